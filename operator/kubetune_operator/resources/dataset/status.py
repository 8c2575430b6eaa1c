"""A Dataset's status from its validation Job: the validator's summary, or why
validation could not run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_operator.api.dataset import VALIDATED, DatasetPhase
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.workloads import RETRIED_START_FAILURES, JobState, RunPhase
from kubetune_trainer.contract.summaries import ValidationSummary, read_summary

MAX_STATUS_PROBLEMS = 20

_REASONS = {
    DatasetPhase.READY: "Validated",
    DatasetPhase.INVALID: "InvalidData",
    DatasetPhase.FAILED: "ValidationFailed",
}


def dataset_result(value: Mapping[str, Any]) -> Manifest | None:
    """Dataset status fields from `kubetune validate --summary-file`; None when
    ``value`` is no validation summary."""
    summary = read_summary(ValidationSummary, value)
    if summary is None:
        return None
    errors, warnings = (
        [{"line": p.line, "message": p.message[:4096]} for p in problems[:MAX_STATUS_PROBLEMS]]
        for problems in (summary.errors, summary.warnings or [])
    )
    error_count = summary.error_count if summary.error_count is not None else len(errors)
    examples = summary.examples or 0
    images = summary.images or 0
    if summary.valid:
        message = f"{examples} examples, {images} images"
    elif errors:
        message = f"{error_count} errors; first: line {errors[0]['line']}: {errors[0]['message']}"
    else:
        message = f"{error_count} errors"
    return {
        "phase": DatasetPhase.READY if summary.valid else DatasetPhase.INVALID,
        "message": message,
        "examples": examples,
        "images": images,
        "textOnlyExamples": summary.text_only_examples or 0,
        "remoteImages": summary.remote_images or 0,
        "remoteImagesSha256": summary.remote_images_sha256,
        "sha256": summary.sha256,
        "errorCount": error_count,
        "warningCount": (
            summary.warning_count
            if summary.warning_count is not None
            else len(summary.warnings or [])
        ),
        "errors": errors,
        "warnings": warnings,
    }


def dataset_status(
    state: JobState | None, job_name: str, queue: str | None = None
) -> tuple[Manifest, str]:
    """The Dataset's status fields and the Ready condition's reason, from the state of
    its validation Job ``job_name`` (None while there is none; in Kueue's ``queue``)."""
    waiting_reason = None
    result = dataset_result(state.summary) if state is not None and state.summary else None
    status: Manifest
    if state is None:
        status = {"phase": DatasetPhase.PENDING, "message": "creating the validation Job"}
    else:
        if result is not None:
            status = result
        elif state.phase == RunPhase.FAILED:
            status = {
                "phase": DatasetPhase.FAILED,
                "message": f"validation could not run: {state.reason}: {state.message}",
            }
        elif state.phase == RunPhase.SUSPENDED and queue:
            message = f"queued in {queue!r}; waiting for Kueue to admit the validation Job"
            status = {"phase": DatasetPhase.VALIDATING, "message": message}
            waiting_reason = "Queued"
        elif state.reason in RETRIED_START_FAILURES:
            status = {"phase": DatasetPhase.VALIDATING, "message": state.message}
            waiting_reason = state.reason
        else:
            status = {"phase": DatasetPhase.VALIDATING, "message": "validating the dataset"}
        status["validationJob"] = job_name
    if status["phase"] not in (DatasetPhase.READY, DatasetPhase.INVALID):
        # Counts from an earlier generation would describe another file.
        status.update(
            examples=None,
            images=None,
            textOnlyExamples=None,
            remoteImages=None,
            remoteImagesSha256=None,
            sha256=None,
            errorCount=None,
            warningCount=None,
            errors=[],
            warnings=[],
        )
    reason = waiting_reason or _REASONS.get(status["phase"], "Validating")
    return status, reason


def ready(phase: DatasetPhase) -> bool | None:
    """The Ready condition: unknown until validation has settled."""
    return phase == DatasetPhase.READY if phase in VALIDATED else None
