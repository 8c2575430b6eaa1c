"""FineTuneJob → (Datasets Ready) → job.json ConfigMap + training Job → status, with
progress and losses read from the trainer while it runs."""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.handlers import modeldeployments
from kubetune_operator.handlers.common import (
    context,
    live_object,
    now,
    one_at_a_time,
    resync_each,
    write_phase,
)
from kubetune_operator.kube import Manifest, owned_by, scrape
from kubetune_operator.observability import PHASES, RECONCILE_SECONDS
from kubetune_operator.resources import model_deployment as serving
from kubetune_operator.resources import training_job as tj
from kubetune_operator.resources.common import LABEL_FINETUNEJOB
from kubetune_operator.resources.metrics import (
    metrics_from_samples,
    parse_samples,
    progress_from_samples,
)
from kubetune_operator.resources.status import (
    FINAL,
    JobState,
    dataset_gate,
    job_finished,
    job_state,
    status_from_job,
    unobserved,
)

log = logging.getLogger(__name__)

PLURAL = "finetunejobs"
# Phases in which something may change without an event the operator sees: metrics
# move, and a missed watch event would otherwise leave status stale.
ACTIVE = ("Pending", "WaitingForDataset", "Queued", "Running", "Suspended")
# Phases worth a Kubernetes Event: the ones a user waits for. The others show in status.
EVENT_PHASES = ("Running", "Succeeded", "Failed")


def _write(ftj: Manifest, fields: Manifest, reason: str) -> Manifest | None:
    phase = fields["phase"]
    ready = True if phase == "Succeeded" else False if phase == "Failed" else None
    return write_phase(
        PLURAL,
        "FineTuneJob",
        ftj,
        fields,
        reason,
        ready=ready,
        final=FINAL,
        event_phases=EVENT_PHASES,
    )


def reconcile(
    namespace: str, name: str, ftj: Manifest | None = None, job: Manifest | None = None
) -> None:
    """Bring one FineTuneJob's children and status in line with its spec. `ftj` and
    `job` are bodies a watch event already delivered; they spare a read, and a stale one
    only costs a retried status write."""
    with (
        one_at_a_time("FineTuneJob", namespace, name),
        RECONCILE_SECONDS.labels("FineTuneJob").time(),
    ):
        _reconcile(namespace, name, ftj, job)


def _reconcile(namespace: str, name: str, ftj: Manifest | None, job: Manifest | None) -> None:
    ctx = context()
    api = ctx.api
    ftj = live_object(PLURAL, "FineTuneJob", namespace, name, ftj)
    if ftj is None:
        return
    status = ftj.get("status") or {}
    if status.get("phase") in FINAL and status.get("observedGeneration") == ftj["metadata"].get(
        "generation"
    ):
        if (
            status["phase"] == "Failed"
            and job is not None
            and owned_by(job, ftj["metadata"]["uid"])
            and not job_finished(job)
        ):
            # Failed because its pod never started, and the Job's deletion was lost (an
            # operator that stopped in between): its Jobs' events at the next start
            # bring it here, and no pod may wait on for a Failed run.
            api.delete_job(namespace, job["metadata"]["name"])
        return
    spec = FineTuneJobSpec.model_validate(ftj["spec"])
    uid = ftj["metadata"]["uid"]
    if job is not None and not owned_by(job, uid):
        job = None  # an event of a deleted namesake's Job: look for this one's own
    if job is None and status.get("jobName"):
        job = api.get_job(namespace, tj.job_name(name))
    if job is None and status.get("phase") in FINAL:
        _finished_without_job(ftj, spec, status)
        return
    # Without a recorded jobName the Job most likely does not exist: creating it
    # straight away saves a read, and AlreadyExists (after a crash between create and
    # status write) falls back to reading it.
    created: Manifest = {}
    if job is None:
        ds = ctx.dataset(namespace, spec.dataset.name)
        val_ds = None
        gates = [dataset_gate(ds, "training", spec.dataset.name)]
        if spec.validation is not None and spec.validation.dataset is not None:
            val_ds = ctx.dataset(namespace, spec.validation.dataset.name)
            gates.append(dataset_gate(val_ds, "validation", spec.validation.dataset.name))
        blocked = next((g for g in gates if g is not None), None)
        if blocked is not None:
            phase, reason, message = blocked
            _write(ftj, {"phase": phase, "message": message}, reason)
            return
        assert ds is not None
        inputs = tj.Inputs(
            finetunejob=ftj,
            dataset=DatasetSpec.model_validate(ds["spec"]),
            dataset_sha256=ds["status"].get("sha256"),
            validation_dataset=DatasetSpec.model_validate(val_ds["spec"])
            if val_ds is not None
            else None,
        )
        plan = tj.plan(inputs, ctx.settings.trainer_image)
        api.ensure_service_account(tj.service_account(namespace))
        config_map = tj.config_map(plan)
        existing = api.ensure_config_map(config_map)
        if existing is not None and not owned_by(existing, uid):
            _wait_for_namesake(ftj, "ConfigMap", config_map["metadata"]["name"])
            return
        if spec.resources.nodes > 1:
            api.ensure_service(tj.rendezvous_service(plan))
        job = api.create_job(tj.training_job(plan)) or api.get_job(namespace, tj.job_name(name))
        if job is None:
            return
        created = {"datasetSha256": inputs.dataset_sha256, "outputModel": {"uri": plan.output_uri}}
    if not owned_by(job, uid):
        _wait_for_namesake(ftj, "Job", job["metadata"]["name"])
        return
    _sync_suspend(spec, job)
    pods = api.job_pods(namespace, job["metadata"]["name"]) if _may_have_pods(job) else []
    at = now()
    state = job_state(job, pods, at, ctx.settings.start_grace)
    uri = (created.get("outputModel") or status.get("outputModel") or {}).get("uri", "")
    fields = {
        **status_from_job(ftj, state, uri, at),
        **created,
        "jobName": job["metadata"]["name"],
    }
    if state.phase == "Succeeded":
        fields |= _deploy(ftj, spec)
    updated = _write(ftj, fields, state.reason or state.phase)
    if state.stop_job:
        # Only once the status says Failed: the Job's deletion brings this run back
        # here, and it must not find a run that still wants a Job.
        api.delete_job(namespace, job["metadata"]["name"])
    after = ((updated or {}).get("status") or {}).get("phase")
    if after in FINAL and after != status.get("phase"):
        modeldeployments.finetunejob_finished(namespace, name)
    if state.phase == "Running":
        _scrape_into_status(updated or ftj, state)


def _finished_without_job(ftj: Manifest, spec: FineTuneJobSpec, status: Manifest) -> None:
    """A finished run whose Job is gone (deleted, or removed by a cleanup policy) got a
    spec edit: the fields that define the run are immutable, so it never trains again;
    only deploy can change what follows from it."""
    fields: Manifest = {"phase": status["phase"], "message": status.get("message")}
    if status["phase"] == "Succeeded":
        fields |= _deploy(ftj, spec)
    ready: Manifest = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    _write(ftj, fields, ready.get("reason") or status["phase"])


def _wait_for_namesake(ftj: Manifest, kind: str, name: str) -> None:
    """A child's name is taken by an object this FineTuneJob does not own: most likely
    left by a deleted FineTuneJob of the same name and about to be garbage-collected.
    Using it would train with another job's settings or report another job's outcome;
    the Job's deletion event, or the periodic resync, tries again."""
    message = (
        f"{kind} {name} exists but does not belong to this FineTuneJob (a deleted "
        "FineTuneJob of the same name left it, or someone else made it); waiting for it "
        "to be deleted"
    )
    _write(ftj, {"phase": "Pending", "message": message}, "WaitingForCleanup")


def _deploy(ftj: Manifest, spec: FineTuneJobSpec) -> Manifest:
    """Serve the result as spec.deploy says: apply its ModelDeployment, or delete the one
    it made once deploy is turned off. Returns the status fields to write with it."""
    api = context().api
    meta = ftj["metadata"]
    existing = api.get_object("modeldeployments", meta["namespace"], meta["name"])
    if existing is not None and not owned_by(existing, meta["uid"]):
        if spec.deploy is not None and spec.deploy.enabled:
            return {
                "deployment": None,
                "message": f"trained, but not deployed: ModelDeployment {meta['name']} "
                "exists and belongs to something else",
            }
        return {"deployment": None}
    if spec.deploy is not None and spec.deploy.enabled:
        md = api.apply_object("modeldeployments", serving.for_finetunejob(ftj, spec.deploy))
        return {"deployment": {"name": md["metadata"]["name"]}}
    if existing is not None:
        api.delete_object("modeldeployments", meta["namespace"], meta["name"])
    return {"deployment": None}


def _may_have_pods(job: Manifest) -> bool:
    """A Job that has never counted a pod nor finished has none worth reading: skipping
    the list halves the requests for a fresh or queued Job."""
    status = job.get("status") or {}
    return bool(
        status.get("conditions")
        or any(status.get(k) for k in ("active", "succeeded", "failed", "ready", "terminating"))
    )


def _sync_suspend(spec: FineTuneJobSpec, job: Manifest) -> None:
    """spec.suspend drives the Job's suspend; with a queue, Kueue unsuspends it, so the
    operator only ever suspends."""
    suspended = bool(job["spec"].get("suspend"))
    meta = job["metadata"]
    if spec.suspend and not suspended:
        context().api.set_job_suspended(meta["namespace"], meta["name"], True)
        job["spec"]["suspend"] = True
    elif not spec.suspend and suspended and not spec.queue_name:
        context().api.set_job_suspended(meta["namespace"], meta["name"], False)
        job["spec"]["suspend"] = False


def _scrape_into_status(ftj: Manifest, state: JobState) -> None:
    ctx = context()
    if not state.pod_ip or not state.metrics_port:
        return
    text = scrape(state.pod_ip, state.metrics_port, ctx.settings.scrape_timeout)
    if text is None:
        return
    samples = parse_samples(text)
    progress, metrics = progress_from_samples(samples), metrics_from_samples(samples)
    if progress is None and metrics is None:
        return
    meta = ftj["metadata"]

    def compute(obj: Manifest) -> Manifest | None:
        if (obj.get("status") or {}).get("phase") != "Running":
            return None
        patch: Manifest = {}
        if progress is not None:
            patch["progress"] = progress.model_dump(by_alias=True, exclude_none=True)
        if metrics is not None:
            patch["metrics"] = metrics.model_dump(by_alias=True, exclude_none=True)
        return patch

    ctx.api.update_status(PLURAL, meta["namespace"], meta["name"], compute)


@kopf.on.event("kubetune.io", "v1alpha1", PLURAL)
def finetunejob_event(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    """Every FineTuneJob watch event. Reconciled when its spec is new or changed, and at
    the operator's start (the initial listing, `type` None) while it is active, which
    resumes whatever a previous operator left. An event handler leaves no kopf
    bookkeeping on the object and has no kopf retries: a failed reconcile leaves the
    object unobserved, and the periodic resync takes it up again."""
    if not namespace:
        return
    if type == "DELETED":
        context().watched.forget(PLURAL, namespace, name)
        PHASES.record("FineTuneJob", namespace, name, None)
        return
    ftj = _plain(body)
    context().watched.remember(PLURAL, ftj)
    if unobserved(ftj) or (type is None and _active(ftj)):
        reconcile(namespace, name, ftj=ftj)


def _active(ftj: Manifest | kopf.Body) -> bool:
    return (ftj.get("status") or {}).get("phase") in ACTIVE


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
def training_object_event(
    type: str | None, body: kopf.Body, namespace: str | None, **_: Any
) -> None:
    # Both the Job and its pods carry the FineTuneJob's name as a label.
    owner = (body.get("metadata", {}).get("labels") or {}).get(LABEL_FINETUNEJOB)
    if not owner or not namespace:
        return
    if body.get("kind") == "Job" and not body.get("status") and type != "DELETED":
        # A Job nothing has acted on yet: the reconcile that created it wrote the status
        # this would give; its pods and its controller's first update will tell more.
        return
    # A deleted Job's last body is no state to report: the reconcile reads afresh (and
    # makes the Job again while the FineTuneJob still wants one).
    current = body.get("kind") == "Job" and type != "DELETED"
    reconcile(namespace, owner, job=_plain(body) if current else None)


@kopf.on.event("kubetune.io", "v1alpha1", "datasets")
def dataset_event(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    """Keep the watch's copy of every Dataset, and when one is done validating, move on
    the FineTuneJobs waiting for it."""
    if not namespace:
        return
    watched = context().watched
    if type == "DELETED":
        watched.forget("datasets", namespace, name)
        return
    watched.remember("datasets", _plain(body))
    phase = (body.get("status") or {}).get("phase")
    if phase not in ("Ready", "Invalid", "Failed"):
        return
    for ftj in watched.all(PLURAL, namespace):
        spec = ftj.get("spec", {})
        uses = {
            spec.get("dataset", {}).get("name"),
            ((spec.get("validation") or {}).get("dataset") or {}).get("name"),
        }
        if name in uses and (ftj.get("status") or {}).get("phase") in (
            None,
            "Pending",
            "WaitingForDataset",
        ):
            reconcile(namespace, ftj["metadata"]["name"])


def resync() -> None:
    """Reconcile every active or unobserved FineTuneJob: reads the trainers' metrics
    while they run, and retries a reconcile that failed. A periodic loop rather than a
    kopf timer, because kopf puts a finalizer on objects with timers, and a FineTuneJob
    must stay deletable while the operator is away."""
    resync_each(PLURAL, lambda ftj: _active(ftj) or unobserved(ftj), reconcile)


def _plain(body: kopf.Body) -> Manifest:
    """A kopf body as the plain, mutable dict the API client returns."""
    return copy.deepcopy(dict(body))
