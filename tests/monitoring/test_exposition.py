"""What the trainer and the operator expose follows Prometheus's conventions:
`promtool check metrics` finds nothing in either exposition, every metric is of the type
its contract says (a `_total` is a counter), and the per-object phase series carry the
labels the alert rules match on."""

from __future__ import annotations

import subprocess

from prometheus import promtool
from prometheus_client import generate_latest
from prometheus_client.core import REGISTRY

from kubetune_operator.observability import PHASES, RECONCILE_ERRORS, RECONCILE_SECONDS
from kubetune_trainer.contract import metrics as contract
from kubetune_trainer.training.metrics import TrainMetrics


def lint(exposition: bytes) -> str:
    proc = subprocess.run(
        [str(promtool()), "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=120,
    )
    return f"exit {proc.returncode}: {proc.stdout.decode()}{proc.stderr.decode()}"


def trainer_exposition() -> bytes:
    """A trainer past its first logging step and evaluation: every metric has a value."""
    metrics = TrainMetrics()
    metrics.update(
        {
            name: 1.0
            for name, metric in contract.METRICS.items()
            if isinstance(metric, contract.Gauge)
        }
    )
    metrics.count(
        {
            name: 2048.0
            for name, metric in contract.METRICS.items()
            if isinstance(metric, contract.Counter)
        }
    )
    return generate_latest(metrics.registry)


def test_promtool_finds_nothing_in_the_trainer_s_metrics() -> None:
    assert lint(trainer_exposition()) == "exit 0: "


def test_each_trainer_metric_has_its_contract_s_type() -> None:
    text = trainer_exposition().decode()
    for name, metric in contract.METRICS.items():
        kind = "counter" if isinstance(metric, contract.Counter) else "gauge"
        assert f"# TYPE {name} {kind}\n" in text
        assert f"# HELP {name} {metric.help}\n" in text
        assert name.endswith("_total") == (kind == "counter"), name


def test_promtool_finds_nothing_in_the_operator_s_metrics() -> None:
    PHASES.record("FineTuneJob", "team", "exposition-test", "Running")
    PHASES.record("ModelDeployment", "team", "exposition-test", "Progressing")
    RECONCILE_ERRORS.labels("FineTuneJob").inc()
    RECONCILE_SECONDS.labels("FineTuneJob").observe(0.2)
    try:
        text = generate_latest(REGISTRY)
        assert lint(text) == "exit 0: "
        assert (
            b'kubetune_operator_object_phase{kind="FineTuneJob",name="exposition-test",'
            b'namespace="team",phase="Running"} 1.0' in text
        )
        assert b"# TYPE kubetune_operator_reconcile_errors_total counter" in text
    finally:
        PHASES.record("FineTuneJob", "team", "exposition-test", None)
        PHASES.record("ModelDeployment", "team", "exposition-test", None)
