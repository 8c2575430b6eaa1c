"""The operator's own Prometheus metrics: objects by phase, each object's phase,
reconcile time and errors, API errors."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_operator.api.crds import ALL

RECONCILE_SECONDS = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Time spent reconciling one object.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "kubetune_operator_reconcile_errors_total",
    "Reconciles that ended in an error (each is retried).",
    ["kind"],
)
# Every kind's series from the start, at 0: a counter that first appears at 1 is an
# increase rate() cannot see.
for crd in ALL:
    RECONCILE_ERRORS.labels(crd.kind)
API_ERRORS = Counter(
    "kubetune_operator_api_errors_total",
    "Kubernetes API calls that failed, by HTTP status.",
    ["status"],
)


class PhaseBook(Collector):
    """The last phase written for each object, exported as counts by kind and phase,
    and as one series per object (kube-state-metrics' style: 1 for its current
    phase), which alerts on one object's phase need."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str | None, str], str] = {}

    def record(self, kind: str, namespace: str | None, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop((kind, namespace, name), None)
            else:
                self._phases[(kind, namespace, name)] = phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            phases = list(self._phases.items())
        counts = Tally((kind, phase) for (kind, _, _), phase in phases)
        family = GaugeMetricFamily(
            "kubetune_operator_objects",
            "kubetune objects by kind and phase.",
            labels=["kind", "phase"],
        )
        for (kind, phase), n in sorted(counts.items()):
            family.add_metric([kind, phase], n)
        yield family
        each = GaugeMetricFamily(
            "kubetune_operator_object_phase",
            "1 for each kubetune object's current phase.",
            labels=["kind", "namespace", "name", "phase"],
        )
        for (kind, namespace, name), phase in phases:
            each.add_metric([kind, namespace or "", name, phase], 1)
        yield each


PHASES = PhaseBook()
REGISTRY.register(PHASES)
