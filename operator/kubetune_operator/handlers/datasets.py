"""Dataset handlers: observe a Dataset's validation Job, decide
(resources/dataset/decide.py), act; and wake the FineTuneJobs that wait for it."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune_operator.api.common import GROUP, VERSION
from kubetune_operator.api.dataset import DATASET, DatasetSpec
from kubetune_operator.handlers import finetunejobs
from kubetune_operator.handlers.act import plain, reconcile_object, reconciling, resync_each
from kubetune_operator.handlers.context import Context, context_of, now
from kubetune_operator.observability import PHASES
from kubetune_operator.resources import references
from kubetune_operator.resources.common import LABEL_DATASET, Manifest, owner_name
from kubetune_operator.resources.conditions import unobserved
from kubetune_operator.resources.dataset.decide import (
    Observed,
    current_job_name,
    decide,
    has_result,
    job_due,
    validated,
)


def reconcile(ctx: Context, namespace: str, name: str) -> None:
    with reconciling(ctx, DATASET, namespace, name) as ds:
        if ds is None:
            return
        spec = DatasetSpec.model_validate(ds["spec"])
        reconcile_object(
            ctx,
            DATASET,
            ds,
            lambda found: observe(ctx, ds, spec, found),
            lambda seen: decide(seen, ctx.settings),
        )


def observe(ctx: Context, ds: Manifest, spec: DatasetSpec, found: Manifest | None) -> Observed:
    """The validation Job of the current generation (``found``, when a create ran into
    it) with its pods, and when a new one is due the Jobs of earlier generations (only
    a new generation makes them stale, so they are looked for only then) and whether
    what the spec names exists."""
    meta = ds["metadata"]
    namespace, name = meta["namespace"], current_job_name(ds)
    job = found if found is not None else ctx.api.get_job(namespace, name)
    earlier = (
        ctx.api.list_jobs(namespace, f"{LABEL_DATASET}={meta['name']}") if job_due(ds, job) else []
    )
    pods = ctx.api.job_pods(namespace, name) if job is not None else []
    missing = (
        [
            ref
            for ref in references.of_dataset(spec)
            if not ctx.api.exists(ref.kind, namespace, ref.name)
        ]
        if job_due(ds, job)
        else []
    )
    return Observed(ds, spec, now(), job=job, pods=pods, earlier_jobs=earlier, missing=missing)


@kopf.on.event(GROUP, VERSION, DATASET.plural)
def dataset_event(
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Reconciled when the spec is new or changed, and at the operator's start (the
    initial listing, `type` None) until validation has settled; in between, the
    validation Job's events drive it. An event handler leaves no kopf bookkeeping on
    the object and has no kopf retries: a failed reconcile leaves the object
    unobserved, and the periodic resync takes it up again. Keeps the watch's copy of
    every Dataset, and when one has a result, moves on the FineTuneJobs waiting for
    it."""
    if not namespace:
        return
    ctx = context_of(memo)
    if type == "DELETED":
        ctx.watched.forget(DATASET.plural, namespace, name)
        PHASES.record(DATASET.kind, namespace, name, None)
        return
    ds = plain(body)
    ctx.watched.remember(DATASET.plural, ds)
    if unobserved(ds) or (type is None and not validated(ds)):
        reconcile(ctx, namespace, name)
    if has_result(ds):
        finetunejobs.dataset_settled(ctx, namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_DATASET: kopf.PRESENT})
def validation_job_event(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    owner = owner_name(body, DATASET.kind)
    if owner is not None and namespace:
        reconcile(context_of(memo), namespace, owner)


def resync(ctx: Context) -> None:
    """Reconcile every Dataset whose validation has not settled."""
    resync_each(ctx, DATASET, lambda ds: not validated(ds), reconcile)
