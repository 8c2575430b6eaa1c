"""Trainers' /metrics, read in the background.

A trainer pod runs the image its FineTuneJob names, so its /metrics may be slow or
hostile. A reconcile therefore never waits on one: it takes the newest text read so
far and, when that is older than the interval and no read is under way, starts one in
a small pool. Each read runs under one deadline and a size cap (pod_http); when it
brings new text, what the caller asked for (a reconcile of the run) follows. A trainer that trickles
holds one pool thread for at most the deadline, and no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kubetune_operator.pod_http import PodHttpError, request

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name) of the FineTuneJob
Endpoint = tuple[str, int]  # (pod IP, port)

# The trainer's exposition is a few KiB; a cap far above it costs nothing.
MAX_METRICS_BYTES = 1 << 20
READERS = 4


def read_metrics(ip: str, port: int, deadline: float) -> str | None:
    """The trainer's /metrics text, or None while it gives no whole, successful answer."""
    try:
        answer = request(
            ip, port, "GET", "/metrics", deadline=deadline, max_bytes=MAX_METRICS_BYTES
        )
    except PodHttpError as exc:
        log.debug("metrics of %s:%s not readable: %s", ip, port, exc)
        return None
    if answer.status != 200:
        log.debug("metrics of %s:%s answered %s", ip, port, answer.status)
        return None
    return answer.body.decode("utf-8", "replace")


@dataclass
class _Latest:
    endpoint: Endpoint
    text: str | None
    read_at: float


class Scrapes:
    """The newest /metrics text of each running trainer, kept fresh in the background."""

    def __init__(
        self,
        deadline: float,
        interval: float,
        read: Callable[[str, int, float], str | None] = read_metrics,
    ) -> None:
        self.deadline = deadline
        self.interval = interval
        self._read = read
        self._lock = threading.Lock()
        self._latest: dict[Key, _Latest] = {}
        self._reading: set[Key] = set()
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="scrape")

    def latest(self, key: Key, endpoint: Endpoint, then: Callable[[], None]) -> str | None:
        """The newest text read from the trainer of ``key`` at ``endpoint`` (None until
        a read there answers). When the last is older than the interval, a read starts,
        and ``then`` runs (in a reader thread) if it brings text."""
        with self._lock:
            latest = self._latest.get(key)
            if latest is not None and latest.endpoint != endpoint:
                latest = None  # a new pod: the old one's text is not this one's
                del self._latest[key]
            stale = latest is None or time.monotonic() - latest.read_at >= self.interval
            if stale and key not in self._reading:
                self._reading.add(key)
                self._pool.submit(self._refresh, key, endpoint, then)
            return latest.text if latest is not None else None

    def forget(self, key: Key) -> None:
        """Drop what was read for a run that no longer trains."""
        with self._lock:
            self._latest.pop(key, None)
            self._reading.discard(key)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _refresh(self, key: Key, endpoint: Endpoint, then: Callable[[], None]) -> None:
        try:
            text = self._read(*endpoint, self.deadline)
        except Exception:
            log.exception("reading the metrics of %s/%s failed", *key)
            text = None
        with self._lock:
            if key not in self._reading:
                return  # forgotten while it was read
            self._reading.discard(key)
            self._latest[key] = _Latest(endpoint, text, time.monotonic())
        if text is not None:
            try:
                then()
            except Exception:
                log.exception("reconciling %s/%s after reading its metrics failed", *key)
