"""The tests' side of hack/'s scripts, which build real tools from pinned Go modules
and start them.

Every build script prints what it built (a path) last and exits 3 when Go is missing
and nothing built is cached. A test that needs the tool then skips, and fails instead
under CI=true, where everything must run::

    path = hack_scripts.require("the real Prometheus", lambda: hack_scripts.build("prometheus.sh"))
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

HACK = Path(__file__).resolve().parent.parent / "hack"
EXIT_NO_GO = 3

T = TypeVar("T")


class HackScriptError(RuntimeError):
    """A hack/ script failed or did not finish in time."""


class NoGo(Exception):
    """Go is not installed and the tool was never built."""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(script: str, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """``hack/SCRIPT ARGS...`` with this environment and ``env``; its exit status is the
    caller's to read."""
    try:
        return subprocess.run(
            [str(HACK / script), *args],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HackScriptError(f"hack/{script} {' '.join(args)} timed out after {timeout}s") from exc


def build(script: str, *args: str, timeout: float = 3600) -> Path:
    """``hack/SCRIPT build ARGS...``: the path it prints (a cold build takes minutes)."""
    proc = run(script, "build", *args, timeout=timeout)
    if proc.returncode == EXIT_NO_GO:
        raise NoGo(tail(proc.stderr, 1) or "go is not installed")
    if proc.returncode != 0 or not proc.stdout.strip():
        raise HackScriptError(
            f"hack/{script} build {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{tail(proc.stderr)}"
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def skip_or_fail(needed: str, reason: str) -> NoReturn:
    """Skips the calling test or fixture; fails it instead under CI=true."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI requires {needed}: {reason}", pytrace=False)
    pytest.skip(reason)


def require(needed: str, get: Callable[[], T]) -> T:
    """What ``get`` builds; without Go, skip_or_fail."""
    try:
        return get()
    except NoGo as exc:
        skip_or_fail(needed, str(exc))
