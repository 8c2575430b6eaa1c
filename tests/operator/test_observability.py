"""The operator's own metrics: each object's current phase, and reconciles that fail."""

from __future__ import annotations

from typing import cast

import pytest
from prometheus_client.core import REGISTRY

from kubetune_operator.api.crds import ALL
from kubetune_operator.api.finetunejob import FINE_TUNE_JOB
from kubetune_operator.handlers.act import reconciling
from kubetune_operator.handlers.context import Context
from kubetune_operator.kube import Api
from kubetune_operator.observability import PhaseBook
from kubetune_operator.settings import Settings


def test_each_object_has_one_series_for_its_current_phase() -> None:
    book = PhaseBook()
    book.record("FineTuneJob", "team", "a", "Pending")
    book.record("FineTuneJob", "team", "a", "Running")
    book.record("FineTuneJob", "lab", "b", "Running")
    book.record("ModelDeployment", "team", "a", "Available")
    book.record("FineTuneJob", "team", "gone", "Failed")
    book.record("FineTuneJob", "team", "gone", None)
    families = {family.name: family for family in book.collect()}
    each = {
        tuple(s.labels[label] for label in ("kind", "namespace", "name", "phase")): s.value
        for s in families["kubetune_operator_object_phase"].samples
    }
    assert each == {
        ("FineTuneJob", "team", "a", "Running"): 1,
        ("FineTuneJob", "lab", "b", "Running"): 1,
        ("ModelDeployment", "team", "a", "Available"): 1,
    }
    counts = {
        (s.labels["kind"], s.labels["phase"]): s.value
        for s in families["kubetune_operator_objects"].samples
    }
    assert counts == {("FineTuneJob", "Running"): 2, ("ModelDeployment", "Available"): 1}


def reconcile_errors(kind: str) -> float | None:
    return REGISTRY.get_sample_value("kubetune_operator_reconcile_errors_total", {"kind": kind})


def test_a_failed_reconcile_is_counted_once_and_its_error_goes_on() -> None:
    # Every kind's series is there from the start, so that rate() sees the first error.
    assert all(reconcile_errors(crd.kind) is not None for crd in ALL)
    before = reconcile_errors(FINE_TUNE_JOB.kind) or 0.0
    # The body an event delivered: the reconcile reads nothing from the API.
    ctx = Context(api=cast(Api, object()), settings=Settings())
    body = {"metadata": {"namespace": "team", "name": "run"}}
    with reconciling(ctx, FINE_TUNE_JOB, "team", "run", body) as live:
        assert live is body
    assert reconcile_errors(FINE_TUNE_JOB.kind) == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        reconciling(ctx, FINE_TUNE_JOB, "team", "run", body),
    ):
        raise RuntimeError("boom")
    assert reconcile_errors(FINE_TUNE_JOB.kind) == before + 1
