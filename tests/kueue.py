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

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "hack" / "kueue.sh"
EXIT_NO_GO = 3  # hack/kueue.sh: go missing and no cached binary
EXIT_NO_METRICS_CERT_DIR = 4  # hack/kueue.sh: /etc/kueue/metrics/certs not writable
_EXPORT_PREFIX = "export KUBETUNE_KUEUE_DIR="


class KueueError(RuntimeError):
    """Kueue could not be built, started or stopped."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    args: list[str], run_dir: Path | None, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **env)
    if run_dir is not None:
        full_env["KUBETUNE_KUEUE_DIR"] = str(run_dir)
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
        raise KueueError(f"hack/kueue.sh {' '.join(args)} timed out after {timeout}s") from exc


@dataclass(frozen=True)
class Kueue:
    run_dir: Path
    kubeconfig: Path

    @property
    def log(self) -> Path:
        return self.run_dir / "kueue.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the manager's log, for failure messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return f"---- last lines of {self.log} ----\n{_tail(text, lines)}"

    def stop(self) -> None:
        """Remove Kueue's webhook configurations from the plane, stop the manager and
        remove the run dir. Kueue's CRDs and objects stay."""
        proc = _run(["down"], self.run_dir, timeout=60)
        if proc.returncode != 0:
            raise KueueError(f"hack/kueue.sh down failed:\n{_tail(proc.stderr)}")

    def __enter__(self) -> Kueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_binaries(timeout: float = 3600) -> bool | str:
    """Build or reuse the kueue binary (a cold build takes minutes).

    Returns True when it is available, or a one-line reason when Go is missing and
    nothing is cached. Raises KueueError when the build itself fails.
    """
    proc = _run(["build"], None, timeout=timeout)
    if proc.returncode == 0:
        return True
    if proc.returncode == EXIT_NO_GO:
        return (
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "go is not installed"
        )
    raise KueueError(f"hack/kueue.sh build failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI requires the real Kueue: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binaries() -> None:
    """Skip the calling test/fixture when Kueue cannot be had; fail instead under CI=true."""
    result = ensure_binaries()
    if result is not True:
        _skip_or_fail(result if isinstance(result, str) else "kueue binary unavailable")


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
        _skip_or_fail(_tail(proc.stderr, 3))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(_EXPORT_PREFIX):
        raise KueueError(f"hack/kueue.sh up failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")
    return Kueue(run_dir=Path(lines[-1].removeprefix(_EXPORT_PREFIX)), kubeconfig=kubeconfig)
