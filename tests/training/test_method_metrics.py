"""The figures DPO and preserve-skills add: gauges, log lines, report.json."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer.training.callbacks import Telemetry
from kubetune_trainer.training.metrics import TrainMetrics
from kubetune_trainer.training.report import build_report, termination_summary


def gauges(metrics: TrainMetrics) -> dict[str, float]:
    return {s.name: s.value for m in metrics.registry.collect() for s in m.samples}


def test_dpo_and_kl_figures_reach_the_gauges_and_the_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = TrainMetrics()
    assert "kubetune_eval_preference_accuracy" not in gauges(metrics)  # unknown yet
    telemetry = Telemetry(metrics)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state = TrainerState(max_steps=20, global_step=0, epoch=0.0)
    control = TrainerControl()
    with caplog.at_level(logging.INFO, logger="kubetune.train"):
        telemetry.on_train_begin(args, state, control)
        state.global_step, state.epoch = 10, 1.0
        telemetry.on_log(
            args,
            state,
            control,
            logs={"eval_loss": 0.6, "eval_rewards/margins": 0.4, "eval_rewards/accuracies": 0.9},
        )
        eval_line = caplog.records[-1].getMessage()
        telemetry.on_log(
            args,
            state,
            control,
            logs={"loss": 0.5, "rewards/margins": 0.3, "rewards/accuracies": 0.75, "kl": 0.2},
        )
        train_line = caplog.records[-1].getMessage()
    assert "reward_margin 0.4000 preference_accuracy 0.9000" in eval_line
    assert "reward_margin 0.3000 preference_accuracy 0.7500 kl 0.2000" in train_line
    values = gauges(metrics)
    assert values["kubetune_eval_reward_margin"] == 0.4
    assert values["kubetune_eval_preference_accuracy"] == 0.9
    assert values["kubetune_train_reward_margin"] == 0.3
    assert values["kubetune_train_preference_accuracy"] == 0.75
    assert values["kubetune_train_kl"] == 0.2


def test_report_has_the_method_figures_of_the_exported_model() -> None:
    history = [
        {"step": 5, "loss": 0.7, "rewards/margins": 0.1, "rewards/accuracies": 0.5},
        {"step": 5, "eval_loss": 0.5, "eval_rewards/margins": 0.8, "eval_rewards/accuracies": 1.0},
        {"step": 10, "loss": 0.4, "rewards/margins": 0.9, "rewards/accuracies": 1.0},
        {"step": 10, "eval_loss": 0.6, "eval_rewards/margins": 0.7, "eval_rewards/accuracies": 0.9},
    ]
    report = build_report(log_history=history, run={"method": "dpo"})
    assert report["bestStep"] == 5
    assert report["evalRewardMargin"] == 0.8 and report["evalPreferenceAccuracy"] == 1.0
    assert report["trainRewardMargin"] == 0.9 and report["trainPreferenceAccuracy"] == 1.0
    assert "trainKl" not in report and "evalKl" not in report
    assert termination_summary(report)["evalPreferenceAccuracy"] == 1.0

    sft = build_report(log_history=[{"step": 1, "loss": 1.0, "kl": 0.3}], run={})
    assert sft["trainKl"] == 0.3 and "trainRewardMargin" not in sft
