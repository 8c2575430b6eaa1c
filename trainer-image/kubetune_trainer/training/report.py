"""What a run leaves behind: report.json, loss.png and the termination-log summary."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.contract.summaries import (
    TrainingReport,
    TrainingSummary,
    dump,
)

# The end of a string is kept: it holds the last path component and the last line of
# an error. A dozen numbers and a few strings of this length stay well within the
# termination message's limit.
_MAX_STRING = 400

Curve = list[tuple[int, float]]


def loss_curves(log_history: Iterable[Mapping[str, Any]]) -> tuple[Curve, Curve]:
    """(train, validation) loss against step, from the Trainer's log history (which a
    resumed run restores from its checkpoint, so the curves cover the whole run)."""
    train: Curve = []
    evaluation: Curve = []
    for entry in log_history:
        if "loss" in entry:
            train.append((int(entry["step"]), float(entry["loss"])))
        if "eval_loss" in entry:
            evaluation.append((int(entry["step"]), float(entry["eval_loss"])))
    return train, evaluation


# Method-specific log entries and the figures they become: the latest training log's,
# and the evaluation's at bestStep (whose model is the one exported).
_METHOD_FIGURES = {
    "rewards/margins": ("train_reward_margin", "eval_reward_margin"),
    "rewards/accuracies": ("train_preference_accuracy", "eval_preference_accuracy"),
    "kl": ("train_kl", "eval_kl"),
}


def method_figures(
    log_history: Sequence[Mapping[str, Any]], best_step: int | None
) -> dict[str, float | None]:
    """DPO's reward margin and preference accuracy, preserve-skills' KL: whichever the
    run logged, by TrainingFigures field."""
    figures: dict[str, float | None] = {}
    for key, (train_field, eval_field) in _METHOD_FIGURES.items():
        train = [e[key] for e in log_history if key in e and "loss" in e]
        if train:
            figures[train_field] = finite_or_none(float(train[-1]))
        evaluated = [e for e in log_history if f"eval_{key}" in e]
        at_best = [e for e in evaluated if e.get("step") == best_step] or evaluated
        if at_best:
            figures[eval_field] = finite_or_none(float(at_best[-1][f"eval_{key}"]))
    return figures


def _last(curve: Curve) -> float | None:
    return curve[-1][1] if curve else None


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or infinity; a diverged loss is reported as null."""
    return value if value is not None and math.isfinite(value) else None


def build_report(
    *,
    log_history: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """report.json: ``run`` (the facts the runner gathered, TrainingSummary fields:
    steps, throughput, data counts, output) plus the final and best losses and the loss
    curves."""
    train, evaluation = loss_curves(log_history)
    best = min(evaluation, key=lambda point: point[1]) if evaluation else None
    facts = TrainingSummary.model_validate(run).model_dump(exclude_unset=True)
    report = TrainingReport.model_validate(
        {
            "ok": True,
            "phase": "Succeeded",
            **facts,
            "train_loss": finite_or_none(_last(train)),
            "eval_loss": finite_or_none(_last(evaluation)),
            "best_eval_loss": finite_or_none(best[1]) if best else None,
            "best_step": best[0] if best else None,
            **method_figures(log_history, best[0] if best else None),
            "history": {"train": train, "eval": evaluation},
        }
    )
    return dump(report)


def termination_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without its curves, its strings (paths, error message) cut short so
    that the whole always fits a termination message."""
    whole = TrainingReport.model_validate(report).model_dump(exclude_unset=True)
    whole.pop("history", None)
    return dump(
        TrainingSummary.model_validate(
            {k: v[-_MAX_STRING:] if isinstance(v, str) else v for k, v in whole.items()}
        )
    )


def failure_summary(message: str) -> dict[str, Any]:
    return termination_summary(dump(TrainingSummary(ok=False, phase="Failed", message=message)))


def write_json(path: str | Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=2) + "\n")


def write_termination_log(path: str | Path, summary: Mapping[str, Any]) -> bool:
    """Write the summary where Kubernetes reads the termination message. Outside a pod
    the path usually does not exist or is not writable: then nothing is written."""
    try:
        with open(path, "w") as fp:
            fp.write(json.dumps(summary, separators=(",", ":")))
    except OSError:
        return False
    return True


_WIDTH, _HEIGHT = 800, 450
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 20, 50
_TRAIN_COLOUR, _EVAL_COLOUR, _GRID_COLOUR = (31, 119, 180), (255, 127, 14), (225, 225, 225)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def plot_losses(train: Curve, evaluation: Curve, path: str | Path) -> None:
    """loss.png: training and validation loss against step.

    Drawn with Pillow rather than matplotlib: importing matplotlib adds about 30 MiB to
    the peak memory of every training process, for one small picture."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    points = train + evaluation
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points if math.isfinite(v)] or [0.0]
        x_low, x_high = min(steps), max(max(steps), min(steps) + 1)
        pad = (max(losses) - min(losses)) * 0.05 or 0.5
        y_low, y_high = min(losses) - pad, max(losses) + pad
        if min(losses) >= 0:
            y_low = max(y_low, 0.0)  # a loss axis that dips below zero looks like a bug

        def xy(step: float, loss: float) -> tuple[float, float]:
            x = _LEFT + (step - x_low) / (x_high - x_low) * (_WIDTH - _LEFT - _RIGHT)
            y = _HEIGHT - _BOTTOM - (loss - y_low) / (y_high - y_low) * (_HEIGHT - _TOP - _BOTTOM)
            return x, y

        for value in _ticks(y_low, y_high):
            _, y = xy(x_low, value)
            draw.line([(_LEFT, y), (_WIDTH - _RIGHT, y)], fill=_GRID_COLOUR)
            draw.text((_LEFT - 6, y), f"{value:.3g}", fill="black", anchor="rm")
        for value in _ticks(x_low, x_high):
            x, _ = xy(value, y_low)
            draw.line([(x, _TOP), (x, _HEIGHT - _BOTTOM)], fill=_GRID_COLOUR)
            draw.text((x, _HEIGHT - _BOTTOM + 6), f"{value:.0f}", fill="black", anchor="mt")
        for curve, colour in ((train, _TRAIN_COLOUR), (evaluation, _EVAL_COLOUR)):
            line = [xy(s, v) for s, v in curve if math.isfinite(v)]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            if curve is evaluation or len(line) == 1:  # evaluations are few: mark each
                for x, y in line:
                    draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=colour)
    draw.rectangle([(_LEFT, _TOP), (_WIDTH - _RIGHT, _HEIGHT - _BOTTOM)], outline="black")
    draw.text(((_LEFT + _WIDTH - _RIGHT) / 2, _HEIGHT - 12), "step", fill="black", anchor="mm")
    draw.text((14, (_TOP + _HEIGHT - _BOTTOM) / 2), "loss", fill="black", anchor="mm")
    for row, (label, colour) in enumerate((("train", _TRAIN_COLOUR), ("validation", _EVAL_COLOUR))):
        y = _TOP + 14 + row * 18
        draw.line([(_WIDTH - _RIGHT - 120, y), (_WIDTH - _RIGHT - 96, y)], fill=colour, width=3)
        draw.text((_WIDTH - _RIGHT - 90, y), label, fill="black", anchor="lm")
    image.save(path)
