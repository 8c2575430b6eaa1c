"""``kubetune train``: one run of any method, end to end.

The runner does what every method shares (check and read the data, load the model,
serve metrics, resume, export the best model, report); a method only says how to build
its trainer (``BUILDERS``), so DPO slots in beside SFT.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
)

from kubetune_trainer.contract.job import EXIT_CANNOT_SUCCEED, EXIT_FAILED, TrainingConfig
from kubetune_trainer.contract.rules import REQUIREMENTS, broken
from kubetune_trainer.contract.summaries import TrainingReport, TrainingSummary, dump
from kubetune_trainer.data import DatasetError, read_examples
from kubetune_trainer.training.callbacks import EvalSaveSchedule, Telemetry
from kubetune_trainer.training.checkpoints import (
    CheckpointMirror,
    drop_copies,
    latest_checkpoint,
    restore_checkpoint,
)
from kubetune_trainer.training.config_mapping import Hardware, model_dtype
from kubetune_trainer.training.images import image_root
from kubetune_trainer.training.inputs import DataStats, JobError, TrainerInputs
from kubetune_trainer.training.metrics import TrainMetrics
from kubetune_trainer.training.models import is_multimodal, load_model, load_processing
from kubetune_trainer.training.records import file_sha256, split_validation
from kubetune_trainer.training.report import (
    build_report,
    failure_summary,
    loss_curves,
    plot_losses,
    termination_summary,
    write_json,
    write_termination_log,
)
from kubetune_trainer.transfer import FetchError, upload_s3

log = logging.getLogger("kubetune.train")

Builder = Callable[[TrainerInputs], tuple[Trainer, DataStats]]


BUILDERS: dict[str, str] = {
    "sft": "kubetune_trainer.training.sft",
    "dpo": "kubetune_trainer.training.preference",
}
"""Each method's module, whose ``build_trainer`` is the method's Builder. Only the run's
own method is imported: TRL's DPOTrainer brings modules (rich's progress display among
them) that an SFT run would otherwise hold in memory throughout."""


def load_builder(method: str) -> Builder:
    module = BUILDERS.get(method)
    if module is None:
        raise JobError(f"method {method!r} is not supported by this trainer version yet")
    builder: Builder = importlib.import_module(module).build_trainer
    return builder


def is_main_process() -> bool:
    # torchrun sets RANK; reading it here (before the Trainer sets up torch.distributed)
    # lets only one process serve metrics and write the report.
    return int(os.environ.get("RANK", "0")) == 0


def verify_dataset(config: TrainingConfig) -> None:
    if config.dataset_sha256 is None:
        return
    actual = file_sha256(config.dataset)
    if actual != config.dataset_sha256:
        raise DatasetError(
            0,
            f"dataset {config.dataset} has SHA-256 {actual}, not the validated {config.dataset_sha256}",
        )


def split_data(config: TrainingConfig) -> tuple[list[Any], Path, list[Any], Path]:
    """(training examples, their image root, validation examples, their image root),
    each file read under its own Dataset's limits and with its own image root."""
    train = list(read_examples(config.dataset, config.dataset_limits))
    root = image_root(config.image_root, config.dataset)
    validation = config.validation
    if validation is None:
        return train, root, [], root
    if validation.dataset is not None:
        return (
            train,
            root,
            list(read_examples(validation.dataset, validation.limits)),
            image_root(validation.image_root, validation.dataset),
        )
    assert validation.split is not None
    train, held_out = split_validation(train, validation.split, config.hyperparameters.seed)
    return train, root, held_out, root


def peak_memory() -> dict[str, int | None]:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_memory_bytes": rss_kib * 1024, "peak_gpu_memory_bytes": gpu}


def run(config: TrainingConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Train as ``config`` says; return the process exit code (0 done, else one of
    config's EXIT_*). The outcome also goes to the termination log (main process only)."""
    main = is_main_process()
    metrics = TrainMetrics() if main else None
    port = config.metrics_port
    stop_metrics = metrics.serve(port) if metrics and port else None
    try:
        report = _train(config, metrics, callbacks)
    except Exception as exc:
        code, message = outcome(exc)
        if code == EXIT_CANNOT_SUCCEED or isinstance(exc, FetchError):
            log.error("training failed: %s", message)  # not a bug: no traceback
        else:
            log.exception("training failed")
        if main:
            write_termination_log(config.termination_log, failure_summary(message))
        return code
    finally:
        if stop_metrics:
            stop_metrics()
    if main and report is not None and config.output_uri:
        try:
            sent = upload_s3(
                Path(config.output_dir), config.output_uri, exclude=_inner_dirs(config)
            )
        except FetchError as exc:
            log.error("training failed: %s", exc)
            write_termination_log(config.termination_log, failure_summary(str(exc)))
            return EXIT_FAILED
        log.info("uploaded %d files to %s", sent, config.output_uri)
        report |= dump(TrainingSummary(output_uri=config.output_uri))
    if main and report is not None and config.checkpoint_uri:
        drop_copies(config.checkpoint_uri)
    if main and report is not None:
        write_termination_log(config.termination_log, termination_summary(report))
        done = TrainingReport.model_validate(report)
        log.info(
            "done: %d steps, train loss %s, best eval loss %s at step %s; output in %s",
            done.steps,
            done.train_loss,
            done.best_eval_loss,
            done.best_step,
            done.output_dir,
        )
    return 0


_IN_A_WORKER = f"Caught {DatasetError.__name__} in DataLoader worker"


def outcome(exc: Exception) -> tuple[int, str]:
    """The exit code and the message for a run that raised ``exc``: EXIT_CANNOT_SUCCEED
    when the data or the settings are at fault (a retry, on a new GPU pod, would fail
    the same way), else EXIT_FAILED."""
    if isinstance(exc, DatasetError | JobError):
        return EXIT_CANNOT_SUCCEED, f"{type(exc).__name__}: {exc}"
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith(_IN_A_WORKER):
        # A DataLoader worker (where images are opened) hands its exception back as a
        # RuntimeError holding the traceback when torch cannot rebuild it, as with
        # DatasetError's two arguments; the traceback's last line is the error.
        last = text.rstrip().rsplit("\n", 1)[-1]
        return EXIT_CANNOT_SUCCEED, f"{DatasetError.__name__}: {last.split(': ', 1)[-1]}"
    return EXIT_FAILED, f"{type(exc).__name__}: {exc}"


def _checkpoint_to_resume(config: TrainingConfig) -> Path | None:
    """The latest checkpoint in checkpointDir; with checkpointUri, brought back from
    there first when checkpointDir has none (a replacement pod on a fresh disk)."""
    if not config.resume:
        return None
    if not config.checkpoint_uri:
        return latest_checkpoint(config.effective_checkpoint_dir)
    try:
        return restore_checkpoint(config.checkpoint_uri, config.effective_checkpoint_dir)
    except FetchError as exc:
        # Storage may be back for the next pod: not a JobError, which would end the run.
        raise FetchError(f"cannot read the checkpoint copies: {exc}") from exc


def _inner_dirs(config: TrainingConfig) -> tuple[str, ...]:
    """The checkpoint folder's name when it sits inside outputDir: not part of the model."""
    out, checkpoints = Path(config.output_dir), Path(config.effective_checkpoint_dir)
    return (checkpoints.relative_to(out).parts[0],) if checkpoints.is_relative_to(out) else ()


def _train(
    config: TrainingConfig, metrics: TrainMetrics | None, extra_callbacks: Sequence[TrainerCallback]
) -> dict[str, Any] | None:
    """Train, export, and (main process) write report.json and loss.png and return the
    report."""
    builder = load_builder(config.method)
    unmet = broken(REQUIREMENTS, config)
    if unmet:
        raise JobError("; ".join(unmet))
    has_eval = config.validation is not None
    verify_dataset(config)
    hardware = Hardware.detect()
    processing = load_processing(config.base_model, trust_remote_code=config.trust_remote_code)
    train, train_root, validation, validation_root = split_data(config)
    model = load_model(
        config.base_model,
        multimodal=is_multimodal(processing),
        trust_remote_code=config.trust_remote_code,
        dtype=model_dtype(config, hardware),
    )
    hp = config.hyperparameters
    telemetry = Telemetry(metrics)
    callbacks: list[TrainerCallback] = [
        EvalSaveSchedule(eval_steps=hp.eval_steps, save_steps=hp.save_steps, has_eval=has_eval),
        telemetry,
        *extra_callbacks,
    ]
    if config.early_stopping:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=config.early_stopping.patience)
        )
    if config.checkpoint_uri:
        callbacks.append(CheckpointMirror(config.checkpoint_uri))
    trainer, stats = builder(
        TrainerInputs(
            config=config,
            hardware=hardware,
            model=model,
            processing=processing,
            train=train,
            train_root=train_root,
            validation=validation,
            validation_root=validation_root,
            callbacks=callbacks,
        )
    )
    # The trainer holds the records it needs; the parsed examples (which may embed whole
    # images as data: URIs) would only take memory for the rest of the run.
    del train, validation
    # Telemetry prints the log lines; the Trainer's own printer would repeat them as dicts.
    trainer.remove_callback(PrinterCallback)
    resume = _checkpoint_to_resume(config)
    if resume:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # With validation, the Trainer has loaded the best checkpoint back: that is what
    # gets exported. A PEFT model saves only its adapter.
    trainer.save_model(config.output_dir)
    if not trainer.is_world_process_zero():
        return None
    report = _report(
        config, trainer.state, stats, resume, telemetry.start_epoch, result.metrics["train_runtime"]
    )
    output = Path(config.output_dir)
    write_json(output / "report.json", report)
    plot_losses(*loss_curves(trainer.state.log_history), output / "loss.png")
    return report


def _report(
    config: TrainingConfig,
    state: TrainerState,
    stats: DataStats,
    resumed_from: Path | None,
    start_epoch: float,
    runtime: float,
) -> dict[str, Any]:
    # TRL logs the tokens this process has trained on so far; the latest entry has them all.
    tokens = next((e["num_tokens"] for e in reversed(state.log_history) if "num_tokens" in e), 0.0)
    return build_report(
        log_history=state.log_history,
        run={
            "method": config.method,
            "tuning": config.tuning,
            "base_model": config.base_model,
            "output_dir": str(Path(config.output_dir).resolve()),
            "steps": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
            "early_stopped": state.global_step < state.max_steps,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "train_examples": stats.train_examples,
            "eval_examples": stats.eval_examples,
            "truncated_examples": stats.truncated,
            "dropped_examples": stats.dropped,
            # What the run learned from (labelled tokens of trained turns), as hosted
            # services bill it: an epoch's worth for each epoch run.
            "trained_tokens": round(stats.trained_tokens * (state.epoch or 0.0)),
            "train_runtime_seconds": runtime,
            # This process's share of the run (all of it unless it resumed).
            "samples_per_second": ((state.epoch or 0.0) - start_epoch)
            * stats.train_examples
            / runtime,
            "tokens_per_second": tokens / runtime,
            **peak_memory(),
        },
    )
