"""`kubetune validate`: one streaming pass over a JSONL file that checks every rule
and produces a report (the JSON the operator stores in the Dataset status).

Memory stays flat whatever the file size: one line at a time, and no line costlier
than the memory allows (``jsonl.LineBudget``); 12 bytes per distinct line for
duplicate detection (bounded, see ``duplicates.py``); at most ``MAX_REPORTED``
stored errors and warnings, of ``MAX_MESSAGE`` characters at most; and a small
cache of image checks.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kubetune_trainer.contract.limits import DEFAULT_LIMITS, TERMINATION_LIMIT, Limits, Task
from kubetune_trainer.data.duplicates import DEFAULT_LIMIT, FingerprintTable
from kubetune_trainer.data.example import ImageRef
from kubetune_trainer.data.images import (
    ImageCheck,
    check_image,
    describe,
    remote_images_sha256,
    resolve_image_root,
)
from kubetune_trainer.data.jsonl import DEFAULT_BUDGET, LineBudget
from kubetune_trainer.data.problems import FILE_LINE, Problem
from kubetune_trainer.data.reader import Record, iter_records
from kubetune_trainer.data.rules import count_problem

MAX_REPORTED = 1000
"""Errors (and, separately, warnings) kept in the report; the rest are only counted."""

MAX_MESSAGE = 1024
"""Longest message kept in the report: a message may quote the line (a key, a path),
and a thousand of them must not add up to a line's worth of memory each."""

_IMAGE_CACHE_SIZE = 1024  # path and URL checks; repeated images are common
_CACHED_SOURCE = 4096  # longer sources are checked afresh: the cache keeps its keys


@dataclass(frozen=True, slots=True)
class ValidationReport:
    valid: bool
    examples: int
    images: int
    text_only_examples: int
    # http(s) image URLs, fetched again before a run, which checks them against the digest.
    remote_images: int
    remote_images_sha256: str | None
    sha256: str
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    error_count: int
    warning_count: int

    # The report is ``contract.summaries.ValidationSummary`` as ``dump`` writes it, made
    # here from this dataclass's fields (the same names) so that the command does not
    # import pydantic (see contract/limits.py why). The operator reads it with that
    # model; tests/data/test_data_report_shape.py holds the two to the same JSON.

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` report (camelCase, as the Dataset status spells it)."""
        return self._report()

    def summary(self, max_bytes: int = TERMINATION_LIMIT, max_each: int = 20) -> dict[str, Any]:
        """The report cut to fit a container termination message: the counts and as
        many of the first errors, then of the first warnings, as fit (warnings go
        first when something must)."""
        report = self._report()
        errors = [_line_problem(e.line, e.message[:512]) for e in self.errors[:max_each]]
        warnings = [_line_problem(w.line, w.message[:256]) for w in self.warnings[:max_each]]
        while True:
            cut = {**report, "errors": errors, "warnings": warnings}
            if len(json.dumps(cut).encode()) <= max_bytes or not (errors or warnings):
                return cut
            if warnings:
                warnings = warnings[:-1]
            else:
                errors = errors[:-1]

    def _report(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("errors", "warnings"):
                value = [_line_problem(p.line, p.message) for p in value]
            report[_camel(f.name)] = value
        report["truncatedErrors"] = self.error_count - len(self.errors)
        report["truncatedWarnings"] = self.warning_count - len(self.warnings)
        return report

    def plain_lines(self, name: str) -> Iterator[str]:
        """The plain output: ``line N: message`` per problem in line order, then a summary."""
        problems = sorted(
            (*self.errors, *self.warnings), key=lambda p: (p.line == FILE_LINE, p.line)
        )
        for problem in problems:
            yield str(problem)
        hidden = self.error_count + self.warning_count - len(problems)
        if hidden:
            yield f"... and {hidden:,} more problems (the first {MAX_REPORTED:,} of each kind are shown)"
        verdict = "valid" if self.valid else "INVALID"
        yield (
            f"{name}: {verdict}: {self.examples:,} examples ({self.text_only_examples:,} text-only), "
            f"{self.images:,} images, {self.error_count:,} errors, {self.warning_count:,} warnings; "
            f"sha256 {self.sha256}"
        )


def _line_problem(line: int, message: str) -> dict[str, Any]:
    return {"line": line, "message": message}


def _camel(name: str) -> str:
    """``pydantic.alias_generators.to_camel`` for the snake_case names of this module."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


@dataclass
class _Tally:
    """The running counts of one validation pass (the only mutable state)."""

    examples: int = 0
    images: int = 0
    text_only: int = 0
    remote_images: int = 0
    # Each remote image's URL and the SHA-256 of the bytes it answered with.
    remote: dict[str, str] = field(default_factory=dict)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0

    def add(self, problem: Problem) -> None:
        if len(problem.message) > MAX_MESSAGE:
            problem = Problem(
                problem.line, problem.message[: MAX_MESSAGE - 3] + "...", problem.severity
            )
        if problem.is_error:
            self.error_count += 1
            if len(self.errors) < MAX_REPORTED:
                self.errors.append(problem)
        else:
            self.warning_count += 1
            if len(self.warnings) < MAX_REPORTED:
                self.warnings.append(problem)


def validate_file(
    path: str | Path,
    *,
    task: Task = "sft",
    image_root: str | Path | None = None,
    limits: Limits | None = None,
    deep: bool = False,
    budget: LineBudget = DEFAULT_BUDGET,
    style: str = "auto",
) -> ValidationReport:
    """Validate a dataset file. Problems in the data go into the report; only a
    missing file or image root raises (``OSError``), which is a usage error.
    ``budget`` keeps the memory one line takes within what the process may use."""
    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    root = resolve_image_root(image_root if image_root is not None else path.parent)
    check = _image_checker(root, limits, deep)
    tally = _Tally()
    seen = FingerprintTable(min(DEFAULT_LIMIT, limits.max_examples + 1))
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        for item in iter_records(
            fp,
            limits=limits,
            task=task,
            budget=budget,
            digest=digest,
            style=style,
            stand_ins=True,
        ):
            if isinstance(item, Problem):
                tally.add(item)
            else:
                _check_record(item, tally, seen, check, limits.max_images_per_example)
            del item  # a record may hold a line's worth of values: not while the next is read
    if seen.full:
        tally.add(
            Problem(
                FILE_LINE,
                f"duplicates were looked for among the first {seen.limit:,} distinct lines only",
                "warning",
            )
        )
    count = count_problem(tally.examples, limits)
    if count:
        tally.add(Problem(FILE_LINE, count))
    return ValidationReport(
        valid=tally.error_count == 0,
        examples=tally.examples,
        images=tally.images,
        text_only_examples=tally.text_only,
        remote_images=tally.remote_images,
        remote_images_sha256=remote_images_sha256(tally.remote) if tally.remote else None,
        sha256=digest.hexdigest(),
        errors=tuple(tally.errors),
        warnings=tuple(tally.warnings),
        error_count=tally.error_count,
        warning_count=tally.warning_count,
    )


def _check_record(
    record: Record,
    tally: _Tally,
    seen: FingerprintTable,
    check: Callable[[ImageRef, bytes | None], ImageCheck],
    max_images: int,
) -> None:
    example = record.example
    line = example.line
    images = example.images
    rejected_images = example.rejected_images or ()
    tally.examples += 1
    tally.images += len(images) + len(rejected_images)
    tally.remote_images += sum(ref.kind == "url" for ref in (*images, *rejected_images))
    if not images:
        tally.text_only += 1
    earlier = seen.add(record.fingerprint, line)
    if earlier is not None:
        tally.add(Problem(line, f"exact duplicate of line {earlier}", "warning"))
    if not images and not rejected_images:
        return
    if len(images) > max_images:
        return  # already an error; checking (or fetching) them all would only cost time
    embedded = record.embedded
    for label, ref in _labelled_images(images, rejected_images):
        # A stand-in for a data: URI that reading the line checked as base64 and decoded.
        uri = embedded.get(ref.source) if embedded else None
        result = check(ref, None if uri is None else uri.decoded)
        if result.sha256 is not None:
            tally.remote[ref.source] = result.sha256
        if not (result.errors or result.warnings):
            continue
        name = describe(ref, None if uri is None else uri.length)
        for error in result.errors:
            tally.add(Problem(line, f"{label} ({name}): {error}"))
        for warning in result.warnings:
            tally.add(Problem(line, f"{label} ({name}): {warning}", "warning"))


def _labelled_images(
    images: tuple[ImageRef, ...], rejected_images: tuple[ImageRef, ...]
) -> Iterator[tuple[str, ImageRef]]:
    for i, ref in enumerate(images, 1):
        yield f"image {i}", ref
    for i, ref in enumerate(rejected_images, 1):
        yield f"rejected image {i}", ref


def _image_checker(
    root: Path, limits: Limits, deep: bool
) -> Callable[[ImageRef, bytes | None], ImageCheck]:
    """``check_image`` with the run's settings bound, and a small cache for paths and
    URLs (many examples share images; a URL is then fetched once). Data URIs and
    other long sources are not cached: each is its own image, and keys that size
    would hold memory."""

    @functools.lru_cache(maxsize=_IMAGE_CACHE_SIZE)
    def cached(source: str) -> ImageCheck:
        return check_image(ImageRef(source), root, limits, deep=deep)

    def check(ref: ImageRef, decoded: bytes | None) -> ImageCheck:
        if decoded is not None:
            return check_image(ref, root, limits, deep=deep, decoded=decoded)
        if ref.kind == "data" or len(ref.source) > _CACHED_SOURCE:
            return check_image(ref, root, limits, deep=deep)
        return cached(ref.source)

    return check
