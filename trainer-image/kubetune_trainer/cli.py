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
import importlib
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
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {c for commands in GROUPS.values() for c in commands}
    command = argv[0] if argv and argv[0] in known else None
    args = build_parser(command).parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
