"""The evaluation of a FineTuneJob that succeeded: a Job of one pod, like a training
pod, that runs `kubetune evaluate --config` (the tuned model against its base on the
run's held-out examples), and status.evaluation from its summary.

A Job of its own rather than a last step of training: a run on many nodes frees them
all when training ends, scoring needs one GPU, and a failed evaluation leaves the run
Succeeded (it only says so in status.evaluation).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_operator.api.finetunejob import EvaluationPhase, FineTuneJobSpec
from kubetune_operator.resources.actions import Action, Create
from kubetune_operator.resources.common import (
    Manifest,
    child_name,
    container_resources,
    scheduling,
)
from kubetune_operator.resources.finetunejob.side_jobs import follow
from kubetune_operator.resources.finetunejob.training_job import (
    CONFIG_DIR,
    CONFIG_KEY,
    TRAINER_CONTAINER,
    run_job,
)
from kubetune_operator.resources.platform import PodDefaults
from kubetune_operator.resources.workloads import EVALUATION_OOM
from kubetune_trainer.contract.summaries import EvaluationSummary

# A crash or lost node gets one more try; a final exit code fails at once (the policy).
BACKOFF_LIMIT = 1
DONE = frozenset({EvaluationPhase.SUCCEEDED, EvaluationPhase.FAILED, EvaluationPhase.SKIPPED})


def job_name(finetunejob: str) -> str:
    return child_name(finetunejob, "evaluate")


def evaluation_phase(ftj: Mapping[str, Any]) -> str | None:
    return ((ftj.get("status") or {}).get("evaluation") or {}).get("phase")


def due(ftj: Mapping[str, Any], spec: FineTuneJobSpec) -> bool:
    """Whether the run, once trained, still has an evaluation to start or follow."""
    return spec.evaluation.enabled and evaluation_phase(ftj) not in DONE


def evaluating(ftj: Mapping[str, Any]) -> bool:
    """Whether an evaluation Job of the run is under way."""
    return evaluation_phase(ftj) == EvaluationPhase.RUNNING


def evaluation_job(
    ftj: Manifest, spec: FineTuneJobSpec, training: Manifest, pods: PodDefaults
) -> Manifest:
    """The training Job's pod (its mounts, image, job.json and identity, so that the run
        is scored on exactly what it trained with) as one pod that runs `kubetune evaluate`
        on one GPU. Placement comes from the spec again: Kueue writes its flavor's into an
        admitted Job's template, and admits this Job on its own; the platform's pod defaults
    are applied again with it."""
    meta = ftj["metadata"]
    name = meta["name"]
    pod = copy.deepcopy(training["spec"]["template"]["spec"])
    for key in ("subdomain", "nodeSelector", "tolerations", "priorityClassName"):
        pod.pop(key, None)
    pod |= scheduling(spec.resources)
    one_gpu = spec.resources.model_copy(update={"gpus": min(spec.resources.gpus, 1)})
    for container in pod["containers"]:
        if container["name"] == TRAINER_CONTAINER:
            container["command"] = ["kubetune"]
            container["args"] = [
                "evaluate",
                "--config",
                f"{CONFIG_DIR}/{CONFIG_KEY}",
                "--max-examples",
                str(spec.evaluation.max_examples),
            ]
            container.pop("ports", None)
            container["resources"] = container_resources(one_gpu)
    return run_job(
        ftj,
        spec,
        "evaluation",
        job_name(name),
        {"backoffLimit": BACKOFF_LIMIT, "suspend": bool(spec.queue_name)},
        pod,
        pods,
    )


def evaluate(
    ftj: Manifest,
    spec: FineTuneJobSpec,
    training: Manifest | None,
    job: Manifest | None,
    pods: Sequence[Manifest],
    now: str,
    start_grace: float,
    pod_defaults: PodDefaults,
) -> tuple[tuple[Action, ...], tuple[Action, ...], Manifest]:
    """(actions, actions after the status write, status fields) for a run that has
    trained: start its evaluation Job, follow it, and report its figures."""
    if not due(ftj, spec):
        return (), (), {}
    if spec.validation is None:
        return (
            (),
            (),
            _status(EvaluationPhase.SKIPPED, "the run has no validation data to score on"),
        )
    if job is None:
        if evaluating(ftj):
            # Deleted under way: the Job is made again only while nothing says it ran.
            return (), (), _status(EvaluationPhase.FAILED, "the evaluation Job was deleted")
        if training is None:
            return (
                (),
                (),
                _status(
                    EvaluationPhase.SKIPPED, "the training Job is gone: nothing to score it with"
                ),
            )
        created = evaluation_job(ftj, spec, training, pod_defaults)
        return (
            (Create(created),),
            (),
            _status(EvaluationPhase.RUNNING, None, created["metadata"]["name"]),
        )
    seen = follow(
        job,
        pods,
        now,
        start_grace,
        summary=EvaluationSummary,
        oom=EVALUATION_OOM,
        what="evaluation",
        doing="scoring the tuned model against its base",
    )
    if seen.figures is not None:
        status = _status(EvaluationPhase.SUCCEEDED, None, seen.name)
        return (), seen.after, {"evaluation": {**status["evaluation"], **seen.figures}}
    if seen.failed is not None:
        return (), seen.after, _status(EvaluationPhase.FAILED, seen.failed, seen.name)
    return (), seen.after, _status(EvaluationPhase.RUNNING, seen.waiting, seen.name)


def _status(phase: EvaluationPhase, message: str | None, job: str | None = None) -> Manifest:
    """status.evaluation's own fields. Status writes merge into what is there, so a
    field that no longer applies is written as None (removed), not left out."""
    return {"evaluation": {"phase": phase, "message": message, "jobName": job}}
