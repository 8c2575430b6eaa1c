"""Reading a JSONL stream into canonical examples: lines, then JSON, then the format
parsers, then the per-example rules. One pass, one line in memory at a time.

Everything that goes wrong comes back as a line-numbered ``Problem``; only
``read_examples`` (for the trainer, which reads validated files) raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kubetune_trainer.contract.limits import DEFAULT_LIMITS, Limits, Task
from kubetune_trainer.data.example import Example
from kubetune_trainer.data.formats import line_style, parse_record
from kubetune_trainer.data.jsonl import (
    DEFAULT_BUDGET,
    Embedded,
    Hasher,
    Line,
    LineBudget,
    Lookout,
    Shortened,
    decode_line_exact,
    decode_whole,
    iter_lines,
    may_have_lost_digits,
    restore,
)
from kubetune_trainer.data.problems import DatasetError, Problem
from kubetune_trainer.data.rules import example_problems


@dataclass(frozen=True, slots=True)
class Record:
    """A line that parsed into an example. Rule violations found on it come as
    error problems just before it, so that a validator sees both."""

    example: Example
    fingerprint: int
    """A 64-bit hash of the line's bytes, to spot exact duplicate lines cheaply."""
    embedded: dict[str, Embedded] = field(default_factory=dict)
    """With ``iter_records(stand_ins=True)``: the data: URIs that the example's image
    sources stand in for, by those sources, their payloads checked and decoded."""


def iter_records(
    fp: BinaryIO,
    *,
    limits: Limits | None = None,
    task: Task | None = None,
    budget: LineBudget = DEFAULT_BUDGET,
    digest: Hasher | None = None,
    style: str = "auto",
    stand_ins: bool = False,
) -> Iterator[Record | Problem]:
    """Each line's problems, then its ``Record`` if it parsed into an example. A
    ``style`` other than "auto" makes a line written in the other style an error.
    ``budget`` says which lines are too big to check in the memory there is.

    ``stand_ins`` is validation's shortcut: the example of a line without a problem
    may have short stand-ins as the sources of its embedded images, the data: URIs
    they stand for in ``Record.embedded``, checked as base64 and decoded. Nothing but
    the image checks may look at those sources."""
    limits = limits or DEFAULT_LIMITS
    lookout = Lookout()
    for item in iter_lines(fp, budget=budget, digest=digest):
        if isinstance(item, Problem):
            yield item
        else:
            # A function of its own, so that one line's values are gone before the
            # next line is read: two at once could pass the memory budget.
            yield from _read_line(item, limits, task, budget, style, lookout, stand_ins)


def _read_line(
    item: Line,
    limits: Limits,
    task: Task | None,
    budget: LineBudget,
    style: str,
    lookout: Lookout,
    stand_ins: bool,
) -> Iterator[Record | Problem]:
    line = item.number
    too_costly = budget.problem(item.data)
    if too_costly is not None:
        yield Problem(line, too_costly)
        return
    value: Any = None
    shortened = lookout.shortened(item.data)
    if shortened is not None:
        if stand_ins:
            record = _record_with_stand_ins(item, shortened, limits, task, style)
            if record is not None:
                yield record
                return
        # None only where it cannot: a line that holds a data: URI is not null.
        value = restore(shortened, item.data)
        del shortened  # its payloads' bytes: not kept while the line is checked
    json_error = None
    if value is None:
        value, json_error = decode_whole(item.data)
    if json_error is not None:
        yield Problem(line, json_error)
        return
    written = line_style(value) if style != "auto" else None
    if written is not None and written != style:
        yield Problem(line, f"written in the {written} style, but the Dataset's format is {style}")
        return
    parsed = parse_record(value, line)
    if (
        parsed.example is not None
        and parsed.example.extra
        and may_have_lost_digits(parsed.example.extra)
    ):
        # The first reading goes before the second: both at once could pass the
        # line's memory budget.
        del value, parsed
        parsed = parse_record(decode_line_exact(item.data)[0], line)
    for warning in parsed.warnings:
        yield Problem(line, warning, "warning")
    if parsed.example is None:
        for error in parsed.errors:
            yield Problem(line, error)
        return
    for error in example_problems(parsed.example, limits, task):
        yield Problem(line, error)
    # hash() of bytes is SipHash, keyed per process: fine for an in-run set.
    yield Record(parsed.example, hash(item.data))


def _record_with_stand_ins(
    item: Line, shortened: Shortened, limits: Limits, task: Task | None, style: str
) -> Record | None:
    """The line's record with its long data: URIs as stand-ins (``decode_shortened``),
    when the line reads without any problem; else None, and the line is read the
    whole way, which finds the same and says what the problems are (a message could
    quote a stand-in).

    The stand-ins leave the example as the line's would be but for the strings of
    its data: URIs, which nothing here looks into: a data: URI's text is read only by
    the image check (given its bytes instead) and by the rule that a preference pair
    with ``rejected_images`` differs from its chosen side (such a line goes the whole
    way). And only there: each stand-in must be found as the source of one image."""
    value, embedded, error = shortened
    if error is not None:
        return None
    if style != "auto" and line_style(value) not in (None, style):
        return None
    parsed = parse_record(value, item.number)
    example = parsed.example
    if (
        example is None
        or parsed.warnings
        or example.rejected_images is not None
        or (example.extra and may_have_lost_digits(example.extra))
        or sum(ref.source in embedded for ref in example.images) != len(embedded)
        or example_problems(example, limits, task)
    ):
        return None
    return Record(example, hash(item.data), embedded)


def read_examples(
    path: str | Path, limits: Limits | None = None, budget: LineBudget = DEFAULT_BUDGET
) -> Iterator[Example]:
    """Every example of a JSONL file, in any supported format (mixed is fine), with
    ``Example.line`` set. Raises ``DatasetError`` at the first invalid line: the
    trainer reads files that ``kubetune validate`` has accepted, under the same
    ``limits`` (the Dataset's) and the same default budget. Images are not opened
    here; see ``open_image``."""
    with open(path, "rb") as fp:
        for item in iter_records(fp, limits=limits, budget=budget):
            if isinstance(item, Record):
                yield item.example
            elif item.is_error:
                raise DatasetError(item.line, item.message)
