"""JSON Lines at the byte level: split a stream into numbered lines, decode one line,
encode one record.

Lines are read with a length cap, so memory depends on the longest line allowed,
never on the file size. orjson is used when it is installed (it parses the long
base64 strings of embedded images about twice as fast as the standard library);
both paths accept and reject the same documents. One difference remains: orjson
reads an integer beyond 64 bits as a float. No field kubetune interprets can hold
one; for carried-through metadata the reader re-reads such a line with the
standard library (``may_have_lost_digits``), so convert keeps every digit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from kubetune_trainer.data.problems import Problem

try:  # optional speed-up; behaviour is the same without it
    import orjson
except ImportError:  # pragma: no cover - exercised when orjson is absent
    orjson = None  # type: ignore[assignment]

BOM = b"\xef\xbb\xbf"

DEFAULT_MAX_LINE_BYTES = 256 * 1024 * 1024
"""Longest line read. A line is one example, so this bounds the memory one example
may take; embedded images beyond it should be files next to the JSONL instead."""

_CHUNK = 4 << 20  # bytes per read


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line without its line ending (and without the BOM on line 1)."""

    number: int
    data: bytes


def iter_lines(
    fp: BinaryIO, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, digest: Hasher | None = None
) -> Iterator[Line | Problem]:
    """Yield each line, or a problem for a blank (warning) or over-long (error) line.

    ``digest`` is fed every byte of the file, so one pass gives the file's hash too.
    """
    for number, data in enumerate(_split_lines(fp, max_line_bytes, digest), 1):
        if data is None:
            yield Problem(
                number, f"line is longer than {max_line_bytes:,} bytes; keep large images in files"
            )
            continue
        if number == 1 and data.startswith(BOM):
            data = data[len(BOM) :]
        if data.endswith(b"\r"):
            data = data[:-1]
        if not data.strip():
            yield Problem(number, "blank line skipped", "warning")
            continue
        yield Line(number, data)


def _split_lines(
    fp: BinaryIO, max_line_bytes: int, digest: Hasher | None
) -> Iterator[bytes | None]:
    """Each line's bytes without the newline, or None for a line over the cap.

    Reads big chunks and splits them itself: lines are found with one C-speed
    ``find`` each and the hash is fed a few large buffers, which is several times
    cheaper than ``readline`` on lines of hundreds of kilobytes. A line that spans
    chunks is held in pieces, and dropped (not held) once it passes the cap."""
    held: list[bytes] = []  # the current line's pieces from earlier chunks
    held_size = 0
    too_long = False
    while chunk := fp.read(_CHUNK):
        if digest is not None:
            digest.update(chunk)
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            if too_long or held_size + end - start > max_line_bytes:
                yield None
            elif held:
                held.append(chunk[start:end])
                yield b"".join(held)
            else:
                yield chunk[start:end]
            held, held_size, too_long = [], 0, False
            start = end + 1
        if start < len(chunk) and not too_long:
            held_size += len(chunk) - start
            if held_size > max_line_bytes:
                too_long, held = True, []
            else:
                held.append(chunk[start:])
    if too_long:
        yield None
    elif held:
        yield b"".join(held)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A \uD800-\uDFFF escape; only these can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_line(data: bytes) -> tuple[Any, str | None]:
    """Parse one line as strict UTF-8 JSON: ``(value, None)`` or ``(None, message)``.

    orjson parses the common case. It is stricter than the standard library, so when
    it refuses a line the standard library decides, with its messages: the outcome is
    the same whether orjson is installed or not."""
    if orjson is not None:
        try:
            return orjson.loads(data), None
        except orjson.JSONDecodeError:
            pass
    return _decode_stdlib(data)


def may_have_lost_digits(value: Any) -> bool:
    """Whether ``value`` holds a float that orjson may have made from an integer too
    big for 64 bits (it does that silently); then the line is worth re-reading with
    ``decode_line_exact``."""
    if isinstance(value, float):
        return abs(value) >= 2.0**63
    if isinstance(value, dict):
        return any(may_have_lost_digits(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(may_have_lost_digits(v) for v in value)
    return False


def decode_line_exact(data: bytes) -> tuple[Any, str | None]:
    """``decode_line`` with the standard library only: integers of any size."""
    return _decode_stdlib(data)


def _decode_stdlib(data: bytes) -> tuple[Any, str | None]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 at byte {exc.start + 1}"
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON at column {exc.colno}: {exc.msg}"
    except (ValueError, RecursionError) as exc:
        return None, f"invalid JSON: {exc}"
    # A lone surrogate is an escape that decodes to no character; refuse it so that
    # every accepted line can be written back out as UTF-8.
    if _SURROGATE_ESCAPE.search(data):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "a JSON string holds a lone UTF-16 surrogate escape"
    return value, None


def encode_record(record: dict[str, Any]) -> bytes:
    """One JSON object as a line of UTF-8 (without the newline)."""
    if orjson is not None:
        try:
            return bytes(orjson.dumps(record))
        except TypeError:
            pass  # values orjson cannot encode (ints over 64 bits): the slow path below
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
