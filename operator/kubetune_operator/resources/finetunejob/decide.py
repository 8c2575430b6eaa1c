"""FineTuneJob: what to do and what status to write, given what the cluster shows.

A run waits for its Datasets to be Ready, gets its job.json ConfigMap and training
Job, follows the Job (progress and losses from the trainer's gauges while it runs, the
trainer's summary when it ends), and once trained is served as spec.deploy says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FINISHED, FineTuneJobSpec, JobPhase
from kubetune_operator.resources.actions import (
    Action,
    Activate,
    Create,
    Decision,
    Delete,
    Suspend,
)
from kubetune_operator.resources.common import Manifest, trainer_service_account
from kubetune_operator.resources.conditions import (
    Notice,
    StatusUpdate,
    Verdict,
    phase_of,
    ready_reason,
    settled,
)
from kubetune_operator.resources.finetunejob import evaluation as ev
from kubetune_operator.resources.finetunejob import preflight as pf
from kubetune_operator.resources.finetunejob import training_job as tj
from kubetune_operator.resources.finetunejob.deploy import deploy
from kubetune_operator.resources.finetunejob.progress import (
    metrics_from_samples,
    progress_from_samples,
)
from kubetune_operator.resources.finetunejob.status import (
    WAITING_TO_TRAIN,
    between_trainers,
    dataset_gate,
    remote_images_gate,
    status_from_job,
    task_mismatch,
)
from kubetune_operator.resources.platform import output_problem
from kubetune_operator.resources.policy import NOT_ALLOWED, finetunejob_refusal, was_refused
from kubetune_operator.resources.references import Reference, missing_message, missing_reason
from kubetune_operator.resources.workloads import (
    START_FAILURES,
    RunPhase,
    job_complete,
    job_finished,
    job_state,
)
from kubetune_operator.settings import Settings

# The phases worth a Kubernetes Event: the ones a user waits for. The others show in status.
NOTICED = frozenset({JobPhase.RUNNING, JobPhase.SUCCEEDED, JobPhase.FAILED})
# The phases of a run that waits for its Datasets.
WAITING = (None, JobPhase.PENDING, JobPhase.WAITING_FOR_DATASET)


@dataclass(frozen=True)
class Observed:
    """What one reconcile of a FineTuneJob saw. The handler reads only what the
    decision can depend on: the Datasets while the run has no Job, the pods of a Job
    that may have some, the trainer's gauges while it trains, and the ModelDeployment
    of its name once it has trained."""

    finetunejob: Manifest
    spec: FineTuneJobSpec
    now: str
    job: Manifest | None = None
    pods: Sequence[Manifest] = ()
    # A child object under this run's names that it does not own, most likely left by a
    # deleted FineTuneJob of the same name and about to be garbage-collected.
    namesake: Manifest | None = None
    datasets: Mapping[str, Manifest | None] = field(default_factory=dict)
    samples: Mapping[str, float] | None = None
    deployment: Manifest | None = None
    # Kueue's Workload of the Job, for a run with a queue.
    workload: Manifest | None = None
    # The evaluation Job and its pods, once the run has trained and is to be scored.
    evaluation_job: Manifest | None = None
    evaluation_pods: Sequence[Manifest] = ()
    # What the spec names that does not exist, looked for while the Job is to be made.
    missing: Sequence[Reference] = ()
    # The shared ModelDeployment deploy.modelDeployment names, once the run has trained.
    shared_server: Manifest | None = None
    # The pre-flight Job and its pods, while the run has no training Job and its
    # pre-flight has not passed.
    preflight_job: Manifest | None = None
    preflight_pods: Sequence[Manifest] = ()


def dataset_roles(spec: FineTuneJobSpec) -> dict[str, str]:
    """The Datasets the run trains and validates on, by name, with their role."""
    roles = {spec.dataset.name: "training"}
    if spec.validation is not None and spec.validation.dataset is not None:
        roles.setdefault(spec.validation.dataset.name, "validation")
    return roles


def finished(ftj: Manifest) -> bool:
    """Whether the run has ended for its current spec, its evaluation included: nothing
    about it can change."""
    return settled(ftj, FINISHED) and not ev.evaluating(ftj)


def needs_datasets(ftj: Manifest, job: Manifest | None) -> bool:
    """Whether a reconcile may create the training Job, and so needs its Datasets: a
    run that has none and has not ended, or one the policy refused (it starts afresh
    once its spec changes)."""
    if job is not None:
        return False
    return phase_of(ftj) not in FINISHED or (was_refused(ftj) and not finished(ftj))


def trained(ftj: Manifest, job: Manifest | None) -> bool:
    """Whether the run has trained, so that spec.deploy applies."""
    if job is not None:
        return job_complete(job)
    return phase_of(ftj) == JobPhase.SUCCEEDED


def may_have_pods(job: Manifest) -> bool:
    """A Job that has never counted a pod nor finished has none worth reading: skipping
    the list halves the requests for a fresh or queued Job."""
    status = job.get("status") or {}
    return bool(
        status.get("conditions")
        or any(status.get(k) for k in ("active", "succeeded", "failed", "ready", "terminating"))
    )


def trainer_endpoint(
    job: Manifest, pods: Sequence[Manifest], now: str, settings: Settings
) -> tuple[str, int] | None:
    """Where the running trainer serves its gauges, or None when it does not run."""
    state = job_state(job, pods, now, settings.start_grace)
    if state.phase != RunPhase.RUNNING or not state.pod_ip or not state.metrics_port:
        return None
    return state.pod_ip, state.metrics_port


def uses_dataset(ftj: Manifest, dataset: str) -> bool:
    """Whether the run waits for this Dataset to be validated."""
    spec = ftj.get("spec") or {}
    names = {
        (spec.get("dataset") or {}).get("name"),
        ((spec.get("validation") or {}).get("dataset") or {}).get("name"),
    }
    return dataset in names and phase_of(ftj) in WAITING


def active(ftj: Manifest) -> bool:
    """Whether the run may change without an event the operator sees (its metrics move,
    a pod's start grace runs out, Kueue says why it waits; a missed watch event would
    leave status stale). A suspended run changes only with its spec or its Job, whose
    events bring it back: rereading each one every period would cost three requests for
    nothing."""
    phase = phase_of(ftj)
    return (phase not in FINISHED and phase != JobPhase.SUSPENDED) or ev.evaluating(ftj)


def decide(seen: Observed, settings: Settings) -> Decision:
    ftj = seen.finetunejob
    status = ftj.get("status") or {}
    if finished(ftj):
        return _finished(seen)
    if needs_datasets(ftj, seen.job):
        refusal = finetunejob_refusal(seen.spec, settings.policy)
        if refusal is not None:
            return _decision(seen, Verdict(JobPhase.FAILED, NOT_ALLOWED, refusal))
        nowhere = output_problem(seen.spec)
        if nowhere is not None:
            return _decision(seen, Verdict(JobPhase.FAILED, "NoOutputStorage", nowhere))
    if seen.namesake is not None:
        return _decision(seen, _waiting_for_namesake(seen.namesake))
    if seen.job is None and status.get("phase") in FINISHED and not was_refused(ftj):
        return _finished_without_job(seen, settings)
    actions: tuple[Action, ...] = ()
    created: Manifest = {}
    job = seen.job
    if job is None:
        roles = dataset_roles(seen.spec).items()
        waiting = next(
            (
                gate
                for check in (
                    partial(task_mismatch, seen.spec.method),
                    dataset_gate,
                    remote_images_gate,
                )
                for name, role in roles
                if (gate := check(seen.datasets.get(name), role, name)) is not None
            ),
            None,
        )
        if waiting is not None:
            return _decision(seen, waiting)
        if seen.missing:
            namespace = seen.finetunejob["metadata"]["namespace"]
            return _decision(
                seen,
                Verdict(
                    JobPhase.PENDING,
                    missing_reason(seen.missing),
                    missing_message(seen.missing, namespace),
                ),
            )
        plan = _plan(seen, settings)
        job = tj.training_job(plan, settings.pod_defaults)
        inputs = (
            Create(
                trainer_service_account(
                    plan.finetunejob["metadata"]["namespace"], settings.identity_annotations
                )
            ),
            Create(tj.config_map(plan)),
        )
        checked: Manifest = {}
        if pf.needed(ftj, seen.spec):
            step = pf.preflight(
                ftj,
                seen.spec,
                job,
                seen.preflight_job,
                seen.preflight_pods,
                seen.now,
                settings.start_grace,
                settings.pod_defaults,
            )
            if step.failed is not None:
                verdict = Verdict(JobPhase.FAILED, "PreflightFailed", f"pre-flight: {step.failed}")
                fields = {"phase": verdict.phase, "message": verdict.message, **step.status}
                return _decision(seen, verdict, fields, step.actions, step.after)
            if not step.passed:
                message = step.status["preflight"]["message"]
                verdict = Verdict(JobPhase.PENDING, "Preflight", message)
                fields = {"phase": verdict.phase, "message": message, **step.status}
                # The pre-flight pod mounts job.json: made with the Job that runs it.
                made = (*inputs, *step.actions) if step.actions else ()
                return _decision(seen, verdict, fields, made, step.after)
            checked = step.status
        actions = (
            *inputs,
            *((Create(tj.rendezvous_service(plan)),) if seen.spec.resources.nodes > 1 else ()),
            Create(job),
        )
        created = {
            "datasetSha256": plan.config.dataset_sha256,
            "outputModel": {"uri": plan.output_uri},
            **checked,
        }
    elif seen.spec.queue_name:
        activate = _activate(seen.spec, seen.workload)
        actions = (activate,) if activate is not None else ()
    else:
        suspend = _suspend(seen.spec, job)
        if suspend is not None:
            actions = (suspend,)
            job = {**job, "spec": {**job["spec"], "suspend": suspend.suspend}}
    return _following(seen, job, actions, created, settings)


def _following(
    seen: Observed,
    job: Manifest,
    actions: tuple[Action, ...],
    created: Manifest,
    settings: Settings,
) -> Decision:
    """The run as its training Job shows it."""
    status = seen.finetunejob.get("status") or {}
    state = job_state(job, seen.pods, seen.now, settings.start_grace)
    uri = (created.get("outputModel") or status.get("outputModel") or {}).get("uri", "")
    fields = {
        **status_from_job(seen.spec, state, uri, seen.now, seen.workload),
        **created,
        "jobName": job["metadata"]["name"],
    }
    reason = state.reason or state.phase
    if fields["phase"] in WAITING_TO_TRAIN and phase_of(seen.finetunejob) == JobPhase.RUNNING:
        reason, message = between_trainers(seen.spec, state, job, seen.pods, seen.workload)
        fields |= {"phase": JobPhase.RUNNING, "message": message}
    if state.phase == RunPhase.RUNNING:
        fields |= _gauges(seen.samples)
    after: tuple[Action, ...] = ()
    if state.phase == RunPhase.SUCCEEDED:
        served, deployed = deploy(
            seen.finetunejob, seen.spec, seen.deployment, settings.policy, seen.shared_server
        )
        scoring, after, scored = _evaluate(seen, job, settings)
        actions += served + scoring
        fields |= deployed | scored
    if state.stop_job:
        # The Job of a run that failed while it still runs (its pod never started)
        # goes only once status says Failed.
        after = (Delete("Job", job["metadata"]["namespace"], job["metadata"]["name"]),)
    return _decision(
        seen,
        Verdict(fields["phase"], reason, fields["message"]),
        fields,
        actions,
        after,
    )


def _evaluate(
    seen: Observed, training: Manifest | None, settings: Settings
) -> tuple[tuple[Action, ...], tuple[Action, ...], Manifest]:
    return ev.evaluate(
        seen.finetunejob,
        seen.spec,
        training,
        seen.evaluation_job,
        seen.evaluation_pods,
        seen.now,
        settings.start_grace,
        settings.pod_defaults,
    )


def _gauges(samples: Mapping[str, float] | None) -> Manifest:
    """Progress and losses from the trainer's gauges, once it has counted its steps.
    Before that (a pod that loads the model, a replacement that has not resumed yet)
    its step gauges read 0 of 0: taking them would wipe the progress status holds."""
    if not samples or (progress := progress_from_samples(samples)) is None:
        return {}
    metrics = metrics_from_samples(samples)
    fields: Manifest = {"progress": progress.model_dump(by_alias=True, exclude_none=True)}
    if metrics is not None:
        fields["metrics"] = metrics.model_dump(by_alias=True, exclude_none=True)
    return fields


def _plan(seen: Observed, settings: Settings) -> tj.Plan:
    """The run laid out, once its Datasets are Ready."""
    train = seen.datasets[seen.spec.dataset.name]
    assert train is not None
    validation = None
    if seen.spec.validation is not None and seen.spec.validation.dataset is not None:
        validation = seen.datasets[seen.spec.validation.dataset.name]
    train_status = train.get("status") or {}
    inputs = tj.Inputs(
        finetunejob=seen.finetunejob,
        spec=seen.spec,
        dataset=DatasetSpec.model_validate(train["spec"]),
        dataset_sha256=train_status.get("sha256"),
        validation_dataset=(
            DatasetSpec.model_validate(validation["spec"]) if validation is not None else None
        ),
        remote_images_sha256=train_status.get("remoteImagesSha256"),
        validation_remote_images_sha256=(
            (validation.get("status") or {}).get("remoteImagesSha256")
            if validation is not None
            else None
        ),
    )
    return tj.plan(inputs, settings.trainer_image)


def _suspend(spec: FineTuneJobSpec, job: Manifest) -> Suspend | None:
    """spec.suspend drives the Job's suspend, for a run without a queue."""
    suspended = bool(job["spec"].get("suspend"))
    meta = job["metadata"]
    if spec.suspend != suspended:
        return Suspend(meta["namespace"], meta["name"], spec.suspend)
    return None


def _activate(spec: FineTuneJobSpec, workload: Manifest | None) -> Activate | None:
    """spec.suspend of a run with a queue: Kueue manages its Job (admits it by
    unsuspending it), so the operator never writes the Job's suspend, which Kueue
    would undo; it deactivates the Workload instead, Kueue's own way to stop one."""
    if workload is None:
        return None
    active = (workload.get("spec") or {}).get("active", True)
    if active == (not spec.suspend):
        return None
    meta = workload["metadata"]
    return Activate(meta["namespace"], meta["name"], not spec.suspend)


def _finished(seen: Observed) -> Decision:
    """A run that ended for its current spec. One Failed because its pod never started
    keeps no Job: its deletion may have been lost (an operator that stopped in
    between), and its Job's events at the next start bring the run here. Any other
    Job is the job controller's to finish: a stale event may show it unfinished (say,
    failing, before its Failed condition)."""
    job, ftj = seen.job, seen.finetunejob
    never_started = ready_reason(ftj) in START_FAILURES
    if phase_of(ftj) == JobPhase.FAILED and never_started and job and not job_finished(job):
        return Decision(
            actions=(Delete("Job", job["metadata"]["namespace"], job["metadata"]["name"]),)
        )
    return Decision()


def _finished_without_job(seen: Observed, settings: Settings) -> Decision:
    """A finished run whose Job is gone (deleted, or removed by a cleanup policy) got a
    spec edit: the fields that define the run are immutable, so it never trains again;
    only deploy can change what follows from it."""
    status = seen.finetunejob.get("status") or {}
    fields: Manifest = {"phase": status["phase"], "message": status.get("message")}
    actions: tuple[Action, ...] = ()
    after: tuple[Action, ...] = ()
    if status["phase"] == JobPhase.SUCCEEDED:
        served, deployed = deploy(
            seen.finetunejob, seen.spec, seen.deployment, settings.policy, seen.shared_server
        )
        scoring, after, scored = _evaluate(seen, None, settings)
        actions = served + scoring
        fields |= deployed | scored
    reason = ready_reason(seen.finetunejob) or status["phase"]
    return _decision(
        seen, Verdict(status["phase"], reason, fields["message"]), fields, actions, after
    )


def _waiting_for_namesake(child: Manifest) -> Verdict:
    """Using a namesake's child would train with another job's settings or report
    another job's outcome; its deletion event, or the periodic resync, tries again."""
    kind, name = child.get("kind", "object"), child["metadata"]["name"]
    return Verdict(
        JobPhase.PENDING,
        "WaitingForCleanup",
        f"{kind} {name} exists but does not belong to this FineTuneJob (a deleted "
        "FineTuneJob of the same name left it, or someone else made it); waiting for it "
        "to be deleted",
    )


def _decision(
    seen: Observed,
    verdict: Verdict,
    fields: Manifest | None = None,
    actions: tuple[Action, ...] = (),
    after: tuple[Action, ...] = (),
) -> Decision:
    """The status write for ``verdict`` (its phase, reason and message, with
    ``fields`` when given), and the actions around it."""
    phase = JobPhase(verdict.phase)
    fields = fields if fields is not None else {"phase": phase, "message": verdict.message}
    ready = True if phase == JobPhase.SUCCEEDED else False if phase == JobPhase.FAILED else None
    notice = None
    if phase in NOTICED:
        kind = "Warning" if phase == JobPhase.FAILED else "Normal"
        notice = Notice(kind, verdict.reason, str(fields.get("message") or phase))
    update = StatusUpdate(
        fields=fields,
        reason=verdict.reason,
        ready=ready,
        generation=seen.finetunejob["metadata"].get("generation"),
        done=finished,
        notice=notice,
    )
    return Decision(
        actions=actions,
        status=update,
        after_status=after,
        dependents_changed=phase in FINISHED and phase != phase_of(seen.finetunejob),
    )
