"""The trainer's Prometheus metrics, served on metricsPort for the operator to scrape.

Each run has its own registry (not prometheus_client's global one), so a process that
trains twice, as the tests do, starts from fresh gauges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server

PORT_VARIABLE = "KUBETUNE_METRICS_PORT"


def metrics_port(configured: int, env: Mapping[str, str] = os.environ) -> int:
    """The port to serve on: $KUBETUNE_METRICS_PORT wins over job.json's metricsPort,
    for hosts where several trainers share one IP (the local executor sets it to the
    pod's container port named metrics)."""
    value = env.get(PORT_VARIABLE, "").strip()
    return int(value) if value.isdigit() else configured


GAUGES: dict[str, str] = {
    "kubetune_train_loss": "Training loss, averaged over the latest logging interval.",
    "kubetune_eval_loss": "Validation loss at the latest evaluation.",
    "kubetune_best_eval_loss": "Lowest validation loss so far.",
    "kubetune_best_step": "Step of the lowest validation loss so far.",
    "kubetune_learning_rate": "Learning rate at the latest logging step.",
    "kubetune_grad_norm": "Gradient norm at the latest logging step.",
    "kubetune_train_step": "Optimizer steps done.",
    "kubetune_train_total_steps": "Optimizer steps the run will take (without early stopping).",
    "kubetune_epoch": "Epochs done, fractional.",
    "kubetune_train_tokens_per_second": "Training tokens (padding excluded) per second, all workers.",
    "kubetune_train_samples_per_second": "Training examples per second, all workers.",
    "kubetune_train_tokens_total": "Training tokens processed by this process's run so far.",
    "kubetune_eta_seconds": "Estimated seconds until the last step.",
    # DPO
    "kubetune_train_reward_margin": "DPO: mean reward margin (beta x log-ratio, chosen minus "
    "rejected) over the latest logging interval.",
    "kubetune_train_preference_accuracy": "DPO: share of training pairs whose chosen reply got "
    "the higher reward, over the latest logging interval.",
    "kubetune_eval_reward_margin": "DPO: mean reward margin on the validation pairs at the "
    "latest evaluation.",
    "kubetune_eval_preference_accuracy": "DPO: share of validation pairs whose chosen reply got "
    "the higher reward at the latest evaluation.",
    # preserveGeneralSkills
    "kubetune_train_kl": "preserveGeneralSkills: mean per-token KL(base || tuned) at the "
    "configured temperature, over the latest logging interval.",
    "kubetune_eval_kl": "preserveGeneralSkills: mean per-token KL(base || tuned) on the "
    "validation data at the latest evaluation.",
}

# Training log entries (as transformers and TRL name them) that go straight to a gauge.
# Each method adds its own (DPO: reward margin, preference accuracy; preserve-skills: KL).
LOG_GAUGES: dict[str, str] = {
    "loss": "kubetune_train_loss",
    "learning_rate": "kubetune_learning_rate",
    "grad_norm": "kubetune_grad_norm",
    "rewards/margins": "kubetune_train_reward_margin",
    "rewards/accuracies": "kubetune_train_preference_accuracy",
    "kl": "kubetune_train_kl",
}

# The same for evaluation log entries (eval_loss has gauges of its own: latest and best).
EVAL_LOG_GAUGES: dict[str, str] = {
    "eval_rewards/margins": "kubetune_eval_reward_margin",
    "eval_rewards/accuracies": "kubetune_eval_preference_accuracy",
    "eval_kl": "kubetune_eval_kl",
}

# Method-specific log entries that also go into the log lines, with their short names.
LOG_EXTRAS: dict[str, str] = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "preference_accuracy",
    "kl": "kl",
}

# Gauges that have no value until the first logging step or evaluation show NaN, not a
# misleading 0.
_UNKNOWN_UNTIL_SET = (
    "kubetune_train_loss",
    "kubetune_eval_loss",
    "kubetune_best_eval_loss",
    "kubetune_eta_seconds",
    *(
        name
        for name in GAUGES
        if "_reward_" in name or "_preference_" in name or name.endswith("_kl")
    ),
)


class TrainMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._gauges = {
            name: Gauge(name, doc, registry=self.registry) for name, doc in GAUGES.items()
        }
        for name in _UNKNOWN_UNTIL_SET:
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
