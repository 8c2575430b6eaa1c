"""The real Kueue controller manager (sigs.k8s.io/kueue) next to the test control plane.

Thin wrapper around ``hack/kueue.sh``; see hack/README.md. Typical fixture::

    kueue.require_binaries()                      # skip (or fail under CI=true) without Go
    handle = kueue.start(plane.kubeconfig, tmp_path_factory.mktemp("kueue"))
    plane.restart_controllers()                   # the GC then collects Workloads at once
    yield handle
    handle.stop()                                 # also removes Kueue's webhooks from the plane
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hack_scripts import EXIT_NO_GO, HackScriptError, build, require, run, skip_or_fail, tail

EXIT_NO_METRICS_CERT_DIR = 4  # hack/kueue.sh: /etc/kueue/metrics/certs not writable
NEEDED = "the real Kueue"
_EXPORT_PREFIX = "export KUBETUNE_KUEUE_DIR="


def _run(
    args: list[str], run_dir: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    return run("kueue.sh", *args, timeout=timeout, KUBETUNE_KUEUE_DIR=str(run_dir), **env)


@dataclass(frozen=True)
class Kueue:
    run_dir: Path
    kubeconfig: Path

    def stop(self) -> None:
        """Remove Kueue's webhook configurations from the plane, stop the manager and
        remove the run dir. Kueue's CRDs and objects stay."""
        proc = _run(["down"], self.run_dir, timeout=60)
        if proc.returncode != 0:
            raise HackScriptError(f"hack/kueue.sh down failed:\n{tail(proc.stderr)}")

    def __enter__(self) -> Kueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_binary() -> None:
    """Build or reuse the kueue binary (a cold build takes minutes); NoGo without Go and
    nothing cached."""
    build("kueue.sh")


def require_binaries() -> None:
    """Skip the calling test/fixture when Kueue cannot be had; fail instead under CI=true."""
    require(NEEDED, build_binary)


def start(
    kubeconfig: Path | str,
    run_dir: Path | str,
    timeout: float = 600,
    manage_all_in: str | None = None,
) -> Kueue:
    """Start Kueue against the plane of ``kubeconfig`` with its state in ``run_dir``
    (reused if one already runs there): CRDs, webhooks, manager. With
    ``manage_all_in`` (a namespace label, ``key=value``), Kueue also manages the Jobs
    without a queue-name label in the namespaces so labelled.

    A watchdog stops it if this process dies without calling stop(). Skips (or fails
    under CI=true) when the host lacks a prerequisite that hack/kueue.sh names.
    """
    run_dir = Path(run_dir).resolve()
    kubeconfig = Path(kubeconfig).resolve()
    managed = (
        {"KUBETUNE_KUEUE_MANAGE_ALL": "true", "KUBETUNE_KUEUE_NAMESPACE_LABEL": manage_all_in}
        if manage_all_in
        else {}
    )
    proc = _run(
        ["up"],
        run_dir,
        timeout=timeout,
        KUBECONFIG=str(kubeconfig),
        KUBETUNE_KUEUE_WATCH_PID=str(os.getpid()),
        **managed,
    )
    if proc.returncode in (EXIT_NO_GO, EXIT_NO_METRICS_CERT_DIR):
        skip_or_fail(NEEDED, tail(proc.stderr, 3))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(_EXPORT_PREFIX):
        raise HackScriptError(
            f"hack/kueue.sh up failed (exit {proc.returncode}):\n{tail(proc.stderr)}"
        )
    return Kueue(run_dir=Path(lines[-1].removeprefix(_EXPORT_PREFIX)), kubeconfig=kubeconfig)
