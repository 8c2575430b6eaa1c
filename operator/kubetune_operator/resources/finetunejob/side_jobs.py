"""The run's one-pod Jobs beside its training (the pre-flight before it, the evaluation
after it), followed the same way: where the Job stands, the figures of its summary
when it succeeded, why it failed, or what it waits for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from kubetune_operator.resources.actions import Action, Delete
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.workloads import RunPhase, job_state
from kubetune_trainer.contract.summaries import Outcome, read_summary


@dataclass(frozen=True)
class Followed:
    """One look at a side Job: ``figures`` once it succeeded (its summary's fields but
    ``ok`` and ``message``), ``failed`` (why) once it ended otherwise, else ``waiting``
    (what it is doing or waiting for); ``after`` deletes a Job that failed while it
    still runs (its pod never started), once status says so."""

    name: str
    after: tuple[Action, ...]
    figures: Manifest | None = None
    failed: str | None = None
    waiting: str | None = None


def follow(
    job: Manifest,
    pods: Sequence[Manifest],
    now: str,
    start_grace: float,
    *,
    summary: type[Outcome],
    oom: str,
    what: str,
    doing: str,
) -> Followed:
    """``what`` names the Job in messages ("pre-flight"); ``doing`` is the message
    while its pod runs."""
    name = job["metadata"]["name"]
    state = job_state(job, pods, now, start_grace, oom=oom)
    after: tuple[Action, ...] = (
        (Delete("Job", job["metadata"]["namespace"], name),) if state.stop_job else ()
    )
    read: BaseModel | None = read_summary(summary, state.summary)
    said = read if isinstance(read, Outcome) else None
    if state.phase == RunPhase.SUCCEEDED and said is not None and said.ok:
        figures = said.model_dump(by_alias=True, exclude_none=True, exclude={"ok", "message"})
        return Followed(name, after, figures=figures)
    if state.phase in (RunPhase.SUCCEEDED, RunPhase.FAILED):
        return Followed(name, after, failed=(said.message if said else None) or state.message)
    if state.phase == RunPhase.RUNNING:
        waiting = doing
    elif state.phase == RunPhase.SUSPENDED:
        waiting = f"waiting for Kueue to admit the {what} Job"
    elif state.reason == "PodPending":
        waiting = f"waiting for the {what} pod to start"
    else:
        waiting = state.message  # why its pod cannot start
    return Followed(name, after, waiting=waiting)
