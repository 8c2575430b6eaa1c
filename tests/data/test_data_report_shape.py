"""`kubetune validate` works without pydantic (see contract/limits.py why), so two things
it makes by itself are held here to the pydantic models that define them: the JSON
report against ``ValidationSummary``, and the limits its flags give against
``DatasetLimits``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.contract.limits import (
    DEFAULT_LIMITS,
    LIMITS,
    TERMINATION_LIMIT,
    Limits,
    checked_limits,
)
from kubetune_trainer.contract.summaries import LineProblem, ValidationSummary, dump
from kubetune_trainer.data.problems import FILE_LINE, Problem
from kubetune_trainer.data.validate import ValidationReport, _camel


def _report(n_errors: int, n_warnings: int, message: str = "x", **kw: Any) -> ValidationReport:
    values: dict[str, Any] = {
        "valid": n_errors == 0,
        "examples": 10,
        "images": 4,
        "text_only_examples": 7,
        "remote_images": 0,
        "remote_images_sha256": None,
        "sha256": "0" * 64,
        "errors": tuple(Problem(i + 1, f"{message} {i}") for i in range(min(n_errors, 1000))),
        "warnings": tuple(
            Problem(i + 1, f"{message} {i}", "warning") for i in range(min(n_warnings, 1000))
        ),
        "error_count": n_errors,
        "warning_count": n_warnings,
    }
    return ValidationReport(**{**values, **kw})


REPORTS = [
    _report(0, 0),
    _report(3, 2),
    _report(2500, 1200),
    _report(50, 50, message="é" * 600),
    _report(1, 0, remote_images=2, remote_images_sha256="a" * 64),
    _report(0, 1, warnings=(Problem(FILE_LINE, "duplicates ...", "warning"),)),
]


def _old_report(report: ValidationReport) -> ValidationSummary:
    """The report as the command built it when it imported pydantic."""
    return ValidationSummary(
        valid=report.valid,
        examples=report.examples,
        images=report.images,
        text_only_examples=report.text_only_examples,
        remote_images=report.remote_images,
        remote_images_sha256=report.remote_images_sha256,
        sha256=report.sha256,
        errors=[LineProblem(line=p.line, message=p.message) for p in report.errors],
        warnings=[LineProblem(line=p.line, message=p.message) for p in report.warnings],
        error_count=report.error_count,
        warning_count=report.warning_count,
        truncated_errors=report.error_count - len(report.errors),
        truncated_warnings=report.warning_count - len(report.warnings),
    )


def _old_summary(report: ValidationReport, max_bytes: int, max_each: int) -> dict[str, Any]:
    full = _old_report(report)
    errors = [LineProblem(line=e.line, message=e.message[:512]) for e in full.errors[:max_each]]
    warnings = [
        LineProblem(line=w.line, message=w.message[:256]) for w in (full.warnings or [])[:max_each]
    ]
    while True:
        cut = dump(full.model_copy(update={"errors": errors, "warnings": warnings}))
        if len(json.dumps(cut).encode()) <= max_bytes or not (errors or warnings):
            return cut
        if warnings:
            warnings = warnings[:-1]
        else:
            errors = errors[:-1]


def _same_json(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)


@pytest.mark.parametrize("report", REPORTS)
def test_the_report_is_the_validation_summary_as_dump_writes_it(report: ValidationReport) -> None:
    made = report.to_json()
    _same_json(made, dump(_old_report(report)))  # the same keys, in the same order
    _same_json(made, dump(ValidationSummary.model_validate(made)))


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize(("max_bytes", "max_each"), [(TERMINATION_LIMIT, 20), (600, 20), (0, 5)])
def test_the_summary_is_cut_as_before(
    report: ValidationReport, max_bytes: int, max_each: int
) -> None:
    made = report.summary(max_bytes, max_each)
    _same_json(made, _old_summary(report, max_bytes, max_each))
    _same_json(made, dump(ValidationSummary.model_validate(made)))


def test_report_keys_are_the_summary_aliases() -> None:
    fields = ValidationSummary.model_fields
    for f in dataclasses.fields(ValidationReport):
        assert _camel(f.name) == fields[f.name].alias, f.name
    for name in ("truncated_errors", "truncated_warnings"):
        assert _camel(name) == fields[name].alias
    from kubetune_trainer.contract import summaries

    assert summaries.TERMINATION_LIMIT == TERMINATION_LIMIT == 4096


def test_limits_are_the_dataset_limits_fields() -> None:
    assert list(LIMITS) == list(DatasetLimits.model_fields)
    assert set(LIMITS) == {
        name for name in dir(Limits) if not name.startswith("_")
    }  # the Protocol's members
    defaults = DatasetLimits()
    for name, limit in LIMITS.items():
        assert getattr(DEFAULT_LIMITS, name) == getattr(defaults, name) == limit.default
        assert DatasetLimits.model_fields[name].description == limit.description


LIMIT_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "min_examples": st.integers(-2, 3_000_005),
        "max_examples": st.integers(-2, 3_000_005),
        "max_images_per_example": st.integers(-2, 10_002),
        "max_image_bytes": st.integers(-2, 1 << 40),
        "allow_remote_images": st.booleans(),
    },
)


@settings(max_examples=300, deadline=None)
@given(LIMIT_VALUES)
def test_checked_limits_accept_exactly_what_dataset_limits_accepts(given: dict[str, Any]) -> None:
    checked = checked_limits(given)
    try:
        model = DatasetLimits(**given)
    except ValidationError:
        assert checked is None
        return
    assert checked is not None
    assert {name: getattr(checked, name) for name in LIMITS} == model.model_dump()


@pytest.mark.parametrize(
    "given",
    [
        {"min_examples": True},  # pydantic would take a bool as 1, or refuse a float:
        {"max_examples": 5.0},  # either way, it decides
        {"allow_remote_images": 1},
        {"max_images_per_example": "3"},
        {"unknown": 1},
    ],
)
def test_checked_limits_leave_other_types_to_dataset_limits(given: dict[str, Any]) -> None:
    assert checked_limits(given) is None
