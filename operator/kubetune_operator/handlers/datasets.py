"""Dataset → validation Job → status."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune_operator.handlers.common import (
    context,
    live_object,
    now,
    one_at_a_time,
    post_event,
    resync_each,
)
from kubetune_operator.kube import Manifest, owned_by, owner_name
from kubetune_operator.observability import PHASES, RECONCILE_SECONDS
from kubetune_operator.resources.common import LABEL_DATASET
from kubetune_operator.resources.status import DONE, dataset_status, job_state, unobserved
from kubetune_operator.resources.training_job import service_account
from kubetune_operator.resources.validation_job import validation_job, validation_job_name

PLURAL = "datasets"

log = logging.getLogger(__name__)


def reconcile(namespace: str, name: str) -> None:
    with one_at_a_time("Dataset", namespace, name), RECONCILE_SECONDS.labels("Dataset").time():
        _reconcile(namespace, name)


def _reconcile(namespace: str, name: str) -> None:
    ctx = context()
    ds = live_object(PLURAL, "Dataset", namespace, name)
    if ds is None:
        return
    generation = ds["metadata"].get("generation", 1)
    current = validation_job_name(name, generation)
    job = ctx.api.get_job(namespace, current)
    if job is not None and not owned_by(job, ds["metadata"]["uid"]):
        # A deleted Dataset of the same name left it: its result is about other data.
        # Its deletion event (or the periodic resync) brings this Dataset back here.
        log.info(
            "%s/%s: waiting for the deletion of Job %s of a namesake", namespace, name, current
        )
        return
    if job is None and not _settled(ds):
        ctx.api.ensure_service_account(service_account(namespace))
        job = ctx.api.create_job(validation_job(ds, ctx.settings.trainer_image)) or ctx.api.get_job(
            namespace, current
        )
        # Jobs of earlier generations validated a spec that no longer exists. Only a new
        # generation makes them stale, so they are looked for only here, not per event.
        for old in ctx.api.list_jobs(namespace, f"{LABEL_DATASET}={name}"):
            if old["metadata"]["name"] != current and owner_name(old, "Dataset") == name:
                ctx.api.delete_job(namespace, old["metadata"]["name"])
    at = now()
    state = None
    if job is not None:
        pods = ctx.api.job_pods(namespace, current)
        state = job_state(job, pods, at, ctx.settings.start_grace)
    before = (ds.get("status") or {}).get("phase")

    def compute(obj: Manifest) -> Manifest | None:
        if obj["metadata"].get("generation") != generation or _settled(obj):
            return None
        return dataset_status(obj, state, current, at)

    updated = ctx.api.update_status(PLURAL, namespace, name, compute)
    if state is not None and state.stop_job:
        # Only once the status says Failed: the Job's deletion brings this Dataset back
        # here, and it must not find a Dataset that still wants a Job.
        ctx.api.delete_job(namespace, current)
    after = ((updated or {}).get("status") or {}).get("phase")
    PHASES.record("Dataset", namespace, name, after)
    if updated is not None and after != before and after in DONE:
        message = updated["status"].get("message", "")
        post_event(updated, "Normal" if after == "Ready" else "Warning", after, message)


def _settled(ds: Manifest | kopf.Body) -> bool:
    status = ds.get("status") or {}
    return (
        status.get("observedGeneration") == ds["metadata"].get("generation")
        and status.get("phase") in DONE
    )


@kopf.on.event("kubetune.io", "v1alpha1", PLURAL)
def dataset_changed(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    """Reconciled when the spec is new or changed, and at the operator's start (the
    initial listing, `type` None) until validation has settled; in between, the
    validation Job's events drive it. As for FineTuneJobs, no kopf bookkeeping, and the
    periodic resync retries what failed."""
    if type == "DELETED":
        PHASES.record("Dataset", namespace, name, None)
        return
    if namespace and (unobserved(body) or (type is None and not _settled(body))):
        reconcile(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_DATASET: kopf.PRESENT})
def validation_job_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    owner = owner_name(body, "Dataset")
    if owner is not None and namespace:
        reconcile(namespace, owner)


def resync() -> None:
    """Reconcile every Dataset whose validation has not settled."""
    resync_each(PLURAL, lambda ds: not _settled(ds), reconcile)
