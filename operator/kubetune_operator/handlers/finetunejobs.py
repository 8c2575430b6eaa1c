"""FineTuneJob handlers: observe what a run's decision depends on (its Datasets, its
training Job and pods, the trainer's gauges, the ModelDeployment of its name), decide
(resources/finetunejob/decide.py), act."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune_operator.api.common import GROUP, VERSION
from kubetune_operator.api.finetunejob import FINE_TUNE_JOB, FineTuneJobSpec
from kubetune_operator.api.modeldeployment import MODEL_DEPLOYMENT
from kubetune_operator.handlers import modeldeployments
from kubetune_operator.handlers.act import plain, reconcile_object, reconciling, resync_each
from kubetune_operator.handlers.context import Context, context_of, now
from kubetune_operator.observability import PHASES
from kubetune_operator.resources import references
from kubetune_operator.resources.common import LABEL_FINETUNEJOB, Manifest, owned_by
from kubetune_operator.resources.conditions import unobserved
from kubetune_operator.resources.finetunejob import evaluation as ev
from kubetune_operator.resources.finetunejob import preflight as pf
from kubetune_operator.resources.finetunejob import training_job as tj
from kubetune_operator.resources.finetunejob.decide import (
    Observed,
    active,
    dataset_roles,
    decide,
    finished,
    may_have_pods,
    needs_datasets,
    trained,
    trainer_endpoint,
    uses_dataset,
)
from kubetune_operator.resources.finetunejob.deploy import shared_server
from kubetune_operator.resources.finetunejob.progress import parse_samples
from kubetune_operator.resources.platform import with_output
from kubetune_operator.resources.workloads import job_finished


def reconcile(
    ctx: Context,
    namespace: str,
    name: str,
    ftj: Manifest | None = None,
    job: Manifest | None = None,
) -> None:
    """Bring one FineTuneJob's children and status in line with its spec. `ftj` and
    `job` are bodies a watch event already delivered; they spare a read, and a stale one
    only costs a retried status write."""
    with reconciling(ctx, FINE_TUNE_JOB, namespace, name, ftj) as live:
        if live is None:
            return
        spec = with_output(
            FineTuneJobSpec.model_validate(live["spec"]), live["metadata"], ctx.settings.model_store
        )
        if job is not None and not owned_by(job, live["metadata"]["uid"]):
            job = None  # an event of a deleted namesake's Job: look for this one's own
        decision = reconcile_object(
            ctx,
            FINE_TUNE_JOB,
            live,
            lambda found: observe(ctx, live, spec, job, found),
            lambda seen: decide(seen, ctx.settings),
        )
        if decision.dependents_changed:
            modeldeployments.finetunejob_changed(ctx, namespace, name, live)


def observe(
    ctx: Context,
    ftj: Manifest,
    spec: FineTuneJobSpec,
    job: Manifest | None,
    found: Manifest | None,
) -> Observed:
    """Read what the decision can depend on, and no more: a finished run needs nothing
    (``job`` is its Job's event, for the cleanup of a run whose pod never started);
    ``found`` is what a create ran into, this run's Job or a namesake's object."""
    meta = ftj["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    at = now()
    namesake = None
    evaluation_job = preflight_job = None
    if found is not None:
        if found.get("kind") == "Job" and owned_by(found, uid):
            if found["metadata"]["name"] == ev.job_name(name):
                evaluation_job = found
            elif found["metadata"]["name"] == pf.job_name(name):
                preflight_job = found
            else:
                job = found
        else:
            namesake = found
    if finished(ftj):
        return Observed(ftj, spec, at, job=job)
    # Without a recorded jobName the Job most likely does not exist: creating it
    # straight away saves a read, and AlreadyExists (after a crash between create and
    # status write) brings it here as ``found``.
    if job is None and namesake is None and (ftj.get("status") or {}).get("jobName"):
        current = ctx.api.get_job(namespace, tj.job_name(name))
        if current is not None and owned_by(current, uid):
            job = current
        else:
            namesake = current
    if namesake is not None:
        return Observed(ftj, spec, at, namesake=namesake)
    datasets: dict[str, Manifest | None] = {}
    missing: list[references.Reference] = []
    preflight_pods: list[Manifest] = []
    if needs_datasets(ftj, job):
        datasets = {ds: ctx.dataset(namespace, ds) for ds in dataset_roles(spec)}
        missing = [
            ref
            for ref in references.of_finetunejob(spec)
            if not ctx.api.exists(ref.kind, namespace, ref.name)
        ]
        # As for the training Job: read only once status says it was made.
        recorded = ((ftj.get("status") or {}).get("preflight") or {}).get("jobName")
        if (recorded or preflight_job is not None) and pf.needed(ftj, spec):
            preflight_job, preflight_pods, namesake = _side_job(
                ctx, namespace, pf.job_name(name), uid, preflight_job
            )
            if namesake is not None:
                return Observed(ftj, spec, at, namesake=namesake)
    pods = (
        ctx.api.job_pods(namespace, job["metadata"]["name"]) if job and may_have_pods(job) else []
    )
    samples = None
    endpoint = trainer_endpoint(job, pods, at, ctx.settings) if job is not None else None
    if endpoint is None:
        ctx.scrapes.forget((namespace, name))
    else:
        text = ctx.scrapes.latest(
            (namespace, name), endpoint, then=lambda: reconcile(ctx, namespace, name)
        )
        samples = parse_samples(text) if text is not None else None
    deployment = shared = None
    if trained(ftj, job):
        deployment = ctx.api.get_object(MODEL_DEPLOYMENT.plural, namespace, name)
        server = shared_server(spec)
        if server is not None:
            shared = ctx.api.get_object(MODEL_DEPLOYMENT.plural, namespace, server)
    workload = (
        ctx.api.job_workload(namespace, job["metadata"]["uid"])
        if job is not None and spec.queue_name and not job_finished(job)
        else None
    )
    evaluation_pods: list[Manifest] = []
    if trained(ftj, job) and ev.due(ftj, spec):
        evaluation_job, evaluation_pods, namesake = _side_job(
            ctx, namespace, ev.job_name(name), uid, evaluation_job
        )
        if namesake is not None:
            return Observed(ftj, spec, at, namesake=namesake)
    return Observed(
        ftj,
        spec,
        at,
        job=job,
        pods=pods,
        datasets=datasets,
        samples=samples,
        deployment=deployment,
        workload=workload,
        evaluation_job=evaluation_job,
        evaluation_pods=evaluation_pods,
        missing=missing,
        shared_server=shared,
        preflight_job=preflight_job,
        preflight_pods=preflight_pods,
    )


def _side_job(
    ctx: Context, namespace: str, job_name: str, uid: str, found: Manifest | None
) -> tuple[Manifest | None, list[Manifest], Manifest | None]:
    """A pre-flight or evaluation Job of the run (``found`` when a create ran into it,
    else read) with its pods, or the namesake's Job under that name: (job, pods,
    namesake)."""
    job = found if found is not None else ctx.api.get_job(namespace, job_name)
    if job is not None and not owned_by(job, uid):
        return None, [], job
    pods = ctx.api.job_pods(namespace, job_name) if job is not None and may_have_pods(job) else []
    return job, pods, None


@kopf.on.event(GROUP, VERSION, FINE_TUNE_JOB.plural)
def finetunejob_event(
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Every FineTuneJob watch event. Reconciled when its spec is new or changed, and at
    the operator's start (the initial listing, `type` None) while it is active, which
    resumes whatever a previous operator left. As for Datasets, no kopf bookkeeping and
    no kopf retries: the periodic resync takes up a reconcile that failed."""
    if not namespace:
        return
    ctx = context_of(memo)
    before = ctx.watched.get(FINE_TUNE_JOB.plural, namespace, name)
    if type == "DELETED":
        ctx.watched.forget(FINE_TUNE_JOB.plural, namespace, name)
        ctx.scrapes.forget((namespace, name))
        PHASES.record(FINE_TUNE_JOB.kind, namespace, name, None)
        if modeldeployments.serving_changed(before, None):
            modeldeployments.finetunejob_changed(ctx, namespace, name, before)
        return
    ftj = plain(body)
    ctx.watched.remember(FINE_TUNE_JOB.plural, ftj)
    if unobserved(ftj) or (type is None and active(ftj)):
        reconcile(ctx, namespace, name, ftj=ftj)
    if modeldeployments.serving_changed(before, ftj):
        modeldeployments.finetunejob_changed(ctx, namespace, name, before, ftj)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
def training_object_event(
    type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
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
    # makes the Job again while the FineTuneJob still wants one). The evaluation Job's
    # events only move the run on: the reconcile reads that Job itself.
    current = (
        body.get("kind") == "Job"
        and type != "DELETED"
        and body.get("metadata", {}).get("name") == tj.job_name(owner)
    )
    reconcile(context_of(memo), namespace, owner, job=plain(body) if current else None)


def dataset_settled(ctx: Context, namespace: str, dataset: str) -> None:
    """Move on the FineTuneJobs waiting for this Dataset's validation."""
    for ftj in ctx.watched.all(FINE_TUNE_JOB.plural, namespace):
        if uses_dataset(ftj, dataset):
            reconcile(ctx, namespace, ftj["metadata"]["name"])


def resync(ctx: Context) -> None:
    """Reconcile every active or unobserved FineTuneJob: reads the trainers' metrics
    while they run, and retries a reconcile that failed. A periodic loop rather than a
    kopf timer, because kopf puts a finalizer on objects with timers, and a FineTuneJob
    must stay deletable while the operator is away."""
    resync_each(ctx, FINE_TUNE_JOB, lambda ftj: active(ftj) or unobserved(ftj), reconcile)
