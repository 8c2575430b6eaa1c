"""A FineTuneJob's status from the Datasets it trains on and its training Job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_operator.api.dataset import DatasetPhase
from kubetune_operator.api.finetunejob import FINISHED, FineTuneJobSpec, JobPhase, Progress
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.conditions import Verdict, settled
from kubetune_operator.resources.finetunejob.progress import final_metrics
from kubetune_operator.resources.workloads import (
    START_FAILURES,
    JobState,
    RunPhase,
    condition,
    lead_pod,
    summary_of,
    terminated,
)
from kubetune_trainer.contract.summaries import Outcome, TrainingSummary, read_summary

# The phases in which a run waits to train. Once it has been Running it never shows
# one of them again (phases only move forward): while it waits again (a retry, an
# eviction, Kueue's preemption) it stays Running, and Ready's reason says why.
WAITING_TO_TRAIN = frozenset({JobPhase.PENDING, JobPhase.QUEUED})


def task_mismatch(
    method: str, ds: Mapping[str, Any] | None, role: str, name: str
) -> Verdict | None:
    """Why a run cannot train on a Dataset as it is validated, from the specs alone (so
    it shows at once, before validation ends): DPO needs preference pairs. An SFT run
    may train on a dpo Dataset, on its chosen replies, as TRL's SFT does with such data."""
    if ds is None or method != "dpo":
        return None
    task = (ds.get("spec") or {}).get("task", "sft")
    if task == "dpo":
        return None
    return Verdict(
        JobPhase.FAILED,
        "DatasetTaskMismatch",
        f"method dpo trains on preference pairs, but {role} Dataset {name!r} is validated "
        f"for task {task} (its spec.task); set it to dpo, or use method sft",
    )


def remote_images_gate(ds: Mapping[str, Any] | None, role: str, name: str) -> Verdict | None:
    """Why a run cannot train on a Ready Dataset whose lines name http(s) images: its
    validation recorded no digest of them (it ran before kubetune fetched them for
    runs), so a run could not check that it fetches what was validated."""
    status = (ds or {}).get("status") or {}
    remote = status.get("remoteImages") or 0
    if not remote or status.get("remoteImagesSha256"):
        return None
    return Verdict(
        JobPhase.FAILED,
        "RemoteImagesNotValidated",
        f"{role} Dataset {name!r} names {remote} images by http(s) URL, but its validation "
        "recorded no digest of them to check a run's copies against; validate it again "
        "(delete and apply it)",
    )


def dataset_gate(ds: Mapping[str, Any] | None, role: str, name: str) -> Verdict | None:
    """None when the Dataset is Ready for its current spec; else what the run waits
    for, or why it fails."""
    if ds is None:
        return Verdict(
            JobPhase.WAITING_FOR_DATASET,
            "DatasetNotFound",
            f"{role} Dataset {name!r} does not exist yet",
        )
    message = (ds.get("status") or {}).get("message", "")
    if settled(ds, frozenset({DatasetPhase.READY})):
        return None
    if settled(ds, frozenset({DatasetPhase.INVALID})):
        return Verdict(
            JobPhase.FAILED, "DatasetInvalid", f"{role} Dataset {name!r} is invalid: {message}"
        )
    if settled(ds, frozenset({DatasetPhase.FAILED})):
        return Verdict(
            JobPhase.FAILED,
            "DatasetFailed",
            f"{role} Dataset {name!r} could not be validated: {message}",
        )
    return Verdict(
        JobPhase.WAITING_FOR_DATASET,
        "DatasetNotReady",
        f"waiting for {role} Dataset {name!r} to be validated",
    )


def kueue_reason(workload: Mapping[str, Any] | None) -> str | None:
    """Why Kueue has not admitted (or has evicted) the run's Workload, in its words."""
    status = (workload or {}).get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    for kind, not_yet in (("Evicted", "True"), ("QuotaReserved", "False"), ("Admitted", "False")):
        condition = conditions.get(kind) or {}
        if condition.get("status") == not_yet and condition.get("message"):
            message: str = condition["message"]
            return message
    return None


def status_from_job(
    spec: FineTuneJobSpec,
    state: JobState,
    output_uri: str,
    now: str,
    workload: Mapping[str, Any] | None = None,
) -> Manifest:
    """The FineTuneJob's status fields for a given training Job state (and, for a run
    with a queue, its Kueue Workload)."""
    phase = JobPhase(state.phase)
    if phase == JobPhase.SUSPENDED and spec.queue_name and not spec.suspend:
        phase = JobPhase.QUEUED
    message = state.message
    if phase == JobPhase.QUEUED:
        why = kueue_reason(workload) or "waiting for Kueue to admit the Job"
        message = f"queued in {spec.queue_name!r}; {why}"
    status: Manifest = {"phase": phase, "message": message, "startTime": state.start_time}
    summary = read_summary(TrainingSummary, state.summary) or TrainingSummary()
    if phase in FINISHED:
        status["completionTime"] = state.completion_time or now
        final = final_metrics(summary)
        if final is not None:
            status["metrics"] = final.model_dump(by_alias=True, exclude_none=True)
    if phase == JobPhase.SUCCEEDED:
        status["outputModel"] = {"uri": summary.output_uri or output_uri}
        if summary.steps is not None:
            done = Progress(
                step=summary.steps,
                total_steps=summary.steps if summary.total_steps is None else summary.total_steps,
                epoch=None if summary.epoch is None else round(summary.epoch, 2),
                percent=100,
                eta_seconds=0,
            )
            status["progress"] = done.model_dump(by_alias=True, exclude_none=True)
    return status


def between_trainers(
    spec: FineTuneJobSpec,
    state: JobState,
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    workload: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Ready's reason and the message of a run that has been Running, whose unfinished
    Job has no trainer running now. Mostly a moment: the kubelet reports the pod's end
    before the job controller counts it, and that controller adds SuccessCriteriaMet or
    FailureTarget before Complete or Failed. Longer while a pod is replaced (a retry,
    an eviction) or Kueue has taken the Job back into its queue."""
    if state.phase == RunPhase.SUSPENDED:
        why = kueue_reason(workload) or "waiting for Kueue to admit the Job again"
        return "Requeued", (
            f"queued again in {spec.queue_name!r}; {why}; once admitted, the trainer "
            "resumes from its last checkpoint, if any"
        )
    if state.reason in START_FAILURES:
        return state.reason, state.message
    failing = condition(job, "FailureTarget")
    if failing is not None:
        why = failing.get("message") or failing.get("reason") or "failed"
        return "JobFailing", f"the Job is failing ({why}); the job controller is finishing it"
    pod = lead_pod(pods)
    phase = ((pod or {}).get("status") or {}).get("phase")
    disrupted = condition(pod, "DisruptionTarget") if pod is not None else None
    if disrupted is not None:
        why = disrupted.get("message") or disrupted.get("reason") or "disrupted"
        return "PodDisrupted", (
            f"the training pod was stopped ({why}); waiting for its replacement, which "
            "resumes from the last checkpoint, if any"
        )
    if phase not in ("Succeeded", "Failed"):
        return "Restarting", "waiting for the training pod to start again"
    code = terminated(pod).get("exitCode")
    if phase == "Succeeded":
        said = read_summary(Outcome, summary_of(pod))
        head = "training finished" if said is not None and said.ok else "the trainer exited"
        return "TrainerExited", f"{head}; the job controller is completing the Job"
    exit_ = f" with code {code}" if code is not None else ""
    return "TrainerExited", (
        f"the trainer exited{exit_}; the job controller retries it or fails the Job"
    )
