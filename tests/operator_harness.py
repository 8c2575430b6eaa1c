"""Run the real operator (under the chart's RBAC) against the test control plane."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kube import ROOT, Kubectl

CHART_FILES = ROOT / "charts" / "kubetune" / "files"
OPERATOR_SA = "kubetune-operator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operator_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for name in ("operator-rules.yaml", "operator-cluster-rules.yaml"):
        rules += yaml.safe_load((CHART_FILES / name).read_text())
    return rules


def restricted_kubeconfig(kubectl: Kubectl, namespace: str, out: Path) -> Path:
    """A kubeconfig for a ServiceAccount bound to exactly the chart's ClusterRole."""
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": OPERATOR_SA, "namespace": namespace},
        }
    )
    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": f"{OPERATOR_SA}-{namespace}"},
            "rules": operator_rules(),
        }
    )
    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{OPERATOR_SA}-{namespace}"},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}],
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"{OPERATOR_SA}-{namespace}",
            },
        }
    )
    token = kubectl.run(
        "create", "token", OPERATOR_SA, "-n", namespace, "--duration", "2h"
    ).stdout.strip()
    admin = yaml.safe_load(kubectl.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [
            {"name": OPERATOR_SA, "context": {"cluster": cluster["name"], "user": OPERATOR_SA}}
        ],
        "current-context": OPERATOR_SA,
    }
    out.write_text(yaml.safe_dump(config))
    return out


@dataclass
class Operator:
    """`python -m kubetune_operator` as a child process."""

    kubeconfig: Path
    namespaces: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        self.metrics_port = free_port()
        health = free_port()
        args = [
            sys.executable,
            "-m",
            "kubetune_operator",
            "--standalone",
            "--metrics-port",
            str(self.metrics_port),
            "--liveness",
            f"http://127.0.0.1:{health}/healthz",
            "--verbose",
        ]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_RESYNC_SECONDS": "2",
            # Long enough for a test to apply a missing Secret, short enough to see a
            # run fail without it.
            "KUBETUNE_START_GRACE_SECONDS": "20",
            "KUBETUNE_ADMIN_KEY": "test-admin-key",
            **self.env,
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the operator exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the operator did not become live:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to tidy up."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as resp:
            text: str = resp.read().decode()
            return text

    def tail(self, lines: int = 60) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
            if self.log.exists()
            else ""
        )


def wait_for(
    predicate: Any, timeout: float, what: str, interval: float = 0.5, on_timeout: Any = None
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{on_timeout()}" if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}{extra}")
