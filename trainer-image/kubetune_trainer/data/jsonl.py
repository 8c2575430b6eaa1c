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
every digit. With pybase64 installed, the long base64 payloads of a line's data: URIs
do not go through the JSON parser at all: they are checked and decoded by pybase64,
several times faster, and the rest of the line is parsed around them
(``decode_shortened``), with the same outcome.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, NamedTuple, Protocol, cast

from kubetune_trainer.data.problems import Problem

try:  # optional speed-up; behaviour is the same without it
    import orjson
except ImportError:  # pragma: no cover - exercised when orjson is absent
    orjson = None  # type: ignore[assignment]

try:  # optional speed-up (SIMD base64): see ``decode_shortened``
    import pybase64
except ImportError:  # pragma: no cover - exercised when pybase64 is absent
    pybase64 = None  # type: ignore[assignment]

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

_CHUNK = 512 << 10
"""Bytes per read: a buffer that a core's L2 cache holds (512 KiB to 2 MiB on current
x86 servers), so that hashing and splitting read what the read just wrote from there.
Against 4 MiB chunks, on lines of 300 kB of embedded images (most of which then span
two chunks, and are joined from pieces): 5-10% less time for the whole validation."""


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
    into one buffer, used again and again, which stays in the CPU's caches
    (``_CHUNK``): with a fresh 4 MiB object for every read, reading, hashing and
    splitting lines of 300 kB took 40% longer. A line that spans chunks is held in
    pieces, and dropped (not held) once it passes the cap."""
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
    the same whether orjson is installed or not. A long line's embedded base64
    images are kept out of the parser where that gives the same value
    (``decode_shortened``), then put back (``restore``)."""
    shortened = decode_shortened(data)
    if shortened is not None:
        value = restore(shortened, data)
        if value is not None:
            return value, None
    return decode_whole(data)


def decode_whole(data: bytes) -> tuple[Any, str | None]:
    """``decode_line`` without looking for data: URIs to take out."""
    if orjson is not None:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            return (None, _TOO_DEEP) if _too_deep(data, value) else (value, None)
    return _decode_stdlib(data)


# --- long base64 payloads kept out of the JSON parser ---------------------------------

MIN_TAKEN_OUT = 4096
"""Shortest base64 payload worth taking out of a line before it is parsed."""

_MAX_HEAD = 256
"""Longest ``data:<mime>;<params>;base64,`` head looked back for from ``;base64,``."""

_BASE64_MARK = b";base64,"

_NONCE = os.urandom(12).hex()
"""Part of each text that stands in for a payload while its line is parsed: random
per process, so that no file can hold it (and be misread) but by a 1 in 2**96 chance."""


@dataclass(frozen=True, slots=True)
class Embedded:
    """A data: URI whose base64 payload was taken out of its line (``decode_shortened``)
    and checked: where it was, and its payload's bytes."""

    start: int  # the offset of its "data:" in the line, just after the opening quote
    end: int  # the offset of its closing quote
    decoded: bytes

    @property
    def length(self) -> int:
        """The data: URI's length in characters (it is ASCII)."""
        return self.end - self.start


class Shortened(NamedTuple):
    """A line parsed with its long base64 payloads taken out (``decode_shortened``)."""

    value: Any
    """The line's value, where each string that held a data: URI so shortened holds
    the string that stands in for it; None if ``error``."""
    embedded: dict[str, Embedded]
    """The data: URIs taken out, by the strings that stand in for them."""
    error: str | None
    """Why the shortened line is not valid JSON (nor, then, the line; its parse says
    why in its own words)."""


def decode_shortened(data: bytes) -> Shortened | None:
    """The line ``data`` parsed with the long base64 payload of each
    ``"data:...;base64,<payload>"`` string replaced by a short stand-in (the string
    becomes ``data:...;base64,<stand-in>``); None when pybase64 is absent or there is
    nothing to take out.

    The JSON parser reads a string several times slower than pybase64 checks and
    decodes base64 (orjson at ~2 GB/s against ~11 GB/s), and on lines of embedded
    images that parse was a sixth of the validator's time. What comes out is the
    whole line's value but for the stand-ins:

    * a payload taken out is strict base64 (pybase64 checks it, as
      ``images.base64_problem`` defines it: the alphabet, then at most two ``=``) and
      ends at a ``"``; its head is ASCII without ``\\``, ``"`` or a second ``,``. So
      the line's strings begin and end at the same places with the stand-in (of the
      same kind of characters) as with the payload: only ``"``, ``\\``, control and
      non-ASCII bytes could change where, or whether the line is valid JSON;
    * so the shortened line parses (orjson, or the standard library) exactly when the
      line does, into the same structure, where each string that held a data: URI
      holds its stand-in string instead, and no other string holds one. A stand-in
      that is not a value's whole string (a key; the end of a longer string whose
      ``"data:`` was escaped) stands for something else than a data: URI: whoever
      uses the value makes sure that each is found once where a data: URI may be
      (``restore``, or the reader's count of image sources)."""
    if pybase64 is None or len(data) < MIN_TAKEN_OUT:
        return None
    spans = _payload_spans(data)
    if not spans:
        return None
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    embedded: dict[str, Embedded] = {}
    last = 0
    for i, (head, start, end, decoded) in enumerate(spans):
        stand_in = f"{_NONCE}{i}"
        pieces += (view[last:start], stand_in.encode("ascii"))
        embedded[str(view[head:start], "ascii") + stand_in] = Embedded(head, end, decoded)
        last = end
    pieces.append(view[last:])
    value, error = decode_whole(b"".join(pieces))
    return Shortened(value, embedded, error)


def restore(shortened: Shortened, data: bytes) -> Any | None:
    """The value of the line ``data`` from its ``decode_shortened``: each stand-in put
    back in place (the value is changed in place). None if the shortened line did not
    parse, or a stand-in is not found once as a value's whole string: then the line
    is to be parsed whole."""
    if shortened.error is not None:
        return None
    root = [shortened.value]
    if _put_back(root, shortened.embedded, data) != len(shortened.embedded):
        return None
    return root[0]


@dataclass(slots=True)
class Lookout:
    """Which long lines of a file to search for data: URIs to take out
    (``decode_shortened``). The search is a pass over the line at ~2 GB/s, which on
    long lines of text alone added a fifth to their reading. So every long line is
    searched while lines hold such URIs; after ``QUIET`` long lines in a row without
    one, one long line in ``QUIET``, until one does again."""

    QUIET: ClassVar[int] = 16
    quiet: int = 0  # searched lines in a row without one
    lines: int = 0  # long lines seen

    def shortened(self, data: bytes) -> Shortened | None:
        """``decode_shortened(data)`` if the line is worth searching, else None."""
        if pybase64 is None or len(data) < MIN_TAKEN_OUT:
            return None
        self.lines += 1
        if self.quiet >= self.QUIET and self.lines % self.QUIET:
            return None
        shortened = decode_shortened(data)
        self.quiet = 0 if shortened is not None else self.quiet + 1
        return shortened


def _payload_spans(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """``(head, payload, end, bytes)`` of each long, strict base64 payload of a string
    that starts ``"data:``, in line order: the offsets of "data:", of the payload and
    of the closing quote, and the payload's bytes."""
    spans = []
    view = memoryview(data)
    mark = data.find(_BASE64_MARK)
    while mark != -1:
        start = mark + len(_BASE64_MARK)
        end = data.find(b'"', start)
        if end == -1:
            break
        if end - start >= MIN_TAKEN_OUT:
            quote = data.rfind(b'"', max(0, mark - _MAX_HEAD), mark)
            if (
                quote != -1
                and data.startswith(b"data:", quote + 1)
                and data.find(b"\\", quote, mark) == -1
                and data.find(b",", quote, mark) == -1
                and data[quote + 1 : mark].isascii()
            ):
                decoded = _strict_base64(view[start:end])
                if decoded is not None:
                    spans.append((quote + 1, start, end, decoded))
        mark = data.find(_BASE64_MARK, end)
    return spans


def _strict_base64(payload: memoryview) -> bytes | None:
    """The bytes of ``payload`` if it is strict standard base64 (as
    ``images.base64_problem`` defines it), by pybase64's SIMD decoder; else None."""
    size = len(payload)
    if not size or size % 4:
        return None
    try:
        decoded: bytes = pybase64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error
        return None
    padding = (payload[-1] == 61) + (payload[-2] == 61)  # '='
    return decoded if len(decoded) == size // 4 * 3 - padding else None


def _put_back(root: list[Any], embedded: dict[str, Embedded], data: bytes) -> int:
    """Replace each string among ``root``'s values that stands in for a data: URI by
    that data: URI; how many were replaced."""
    view = memoryview(data)
    found = 0
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        for key, child in node.items() if type(node) is dict else enumerate(node):
            kind = type(child)
            if kind is str:
                if child.startswith("data:") and child in embedded:
                    uri = embedded[child]
                    node[key] = str(view[uri.start : uri.end], "ascii")
                    found += 1
            elif (kind is dict or kind is list) and child:
                stack.append(child)
    return found


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
