"""The trainer's Prometheus metrics, served on metricsPort for the operator to scrape.

Each run has its own registry (not prometheus_client's global one), so a process that
trains twice, as the tests do, starts from fresh metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kubetune_trainer.contract import metrics as contract

# Training log entries (as transformers and TRL name them) that go straight to a gauge.
# Each method adds its own (DPO: reward margin, preference accuracy; preserve-skills: KL).
LOG_GAUGES: dict[str, str] = {
    "loss": contract.TRAIN_LOSS.name,
    "learning_rate": contract.LEARNING_RATE.name,
    "grad_norm": contract.GRAD_NORM.name,
    "rewards/margins": contract.TRAIN_REWARD_MARGIN.name,
    "rewards/accuracies": contract.TRAIN_PREFERENCE_ACCURACY.name,
    "kl": contract.TRAIN_KL.name,
}

# The same for evaluation log entries (eval_loss has gauges of its own: latest and best).
EVAL_LOG_GAUGES: dict[str, str] = {
    "eval_rewards/margins": contract.EVAL_REWARD_MARGIN.name,
    "eval_rewards/accuracies": contract.EVAL_PREFERENCE_ACCURACY.name,
    "eval_kl": contract.EVAL_KL.name,
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
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        # Gauges that join the registry (and the exposition) when first set.
        self._unset: set[str] = set()
        for name, spec in contract.METRICS.items():
            if isinstance(spec, contract.Counter):
                self._counters[name] = Counter(name, spec.help, registry=self.registry)
            elif spec.absent_until_set:
                self._gauges[name] = Gauge(name, spec.help, registry=None)
                self._unset.add(name)
            else:
                self._gauges[name] = Gauge(name, spec.help, registry=self.registry)

    def update(self, values: Mapping[str, float]) -> None:
        """Set gauges."""
        for name, value in values.items():
            self._gauges[name].set(value)
            if name in self._unset:
                self._unset.discard(name)
                self.registry.register(self._gauges[name])

    def count(self, increments: Mapping[str, float]) -> None:
        """Add to counters."""
        for name, amount in increments.items():
            self._counters[name].inc(amount)

    def serve(self, port: int) -> Callable[[], None]:
        """Serve /metrics on ``port`` (all interfaces, as the pod's scrape needs) and
        return the function that stops the server."""
        server, thread = start_http_server(port, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        return stop
