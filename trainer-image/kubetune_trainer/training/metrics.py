"""The trainer's Prometheus metrics, served on metricsPort for the operator to scrape.

Each run has its own registry (not prometheus_client's global one), so a process that
trains twice, as the tests do, starts from fresh gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kubetune_trainer.contract import metrics as gauges
from kubetune_trainer.contract.metrics import GAUGES

# Training log entries (as transformers and TRL name them) that go straight to a gauge.
# Each method adds its own (DPO: reward margin, preference accuracy; preserve-skills: KL).
LOG_GAUGES: dict[str, str] = {
    "loss": gauges.TRAIN_LOSS.name,
    "learning_rate": gauges.LEARNING_RATE.name,
    "grad_norm": gauges.GRAD_NORM.name,
    "rewards/margins": gauges.TRAIN_REWARD_MARGIN.name,
    "rewards/accuracies": gauges.TRAIN_PREFERENCE_ACCURACY.name,
    "kl": gauges.TRAIN_KL.name,
}

# The same for evaluation log entries (eval_loss has gauges of its own: latest and best).
EVAL_LOG_GAUGES: dict[str, str] = {
    "eval_rewards/margins": gauges.EVAL_REWARD_MARGIN.name,
    "eval_rewards/accuracies": gauges.EVAL_PREFERENCE_ACCURACY.name,
    "eval_kl": gauges.EVAL_KL.name,
}

# Method-specific log entries that also go into the log lines, with their short names.
LOG_EXTRAS: dict[str, str] = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "preference_accuracy",
    "kl": "kl",
}


class TrainMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._gauges = {
            name: Gauge(name, spec.help, registry=self.registry) for name, spec in GAUGES.items()
        }
        for name, spec in GAUGES.items():
            if spec.nan_until_set:
                self._gauges[name].set(float("nan"))

    def update(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._gauges[name].set(value)

    def serve(self, port: int) -> Callable[[], None]:
        """Serve /metrics on ``port`` (all interfaces, as the pod's scrape needs) and
        return the function that stops the server."""
        server, thread = start_http_server(port, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        return stop
