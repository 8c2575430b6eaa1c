"""kstatus, the status Flux and `kubectl wait`-style tools read, computed by
sigs.k8s.io/cli-utils itself (hack/kstatus), and the build of that and the other Go
programs tests run (hack/gotools.sh; see hack/README.md)::

    kstatus(obj)  # {"status": "Current" | "InProgress" | "Failed" | ..., "message": ...}
    require_go_tool("argocd-health")  # a fixture's: its path, or skip (fail under CI=true)
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "hack" / "gotools.sh"
EXIT_NO_GO = 3  # hack/gotools.sh: go missing and no cached binary


class NoGo(Exception):
    """Go is not installed and the program was never built."""


@functools.cache
def go_tool(name: str) -> Path:
    """The program hack/<name>, built on first use (a minute or two with cold Go
    caches), then reused."""
    proc = subprocess.run(
        [str(SCRIPT), "build", name],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if proc.returncode == EXIT_NO_GO:
        raise NoGo(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
        raise RuntimeError(f"hack/gotools.sh build {name} failed (exit {proc.returncode}):\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


def require_go_tool(name: str) -> Path:
    """The program's path; skips the caller without Go, or fails it under CI=true."""
    try:
        return go_tool(name)
    except NoGo as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI requires hack/{name}: {exc}", pytrace=False)
        pytest.skip(str(exc))


def kstatus(obj: dict[str, Any]) -> dict[str, str]:
    """kstatus of ``obj`` (a whole object, as `kubectl get -o json` shows it)."""
    proc = subprocess.run(
        [str(go_tool("kstatus"))],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kstatus failed (exit {proc.returncode}): {proc.stderr.strip()}")
    result: dict[str, str] = json.loads(proc.stdout)
    return result
