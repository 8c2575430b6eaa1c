"""Read training progress and losses from the trainer's Prometheus text."""

from __future__ import annotations

import math

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


def metrics_from_samples(samples: dict[str, float]) -> TrainingMetrics | None:
    found = TrainingMetrics(
        train_loss=loss(samples.get("kubetune_train_loss")),
        eval_loss=loss(samples.get("kubetune_eval_loss")),
        best_eval_loss=loss(samples.get("kubetune_best_eval_loss")),
        best_step=_int(samples.get("kubetune_best_step")),
    )
    return found if found.model_dump(exclude_none=True) else None
