"""``kubetune preflight --config job.json``: what a run will train on, counted on a CPU
before its GPUs are booked.

The operator runs it in a CPU Job once the run's Datasets are Ready, with the training
Job's job.json and mounts. It loads the base model's tokenizer or processor only, never
its weights, and plans the data with the method's own planning (inputs.Planning, the
one training uses), so its counts are those the run will report; a job that training
would refuse for its data or settings (nothing fits maxContextLength, a chat template
that cannot mark the assistant's turns, a bad line) fails here with the same message.
The summary goes to the termination log, as ``kubetune train``'s does.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

from annotated_types import MaxLen

from kubetune_trainer.contract.job import EXIT_CANNOT_SUCCEED, TrainingConfig
from kubetune_trainer.contract.rules import REQUIREMENTS, broken
from kubetune_trainer.contract.summaries import (
    LongestExample,
    OverLength,
    PreflightSummary,
    dump,
)
from kubetune_trainer.training.images import run_image_rules
from kubetune_trainer.training.inputs import JobError, Plan, Planning, plan_data
from kubetune_trainer.training.models import is_multimodal, load_processing
from kubetune_trainer.training.report import write_termination_log
from kubetune_trainer.training.runner import (
    BUILDERS,
    load_builder,
    outcome,
    split_data,
    verify_dataset,
)
from kubetune_trainer.training.sft import chat_encoder

log = logging.getLogger("kubetune.preflight")

OVER_LENGTH_LINES = next(
    m.max_length for m in OverLength.model_fields["lines"].metadata if isinstance(m, MaxLen)
)
# A failure's message in the termination log is cut to its start, which names the
# problem and the line.
MESSAGE_LIMIT = 400


def planned_steps(
    examples: int, *, batch_size: int, gradient_accumulation_steps: int, epochs: int, processes: int
) -> int:
    """The optimizer steps the Trainer plans (its max_steps) for ``examples`` records.

    Each process gets ``batch_size`` records a batch. accelerate shards the batches of
    the whole set across the processes, the last batch short (no drop_last) and every
    process given as many batches as the first (even_batches: the short ones are filled
    from the start); the Trainer then takes a step every ``gradient_accumulation_steps``
    batches and after an epoch's last one (transformers'
    Trainer.set_initial_training_values)."""
    batches = math.ceil(examples / batch_size)
    per_process = math.ceil(batches / processes)
    per_epoch = max(math.ceil(per_process / gradient_accumulation_steps), 1)
    return epochs * per_epoch


def planning_of(method: str) -> Planning[Any]:
    load_builder(method)  # refuses a method this trainer lacks, as training does
    planning: Planning[Any] = importlib.import_module(BUILDERS[method]).PLANNING
    return planning


def summary_of(
    plan: Plan[Any], learned_per_epoch: int, config: TrainingConfig, processes: int
) -> PreflightSummary:
    """The pre-flight figures of the planned training split."""
    hp = config.hyperparameters
    kept = [row for row in plan.rows if row.record is not None]
    over = [row for row in plan.rows if row.length > hp.max_context_length]
    longest = max(plan.rows, key=lambda row: row.length)  # the first, on a tie
    return PreflightSummary(
        ok=True,
        examples=len(kept),
        tokens=sum(row.kept_tokens for row in kept),
        training_tokens=learned_per_epoch * hp.epochs,
        steps=planned_steps(
            len(kept),
            batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            epochs=hp.epochs,
            processes=processes,
        ),
        longest_example=LongestExample(line=longest.line, tokens=longest.length),
        over_length=OverLength(
            count=len(over),
            lines=[row.line for row in over[:OVER_LENGTH_LINES]],
            truncated=sum(row.truncated for row in over),
            dropped=sum(row.record is None for row in over),
        ),
    )


def preflight(config: TrainingConfig, *, processes: int = 1) -> PreflightSummary:
    """Plan the run's data as its training will; raise what training would raise for
    the data or settings (DatasetError, JobError)."""
    unmet = broken(REQUIREMENTS, config)
    if unmet:
        raise JobError("; ".join(unmet))
    planning = planning_of(config.method)
    verify_dataset(config)
    processing = load_processing(config.base_model, trust_remote_code=config.trust_remote_code)
    encoder = chat_encoder(processing, config.hyperparameters.max_pixels, run_image_rules(config))
    train, train_root, validation, validation_root = split_data(config)
    planned = plan_data(
        config,
        encoder,
        planning,
        multimodal=is_multimodal(processing),
        train=train,
        train_root=train_root,
        validation=validation,
        validation_root=validation_root,
    )
    return summary_of(planned.train, planned.stats.trained_tokens, config, processes)


def run(config: TrainingConfig, *, processes: int = 1) -> tuple[int, PreflightSummary]:
    """Pre-flight the job: (the exit code, 0 or one of config's EXIT_*, and the
    summary), the summary also written to the termination log."""
    try:
        summary = preflight(config, processes=processes)
        code = 0
    except Exception as exc:
        code, message = outcome(exc)
        if code == EXIT_CANNOT_SUCCEED:
            log.error("pre-flight failed: %s", message)  # the job's fault: no traceback
        else:
            log.exception("pre-flight failed")
        summary = PreflightSummary(ok=False, message=message[:MESSAGE_LIMIT])
    write_termination_log(config.termination_log, dump(summary))
    return code, summary


def describe(summary: PreflightSummary, config: TrainingConfig) -> list[str]:
    """A few lines for a person about a pre-flight that passed: what ``kubetune
    preflight`` prints without --json."""
    hp = config.hyperparameters
    unit = "pairs" if config.method == "dpo" else "examples"
    lines = [
        f"{summary.examples} training {unit}, {summary.tokens} tokens",
        f"{summary.training_tokens} training tokens over {hp.epochs} "
        f"epoch{'s' if hp.epochs > 1 else ''}, {summary.steps} steps",
    ]
    if summary.longest_example is not None:
        longest = summary.longest_example
        lines.append(f"longest: line {longest.line}, {longest.tokens} tokens")
    over = summary.over_length
    if over is not None and over.count:
        shown = ", ".join(map(str, over.lines)) + (", ..." if over.count > len(over.lines) else "")
        lines.append(
            f"{over.count} longer than maxContextLength={hp.max_context_length} "
            f"({over.truncated} truncated, {over.dropped} dropped): lines {shown}"
        )
    return lines
