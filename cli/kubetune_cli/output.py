"""What every command prints, the way kubectl prints it: objects as JSON or YAML
(several as a v1 List in JSON, as YAML documents in YAML, so that the output of
``--dry-run=client -o yaml`` applies with ``kubectl apply -f``), tables with
upper-case headers, ages as ``kubectl get`` writes them, API errors by their message,
and ``error: ...`` on stderr. Pure, but for the printing functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

Manifest = dict[str, Any]

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the answer is no: invalid data, a failed run
EXIT_USAGE = 2  # as argparse and kubectl: the call itself was wrong

DRY_RUN_CHOICES = ("none", "client", "server")


class CommandError(Exception):
    """The command cannot do what was asked; the message says why (exit 1)."""

    code = EXIT_FAILED


class UsageError(CommandError):
    """The call itself is wrong (exit 2, as argparse's)."""

    code = EXIT_USAGE


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    """kubectl's ``--dry-run`` (a bare ``--dry-run`` is ``client``, as kubectl once took it)."""
    parser.add_argument(
        "--dry-run",
        nargs="?",
        const="client",
        default="none",
        choices=DRY_RUN_CHOICES,
        help="client: print what would be written (with -o yaml, manifests that `kubectl "
        "apply` takes) and write nothing, to the cluster or to any store; server: also "
        "have the API server admit it (schema and CEL rules) without keeping it",
    )


def render(objects: Sequence[Mapping[str, Any]], output: str) -> str:
    """Objects as ``-o json`` or ``-o yaml`` prints them: one object alone; several as a
    v1 List (json) or as documents separated by ``---`` (yaml)."""
    if output == "json":
        body: Any = objects[0] if len(objects) == 1 else _as_list(objects)
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
    return "---\n".join(
        yaml.dump(dict(o), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16)
        for o in objects
    )


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a JSONL file in a ConfigMap) as literal blocks, a line each,
    as people write them in Git."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _as_list(objects: Sequence[Mapping[str, Any]]) -> Manifest:
    return {"apiVersion": "v1", "kind": "List", "items": [dict(o) for o in objects]}


def for_git(manifest: Mapping[str, Any], namespace: str | None) -> Manifest:
    """A manifest as ``--dry-run=client`` prints it: with a namespace only where -n named
    one, as kubectl's, so that Argo CD or ``kubectl apply -n`` places it."""
    if namespace is not None:
        return dict(manifest)
    meta = {k: v for k, v in manifest["metadata"].items() if k != "namespace"}
    return {**manifest, "metadata": meta}


def print_objects(objects: Sequence[Mapping[str, Any]], output: str) -> None:
    sys.stdout.write(render(objects, output))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns as kubectl get aligns them: upper-case headers, three spaces between
    columns, a missing value as ``<none>``."""
    cells = [[h.upper() for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "<none>"
    return str(value)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """``Name:   value`` lines as kubectl describe writes them; None values left out."""
    shown = [(k, v) for k, v in pairs if v is not None and v != ""]
    if not shown:
        return ""
    width = max(len(k) for k, _ in shown) + 2
    return "".join(f"{(k + ':').ljust(width)}{v}\n" for k, v in shown)


def parse_time(stamp: str | None) -> datetime | None:
    """An RFC 3339 timestamp as the API server writes it, or None."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(stamp: str | None, now: datetime | None = None) -> str:
    """Time since ``stamp`` as ``kubectl get`` writes it (HumanDuration): 42s, 5m10s,
    3h, 2d4h, 8d..."""
    then = parse_time(stamp)
    if then is None:
        return "<unknown>"
    return duration((now or datetime.now(UTC)) - then)


def duration(delta: Any) -> str:
    """k8s.io/apimachinery's HumanDuration, for a timedelta or seconds."""
    seconds = int(delta.total_seconds() if hasattr(delta, "total_seconds") else delta)
    if seconds < 0:
        return "0s"
    if seconds < 60 * 2:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = hours // 24
        rest = days % 365
        return f"{days // 365}y{rest}d" if rest else f"{days // 365}y"
    return f"{hours // 24 // 365}y"


def number(value: Any, digits: int = 4) -> str | None:
    """A float as a table shows it (``0.8123``), None kept."""
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def percent(value: Any) -> str | None:
    """A share between 0 and 1 as a percentage (``92.5%``), None kept."""
    if value is None:
        return None
    return f"{float(value) * 100:.1f}%"


def api_message(exc: Any) -> str:
    """What the API server said in its Status, else the HTTP status and reason."""
    try:
        message = json.loads(exc.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return str(message or f"{exc.status} {exc.reason}")


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
