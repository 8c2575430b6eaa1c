"""What the runner hands to a method's trainer builder, what the builder reports back
about the data, and the error either raises for a job that cannot run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, TrainerCallback

from kubetune_trainer.config import TrainingConfig
from kubetune_trainer.data.example import Example
from kubetune_trainer.training.config_mapping import Hardware


@dataclass(frozen=True)
class TrainerInputs:
    config: TrainingConfig
    hardware: Hardware
    model: PreTrainedModel
    processing: Any  # a VLM's processor or an LLM's tokenizer
    train: Sequence[Example]
    train_root: Path
    validation: Sequence[Example]
    validation_root: Path
    callbacks: Sequence[TrainerCallback]


@dataclass(frozen=True)
class DataStats:
    train_examples: int
    eval_examples: int
    truncated: int
    dropped: int


class JobError(ValueError):
    """The job cannot run as configured (not a bug): reported without a traceback."""


Planner = Callable[[Sequence[Example], Any], tuple[list[dict[str, Any]], int, int]]

log = logging.getLogger("kubetune.train")


def plan_splits(
    inputs: TrainerInputs, plan: Planner, unit: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], DataStats]:
    """Both splits through `plan` (records, truncated, dropped), with the counts logged
    and a job that has nothing left to train on refused. `unit` names what is counted:
    "examples" or "pairs"."""
    hp = inputs.config.hyperparameters
    train, train_cut, train_dropped = plan(inputs.train, inputs.train_root)
    validation, eval_cut, eval_dropped = plan(inputs.validation, inputs.validation_root)
    stats = DataStats(
        train_examples=len(train),
        eval_examples=len(validation),
        truncated=train_cut + eval_cut,
        dropped=train_dropped + eval_dropped,
    )
    if stats.truncated or stats.dropped:
        log.warning(
            "%d %s longer than maxContextLength=%d were truncated and %d dropped "
            "(truncating those would have cut through image tokens or left no reply)",
            stats.truncated,
            unit,
            hp.max_context_length,
            stats.dropped,
        )
    if not train:
        raise JobError(f"no training {unit[:-1]} fits maxContextLength={hp.max_context_length}")
    if inputs.validation and not validation:
        raise JobError(f"no validation {unit[:-1]} fits maxContextLength={hp.max_context_length}")
    return train, validation, stats


def records_dataset(
    records: list[dict[str, Any]], *, multimodal: bool, image_columns: tuple[str, ...] = ("images",)
) -> Any:
    """The records as a datasets.Dataset for a TRL trainer. For a text-only model the
    image columns go: TRL takes an "images" column as the sign of a vision dataset,
    which a text-only model refuses."""
    from datasets import Dataset

    if not multimodal:
        records = [{k: v for k, v in r.items() if k not in image_columns} for r in records]
    return Dataset.from_list(records)
