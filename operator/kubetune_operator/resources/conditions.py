"""The status conventions every kind follows: a phase with its message, the Ready
condition (with kstatus's Stalled and Reconciling), observedGeneration, phases that a
generation never leaves once reached, and no write when nothing changed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kubetune_operator.resources.common import Manifest


class Verdict(NamedTuple):
    """Where an object stands: its phase, the Ready condition's reason, and a message
    for a person (say, why it cannot go on yet, or at all)."""

    phase: str
    reason: str
    message: str


@dataclass(frozen=True)
class Notice:
    """A Kubernetes Event for a person (`kubectl describe`, `kubectl get events`)."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class StatusUpdate:
    """The status one reconcile decided on for generation ``generation``: ``fields``
    (phase, message and the rest) and the Ready condition's status and reason.
    ``notice`` is posted when the write moves the object into this phase. Nothing is
    written once ``done`` says the object has settled for its generation (the object
    as it is when the write is made: a later reconcile may have settled it), or when a
    newer generation has appeared (its own reconcile writes)."""

    fields: Manifest
    reason: str
    ready: bool | None
    generation: int | None
    done: Callable[[Manifest], bool] = lambda obj: False
    notice: Notice | None = None

    @property
    def phase(self) -> str:
        phase: str = self.fields["phase"]
        return phase


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


# The phases that end a generation in failure (kstatus: Stalled), and those in which
# nothing is under way although the object is not ready (nor Reconciling).
FAILED_PHASES = frozenset({"Failed", "Invalid"})
RESTING_PHASES = frozenset({"Suspended"})


def kstatus_conditions(
    conditions: Sequence[Mapping[str, Any]],
    phase: str,
    ready: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Manifest]:
    """Conditions with kstatus's abnormal-true pair set as it reads them (Flux and
    `kubectl wait` tools use it): Stalled=True on a failure, Reconciling=True while
    work is under way, and neither otherwise (removed, which kstatus reads as False).
    Without them kstatus takes Ready=False for work in progress, for ever."""
    stalled = phase in FAILED_PHASES
    flags = {
        "Stalled": stalled,
        "Reconciling": not stalled and ready is not True and phase not in RESTING_PHASES,
    }
    out = [dict(c) for c in conditions]
    for type_, on in flags.items():
        if on:
            out = set_condition(out, type_, True, reason, message, generation, now)
        else:
            out = [c for c in out if c.get("type") != type_]
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
    patch["conditions"] = kstatus_conditions(
        set_condition(conditions, "Ready", ready, reason, message, generation, now),
        patch["phase"],
        ready,
        reason,
        message,
        generation,
        now,
    )
    patch["observedGeneration"] = generation
    old = next((c for c in conditions if c.get("type") == "Ready"), None)
    new = next(c for c in patch["conditions"] if c.get("type") == "Ready")
    if (
        all(_pruned(current.get(k)) == _pruned(v) for k, v in patch.items() if k != "conditions")
        and old is not None
        and (old.get("status"), old.get("reason")) == (new.get("status"), reason)
    ):
        return None
    return patch


def _pruned(value: Any) -> Any:
    """A status value as the API server keeps it after a merge patch: None removes."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    return value


def status_patch(obj: Manifest, update: StatusUpdate, now: str) -> Manifest | None:
    """The patch that writes ``update`` onto the object as it is now (the reconcile's
    copy, or a fresh read after a conflict); None when there is nothing to write."""
    if obj.get("metadata", {}).get("generation") != update.generation or update.done(obj):
        return None
    status = obj.get("status") or {}
    return phase_patch(status, update.fields, update.reason, update.ready, update.generation, now)


def unobserved(obj: Mapping[str, Any]) -> bool:
    """Whether the object's current spec has not been acted on: new, changed, or its
    last reconcile failed before writing status. Handlers are level-triggered, so a
    watch event for an object whose status observed its generation (the echo of a
    status write, a label edit) needs no work of its own."""
    observed = (obj.get("status") or {}).get("observedGeneration")
    return bool(observed is None or observed != obj.get("metadata", {}).get("generation"))


def ready_reason(obj: Mapping[str, Any]) -> str | None:
    """The reason of the object's Ready condition, as status says now."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
    reason: str | None = ready.get("reason")
    return reason


def phase_of(obj: Mapping[str, Any]) -> str | None:
    phase: str | None = (obj.get("status") or {}).get("phase")
    return phase


def settled(obj: Mapping[str, Any], final: frozenset[str]) -> bool:
    """Whether the object has reached one of ``final`` for its current spec."""
    status = obj.get("status") or {}
    return status.get("phase") in final and status.get("observedGeneration") == obj.get(
        "metadata", {}
    ).get("generation")
