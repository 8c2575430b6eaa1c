"""The `kubectl-kubetune` entry point: kubectl's global options, then one command
group per module (datasets, jobs, serving, chat), each adding its own parsers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubetune_cli import chat, datasets, jobs, serving
from kubetune_cli.context import Context, global_options
from kubetune_cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, api_message, error

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main", "parser"]

EXAMPLES = """\
examples:
  kubectl kubetune dataset create shapes -f shapes.jsonl --wait
  kubectl kubetune job create shapes-lora --base-model pvc://models/qwen2.5-vl \\
      --dataset shapes --deploy --follow
  kubectl kubetune chat shapes-lora "What is in this picture?" --image photo.png
"""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="kubectl kubetune",
        parents=[global_options(defaults=True)],
        description="Fine-tune, evaluate and serve models on a kubetune cluster.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (datasets, jobs, serving, chat):
        module.register(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    args = parser().parse_args(argv)
    try:
        context = Context.from_args(args)
        code: int = args.run(args, context)
    except CommandError as exc:
        error(str(exc))
        return exc.code
    except ConfigException as exc:
        error(f"kubeconfig: {exc}")
        return EXIT_FAILED
    except ApiException as exc:
        error(api_message(exc))
        return EXIT_FAILED
    except HTTPError as exc:
        # As kubectl says it: the server named in the kubeconfig did not answer.
        error(f"cannot reach the API server: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
