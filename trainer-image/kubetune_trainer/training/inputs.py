"""What the runner hands to a method's trainer builder, what the builder reports back
about the data, and the error either raises for a job that cannot run.

records.py imports JobError from here, so the data preparation here is generic over the
record type (records.py's ChatRecord or PreferenceRecord) instead of importing it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedModel, TrainerCallback

from kubetune_trainer.contract.job import TrainingConfig
from kubetune_trainer.data.example import Example
from kubetune_trainer.training.config_mapping import Hardware
from kubetune_trainer.training.models import is_multimodal


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
    trained_tokens: int
    """The tokens one epoch learns: those with a label in the kept training records,
    not their prompts nor their turns weighted 0."""


class JobError(ValueError):
    """The job cannot run as configured (not a bug): reported without a traceback."""


Record = TypeVar("Record", bound=Mapping[str, Any])

RecordMaker = Callable[..., Record]
"""(example, image root, *, multimodal) -> the record a method's collator encodes."""
Planner = Callable[[Any, list[Record], int], tuple[list[Record], int, int]]
"""(encoder, records, maxContextLength) -> (records kept with their lengths, truncated,
dropped)."""
TokenCounter = Callable[[Record], int]
"""A planned record -> how many of its kept tokens carry a label."""

log = logging.getLogger("kubetune.train")


@dataclass(frozen=True)
class PreparedData:
    """Both splits as datasets.Dataset for a TRL trainer (validation None when there is
    none), and the counts."""

    train: Any
    validation: Any | None
    stats: DataStats


def prepare_data(
    inputs: TrainerInputs,
    encoder: Any,
    make_record: RecordMaker[Record],
    plan: Planner[Record],
    count_learned: TokenCounter[Record],
    unit: str,
    image_columns: tuple[str, ...] = ("images",),
) -> PreparedData:
    """Both splits made into records and planned (kept lengths, the encoder's planned
    tokens), with the counts logged and a job that has nothing left to train on
    refused, then made datasets. `unit` names what is counted: "examples" or "pairs";
    ``count_learned`` counts a record's trained tokens."""
    hp = inputs.config.hyperparameters
    multimodal = is_multimodal(inputs.processing)

    def planned(examples: Sequence[Example], root: Path) -> tuple[list[Record], int, int]:
        records = [make_record(e, root, multimodal=multimodal) for e in examples]
        return plan(encoder, records, hp.max_context_length)

    train, train_cut, train_dropped = planned(inputs.train, inputs.train_root)
    validation, eval_cut, eval_dropped = planned(inputs.validation, inputs.validation_root)
    stats = DataStats(
        train_examples=len(train),
        eval_examples=len(validation),
        truncated=train_cut + eval_cut,
        dropped=train_dropped + eval_dropped,
        trained_tokens=sum(count_learned(record) for record in train),
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
    return PreparedData(
        train=records_dataset(train, multimodal=multimodal, image_columns=image_columns),
        validation=records_dataset(validation, multimodal=multimodal, image_columns=image_columns)
        if validation
        else None,
        stats=stats,
    )


def records_dataset(
    records: Sequence[Mapping[str, Any]],
    *,
    multimodal: bool,
    image_columns: tuple[str, ...] = ("images",),
) -> Any:
    """The records as a datasets.Dataset for a TRL trainer. For a text-only model the
    image columns go: TRL takes an "images" column as the sign of a vision dataset,
    which a text-only model refuses."""
    from datasets import Dataset

    if not multimodal:
        records = [{k: v for k, v in r.items() if k not in image_columns} for r in records]
    return Dataset.from_list(records)
