"""JSON Lines at the byte level: split a stream into numbered lines, decode one line,
encode one record.

Memory depends on the longest line allowed, never on the file size, and that
allowance comes from the memory the process may use (``LineBudget``): a line too
long, or holding too many JSON values, for the memory it would take to check is an
error naming the line, not an out-of-memory kill. orjson is used when it is
installed (it parses the long base64 strings of embedded images about twice as fast
as the standard library); both paths accept and reject the same documents. One
difference remains: orjson reads an integer beyond 64 bits as a float. No field
kubetune interprets can hold one; for carried-through metadata the reader re-reads
such a line with the standard library (``may_have_lost_digits``), so convert keeps
every digit.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

from kubetune_trainer.data.problems import Problem

try:  # optional speed-up; behaviour is the same without it
    import orjson
except ImportError:  # pragma: no cover - exercised when orjson is absent
    orjson = None  # type: ignore[assignment]

BOM = b"\xef\xbb\xbf"

MAX_NESTING = 64
"""Deepest nesting of arrays and objects in a line. The chat formats need 6 levels;
the cap keeps every recursive reader and writer of a value (orjson writes 255
levels at most, the standard library fails near 1000) far from its limit."""

DEFAULT_MEMORY_LIMIT = 1 << 30
"""The memory a reader may use unless told otherwise: the validation Job pod's
limit (the operator's ``resources/dataset/validation_job.py``)."""

RESERVED_MEMORY = 160 << 20
"""Memory that is not the line's: the interpreter with the validator's modules
(about 40 MiB), the duplicate table at its 3,000,000-line limit (up to 72 MiB
while it grows), the stored problems and the image check cache."""

BYTE_COST = 5
"""Bytes of memory per byte of an ASCII line without ``\\u`` escapes, with a margin:
the line, its decoded strings and the copies an embedded image's check makes
(measured 4.0: a 40 MiB data: URI line costs 160 MiB)."""

WIDE_BYTE_COST = 10
"""The same for other lines: one character beyond Latin-1 makes a whole string take
4 bytes a character (measured 9.0: a 40 MiB data: URI with one emoji costs 360 MiB,
as does an assistant reply with one that is not valid JSON)."""

VALUE_COST = 160
"""Bytes of memory per JSON value, with a margin, where values are counted as the
line's ``{ [ , :`` bytes (measured at most 145: an image placeholder with its entry
in ``images``; 41 for the ``{}`` of ``[{},{},...]``, 98 for small nested objects)."""

_CHUNK = 4 << 20  # bytes per read


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


class _ReadsInto(Protocol):
    # What every binary stream of the standard library does (files, io.BytesIO, any
    # io.BufferedIOBase), though typing.BinaryIO does not declare it.
    def readinto(self, buffer: bytearray, /) -> int | None: ...


@dataclass(frozen=True, slots=True)
class LineBudget:
    """What one line may cost to read and check, given the memory the process may use.

    A line needs about ``BYTE_COST`` bytes a byte (``WIDE_BYTE_COST`` with non-ASCII
    text or ``\\u`` escapes) plus ``VALUE_COST`` a JSON value (each object, array,
    string and number becomes a Python object). Lines are looked at, by a few C-speed
    scans, only when they are long enough for that to matter: the limits are
    estimates from measurements, set so that the pod is never the one to say no."""

    memory_limit: int = DEFAULT_MEMORY_LIMIT

    @property
    def line_memory(self) -> int:
        return max(self.memory_limit - RESERVED_MEMORY, 0)

    @property
    def max_bytes(self) -> int:
        """The longest line worth holding: an ASCII one, the cheapest kind."""
        return self.line_memory // BYTE_COST

    def too_long(self, wide: bool = False) -> str:
        cap = self.line_memory // (WIDE_BYTE_COST if wide else BYTE_COST)
        kind = "with non-ASCII text or \\u escapes " if wide else ""
        return (
            f"line is longer than {cap:,} bytes, the most one line {kind}may have in "
            f"{_size(self.memory_limit)} of memory; keep large images in files next to the JSONL"
        )

    def problem(self, data: bytes) -> str | None:
        """Why the line ``data`` is too costly to decode and check, or None."""
        if len(data) * (WIDE_BYTE_COST + VALUE_COST) <= self.line_memory:
            return None  # fits whatever it holds
        wide = not data.isascii() or b"\\u" in data
        per_byte = WIDE_BYTE_COST if wide else BYTE_COST
        if len(data) * per_byte > self.line_memory:
            return self.too_long(wide)
        values = sum(data.count(c) for c in (b"{", b"[", b",", b":"))
        need = len(data) * per_byte + values * VALUE_COST
        if need <= self.line_memory:
            return None
        return (
            f"line holds about {values:,} JSON values; reading them would take about "
            f"{_size(need)}, more than one line may use in {_size(self.memory_limit)} of "
            "memory; split the line up"
        )


DEFAULT_BUDGET = LineBudget()


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.4g} {unit}"
    return f"{n:,} bytes"


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line without its line ending (and without the BOM on line 1)."""

    number: int
    data: bytes


def iter_lines(
    fp: BinaryIO, *, budget: LineBudget = DEFAULT_BUDGET, digest: Hasher | None = None
) -> Iterator[Line | Problem]:
    """Yield each line, or a problem for a blank (warning) or over-long (error) line.

    ``digest`` is fed every byte of the file, so one pass gives the file's hash too.
    """
    for number, data in enumerate(_split_lines(fp, budget.max_bytes, digest), 1):
        if data is None:
            yield Problem(number, budget.too_long())
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
    cheaper than ``readline`` on lines of hundreds of kilobytes. The chunks are read
    into one buffer, used again and again, which stays in the CPU's caches: with a
    fresh 4 MiB object for every read, reading, hashing and splitting lines of 300 kB
    took 40% longer. A line that spans chunks is held in pieces, and dropped (not held)
    once it passes the cap."""
    held: list[bytes] = []  # the current line's pieces from earlier chunks
    held_size = 0
    too_long = False
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    readinto = cast(_ReadsInto, fp).readinto
    while size := readinto(buffer):
        chunk = view[:size]
        if digest is not None:
            digest.update(chunk)
        start = 0
        while (end := buffer.find(b"\n", start, size)) != -1:
            if too_long or held_size + end - start > max_line_bytes:
                yield None
            elif held:
                held.append(chunk[start:end].tobytes())
                line, held = b"".join(held), []  # the pieces go before the line is used
                yield line
            else:
                yield chunk[start:end].tobytes()
            held, held_size, too_long = [], 0, False
            start = end + 1
        if start < size and not too_long:
            held_size += size - start
            if held_size > max_line_bytes:
                too_long, held = True, []
            else:
                held.append(chunk[start:].tobytes())
    if too_long:
        yield None
    elif held:
        line, held = b"".join(held), []
        yield line


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A \uD800-\uDFFF escape; only these can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


_TOO_DEEP = f"arrays and objects nest more than {MAX_NESTING} levels deep"


def decode_line(data: bytes) -> tuple[Any, str | None]:
    """Parse one line as strict UTF-8 JSON: ``(value, None)`` or ``(None, message)``.

    orjson parses the common case. It is stricter than the standard library, so when
    it refuses a line the standard library decides, with its messages: the outcome is
    the same whether orjson is installed or not."""
    if orjson is not None:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            return (None, _TOO_DEEP) if _too_deep(data, value) else (value, None)
    return _decode_stdlib(data)


def _too_deep(data: bytes, value: Any) -> bool:
    # Two ways to know, each cheap where the other is not. Counting brackets (two
    # C-speed scans of the bytes) clears a line with no more than MAX_NESTING of them;
    # walking the value costs per value instead. A line of embedded images holds a few
    # dozen values in hundreds of kilobytes, where the scans took a sixth of the
    # validator's time, so the walk goes first, and gives up for the scans once it has
    # looked at more values than they would cost (``_BYTES_PER_VISIT``).
    deeper = _nests_deeper(value, MAX_NESTING, len(data) // _BYTES_PER_VISIT)
    if deeper is not None:
        return deeper
    if data.count(b"[") + data.count(b"{") <= MAX_NESTING:
        return False
    return nests_deeper(value, MAX_NESTING)


_BYTES_PER_VISIT = 32
"""Bytes the two bracket counts get through in the time the walk spends on one value
(measured: 1.4 ns a byte for the counts, 45 ns a number for the walk), so that a walk
that gives up has cost about what the counts cost."""


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` (decoded JSON) nest more than ``limit``
    levels deep. Without recursion, and with memory for ``limit`` iterators at most;
    exact type tests and skipping empty containers make it a few times faster on
    lines of millions of tiny values."""
    return _nests_deeper(value, limit, sys.maxsize) is True


def _nests_deeper(value: Any, limit: int, budget: int) -> bool | None:
    """``nests_deeper``, or None once it would look at more than ``budget`` values."""
    if type(value) is not dict and type(value) is not list:
        return False
    budget -= len(value)
    if budget < 0:
        return None
    stack = [iter(value.values() if type(value) is dict else value)]
    while stack:
        for child in stack[-1]:
            kind = type(child)
            if kind is dict or kind is list:
                if len(stack) >= limit:
                    return True
                if child:
                    budget -= len(child)
                    if budget < 0:
                        return None
                    stack.append(iter(child.values() if kind is dict else child))
                    break
        else:
            stack.pop()
    return False


def may_have_lost_digits(value: Any) -> bool:
    """Whether ``value`` holds a float that orjson may have made from an integer too
    big for 64 bits (it does that silently); then the line is worth re-reading with
    ``decode_line_exact``. Walked like ``nests_deeper``."""
    stack = [iter((value,))]
    while stack:
        for item in stack[-1]:
            kind = type(item)
            if kind is float:
                if abs(item) >= 2.0**63:
                    return True
            elif kind is dict or kind is list or kind is tuple:
                stack.append(iter(item.values() if kind is dict else item))
                break
        else:
            stack.pop()
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
    except RecursionError:
        return None, _TOO_DEEP
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"
    if _too_deep(data, value):
        return None, _TOO_DEEP
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
