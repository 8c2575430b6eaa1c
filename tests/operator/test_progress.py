"""What the operator reads from the trainer's real /metrics text (prometheus_client's
exposition of TrainMetrics): progress and losses once there are some, nothing for a
figure without a value, and nothing JSON status could not hold."""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from kubetune_operator.resources.finetunejob.progress import (
    metrics_from_samples,
    parse_samples,
    progress_from_samples,
)
from kubetune_trainer.training.metrics import TrainMetrics


def exposition(metrics: TrainMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_trainer_without_values_yet_gives_no_progress_and_no_losses() -> None:
    samples = parse_samples(exposition(TrainMetrics()))
    assert "kubetune_train_loss" not in samples and "kubetune_eval_loss" not in samples
    assert progress_from_samples(samples) is None
    assert metrics_from_samples(samples) is None


def test_losses_come_through_once_set_and_a_diverged_one_is_left_out() -> None:
    metrics = TrainMetrics()
    metrics.update(
        {
            "kubetune_train_step": 30,
            "kubetune_train_total_steps": 120,
            "kubetune_train_loss": 1.25,
            "kubetune_eval_loss": 1.5,
            "kubetune_best_eval_loss": 1.5,
            "kubetune_best_step": 20,
        }
    )
    metrics.count({"kubetune_train_tokens_total": 4096})
    samples = parse_samples(exposition(metrics))
    progress, losses = progress_from_samples(samples), metrics_from_samples(samples)
    assert progress is not None and (progress.step, progress.total_steps) == (30, 120)
    assert losses is not None and (losses.train_loss, losses.eval_loss) == (1.25, 1.5)
    assert samples["kubetune_train_tokens_total"] == 4096

    for diverged in (math.nan, math.inf):
        metrics.update({"kubetune_train_loss": diverged})
        samples = parse_samples(exposition(metrics))
        assert "kubetune_train_loss" not in samples
        losses = metrics_from_samples(samples)
        assert losses is not None and losses.train_loss is None and losses.eval_loss == 1.5
