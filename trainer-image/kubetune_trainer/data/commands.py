"""The dataset subcommands of `kubetune`: ``validate`` and ``convert``.

Exit codes: 0 valid (or converted), 1 invalid data, 2 usage error (bad flags,
which argparse handles, or a file or folder that does not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from kubetune_trainer.contract.limits import LIMITS, Limits, checked_limits
from kubetune_trainer.data.convert import STYLES, convert_file
from kubetune_trainer.data.jsonl import DEFAULT_MEMORY_LIMIT, LineBudget
from kubetune_trainer.data.validate import validate_file

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``validate`` and ``convert`` to the `kubetune` command."""
    validate = sub.add_parser(
        "validate",
        help="check a chat-JSONL dataset before any GPU is spent",
        description=(
            "Check every line of a dataset in any supported format. Prints 'line N: message' "
            "per problem and a summary, or a JSON report. Exit 0 valid, 1 invalid, 2 usage error."
        ),
    )
    validate.add_argument("path", help="the JSONL file")
    validate.add_argument(
        "--task", choices=("sft", "dpo"), default="sft", help="what the data is for"
    )
    validate.add_argument(
        "--image-root", help="where relative image paths resolve (default: the file's folder)"
    )
    validate.add_argument("--json", action="store_true", help="print a JSON report")
    validate.add_argument(
        "--deep", action="store_true", help="decode every image fully (default: headers only)"
    )
    validate.add_argument(
        "--format",
        choices=("auto", "placeholder", "content-parts"),
        default="auto",
        help="auto detects the style per line; otherwise a line in the other style is an error",
    )
    validate.add_argument(
        "--summary-file",
        help="also write a JSON summary under 4 KiB here (a container's termination message)",
    )
    _add_limit_flags(validate, counts=True)
    # Nothing is left running or unwritten when it returns (see cli._exit_at_once).
    validate.set_defaults(func=run_validate, exit_at_once=True)

    convert = sub.add_parser(
        "convert",
        help="convert a dataset between the placeholder and content-part styles",
        description="Convert without losing anything; OUT is written only if every line converts.",
    )
    convert.add_argument("input", help="the JSONL file to read")
    convert.add_argument("output", help="the JSONL file to write")
    convert.add_argument("--to", choices=STYLES, required=True, help="the style to write")
    convert.add_argument(
        "--embed-images",
        action="store_true",
        help="turn image paths (and URLs, with --allow-remote-images) into data: URIs",
    )
    convert.add_argument(
        "--image-root", help="where relative image paths resolve (default: the input's folder)"
    )
    _add_limit_flags(convert, counts=False)
    convert.set_defaults(func=run_convert)


def _add_limit_flags(parser: argparse.ArgumentParser, *, counts: bool) -> None:
    if counts:
        parser.add_argument("--min-examples", type=int, default=LIMITS["min_examples"].default)
        parser.add_argument("--max-examples", type=int, default=LIMITS["max_examples"].default)
        parser.add_argument(
            "--max-images-per-example",
            type=int,
            default=LIMITS["max_images_per_example"].default,
        )
    parser.add_argument("--max-image-bytes", type=int, default=LIMITS["max_image_bytes"].default)
    parser.add_argument(
        "--memory-limit",
        type=memory_size,
        default=DEFAULT_MEMORY_LIMIT,
        help=(
            "memory this run may use, in bytes or with a Ki, Mi or Gi suffix (default: 1Gi, "
            "the validation pod's limit); a line that would need more to check is an error"
        ),
    )
    parser.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="allow http(s) image URLs (never to loopback, link-local, private or metadata addresses)",
    )


_SUFFIXES = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def memory_size(text: str) -> int:
    """A memory size as Kubernetes writes it in binary units: 1073741824, 1024Mi, 1Gi."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1Gi or 512Mi")
    return int(match.group(1)) * _SUFFIXES[match.group(2) or ""]


class _BadLimits(Exception):
    """Flags that ``DatasetLimits`` refuses; the message is its first error."""


def _limits(args: argparse.Namespace) -> Limits:
    given = {
        "min_examples": getattr(args, "min_examples", None),
        "max_examples": getattr(args, "max_examples", None),
        "max_images_per_example": getattr(args, "max_images_per_example", None),
        "max_image_bytes": args.max_image_bytes,
        "allow_remote_images": args.allow_remote_images,
    }
    given = {k: v for k, v in given.items() if v is not None}
    limits = checked_limits(given)
    if limits is not None:
        return limits
    # Only flags that might be wrong import pydantic (see contract/limits.py why not always).
    from pydantic import ValidationError

    from kubetune_trainer.contract.job import DatasetLimits

    try:
        return DatasetLimits(**given)
    except ValidationError as exc:
        raise _BadLimits(_first_pydantic_error(exc)) from None


def _usage_error(command: str, message: str) -> int:
    print(f"kubetune {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


_SPARE_HEAP = 16 << 20
_SPARE_HEAP_FROM = 64 << 20  # file size; below it the saving is not worth loading ctypes


def _keep_heap_spare(path: str) -> None:
    """Ask glibc's malloc to keep 16 MiB spare at the top of its heap (``M_TOP_PAD``)
    before a large file is validated.

    Validation allocates and frees a few objects of hundreds of kilobytes per line (the
    line, its data: URIs, their decoded bytes). With the default padding of 128 KiB,
    malloc gives the top of its heap back to the system after most lines and takes it
    again for the next: on 300 MB of embedded images, 40,000 page faults, a third of
    the command's time in a VM. With the spare kept they were 1,500. Memory: the heap
    keeps up to 16 MiB more than it needs. Elsewhere than glibc, nothing is done."""
    try:
        if os.path.getsize(path) < _SPARE_HEAP_FROM:
            return
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_top_pad = -2  # malloc.h
    mallopt(m_top_pad, _SPARE_HEAP)


def run_validate(args: argparse.Namespace) -> int:
    try:
        limits = _limits(args)
    except _BadLimits as exc:
        return _usage_error("validate", str(exc))
    _keep_heap_spare(args.path)
    try:
        report = validate_file(
            args.path,
            task=args.task,
            image_root=args.image_root,
            limits=limits,
            deep=args.deep,
            budget=LineBudget(args.memory_limit),
            style=args.format,
        )
    except OSError as exc:
        message = f"{exc.filename or args.path}: {exc.strerror or exc}"
        if args.summary_file is not None:
            # A usage error, which may take the time to import pydantic.
            from kubetune_trainer.contract.summaries import ValidationSummary, dump

            _write_summary(args.summary_file, dump(ValidationSummary(valid=False, error=message)))
        return _usage_error("validate", message)
    if args.summary_file is not None:
        _write_summary(args.summary_file, report.summary())
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        for line in report.plain_lines(args.path):
            print(line)
    return EXIT_OK if report.valid else EXIT_INVALID


def _write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False)
    except OSError as exc:
        print(f"kubetune validate: cannot write the summary to {path}: {exc}", file=sys.stderr)


def run_convert(args: argparse.Namespace) -> int:
    try:
        limits = _limits(args)
    except _BadLimits as exc:
        return _usage_error("convert", str(exc))
    try:
        result = convert_file(
            args.input,
            args.output,
            args.to,
            embed_images=args.embed_images,
            image_root=args.image_root,
            limits=limits,
            budget=LineBudget(args.memory_limit),
        )
    except OSError as exc:
        return _usage_error("convert", f"{exc.filename or args.input}: {exc.strerror or exc}")
    for problem in (*result.errors, *result.warnings):
        print(problem, file=sys.stderr)
    if not result.ok:
        print(f"{args.input}: not converted, {len(result.errors):,} errors", file=sys.stderr)
        return EXIT_INVALID
    print(f"wrote {result.examples:,} examples to {args.output} ({args.to})")
    return EXIT_OK


def _first_pydantic_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])
