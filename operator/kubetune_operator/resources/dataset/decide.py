"""Dataset: what to do and what status to write, given what the cluster shows.

Each generation of a Dataset's spec is validated by a Job of its own; its result (or
why it could not run) becomes the status, which then stays until the spec changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetune_operator.api.dataset import VALIDATED, DatasetPhase, DatasetSpec
from kubetune_operator.resources.actions import Action, Create, Decision, Delete
from kubetune_operator.resources.common import (
    Manifest,
    owned_by,
    owner_name,
    trainer_service_account,
)
from kubetune_operator.resources.conditions import Notice, StatusUpdate, phase_of, settled
from kubetune_operator.resources.dataset.status import dataset_status, ready
from kubetune_operator.resources.dataset.validation_job import (
    validation_job,
    validation_job_name,
)
from kubetune_operator.resources.references import Reference, missing_message, missing_reason
from kubetune_operator.resources.workloads import VALIDATION_OOM, job_state
from kubetune_operator.settings import Settings


@dataclass(frozen=True)
class Observed:
    """What one reconcile of a Dataset saw: the validation Job of its current
    generation and that Job's pods and, when a new Job is due, the Jobs of earlier
    generations."""

    dataset: Manifest
    spec: DatasetSpec
    now: str
    job: Manifest | None = None
    pods: Sequence[Manifest] = ()
    earlier_jobs: Sequence[Manifest] = ()
    # What the spec names that does not exist, looked for while a Job is due.
    missing: Sequence[Reference] = ()


def current_job_name(ds: Manifest) -> str:
    meta = ds["metadata"]
    return validation_job_name(meta["name"], meta.get("generation", 1))


def job_due(ds: Manifest, job: Manifest | None) -> bool:
    """Whether this generation's validation Job is still to be made."""
    return job is None and not settled(ds, VALIDATED)


def validated(ds: Manifest) -> bool:
    """Whether validation has settled for the current spec."""
    return settled(ds, VALIDATED)


def has_result(ds: Manifest) -> bool:
    """Whether the Dataset shows a validation result (maybe of an earlier spec): the
    runs that wait for it look again."""
    return phase_of(ds) in VALIDATED


def decide(seen: Observed, settings: Settings) -> Decision:
    ds = seen.dataset
    meta = ds["metadata"]
    name = current_job_name(ds)
    job = seen.job
    if job is not None and not owned_by(job, meta["uid"]):
        # A deleted Dataset of the same name left it: its result is about other data.
        # Its deletion event (or the periodic resync) brings this Dataset back here.
        return Decision(log=f"waiting for the deletion of Job {name} of a namesake")
    actions: tuple[Action, ...] = ()
    if job_due(ds, job) and seen.missing:
        message = missing_message(seen.missing, meta["namespace"])
        return Decision(
            status=StatusUpdate(
                fields={"phase": DatasetPhase.PENDING, "message": message},
                reason=missing_reason(seen.missing),
                ready=ready(DatasetPhase.PENDING),
                generation=meta.get("generation"),
                done=validated,
            )
        )
    if job_due(ds, job):
        job = settings.pod_defaults.apply(validation_job(ds, seen.spec, settings.trainer_image))
        # Jobs of earlier generations validated a spec that no longer exists.
        stale = (
            Delete("Job", meta["namespace"], old["metadata"]["name"])
            for old in seen.earlier_jobs
            if old["metadata"]["name"] != name and owner_name(old, "Dataset") == meta["name"]
        )
        account = trainer_service_account(meta["namespace"], settings.identity_annotations)
        actions = (Create(account), Create(job), *stale)
    state = (
        job_state(job, seen.pods, seen.now, settings.start_grace, oom=VALIDATION_OOM)
        if job is not None
        else None
    )
    fields, reason = dataset_status(state, name, seen.spec.queue_name)
    phase = DatasetPhase(fields["phase"])
    notice = None
    if phase in VALIDATED:
        notice = Notice(
            "Normal" if phase == DatasetPhase.READY else "Warning", phase, fields["message"]
        )
    update = StatusUpdate(
        fields=fields,
        reason=reason,
        ready=ready(phase),
        generation=meta.get("generation"),
        done=validated,
        notice=notice,
    )
    # The Job of a validation that failed while it still runs (its pod never started)
    # goes only once status says Failed.
    after: tuple[Action, ...] = ()
    if state is not None and state.stop_job:
        after = (Delete("Job", meta["namespace"], name),)
    return Decision(actions=actions, status=update, after_status=after)
