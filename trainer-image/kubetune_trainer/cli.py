"""`kubetune`: the trainer image's command (validate | convert | train | preflight |
evaluate | fetch | fetch-images | install-guard).

Each command group registers its own subcommands; the training ones import torch
only when they run, so `kubetune validate` starts fast and works without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubetune_trainer import fetch_images, transfer
from kubetune_trainer.data import commands as data_commands
from kubetune_trainer.serving import commands as serving_commands
from kubetune_trainer.training import commands as training_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Validate, convert and train on chat-JSONL datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_commands.register(sub)
    training_commands.register(sub)
    transfer.register(sub)
    fetch_images.register(sub)
    serving_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
