"""State the handlers share: the API client, settings and the clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import cast

import kopf

from kubetune_operator.kube import Api, Manifest
from kubetune_operator.observability import PHASES
from kubetune_operator.resources.status import phase_patch
from kubetune_operator.settings import Settings


@dataclass
class Context:
    api: Api
    settings: Settings
    # Dataset bodies as the Dataset watch last delivered them: a FineTuneJob reads its
    # dataset's spec and status from here instead of asking the API server each time.
    datasets: dict[tuple[str, str], Manifest] = field(default_factory=dict)

    def dataset(self, namespace: str, name: str) -> Manifest | None:
        """The Dataset, from the watch's copy, or read (and kept) when the watch has not
        delivered it yet."""
        body = self.datasets.get((namespace, name))
        if body is None:
            body = self.api.get_object("datasets", namespace, name)
            if body is not None:
                self.datasets.setdefault((namespace, name), body)
        return body


_context: Context | None = None


def configure(context: Context) -> None:
    global _context
    _context = context


def context() -> Context:
    if _context is None:
        raise RuntimeError(
            "the operator has not started: kubetune_operator.handlers.common.configure() first"
        )
    return _context


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_phase(
    plural: str,
    kind: str,
    obj: Manifest,
    fields: Manifest,
    reason: str,
    *,
    ready: bool | None,
    final: Collection[str] = (),
    event_phases: Collection[str] = (),
) -> Manifest | None:
    """Write a phase and its fields with the Ready condition and observedGeneration
    (nothing when status already says it), count the object by phase, and post an Event
    when it enters one of `event_phases`. A `final` phase, once observed for this
    generation, is never overwritten: phases only move forward."""
    meta = obj["metadata"]
    generation = meta.get("generation")

    def compute(current_obj: Manifest) -> Manifest | None:
        current = current_obj.get("status") or {}
        if current.get("phase") in final and current.get("observedGeneration") == generation:
            return None
        return phase_patch(current, fields, reason, ready, generation, now())

    before = (obj.get("status") or {}).get("phase")
    updated = context().api.update_status(
        plural, meta["namespace"], meta["name"], compute, current=obj
    )
    after = ((updated or {}).get("status") or {}).get("phase")
    PHASES.record(kind, meta["namespace"], meta["name"], after)
    if updated is not None and after != before and after in event_phases:
        kopf.event(
            cast(kopf.Body, updated),
            type="Warning" if after == "Failed" else "Normal",
            reason=reason,
            message=str(updated["status"].get("message") or after)[:1024],
        )
    return updated
