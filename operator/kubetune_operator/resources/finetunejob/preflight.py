"""The pre-flight of a FineTuneJob: once its Datasets are Ready and before its GPUs are
booked, a Job of one CPU pod, made from the training pod (its mounts, image, identity
and job.json), runs `kubetune preflight --config`: the run's data planned with the base
model's tokenizer and processor, as training will plan it. Its summary becomes
status.preflight (tokens, training tokens, steps, the longest and the over-length
examples); a failure the data or the settings cause fails the run here, before any
GPU waits on it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.finetunejob import FineTuneJobSpec, PreflightPhase
from kubetune_operator.resources.actions import Action, Create
from kubetune_operator.resources.common import Manifest, child_name
from kubetune_operator.resources.finetunejob.side_jobs import follow
from kubetune_operator.resources.finetunejob.training_job import (
    CONFIG_DIR,
    CONFIG_KEY,
    TRAINER_CONTAINER,
    run_job,
)
from kubetune_operator.resources.platform import PodDefaults
from kubetune_operator.resources.workloads import PREFLIGHT_OOM
from kubetune_trainer.contract.summaries import PreflightSummary

# A crash or lost node gets one more try; a final exit code fails at once (the policy).
BACKOFF_LIMIT = 1
# Planning holds a tokenizer, a processor and one example's images at a time.
RESOURCES = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
COUNTING = "counting tokens with the base model's tokenizer before booking GPUs"
# The training pod's placement is for GPU nodes; the pre-flight runs anywhere.
GPU_PLACEMENT = ("subdomain", "nodeSelector", "tolerations", "priorityClassName")


def job_name(finetunejob: str) -> str:
    return child_name(finetunejob, "preflight")


def preflight_phase(ftj: Mapping[str, Any]) -> str | None:
    return ((ftj.get("status") or {}).get("preflight") or {}).get("phase")


def needed(ftj: Mapping[str, Any], spec: FineTuneJobSpec) -> bool:
    """Whether the run still has a pre-flight to start or follow before its Job."""
    return spec.preflight.enabled and preflight_phase(ftj) != PreflightPhase.SUCCEEDED


def preflight_job(
    ftj: Manifest, spec: FineTuneJobSpec, training: Manifest, pods: PodDefaults
) -> Manifest:
    """The training Job's pod as one CPU pod that runs `kubetune preflight`, told how
    many processes will share the batches (GPUs times nodes), which sets the steps.
    The platform's pod defaults are applied again after the GPU placement is gone."""
    pod = copy.deepcopy(training["spec"]["template"]["spec"])
    for key in GPU_PLACEMENT:
        pod.pop(key, None)
    processes = max(spec.resources.gpus, 1) * spec.resources.nodes
    for container in pod["containers"]:
        if container["name"] == TRAINER_CONTAINER:
            container["command"] = ["kubetune"]
            container["args"] = [
                "preflight",
                "--config",
                f"{CONFIG_DIR}/{CONFIG_KEY}",
                "--processes",
                str(processes),
            ]
            container.pop("ports", None)
            container["resources"] = copy.deepcopy(RESOURCES)
    return run_job(
        ftj,
        spec,
        "preflight",
        job_name(ftj["metadata"]["name"]),
        {"backoffLimit": BACKOFF_LIMIT, "suspend": bool(spec.queue_name)},
        pod,
        pods,
    )


@dataclass(frozen=True)
class Step:
    """Where the pre-flight stands: what to do now and after the status write, its
    status.preflight fields, and whether the run may go on to its training Job
    (``passed``) or has failed (``failed``, with why)."""

    actions: tuple[Action, ...]
    after: tuple[Action, ...]
    status: Manifest
    passed: bool = False
    failed: str | None = None


def preflight(
    ftj: Manifest,
    spec: FineTuneJobSpec,
    training: Manifest,
    job: Manifest | None,
    pods: Sequence[Manifest],
    now: str,
    start_grace: float,
    pod_defaults: PodDefaults,
) -> Step:
    """Start the pre-flight Job, follow it, and read its figures. ``training`` is the
    training Job the run will make once it passes."""
    if job is None:
        if preflight_phase(ftj) == PreflightPhase.RUNNING:
            why = "the pre-flight Job was deleted before it finished"
            return Step((), (), _status(PreflightPhase.FAILED, why), failed=why)
        created = preflight_job(ftj, spec, training, pod_defaults)
        return Step(
            (Create(created),),
            (),
            _status(PreflightPhase.RUNNING, COUNTING, created["metadata"]["name"]),
        )
    seen = follow(
        job,
        pods,
        now,
        start_grace,
        summary=PreflightSummary,
        oom=PREFLIGHT_OOM,
        what="pre-flight",
        doing=COUNTING,
    )
    if seen.figures is not None:
        status = _status(PreflightPhase.SUCCEEDED, None, seen.name)
        figures = {"preflight": {**status["preflight"], **seen.figures}}
        return Step((), seen.after, figures, passed=True)
    if seen.failed is not None:
        failed = _status(PreflightPhase.FAILED, seen.failed, seen.name)
        return Step((), seen.after, failed, failed=seen.failed)
    return Step((), seen.after, _status(PreflightPhase.RUNNING, seen.waiting, seen.name))


def _status(phase: PreflightPhase, message: str | None, job: str | None = None) -> Manifest:
    """status.preflight's own fields; a field that no longer applies is written as None
    (removed), since status writes merge."""
    return {"preflight": {"phase": phase, "message": message, "jobName": job}}
