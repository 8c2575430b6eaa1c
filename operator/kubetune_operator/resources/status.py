"""Status as a pure function of what the cluster shows: conditions, the Dataset's
validation result, and where a training Job stands."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_operator.resources.metrics import status_metrics

Manifest = dict[str, Any]

MAX_STATUS_ERRORS = 20
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
START_GRACE_SECONDS = 300.0


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Manifest]:
    """Conditions with `type_` set; lastTransitionTime moves only when the status does."""
    value = "Unknown" if status is None else ("True" if status else "False")
    out: list[Manifest] = []
    previous = None
    for c in conditions:
        if c.get("type") == type_:
            previous = c
        else:
            out.append(dict(c))
    since = previous["lastTransitionTime"] if previous and previous.get("status") == value else now
    new: Manifest = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out.append(new)
    return out


def phase_patch(
    current: Mapping[str, Any],
    fields: Manifest,
    reason: str,
    ready: bool | None,
    generation: int | None,
    now: str,
) -> Manifest | None:
    """The status patch that sets `fields` (a phase, its message, ...) with the Ready
    condition and observedGeneration; None when `current` status already says it all."""
    patch = dict(fields)
    message = patch.get("message") or patch["phase"]
    conditions = current.get("conditions") or []
    patch["conditions"] = set_condition(
        conditions, "Ready", ready, reason, message, generation, now
    )
    patch["observedGeneration"] = generation
    old = next((c for c in conditions if c.get("type") == "Ready"), None)
    new = next(c for c in patch["conditions"] if c.get("type") == "Ready")
    if (
        all(current.get(k) == v for k, v in patch.items() if k != "conditions")
        and old is not None
        and (old.get("status"), old.get("reason")) == (new.get("status"), reason)
    ):
        return None
    return patch


def parse_termination_message(text: str | None) -> Manifest | None:
    """The trainer's JSON summary, or None when the message is not one (for example the
    log tail that FallbackToLogsOnError puts there after a crash)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def dataset_result(summary: Mapping[str, Any]) -> Manifest:
    """Dataset status fields from `kubetune validate --summary-file`."""
    errors = [
        {"line": int(e.get("line", 0)), "message": str(e.get("message", ""))[:4096]}
        for e in summary.get("errors", [])[:MAX_STATUS_ERRORS]
        if isinstance(e, Mapping)
    ]
    valid = bool(summary.get("valid"))
    error_count = int(summary.get("errorCount", len(errors)))
    examples = int(summary.get("examples", 0))
    return {
        "phase": "Ready" if valid else "Invalid",
        "message": (
            f"{examples} examples, {int(summary.get('images', 0))} images"
            if valid
            else f"{error_count} errors; first: line {errors[0]['line']}: {errors[0]['message']}"
            if errors
            else f"{error_count} errors"
        ),
        "examples": examples,
        "images": int(summary.get("images", 0)),
        "textOnlyExamples": int(summary.get("textOnlyExamples", 0)),
        "sha256": summary.get("sha256"),
        "errorCount": error_count,
        "warningCount": int(summary.get("warningCount", len(summary.get("warnings", [])))),
        "errors": errors,
    }


@dataclass(frozen=True)
class JobState:
    """Where a batch/v1 Job and its newest pod stand."""

    phase: str  # Pending | Running | Succeeded | Failed | Suspended
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


def _condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_finished(job: Mapping[str, Any]) -> bool:
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


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


def _terminated(pod: Mapping[str, Any] | None) -> Mapping[str, Any]:
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
            if port.get("name") == "metrics":
                return int(port["containerPort"])
    return None


def _failure_message(
    job_reason: str, job_message: str, pod: Mapping[str, Any] | None
) -> tuple[str, str]:
    init = _failed_init(pod)
    if init is not None:
        name, term = init
        return "InitContainerFailed", (
            f"{name} exited with code {term['exitCode']} before the main container"
            f"{_tail(term.get('message'))}"
        )
    term = _terminated(pod)
    summary = parse_termination_message(term.get("message"))
    if term.get("reason") == "OOMKilled":
        return "OOMKilled", (
            "the trainer ran out of memory (OOMKilled); raise resources.memory, or lower "
            "hyperparameters.batchSize, maxContextLength or maxPixels"
        )
    if summary and summary.get("ok") is False and summary.get("message"):
        return job_reason or "TrainerError", str(summary["message"])
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
            "Failed",
            reason,
            f"the pod could not start{after}: {detail}",
            start_time=start,
            completion_time=now,
            stop_job=True,
        )
    return JobState(
        "Pending",
        reason,
        f"the pod cannot start yet: {detail} (retried for {round(grace)} s, then the run fails)",
        start_time=start,
    )


def job_state(
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    now: str,
    start_grace: float = START_GRACE_SECONDS,
) -> JobState:
    status = job.get("status", {})
    pod = lead_pod(pods)
    start, end = status.get("startTime"), status.get("completionTime")
    if _condition(job, "Complete"):
        term = _terminated(pod)
        return JobState(
            "Succeeded",
            "Completed",
            "training finished",
            parse_termination_message(term.get("message")),
            start_time=start,
            completion_time=end or term.get("finishedAt"),
        )
    failed = _condition(job, "Failed")
    if failed:
        # Whichever node failed says why; the others were only stopped.
        culprit = newest_pod([p for p in pods if p.get("status", {}).get("phase") == "Failed"])
        reason, message = _failure_message(
            failed.get("reason", ""), failed.get("message", ""), culprit or pod
        )
        return JobState(
            "Failed",
            reason,
            message,
            parse_termination_message(_terminated(pod).get("message")),
            start_time=start,
            completion_time=failed.get("lastTransitionTime"),
        )
    if job.get("spec", {}).get("suspend"):
        return JobState(
            "Suspended", "JobSuspended", "the training Job is suspended", start_time=start
        )
    stuck = _start_failure(pod, start, now, start_grace)
    if stuck is not None:
        return stuck
    if pod is not None and pod.get("status", {}).get("phase") == "Running":
        return JobState(
            "Running",
            "Training",
            "training",
            pod_ip=pod["status"].get("podIP"),
            metrics_port=_metrics_port(pod),
            start_time=start,
        )
    return JobState(
        "Pending", "PodPending", "waiting for the training pod to start", start_time=start
    )


# FineTuneJob ------------------------------------------------------------------------

FINAL = ("Succeeded", "Failed")


def unobserved(obj: Mapping[str, Any]) -> bool:
    """Whether the object's current spec has not been acted on: new, changed, or its
    last reconcile failed before writing status. Handlers are level-triggered, so a
    watch event for an object whose status observed its generation (the echo of a
    status write, a label edit) needs no work of its own."""
    observed = (obj.get("status") or {}).get("observedGeneration")
    return bool(observed is None or observed != obj.get("metadata", {}).get("generation"))


def dataset_gate(ds: Manifest | None, role: str, name: str) -> tuple[str, str, str] | None:
    """None when the Dataset is Ready; else the (phase, reason, message) the job waits or fails with."""
    if ds is None:
        return "WaitingForDataset", "DatasetNotFound", f"{role} Dataset {name!r} does not exist yet"
    status = ds.get("status") or {}
    phase = status.get("phase", "Pending")
    current = status.get("observedGeneration") == ds["metadata"].get("generation")
    if phase == "Ready" and current:
        return None
    if phase == "Invalid" and current:
        return (
            "Failed",
            "DatasetInvalid",
            f"{role} Dataset {name!r} is invalid: {status.get('message', '')}",
        )
    if phase == "Failed" and current:
        return (
            "Failed",
            "DatasetFailed",
            f"{role} Dataset {name!r} could not be validated: {status.get('message', '')}",
        )
    return (
        "WaitingForDataset",
        "DatasetNotReady",
        f"waiting for {role} Dataset {name!r} to be validated",
    )


def status_from_job(ftj: Manifest, state: JobState, output_uri: str, now: str) -> Manifest:
    """The FineTuneJob's status fields for a given training Job state (pure)."""
    spec = ftj["spec"]
    phase = state.phase
    if phase == "Suspended" and spec.get("queueName") and not spec.get("suspend"):
        phase = "Queued"
    message = {
        "Queued": f"queued in {spec.get('queueName')!r}; waiting for Kueue to admit the Job"
    }.get(phase, state.message)
    status: Manifest = {"phase": phase, "message": message, "startTime": state.start_time}
    summary = state.summary or {}
    if phase in FINAL:
        status["completionTime"] = state.completion_time or now
        final = status_metrics(summary)
        if final is not None:
            status["metrics"] = final.model_dump(by_alias=True, exclude_none=True)
    if phase == "Succeeded":
        status["outputModel"] = {"uri": summary.get("outputUri") or output_uri}
        steps = summary.get("steps")
        if steps is not None:
            status["progress"] = {
                "step": steps,
                "totalSteps": summary.get("totalSteps", steps),
                "percent": 100,
                "etaSeconds": 0,
                **(
                    {"epoch": round(summary["epoch"], 2)}
                    if summary.get("epoch") is not None
                    else {}
                ),
            }
    return status


# Dataset ----------------------------------------------------------------------------

DONE = ("Ready", "Invalid", "Failed")


def dataset_status(
    ds: Manifest, state: JobState | None, job_name: str, now: str
) -> Manifest | None:
    """The Dataset's status patch from the state of its validation Job ``job_name``
    (pure; None while there is no Job); None when its status already says so."""
    generation = ds["metadata"].get("generation")
    previous = ds.get("status") or {}
    status: Manifest
    waiting_reason = None
    if state is None:
        status = {"phase": "Pending", "message": "creating the validation Job"}
    else:
        if state.summary is not None and "valid" in state.summary:
            status = dataset_result(state.summary)
        elif state.phase == "Failed":
            status = {
                "phase": "Failed",
                "message": f"validation could not run: {state.reason}: {state.message}",
            }
        elif state.reason in RETRIED_START_FAILURES:
            status = {"phase": "Validating", "message": state.message}
            waiting_reason = state.reason
        else:
            status = {"phase": "Validating", "message": "validating the dataset"}
        status["validationJob"] = job_name
    if status["phase"] not in ("Ready", "Invalid"):
        # Counts from an earlier generation would describe another file.
        status.update(
            examples=None,
            images=None,
            textOnlyExamples=None,
            sha256=None,
            errorCount=None,
            warningCount=None,
            errors=[],
        )
    reason = waiting_reason or {
        "Ready": "Validated",
        "Invalid": "InvalidData",
        "Failed": "ValidationFailed",
    }.get(status["phase"], "Validating")
    ready = status["phase"] == "Ready" if status["phase"] in DONE else None
    return phase_patch(previous, status, reason, ready, generation, now)
