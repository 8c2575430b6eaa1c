"""TrainerCallbacks: the evaluation/checkpoint schedule and the run's telemetry (log
lines and Prometheus metrics)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer.contract import metrics as contract
from kubetune_trainer.training.metrics import EVAL_LOG_GAUGES, LOG_EXTRAS, LOG_GAUGES, TrainMetrics

log = logging.getLogger("kubetune.train")


# Without evaluations, an epoch ends in a checkpoint only when the last one is at least
# this old: a preempted run loses at most about this much work, and short epochs do
# not spend their time writing optimizer state.
CHECKPOINT_INTERVAL_SECONDS = 600.0


class EvalSaveSchedule(TrainerCallback):
    """Evaluate every ``eval_steps`` and checkpoint every ``save_steps`` and after every
    evaluation, on top of the per-epoch evaluation and checkpoint that the training
    arguments ask for (a transformers strategy can be "steps" or "epoch", not both).
    Without evaluations, checkpoint at an epoch's end when the last checkpoint is older
    than ``interval`` seconds. The last step is always logged, so that a run shorter
    than ``loggingSteps`` still reports a train loss."""

    def __init__(
        self,
        *,
        eval_steps: int | None,
        save_steps: int | None,
        has_eval: bool,
        interval: float = CHECKPOINT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.eval_steps = eval_steps if has_eval else None
        self.save_steps = save_steps
        self.has_eval = has_eval
        self.interval = interval
        self.clock = clock
        self._evaluated_at = -1
        self._saved_at = -1
        self._saved_clock = clock()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        step = state.global_step
        if step == state.max_steps:
            control.should_log = True
        if self.eval_steps and step % self.eval_steps == 0:
            control.should_evaluate = True
        # Saving right after each evaluation is what lets the best one be exported.
        if control.should_evaluate or (self.save_steps and step % self.save_steps == 0):
            control.should_save = True
        return control

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._evaluated_at = state.global_step

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._saved_clock = self.clock()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._saved_at = state.global_step
        self._saved_clock = self.clock()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # An epoch that ends on an evalSteps/saveSteps step was just evaluated and saved.
        if self._evaluated_at == state.global_step:
            control.should_evaluate = False
        if self._saved_at == state.global_step:
            control.should_save = False
        elif not self.has_eval and self.clock() - self._saved_clock >= self.interval:
            control.should_save = True
        return control


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _extras(logs: dict[str, float], prefix: str = "") -> str:
    """The method's own figures (DPO rewards, preserve-skills KL) for a log line."""
    return "".join(
        f" {name} {logs[prefix + key]:.4f}"
        for key, name in LOG_EXTRAS.items()
        if prefix + key in logs
    )


def consecutive_rises(losses: Sequence[float]) -> int:
    """How many evaluations in a row, up to the latest, had a higher loss than the one
    before them: 0 when the latest did not rise (or is the first, or is NaN)."""
    rises = 0
    for i in range(len(losses) - 1, 0, -1):
        if not losses[i] > losses[i - 1]:
            break
        rises += 1
    return rises


class Telemetry(TrainerCallback):
    """One log line per logging step (step/total, epoch, loss, eval loss, learning rate,
    throughput, ETA) and the Prometheus metrics, updated at the same moments. Only the
    main process reports; ``metrics`` is None where nothing is served."""

    def __init__(self, metrics: TrainMetrics | None) -> None:
        self.metrics = metrics
        self.best_eval_loss: float | None = None
        self.best_step: int | None = None
        # Every evaluation's loss, a resumed run's earlier ones included.
        self.eval_losses: list[float] = []
        self.eval_values: dict[str, float] = {}  # method-specific gauges of the latest evaluation
        self._samples_per_step = 1
        self._start_time = 0.0
        self._start_step = 0
        self.start_epoch = 0.0  # where this process began: past 0 when resumed
        self._last: tuple[float, int, float] = (0.0, 0, 0.0)  # time, step, tokens

    @property
    def eval_loss(self) -> float | None:
        """The latest evaluation's loss: a resumed run's from before, until it evaluates."""
        return self.eval_losses[-1] if self.eval_losses else None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._samples_per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        now = time.monotonic()
        self._start_time, self._start_step = now, state.global_step
        self.start_epoch = state.epoch or 0.0
        self._last = (now, state.global_step, 0.0)
        self.eval_losses = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
        if state.best_metric is not None:  # resumed
            self.best_eval_loss = state.best_metric
            self.best_step = state.best_global_step
        if state.is_world_process_zero:
            resumed = f" (resuming at step {state.global_step})" if state.global_step else ""
            log.info("training for %d steps%s", state.max_steps, resumed)
            self._publish(state, {})

    def eta_seconds(self, state: TrainerState, now: float) -> float | None:
        done = state.global_step - self._start_step
        if done <= 0:
            return None
        return (now - self._start_time) / done * (state.max_steps - state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        now = time.monotonic()
        if "eval_loss" in logs:
            eval_loss = logs["eval_loss"]
            self.eval_losses.append(eval_loss)
            if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
                self.best_eval_loss = eval_loss
                self.best_step = state.global_step
            self.eval_values = {
                gauge: logs[key] for key, gauge in EVAL_LOG_GAUGES.items() if key in logs
            }
            log.info(
                "eval step %d/%d epoch %.2f eval_loss %.4f best %.4f%s",
                state.global_step,
                state.max_steps,
                state.epoch or 0.0,
                eval_loss,
                self.best_eval_loss,
                _extras(logs, "eval_"),
            )
            self._publish(state, {})
        if "loss" not in logs:
            return
        last_time, last_step, last_tokens = self._last
        elapsed = max(now - last_time, 1e-9)
        # TRL's running total since this process began, gathered from all workers.
        tokens = logs.get("num_tokens", last_tokens)
        new_tokens = tokens - last_tokens
        values = {
            contract.SAMPLES_PER_SECOND.name: (state.global_step - last_step)
            * self._samples_per_step
            / elapsed,
            contract.TOKENS_PER_SECOND.name: new_tokens / elapsed,
            **{gauge: logs[key] for key, gauge in LOG_GAUGES.items() if key in logs},
        }
        self._last = (now, state.global_step, tokens)
        eta = self.eta_seconds(state, now)
        log.info(
            "step %d/%d epoch %.2f loss %.4f%s eval_loss %s lr %s tokens/s %.0f eta %s",
            state.global_step,
            state.max_steps,
            state.epoch or 0.0,
            logs["loss"],
            _extras(logs),
            _fmt(self.eval_loss, ".4f"),
            _fmt(logs.get("learning_rate"), ".2e"),
            values[contract.TOKENS_PER_SECOND.name],
            "-" if eta is None else timedelta(seconds=round(eta)),
        )
        self._publish(state, values)
        if self.metrics is not None:
            self.metrics.count({contract.TOKENS_TOTAL.name: new_tokens})

    def _publish(self, state: TrainerState, values: dict[str, float]) -> None:
        if self.metrics is None:
            return
        progress = {
            contract.TRAIN_STEP.name: float(state.global_step),
            contract.TRAIN_TOTAL_STEPS.name: float(state.max_steps),
            contract.EPOCH.name: float(state.epoch or 0.0),
        }
        if self.eval_loss is not None:
            progress[contract.EVAL_LOSS.name] = self.eval_loss
        if self.eval_losses:
            progress[contract.EVAL_LOSS_RISES.name] = float(consecutive_rises(self.eval_losses))
        if self.best_eval_loss is not None:
            progress[contract.BEST_EVAL_LOSS.name] = self.best_eval_loss
        if self.best_step is not None:
            progress[contract.BEST_STEP.name] = float(self.best_step)
        eta = self.eta_seconds(state, time.monotonic())
        if eta is not None:
            progress[contract.ETA_SECONDS.name] = eta
        self.metrics.update({**progress, **self.eval_values, **values})
