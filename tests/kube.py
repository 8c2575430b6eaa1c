"""kubectl, as a user runs it, against the test control plane."""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
            )
        return proc

    def apply(
        self, manifest: dict[str, Any] | str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.run("apply", "-f", "-", *args, input=text, check=check)

    def apply_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": data,
        }
        self.apply(secret, "-n", namespace)

    def get(self, *args: str) -> Any:
        return json.loads(self.run("get", *args, "-o", "json").stdout)

    def evict(self, namespace: str, pod: str) -> None:
        """Evict a pod through the Eviction API, as a node drain or a preemption would:
        the API server marks it DisruptionTarget, then deletes it."""
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        }
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction"
        self.run("create", "--raw", path, "-f", "-", input=json.dumps(eviction))

    def new_namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": labels or {}},
            }
        )
        return name

    def install_crds(self) -> None:
        self.run("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        self.run("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
