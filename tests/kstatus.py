"""kstatus, the status Flux and `kubectl wait`-style tools read, computed by
sigs.k8s.io/cli-utils itself (hack/kstatus), and the build of that and the other Go
programs tests run (hack/gotools.sh; see hack/README.md)::

    kstatus(obj)  # {"status": "Current" | "InProgress" | "Failed" | ..., "message": ...}
    require_go_tool("argocd-health")  # a fixture's: its path, or skip (fail under CI=true)
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import hack_scripts


@functools.cache
def go_tool(name: str) -> Path:
    """The program hack/<name>, built on first use (a minute or two with cold Go
    caches), then reused."""
    return hack_scripts.build("gotools.sh", name, timeout=1200)


def require_go_tool(name: str) -> Path:
    """The program's path; skips the caller without Go, or fails it under CI=true."""
    return hack_scripts.require(f"hack/{name}", lambda: go_tool(name))


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
