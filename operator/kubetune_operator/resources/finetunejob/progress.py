"""Training progress and losses, read from the trainer's gauges while it runs and from
its summary when it ends."""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.api.finetunejob import Progress, TrainingMetrics
from kubetune_trainer.contract import metrics as gauges
from kubetune_trainer.contract.summaries import TrainingFigures, figure_gauges

# The trainer's gauge behind each status.metrics field, by the field's name.
FIGURE_GAUGES = figure_gauges()


def parse_samples(text: str) -> dict[str, float]:
    """The kubetune_ samples without labels, by name. Unparseable text gives {}. A NaN
    or infinite sample (a loss that diverged: the trainer leaves out what it has no
    value for yet) is left out too, for status is JSON, which has neither; the chart's
    alert rules report it."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("kubetune_") and math.isfinite(sample.value):
                    out.setdefault(sample.name, sample.value)
    except ValueError:
        return {}
    return out


def _int(value: float | None) -> int | None:
    return None if value is None else max(int(value), 0)


def progress_from_samples(samples: Mapping[str, float]) -> Progress | None:
    """Progress once the trainer has counted its steps: until then its step gauges
    read 0 of 0, which is no progress to report."""
    step = _int(samples.get(gauges.TRAIN_STEP.name))
    total = _int(samples.get(gauges.TRAIN_TOTAL_STEPS.name))
    if step is None or not total:
        return None
    epoch = samples.get(gauges.EPOCH.name)
    return Progress(
        step=step,
        total_steps=total,
        epoch=None if epoch is None else round(epoch, 2),
        percent=min(100, int(100 * step / total)),
        eta_seconds=_int(samples.get(gauges.ETA_SECONDS.name)),
    )


def loss(value: float | None) -> float | None:
    """Losses to five significant digits: what `kubectl get` can show and a person reads."""
    return None if value is None else float(f"{value:.5g}")


def status_metrics(values: Mapping[str, float | None]) -> TrainingMetrics | None:
    """status.metrics from figures by TrainingFigures field name: five significant
    digits, the best step a whole number."""
    fields = {
        name: _int(value) if name == "best_step" else loss(value)
        for name, value in values.items()
        if name in FIGURE_GAUGES and value is not None
    }
    return TrainingMetrics.model_validate(fields) if fields else None


def final_metrics(summary: TrainingFigures) -> TrainingMetrics | None:
    """status.metrics from the trainer's summary (its best evaluation's, where kept)."""
    return status_metrics({name: getattr(summary, name) for name in FIGURE_GAUGES})


def metrics_from_samples(samples: Mapping[str, float]) -> TrainingMetrics | None:
    values = {name: samples.get(g.name) for name, g in FIGURE_GAUGES.items()}
    if values.get("best_eval_loss") is None:
        # The best-step gauge reads 0 until the first evaluation: no step of a best loss.
        values["best_step"] = None
    return status_metrics(values)
