"""Read training progress and losses from the trainer's Prometheus text."""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.api.finetunejob import Progress, TrainingMetrics


def parse_samples(text: str) -> dict[str, float]:
    """The kubetune_ samples without labels, by name. Unparseable text gives {}."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("kubetune_") and not math.isnan(sample.value):
                    out.setdefault(sample.name, sample.value)
    except ValueError:
        return {}
    return out


def _int(value: float | None) -> int | None:
    return None if value is None else max(int(value), 0)


def progress_from_samples(samples: dict[str, float]) -> Progress | None:
    step = _int(samples.get("kubetune_train_step"))
    total = _int(samples.get("kubetune_train_total_steps"))
    if step is None and total is None:
        return None
    percent = min(100, int(100 * step / total)) if step is not None and total else None
    return Progress(
        step=step,
        total_steps=total,
        epoch=None if "kubetune_epoch" not in samples else round(samples["kubetune_epoch"], 2),
        percent=percent,
        eta_seconds=_int(samples.get("kubetune_eta_seconds")),
    )


def loss(value: float | None) -> float | None:
    """Losses to five significant digits: what `kubectl get` can show and a person reads."""
    return None if value is None else float(f"{value:.5g}")


# The trainer's gauge behind each status.metrics field, by the field's camelCase name.
METRIC_GAUGES = {
    "trainLoss": "kubetune_train_loss",
    "evalLoss": "kubetune_eval_loss",
    "bestEvalLoss": "kubetune_best_eval_loss",
    "bestStep": "kubetune_best_step",
    "trainRewardMargin": "kubetune_train_reward_margin",
    "evalRewardMargin": "kubetune_eval_reward_margin",
    "trainPreferenceAccuracy": "kubetune_train_preference_accuracy",
    "evalPreferenceAccuracy": "kubetune_eval_preference_accuracy",
    "trainKl": "kubetune_train_kl",
    "evalKl": "kubetune_eval_kl",
}


def status_metrics(values: Mapping[str, float | None]) -> TrainingMetrics | None:
    """status.metrics from figures by field name (the trainer's summary uses the same
    names): five significant digits, the best step a whole number."""
    fields = {
        name: _int(value) if name == "bestStep" else loss(value)
        for name, value in values.items()
        if name in METRIC_GAUGES and value is not None
    }
    return TrainingMetrics.model_validate(fields) if fields else None


def metrics_from_samples(samples: dict[str, float]) -> TrainingMetrics | None:
    return status_metrics({name: samples.get(gauge) for name, gauge in METRIC_GAUGES.items()})
