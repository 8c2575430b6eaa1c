"""Real etcd + kube-apiserver (+ GC/namespace controllers) for tests.

Thin wrapper around ``hack/controlplane.sh``; see hack/README.md. Typical fixture::

    require_binaries()                      # skip (or fail under CI=true) without Go
    plane = start(tmp_path_factory.mktemp("controlplane"))
    ...apply CRDs...; plane.restart_controllers()   # GC tracks the CRDs at once
    yield plane.kubeconfig
    plane.stop()
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hack_scripts import HackScriptError, build, require, run, tail

_EXPORT_PREFIX = "export KUBECONFIG="


def _run(
    args: list[str], run_dir: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    return run("controlplane.sh", *args, timeout=timeout, KUBETUNE_CP_DIR=str(run_dir), **env)


@dataclass(frozen=True)
class ControlPlane:
    run_dir: Path
    kubeconfig: Path

    def stop(self) -> None:
        """Stop etcd, kube-apiserver and kube-controller-manager; remove the run dir."""
        proc = _run(["down"], self.run_dir, timeout=60)
        if proc.returncode != 0:
            raise HackScriptError(f"hack/controlplane.sh down failed:\n{tail(proc.stderr)}")

    def restart_controllers(self) -> None:
        """Restart kube-controller-manager so its garbage collector tracks CRDs applied since
        start() at once (it otherwise notices new CRDs only on its 30 s discovery resync)."""
        proc = _run(["restart-kcm"], self.run_dir, timeout=120)
        if proc.returncode != 0:
            raise HackScriptError(f"hack/controlplane.sh restart-kcm failed:\n{tail(proc.stderr)}")

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_binaries() -> None:
    """Build or reuse the binaries (a cold build takes minutes); NoGo without Go and
    nothing cached."""
    build("controlplane.sh")


def require_binaries() -> None:
    """Skip the calling test/fixture when the binaries cannot be had; fail instead under CI=true."""
    require("the real control plane", build_binaries)


def start(run_dir: Path | str, timeout: float = 600) -> ControlPlane:
    """Start a plane in ``run_dir`` (reused if one already runs there).

    The plane is torn down by a watchdog if this process dies without calling stop().
    """
    run_dir = Path(run_dir).resolve()
    proc = _run(["up"], run_dir, timeout=timeout, KUBETUNE_CP_WATCH_PID=str(os.getpid()))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(_EXPORT_PREFIX):
        raise HackScriptError(
            f"hack/controlplane.sh up failed (exit {proc.returncode}):\n{tail(proc.stderr)}"
        )
    kubeconfig = Path(lines[-1].removeprefix(_EXPORT_PREFIX))
    if not kubeconfig.is_file():
        raise HackScriptError(
            f"kubeconfig {kubeconfig} printed by hack/controlplane.sh does not exist"
        )
    return ControlPlane(run_dir=run_dir, kubeconfig=kubeconfig)
