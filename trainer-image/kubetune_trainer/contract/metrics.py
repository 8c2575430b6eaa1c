"""The trainer's Prometheus metrics and where they are served: the operator scrapes them
into FineTuneJob status while a run goes on, Grafana charts them and the chart's alert
rules watch them. Each metric's name, help and type (gauge or counter) are said here
once; training.metrics makes them prometheus_client's."""

from __future__ import annotations

from dataclasses import dataclass

METRICS_PORT = 9090


@dataclass(frozen=True)
class Gauge:
    name: str
    help: str
    # Without a value until the first logging step or evaluation: left out of the
    # exposition until then, neither a misleading 0 nor a NaN, which would read as a
    # diverged loss (an alert fires on a NaN train loss).
    absent_until_set: bool = False


@dataclass(frozen=True)
class Counter:
    """A running total (the name ends in ``_total``, as Prometheus reserves for
    counters): it only goes up, and starts again from 0 when the process does, which
    ``rate()`` and ``increase()`` allow for."""

    name: str
    help: str


TRAIN_LOSS = Gauge(
    "kubetune_train_loss", "Training loss, averaged over the latest logging interval.", True
)
EVAL_LOSS = Gauge("kubetune_eval_loss", "Validation loss at the latest evaluation.", True)
BEST_EVAL_LOSS = Gauge("kubetune_best_eval_loss", "Lowest validation loss so far.", True)
BEST_STEP = Gauge("kubetune_best_step", "Step of the lowest validation loss so far.")
LEARNING_RATE = Gauge("kubetune_learning_rate", "Learning rate at the latest logging step.")
GRAD_NORM = Gauge("kubetune_grad_norm", "Gradient norm at the latest logging step.")
TRAIN_STEP = Gauge("kubetune_train_step", "Optimizer steps done.")
TRAIN_TOTAL_STEPS = Gauge(
    "kubetune_train_total_steps", "Optimizer steps the run will take (without early stopping)."
)
EPOCH = Gauge("kubetune_epoch", "Epochs done, fractional.")
TOKENS_PER_SECOND = Gauge(
    "kubetune_train_tokens_per_second",
    "Training tokens (padding excluded) per second, all workers.",
)
SAMPLES_PER_SECOND = Gauge(
    "kubetune_train_samples_per_second", "Training examples per second, all workers."
)
TOKENS_TOTAL = Counter(
    "kubetune_train_tokens_total",
    "Training tokens (padding excluded) processed so far by this process's run, all workers.",
)
ETA_SECONDS = Gauge("kubetune_eta_seconds", "Estimated seconds until the last step.", True)
TRAIN_REWARD_MARGIN = Gauge(
    "kubetune_train_reward_margin",
    "DPO: mean reward margin (beta x log-ratio, chosen minus rejected) over the latest "
    "logging interval.",
    True,
)
TRAIN_PREFERENCE_ACCURACY = Gauge(
    "kubetune_train_preference_accuracy",
    "DPO: share of training pairs whose chosen reply got the higher reward, over the "
    "latest logging interval.",
    True,
)
EVAL_REWARD_MARGIN = Gauge(
    "kubetune_eval_reward_margin",
    "DPO: mean reward margin on the validation pairs at the latest evaluation.",
    True,
)
EVAL_PREFERENCE_ACCURACY = Gauge(
    "kubetune_eval_preference_accuracy",
    "DPO: share of validation pairs whose chosen reply got the higher reward at the "
    "latest evaluation.",
    True,
)
TRAIN_KL = Gauge(
    "kubetune_train_kl",
    "preserveGeneralSkills: mean per-token KL(base || tuned) at the configured "
    "temperature, over the latest logging interval.",
    True,
)
EVAL_KL = Gauge(
    "kubetune_eval_kl",
    "preserveGeneralSkills: mean per-token KL(base || tuned) on the validation data at "
    "the latest evaluation.",
    True,
)
EVAL_LOSS_RISES = Gauge(
    "kubetune_eval_loss_consecutive_rises",
    "Evaluations in a row, up to the latest, whose validation loss rose above the one "
    "before; 0 after one that did not.",
    True,
)

METRICS: dict[str, Gauge | Counter] = {
    metric.name: metric
    for metric in (
        TRAIN_LOSS,
        EVAL_LOSS,
        BEST_EVAL_LOSS,
        BEST_STEP,
        LEARNING_RATE,
        GRAD_NORM,
        TRAIN_STEP,
        TRAIN_TOTAL_STEPS,
        EPOCH,
        TOKENS_PER_SECOND,
        SAMPLES_PER_SECOND,
        TOKENS_TOTAL,
        ETA_SECONDS,
        TRAIN_REWARD_MARGIN,
        TRAIN_PREFERENCE_ACCURACY,
        EVAL_REWARD_MARGIN,
        EVAL_PREFERENCE_ACCURACY,
        TRAIN_KL,
        EVAL_KL,
        EVAL_LOSS_RISES,
    )
}
