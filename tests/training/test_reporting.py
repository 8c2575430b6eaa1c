"""What a run reports: Prometheus metrics, log lines, report.json, the termination
message, and which checkpoint a restart resumes from."""

from __future__ import annotations

import json
import logging
import math
import socket
import urllib.request
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer.contract import metrics as contract
from kubetune_trainer.contract.summaries import TERMINATION_LIMIT
from kubetune_trainer.training.callbacks import EvalSaveSchedule, Telemetry, consecutive_rises
from kubetune_trainer.training.checkpoints import latest_checkpoint
from kubetune_trainer.training.metrics import TrainMetrics
from kubetune_trainer.training.report import (
    build_report,
    failure_summary,
    termination_summary,
    write_termination_log,
)

REQUIRED_METRICS = (
    "kubetune_train_loss",
    "kubetune_eval_loss",
    "kubetune_learning_rate",
    "kubetune_train_step",
    "kubetune_train_total_steps",
    "kubetune_epoch",
    "kubetune_train_tokens_per_second",
    "kubetune_train_tokens_total",
    "kubetune_eval_loss_consecutive_rises",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in (
            line.split() for line in text.splitlines() if line.startswith("kubetune_")
        )
    }


def values_of(metrics: TrainMetrics) -> dict[str, float]:
    return {s.name: s.value for m in metrics.registry.collect() for s in m.samples}


def test_metrics_are_served_and_unknown_figures_are_absent() -> None:
    assert set(REQUIRED_METRICS) <= set(contract.METRICS)
    unset = {
        name
        for name, m in contract.METRICS.items()
        if isinstance(m, contract.Gauge) and m.absent_until_set
    }
    metrics = TrainMetrics()
    port = free_port()
    stop = metrics.serve(port)
    try:
        text = scrape(port)
        # No value yet is no sample at all (a NaN would read as a diverged loss), and
        # no HELP or TYPE line either.
        assert set(samples(text)) == (set(contract.METRICS) - unset) | {
            "kubetune_train_tokens_created"
        }
        assert "kubetune_eval_loss" not in text and "NaN" not in text
        assert "# TYPE kubetune_train_tokens_total counter" in text
        metrics.update({"kubetune_train_step": 3, "kubetune_eval_loss": 1.5})
        metrics.update({"kubetune_eval_loss": 1.25})
        metrics.count({"kubetune_train_tokens_total": 100})
        metrics.count({"kubetune_train_tokens_total": 50})
        values = samples(scrape(port))
        assert (values["kubetune_train_step"], values["kubetune_eval_loss"]) == (3, 1.25)
        assert values["kubetune_train_tokens_total"] == 150
        assert "kubetune_train_loss" not in values
        # A NaN once set is the loss's own.
        metrics.update({"kubetune_train_loss": math.nan})
        assert math.isnan(samples(scrape(port))["kubetune_train_loss"])
    finally:
        stop()


def test_telemetry_logs_a_line_and_updates_metrics_per_logging_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = TrainMetrics()
    telemetry = Telemetry(metrics)
    args = TrainingArguments(
        output_dir="unused", per_device_train_batch_size=4, use_cpu=True, report_to="none"
    )
    state = TrainerState(max_steps=100, global_step=0, epoch=0.0)
    control = TrainerControl()
    with caplog.at_level(logging.INFO, logger="kubetune.train"):
        telemetry.on_train_begin(args, state, control)
        assert "kubetune_eval_loss_consecutive_rises" not in values_of(metrics)
        state.global_step, state.epoch = 10, 0.5
        telemetry.on_log(args, state, control, logs={"eval_loss": 2.0})
        telemetry.on_log(
            args, state, control, logs={"loss": 2.5, "learning_rate": 1e-4, "num_tokens": 800.0}
        )
    line = caplog.records[-1].getMessage()
    for part in (
        "step 10/100",
        "epoch 0.50",
        "loss 2.5000",
        "eval_loss 2.0000",
        "lr 1.00e-04",
        "eta",
    ):
        assert part in line
    values = values_of(metrics)
    assert values["kubetune_train_step"] == 10
    assert values["kubetune_train_total_steps"] == 100
    assert values["kubetune_train_loss"] == 2.5
    assert values["kubetune_eval_loss"] == values["kubetune_best_eval_loss"] == 2.0
    assert values["kubetune_best_step"] == 10
    assert values["kubetune_eval_loss_consecutive_rises"] == 0
    assert values["kubetune_learning_rate"] == 1e-4
    assert values["kubetune_train_tokens_per_second"] > 0
    assert values["kubetune_train_tokens_total"] == 800
    assert values["kubetune_train_samples_per_second"] > 0
    assert values["kubetune_eta_seconds"] >= 0

    # TRL's num_tokens is a running total: the counter adds what each interval added.
    state.global_step = 20
    telemetry.on_log(args, state, control, logs={"eval_loss": 2.1})
    telemetry.on_log(args, state, control, logs={"loss": 2.4, "num_tokens": 1500.0})
    values = values_of(metrics)
    assert values["kubetune_train_tokens_total"] == 1500
    assert values["kubetune_eval_loss_consecutive_rises"] == 1
    assert values["kubetune_best_eval_loss"] == 2.0


@pytest.mark.parametrize(
    ("losses", "rises"),
    [
        ([], 0),
        ([1.0], 0),
        ([1.0, 1.1], 1),
        ([1.0, 1.1, 1.2, 1.3], 3),
        ([1.3, 1.0, 1.1, 1.2], 2),
        ([1.0, 1.1, 1.2, 1.15], 0),  # fell once: the count starts again
        ([1.0, 1.1, 1.1], 0),  # level is not a rise
        ([1.0, 1.1, math.nan], 0),
        ([math.nan, 1.0], 0),
    ],
)
def test_consecutive_rises_counts_back_from_the_latest_evaluation(
    losses: list[float], rises: int
) -> None:
    assert consecutive_rises(losses) == rises


def test_a_resumed_run_reports_and_counts_rises_from_its_earlier_evaluations() -> None:
    metrics = TrainMetrics()
    telemetry = Telemetry(metrics)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    history = [
        {"step": 5, "eval_loss": 1.0},
        {"step": 5, "loss": 1.2},
        {"step": 10, "eval_loss": 1.1},
    ]
    state = TrainerState(max_steps=40, global_step=10, epoch=1.0, log_history=history)
    state.best_metric, state.best_global_step = 1.0, 5
    telemetry.on_train_begin(args, state, TrainerControl())
    values = values_of(metrics)
    assert values["kubetune_eval_loss_consecutive_rises"] == 1
    # The latest loss so far, not none until the resumed run evaluates.
    assert values["kubetune_eval_loss"] == 1.1
    assert values["kubetune_best_eval_loss"] == 1.0
    state.global_step = 15
    telemetry.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.2})
    assert values_of(metrics)["kubetune_eval_loss_consecutive_rises"] == 2


def test_schedule_adds_step_evaluations_and_checkpoints() -> None:
    schedule = EvalSaveSchedule(eval_steps=4, save_steps=3, has_eval=True)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    flags = []
    for step in range(1, 9):
        control = TrainerControl()
        schedule.on_step_end(args, TrainerState(global_step=step), control)
        flags.append((control.should_evaluate, control.should_save))
    assert [s for s, (e, _) in enumerate(flags, 1) if e] == [4, 8]
    assert [s for s, (_, v) in enumerate(flags, 1) if v] == [3, 4, 6, 8]


def test_the_last_step_is_logged_however_short_the_run() -> None:
    schedule = EvalSaveSchedule(eval_steps=None, save_steps=None, has_eval=False)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    logged = []
    for step in range(1, 7):
        control = TrainerControl()
        schedule.on_step_end(args, TrainerState(global_step=step, max_steps=6), control)
        logged.append(control.should_log)
    assert logged == [False] * 5 + [True]


def test_without_evaluations_epochs_end_in_a_checkpoint_by_time() -> None:
    now = [0.0]
    schedule = EvalSaveSchedule(
        eval_steps=None, save_steps=None, has_eval=False, interval=60, clock=lambda: now[0]
    )
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    schedule.on_train_begin(args, TrainerState(), TrainerControl())
    saved = []
    for epoch, minutes in enumerate([0.5, 1.2, 1.5, 2.5], 1):
        now[0] = minutes * 60
        control = schedule.on_epoch_end(args, TrainerState(global_step=epoch), TrainerControl())
        if control.should_save:
            saved.append(epoch)
            schedule.on_save(args, TrainerState(global_step=epoch), control)
    assert saved == [2, 4]


def test_report_has_final_and_best_losses_and_the_summary_fits(tmp_path: Path) -> None:
    history = [
        {"step": 2, "loss": 3.0},
        {"step": 2, "eval_loss": 2.5},
        {"step": 4, "loss": 2.0},
        {"step": 4, "eval_loss": 2.7},
    ]
    report = build_report(log_history=history, run={"steps": 4, "outputDir": "/o" * 3000})
    assert (report["trainLoss"], report["evalLoss"]) == (2.0, 2.7)
    assert (report["bestEvalLoss"], report["bestStep"]) == (2.5, 2)
    assert report["history"] == {"train": [(2, 3.0), (4, 2.0)], "eval": [(2, 2.5), (4, 2.7)]}
    summary = termination_summary(report)
    assert "history" not in summary
    assert len(json.dumps(summary).encode()) < TERMINATION_LIMIT
    failure = failure_summary("Boom\n" * 5000)
    assert failure["ok"] is False and failure["phase"] == "Failed"
    assert len(json.dumps(failure).encode()) < TERMINATION_LIMIT

    assert write_termination_log(tmp_path / "log", summary)
    assert json.loads((tmp_path / "log").read_text())["bestStep"] == 2
    assert not write_termination_log(tmp_path / "missing" / "log", summary)


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
