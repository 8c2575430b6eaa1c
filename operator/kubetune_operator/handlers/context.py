"""What the handlers share: the API client, the settings, the watch's copies of
kubetune objects, the reconcile locks, the adapter loads servers refused, the
trainers' metrics read in the background, and the clock."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kubetune_operator.api.dataset import DATASET
from kubetune_operator.kube import Api
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.workloads import ServerPod
from kubetune_operator.scrapes import Scrapes
from kubetune_operator.settings import Settings

log = logging.getLogger(__name__)


class ReconcileLocks:
    """The lock a reconcile of an object holds. kopf runs the handlers of one object's
    own events in turn, but its Jobs', pods' and Deployments' events, the periodic
    resync and the background metrics reads reach the same object from other threads;
    two reconciles at once could each act on what the other is about to change (say,
    make a new Job for a run the other is failing).

    One lock per object, made while someone holds or waits for it and dropped after,
    so that the table stays as small as the work under way and a reconcile that waits
    on a slow pod holds up no other object. A reconcile only ever nests one of another
    kind (a FineTuneJob's its ModelDeployment's), so two threads never wait on each
    other."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str, str], tuple[threading.RLock, list[int]]] = {}

    @contextmanager
    def hold(self, kind: str, namespace: str, name: str) -> Iterator[None]:
        key = (kind, namespace, name)
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.RLock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]


class Watched:
    """The latest body the watch delivered of each kubetune object, by plural and
    (namespace, name). Reconciles read Datasets from here, wake-ups find who depends
    on what, and the periodic resync picks from these instead of listing everything
    again. Handler threads share it, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bodies: dict[str, dict[tuple[str, str], Manifest]] = {}
        self._delivered: dict[tuple[str, str, str], float] = {}

    def remember(self, plural: str, body: Manifest) -> None:
        meta = body["metadata"]
        with self._lock:
            self._bodies.setdefault(plural, {})[(meta["namespace"], meta["name"])] = body
            self._delivered[(plural, meta["namespace"], meta["name"])] = time.monotonic()

    def delivered_within(self, plural: str, namespace: str, name: str, seconds: float) -> bool:
        """Whether the watch delivered the object less than ``seconds`` ago."""
        with self._lock:
            at = self._delivered.get((plural, namespace, name))
        return at is not None and time.monotonic() - at < seconds

    def remember_first(self, plural: str, body: Manifest) -> None:
        """Keep a body read from the API unless the watch delivered one meanwhile."""
        meta = body["metadata"]
        with self._lock:
            self._bodies.setdefault(plural, {}).setdefault((meta["namespace"], meta["name"]), body)

    def forget(self, plural: str, namespace: str, name: str) -> None:
        with self._lock:
            self._bodies.get(plural, {}).pop((namespace, name), None)
            self._delivered.pop((plural, namespace, name), None)

    def get(self, plural: str, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._bodies.get(plural, {}).get((namespace, name))

    def all(self, plural: str, namespace: str | None = None) -> list[Manifest]:
        with self._lock:
            bodies = list(self._bodies.get(plural, {}).items())
        return [body for (ns, _), body in bodies if namespace is None or ns == namespace]


class LoadFailures:
    """Adapter loads a server pod refused: (pod uid, adapter, folder) → the server's
    reason, by ModelDeployment. Kept in memory only: after an operator restart each
    is tried once more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_server: dict[tuple[str, str], dict[tuple[str, str, str], str]] = {}

    def record(self, pod: ServerPod, adapter: str, folder: str, reason: str) -> None:
        with self._lock:
            self._by_server.setdefault((pod.namespace, pod.server), {})[
                (pod.uid, adapter, folder)
            ] = reason

    def of(
        self, namespace: str, server: str, pod_uids: set[str]
    ) -> dict[tuple[str, str, str], str]:
        """The failures on pods that still exist (the others are dropped)."""
        with self._lock:
            kept = {
                key: reason
                for key, reason in self._by_server.get((namespace, server), {}).items()
                if key[0] in pod_uids
            }
            if kept:
                self._by_server[(namespace, server)] = kept
            else:
                self._by_server.pop((namespace, server), None)
            return dict(kept)


RESYNC_WORKERS = 8


class ResyncPool:
    """Runs the reconciles the periodic resync asks for, in a few threads and at most
    one per object at a time, so that the resync keeps its period however long one
    takes (a server pod that answers slowly holds one thread, not the loop)."""

    def __init__(self, workers: int = RESYNC_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="resync")
        self._lock = threading.Lock()
        self._running: set[tuple[str, str, str]] = set()

    def submit(self, key: tuple[str, str, str], work: Callable[[], None]) -> bool:
        """Start ``work`` for the object ``key`` (kind, namespace, name); False when the
        one started for it before has not finished."""
        with self._lock:
            if key in self._running:
                return False
            self._running.add(key)
        self._pool.submit(self._run, key, work)
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, key: tuple[str, str, str], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("resync of %s %s/%s failed", *key)
        finally:
            with self._lock:
                self._running.discard(key)


@dataclass
class Context:
    """What every handler works with, made once at start (kopf hands it to each
    handler in its memo): the API client, the settings, the watch's copies and the
    reconcile locks."""

    api: Api
    settings: Settings
    watched: Watched = field(default_factory=Watched)
    locks: ReconcileLocks = field(default_factory=ReconcileLocks)
    load_failures: LoadFailures = field(default_factory=LoadFailures)
    resyncs: ResyncPool = field(default_factory=ResyncPool)
    scrapes: Scrapes = field(init=False)

    def __post_init__(self) -> None:
        self.scrapes = Scrapes(self.settings.scrape_timeout, self.settings.resync_seconds)

    def dataset(self, namespace: str, name: str) -> Manifest | None:
        """The Dataset, from the watch's copy, or read (and kept) when the watch has not
        delivered it yet."""
        body = self.watched.get(DATASET.plural, namespace, name)
        if body is None:
            body = self.api.get_object(DATASET.plural, namespace, name)
            if body is not None:
                self.watched.remember_first(DATASET.plural, body)
        return body


MEMO_KEY = "kubetune"


def context_of(memo: Any) -> Context:
    """The Context kopf passes in every handler's memo (see __main__)."""
    ctx = memo[MEMO_KEY]
    assert isinstance(ctx, Context)
    return ctx


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
