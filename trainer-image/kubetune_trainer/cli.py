"""`kubetune`: the trainer image's command (validate | convert | train | preflight |
evaluate | fetch | fetch-images | install-guard).

Each command group registers its own subcommands; the training ones import torch
only when they run, so `kubetune validate` starts fast and works without torch. A
command line that names a known command imports only that command's group (the
others cost start-up: logging, threads, the fetch contract); any other, such as
``--help`` or a mistyped command, gets them all.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence

GROUPS: dict[str, tuple[str, ...]] = {
    "kubetune_trainer.data.commands": ("validate", "convert"),
    "kubetune_trainer.training.commands": ("train", "preflight", "evaluate"),
    "kubetune_trainer.transfer": ("fetch",),
    "kubetune_trainer.fetch_images": ("fetch-images",),
    "kubetune_trainer.serving.commands": ("install-guard",),
}
"""Each module with a ``register(sub)`` and the commands it registers, in help order.
Only a shortcut: a command missing here still works, through the full parser."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `kubetune` parser: with only ``command``'s group when that is a known
    command, else with every command."""
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Validate, convert and train on chat-JSONL datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module, commands in GROUPS.items():
        if command is None or command in commands:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Called without ``argv`` (as the process's entry point), a command
    that allows it ends the process here, with its exit code, instead of returning."""
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {c for commands in GROUPS.values() for c in commands}
    command = argv[0] if argv and argv[0] in known else None
    # Imports make objects that live as long as the process: collecting while they are
    # made frees nothing, and cost `kubetune validate` tens of ms of its ~0.1 s start-up.
    collecting = gc.isenabled()
    gc.disable()
    try:
        parser = build_parser(command)
    finally:
        if collecting:
            gc.enable()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    if argv_given is None and getattr(args, "exit_at_once", False):
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> None:
    """End the process now, without the interpreter's teardown (freeing every object and
    module one by one: tens of ms after a large validation, where all was written and
    closed already). For commands that set ``exit_at_once``: no threads, atexit hooks
    or buffers of theirs may be left to finish."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # the interpreter's exit reports it, as it would have
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
