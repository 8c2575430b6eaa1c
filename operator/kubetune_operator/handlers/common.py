"""State the handlers share: the API client, settings and the clock."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from kubetune_operator.kube import Api, Manifest
from kubetune_operator.observability import PHASES
from kubetune_operator.resources.common import event
from kubetune_operator.resources.status import phase_patch
from kubetune_operator.settings import Settings

log = logging.getLogger(__name__)

_STRIPES = 64
# Striped, so that the table stays bounded however many objects come and go; one set
# per kind, and a reconcile only ever nests one of another kind (a FineTuneJob's its
# ModelDeployment's), so two threads never wait on each other.
_RECONCILE_LOCKS = {
    kind: tuple(threading.RLock() for _ in range(_STRIPES))
    for kind in ("Dataset", "FineTuneJob", "ModelDeployment")
}


def one_at_a_time(kind: str, namespace: str, name: str) -> threading.RLock:
    """The lock a reconcile of this object holds. kopf runs the handlers of one
    object's own events in turn, but its Jobs', pods' and Deployments' events and the
    periodic resync reach the same object from other threads; two reconciles at once
    could each act on what the other is about to change (say, make a new Job for a run
    the other is failing)."""
    return _RECONCILE_LOCKS[kind][hash((namespace, name)) % _STRIPES]


class Watched:
    """The latest body the watch delivered of each kubetune object, by plural and
    (namespace, name). Reconciles read Datasets from here, wake-ups find who depends
    on what, and the periodic resync picks from these instead of listing everything
    again. Handler threads share it, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bodies: dict[str, dict[tuple[str, str], Manifest]] = {}

    def remember(self, plural: str, body: Manifest) -> None:
        meta = body["metadata"]
        with self._lock:
            self._bodies.setdefault(plural, {})[(meta["namespace"], meta["name"])] = body

    def remember_first(self, plural: str, body: Manifest) -> None:
        """Keep a body read from the API unless the watch delivered one meanwhile."""
        meta = body["metadata"]
        with self._lock:
            self._bodies.setdefault(plural, {}).setdefault((meta["namespace"], meta["name"]), body)

    def forget(self, plural: str, namespace: str, name: str) -> None:
        with self._lock:
            self._bodies.get(plural, {}).pop((namespace, name), None)

    def get(self, plural: str, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._bodies.get(plural, {}).get((namespace, name))

    def all(self, plural: str, namespace: str | None = None) -> list[Manifest]:
        with self._lock:
            bodies = list(self._bodies.get(plural, {}).items())
        return [body for (ns, _), body in bodies if namespace is None or ns == namespace]


@dataclass
class Context:
    api: Api
    settings: Settings
    watched: Watched = field(default_factory=Watched)

    def dataset(self, namespace: str, name: str) -> Manifest | None:
        """The Dataset, from the watch's copy, or read (and kept) when the watch has not
        delivered it yet."""
        body = self.watched.get("datasets", namespace, name)
        if body is None:
            body = self.api.get_object("datasets", namespace, name)
            if body is not None:
                self.watched.remember_first("datasets", body)
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


def live_object(
    plural: str, kind: str, namespace: str, name: str, body: Manifest | None = None
) -> Manifest | None:
    """The object to reconcile: `body` (what an event delivered) or a fresh read. None,
    and no longer counted by phase, when it is gone or being deleted."""
    obj = body if body is not None else context().api.get_object(plural, namespace, name)
    if obj is None:
        # Deleted while the watch was away (a relist sends no DELETED event): the
        # resync must stop picking its copy.
        context().watched.forget(plural, namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        PHASES.record(kind, namespace, name, None)
        return None
    return obj


def resync_each(
    plural: str, wanted: Callable[[Manifest], bool], reconcile: Callable[[str, str], None]
) -> None:
    """Reconcile each watched object that ``wanted`` picks, from a fresh read: the
    watch's copy only chooses, so finished objects, which pile up in a long-lived
    cluster, cost no request at all."""
    for body in context().watched.all(plural):
        if wanted(body):
            meta = body["metadata"]
            try:
                reconcile(meta["namespace"], meta["name"])
            except Exception:
                log.exception("resync of %s/%s failed", meta["namespace"], meta["name"])


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
        post_event(
            updated,
            "Warning" if after == "Failed" else "Normal",
            reason,
            str(updated["status"].get("message") or after),
        )
    return updated


def post_event(obj: Manifest, type_: str, reason: str, message: str) -> None:
    context().api.post_event(event(obj, type_, reason, message, now()))
