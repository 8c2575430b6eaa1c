"""Where the trainer serves /metrics."""

from __future__ import annotations

from kubetune_trainer.training.metrics import metrics_port


def test_the_environment_overrides_the_configured_port() -> None:
    assert metrics_port(9090, {}) == 9090
    assert metrics_port(9090, {"KUBETUNE_METRICS_PORT": "41234"}) == 41234
    assert metrics_port(0, {"KUBETUNE_METRICS_PORT": ""}) == 0
    assert metrics_port(9090, {"KUBETUNE_METRICS_PORT": "junk"}) == 9090
