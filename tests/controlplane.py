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

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "hack" / "controlplane.sh"
EXIT_NO_GO = 3  # hack/controlplane.sh: go missing and no cached binaries
_EXPORT_PREFIX = "export KUBECONFIG="


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or stopped."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    args: list[str], run_dir: Path | None, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **env)
    if run_dir is not None:
        full_env["KUBETUNE_CP_DIR"] = str(run_dir)
    try:
        return subprocess.run(
            [str(SCRIPT), *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError(
            f"hack/controlplane.sh {' '.join(args)} timed out after {timeout}s"
        ) from exc


@dataclass(frozen=True)
class ControlPlane:
    run_dir: Path
    kubeconfig: Path

    def stop(self) -> None:
        """Stop etcd, kube-apiserver and kube-controller-manager; remove the run dir."""
        proc = _run(["down"], self.run_dir, timeout=60)
        if proc.returncode != 0:
            raise ControlPlaneError(f"hack/controlplane.sh down failed:\n{_tail(proc.stderr)}")

    def restart_controllers(self) -> None:
        """Restart kube-controller-manager so its garbage collector tracks CRDs applied since
        start() at once (it otherwise notices new CRDs only on its 30 s discovery resync)."""
        proc = _run(["restart-kcm"], self.run_dir, timeout=120)
        if proc.returncode != 0:
            raise ControlPlaneError(
                f"hack/controlplane.sh restart-kcm failed:\n{_tail(proc.stderr)}"
            )

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_binaries(timeout: float = 3600) -> bool | str:
    """Build or reuse the binaries (a cold build takes minutes).

    Returns True when they are available, or a one-line reason when Go is missing and
    nothing is cached. Raises ControlPlaneError when the build itself fails.
    """
    proc = _run(["build"], None, timeout=timeout)
    if proc.returncode == 0:
        return True
    if proc.returncode == EXIT_NO_GO:
        return (
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "go is not installed"
        )
    raise ControlPlaneError(
        f"hack/controlplane.sh build failed (exit {proc.returncode}):\n{_tail(proc.stderr)}"
    )


def require_binaries() -> None:
    """Skip the calling test/fixture when the binaries cannot be had; fail instead under CI=true."""
    result = ensure_binaries()
    if result is True:
        return
    reason = result if isinstance(result, str) else "control-plane binaries unavailable"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI requires the real control plane: {reason}", pytrace=False)
    pytest.skip(reason)


def start(run_dir: Path | str, timeout: float = 600) -> ControlPlane:
    """Start a plane in ``run_dir`` (reused if one already runs there).

    The plane is torn down by a watchdog if this process dies without calling stop().
    """
    run_dir = Path(run_dir).resolve()
    proc = _run(["up"], run_dir, timeout=timeout, KUBETUNE_CP_WATCH_PID=str(os.getpid()))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(_EXPORT_PREFIX):
        raise ControlPlaneError(
            f"hack/controlplane.sh up failed (exit {proc.returncode}):\n{_tail(proc.stderr)}"
        )
    kubeconfig = Path(lines[-1].removeprefix(_EXPORT_PREFIX))
    if not kubeconfig.is_file():
        raise ControlPlaneError(
            f"kubeconfig {kubeconfig} printed by hack/controlplane.sh does not exist"
        )
    return ControlPlane(run_dir=run_dir, kubeconfig=kubeconfig)
