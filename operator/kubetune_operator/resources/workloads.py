"""Where a batch/v1 Job and its pods stand, read as every kind needs it: finished or
not, the pod that speaks for the Job, and why a pod cannot start or failed."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune_operator.resources.common import METRICS_PORT_NAME, Manifest
from kubetune_trainer.contract.summaries import Outcome, read_summary

# Why a pod's container cannot start. The kubelet retries these, and they can clear
# by themselves: a Secret or ConfigMap applied after the object that needs it (an Argo
# CD sync, an external-secrets controller), a registry that is down for a while. A run
# waits for them up to Settings.start_grace, then fails and its Job is deleted.
RETRIED_START_FAILURES = {
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
}
# These never clear without a change to the pod.
PERMANENT_START_FAILURES = {"ErrImageNeverPull", "InvalidImageName"}
START_FAILURES = frozenset(RETRIED_START_FAILURES | PERMANENT_START_FAILURES)
START_GRACE_SECONDS = 300.0


class RunPhase(StrEnum):
    """Where the run a Job holds stands (FineTuneJob phases share these names)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


def summary_of(pod: Mapping[str, Any] | None) -> Manifest | None:
    """The JSON object a kubetune container left as its termination message (a
    summary of the contract's), or None when it left none (for example the log tail
    that FallbackToLogsOnError puts there after a crash)."""
    text = terminated(pod).get("message")
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# Ready's reason while a trainer runs; a Running run with any other reason is between
# trainers (finetunejob.status.between_trainers), and clients show why.
TRAINING = "Training"


@dataclass(frozen=True)
class JobState:
    """Where a batch/v1 Job and its newest pod stand."""

    phase: RunPhase
    reason: str = ""
    message: str = ""
    summary: Manifest | None = None
    pod_ip: str | None = None
    metrics_port: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    # The run failed while its Job still runs (its pod never started): the Job is
    # deleted, so that nothing starts after the status said Failed.
    stop_job: bool = False


def condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    """The object's (a Job's or a pod's) condition of that type, when it is True."""
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_complete(job: Mapping[str, Any]) -> bool:
    return condition(job, "Complete") is not None


def job_finished(job: Mapping[str, Any]) -> bool:
    return job_complete(job) or condition(job, "Failed") is not None


COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def newest_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    if not pods:
        return None
    return max(
        pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"])
    )


def lead_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The pod a run's status follows: the newest of the first node's (completion index
    0 of a multi-node run, which serves the metrics and writes the summary), or of all
    the pods of a single-node Job (which have no index)."""
    first = [
        p
        for p in pods
        if (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0") == "0"
    ]
    return newest_pod(first or pods)


def terminated(pod: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The terminated state of the pod's first container that has ended, or {}."""
    for cs in (pod or {}).get("status", {}).get("containerStatuses") or []:
        if "terminated" in (cs.get("state") or {}):
            return cs["state"]["terminated"]
    return {}


def waiting_container(pod: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The status of the pod's first waiting container, init containers first: while
    one of them waits (a missing Secret, say), the main container only says
    PodInitializing."""
    status = (pod or {}).get("status", {})
    for key in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(key) or []:
            if "waiting" in (cs.get("state") or {}):
                return cs
    return None


def _waiting(pod: Mapping[str, Any] | None) -> Mapping[str, Any]:
    cs = waiting_container(pod)
    return cs["state"]["waiting"] if cs is not None else {}


def _failed_init(pod: Mapping[str, Any] | None) -> tuple[str, Mapping[str, Any]] | None:
    """The init container (a fetch of the dataset or model) that exited non-zero."""
    for cs in (pod or {}).get("status", {}).get("initContainerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if term.get("exitCode"):
            return cs["name"], term
    return None


def _tail(message: str | None) -> str:
    lines = (message or "").strip().splitlines()[-3:]
    return f": {' / '.join(lines)}" if lines else ""


def _metrics_port(pod: Mapping[str, Any]) -> int | None:
    for container in pod.get("spec", {}).get("containers", []):
        for port in container.get("ports") or []:
            if port.get("name") == METRICS_PORT_NAME:
                return int(port["containerPort"])
    return None


# What a run out of memory should change, by what ran: only fields its kind has.
TRAINING_OOM = (
    "the trainer ran out of memory (OOMKilled); raise resources.memory, or lower "
    "hyperparameters.batchSize, maxContextLength or maxPixels"
)
EVALUATION_OOM = (
    "the evaluation ran out of memory (OOMKilled); raise resources.memory, or lower "
    "evaluation.maxExamples or hyperparameters.maxPixels"
)
PREFLIGHT_OOM = (
    "the pre-flight ran out of memory (OOMKilled); lower hyperparameters.maxPixels, or set "
    "preflight.enabled: false to train without it"
)
VALIDATION_OOM = (
    "the validator ran out of memory (OOMKilled); split the dataset's largest lines or "
    "images, or ask the platform team to raise the validation pod's memory"
)


def _failure_message(
    job_reason: str, job_message: str, pod: Mapping[str, Any] | None, oom: str
) -> tuple[str, str]:
    init = _failed_init(pod)
    if init is not None:
        name, term = init
        return "InitContainerFailed", (
            f"{name} exited with code {term['exitCode']} before the main container"
            f"{_tail(term.get('message'))}"
        )
    term = terminated(pod)
    outcome = read_summary(Outcome, summary_of(pod))
    if term.get("reason") == "OOMKilled":
        return "OOMKilled", oom
    if outcome is not None and outcome.ok is False and outcome.message:
        return job_reason or "TrainerError", outcome.message
    if term.get("exitCode"):
        return job_reason or "Error", (
            f"the container exited with code {term['exitCode']}{_tail(term.get('message'))}"
        )
    if job_reason == "DeadlineExceeded":
        return job_reason, "the Job ran past its activeDeadlineSeconds"
    return job_reason or "Failed", job_message or "the training Job failed"


def _seconds_between(earlier: str | None, later: str) -> float:
    if not earlier:
        return 0.0
    return (dt.datetime.fromisoformat(later) - dt.datetime.fromisoformat(earlier)).total_seconds()


def _start_failure(
    pod: Mapping[str, Any] | None, start: str | None, now: str, grace: float
) -> JobState | None:
    """The state of a pod whose container cannot start: waiting while the kubelet
    retries, failed once that has lasted ``grace`` seconds or cannot clear at all."""
    waiting = _waiting(pod)
    reason = waiting.get("reason", "")
    if reason not in RETRIED_START_FAILURES | PERMANENT_START_FAILURES:
        return None
    detail = waiting.get("message") or reason
    assert pod is not None
    waited = _seconds_between(pod["metadata"].get("creationTimestamp"), now)
    if reason in PERMANENT_START_FAILURES or waited >= grace:
        after = "" if reason in PERMANENT_START_FAILURES else f" in {round(waited)} s"
        return JobState(
            RunPhase.FAILED,
            reason,
            f"the pod could not start{after}: {detail}",
            start_time=start,
            completion_time=now,
            stop_job=True,
        )
    return JobState(
        RunPhase.PENDING,
        reason,
        f"the pod cannot start yet: {detail} (retried for {round(grace)} s, then the run fails)",
        start_time=start,
    )


def job_state(
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    now: str,
    start_grace: float = START_GRACE_SECONDS,
    oom: str = TRAINING_OOM,
) -> JobState:
    """Where the Job stands; ``oom`` is what its failure says when a pod ran out of
    memory."""
    status = job.get("status", {})
    pod = lead_pod(pods)
    start, end = status.get("startTime"), status.get("completionTime")
    if job_complete(job):
        return JobState(
            RunPhase.SUCCEEDED,
            "Completed",
            "training finished",
            summary_of(pod),
            start_time=start,
            completion_time=end or terminated(pod).get("finishedAt"),
        )
    failed = condition(job, "Failed")
    if failed:
        # Whichever node failed says why; the others were only stopped.
        culprit = newest_pod([p for p in pods if p.get("status", {}).get("phase") == "Failed"])
        reason, message = _failure_message(
            failed.get("reason", ""), failed.get("message", ""), culprit or pod, oom
        )
        return JobState(
            RunPhase.FAILED,
            reason,
            message,
            summary_of(pod),
            start_time=start,
            completion_time=failed.get("lastTransitionTime"),
        )
    if job.get("spec", {}).get("suspend"):
        return JobState(
            RunPhase.SUSPENDED, "JobSuspended", "the training Job is suspended", start_time=start
        )
    stuck = _start_failure(pod, start, now, start_grace)
    if stuck is not None:
        return stuck
    if pod is not None and pod.get("status", {}).get("phase") == "Running":
        return JobState(
            RunPhase.RUNNING,
            TRAINING,
            "training",
            pod_ip=pod["status"].get("podIP"),
            metrics_port=_metrics_port(pod),
            start_time=start,
        )
    return JobState(
        RunPhase.PENDING, "PodPending", "waiting for the training pod to start", start_time=start
    )


@dataclass(frozen=True)
class ServerPod:
    """A server pod whose containers are ready, and what its server says it has loaded:
    adapter name → the folder it was loaded from (None: the server did not answer)."""

    namespace: str
    name: str
    uid: str
    ip: str
    server: str  # its ModelDeployment
    gate_open: bool
    loaded: Mapping[str, str] | None
