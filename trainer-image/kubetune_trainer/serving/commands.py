"""`kubetune install-guard DIR`: the init container of a server pod copies the guard
module into DIR, which the vLLM container has on its PYTHONPATH; vLLM's image has no
kubetune installed."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from kubetune_trainer.serving import guard


def register(sub: Any) -> None:
    p = sub.add_parser("install-guard", help="copy the vLLM server guard into a folder")
    p.add_argument("folder", help="where the vLLM container's PYTHONPATH looks")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guard.__file__, folder / f"{guard.MODULE}.py")
    return 0
