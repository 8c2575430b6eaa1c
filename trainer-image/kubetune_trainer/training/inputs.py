"""What the runner hands to a method's trainer builder, what the builder reports back
about the data, and the error either raises for a job that cannot run; and the planning
of the data (records kept, truncated or dropped) that training and ``kubetune
preflight`` share.

records.py imports JobError from here, so the data preparation here is generic over the
record type (records.py's ChatRecord or PreferenceRecord) instead of importing it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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
TokenCounter = Callable[[Record], int]
"""A planned record -> how many of its kept tokens carry a label."""

log = logging.getLogger("kubetune.train")


@dataclass(frozen=True)
class RecordPlan(Generic[Record]):
    """What planning made of one record (a pair, for DPO)."""

    line: int
    length: int
    """Its tokens, image tokens included, before any cut (a pair: its longer chat)."""
    record: Record | None = None
    """The record with its kept length and tokens (a pair: of both chats); None when it
    is dropped."""
    kept_tokens: int = 0
    """The tokens it trains on, after the cut (a pair: both chats)."""
    truncated: bool = False


@dataclass(frozen=True)
class Plan(Generic[Record]):
    """A split's records as planning left them, in their order."""

    rows: list[RecordPlan[Record]]

    @property
    def kept(self) -> list[Record]:
        return [row.record for row in self.rows if row.record is not None]

    @property
    def whole(self) -> list[Record]:
        """The records kept without a cut."""
        return [row.record for row in self.rows if row.record is not None and not row.truncated]

    @property
    def truncated(self) -> int:
        return sum(row.truncated for row in self.rows)

    @property
    def dropped(self) -> int:
        return sum(row.record is None for row in self.rows)


Planner = Callable[[Any, list[Record], int], Plan[Record]]
"""(encoder, records, maxContextLength) -> each record kept with its lengths and
tokens, truncated, or dropped."""


@dataclass(frozen=True)
class Planning(Generic[Record]):
    """How a method makes its records and plans them: what training and pre-flight
    share, so that pre-flight counts what training will train on. ``unit`` names what
    is counted ("examples" or "pairs"); ``count_learned`` counts a planned record's
    trained tokens; ``image_columns`` are the record keys that hold images."""

    make_record: RecordMaker[Record]
    plan: Planner[Record]
    count_learned: TokenCounter[Record]
    unit: str
    image_columns: tuple[str, ...] = ("images",)


@dataclass(frozen=True)
class PlannedData(Generic[Record]):
    train: Plan[Record]
    validation: Plan[Record]
    stats: DataStats


@dataclass(frozen=True)
class PreparedData:
    """Both splits as datasets.Dataset for a TRL trainer (validation None when there is
    none), and the counts."""

    train: Any
    validation: Any | None
    stats: DataStats


def plan_data(
    config: TrainingConfig,
    encoder: Any,
    planning: Planning[Record],
    *,
    multimodal: bool,
    train: Sequence[Example],
    train_root: Path,
    validation: Sequence[Example],
    validation_root: Path,
) -> PlannedData[Record]:
    """Both splits made into records and planned (kept lengths, the encoder's planned
    tokens), with the counts logged and a job that has nothing left to train on
    refused."""
    hp = config.hyperparameters
    unit = planning.unit

    def planned(examples: Sequence[Example], root: Path) -> Plan[Record]:
        records = [planning.make_record(e, root, multimodal=multimodal) for e in examples]
        return planning.plan(encoder, records, hp.max_context_length)

    train_plan = planned(train, train_root)
    validation_plan = planned(validation, validation_root)
    stats = DataStats(
        train_examples=len(train_plan.kept),
        eval_examples=len(validation_plan.kept),
        truncated=train_plan.truncated + validation_plan.truncated,
        dropped=train_plan.dropped + validation_plan.dropped,
        trained_tokens=sum(planning.count_learned(record) for record in train_plan.kept),
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
    if not stats.train_examples:
        raise JobError(f"no training {unit[:-1]} fits maxContextLength={hp.max_context_length}")
    if validation and not stats.eval_examples:
        raise JobError(f"no validation {unit[:-1]} fits maxContextLength={hp.max_context_length}")
    return PlannedData(train=train_plan, validation=validation_plan, stats=stats)


def prepare_data(inputs: TrainerInputs, encoder: Any, planning: Planning[Record]) -> PreparedData:
    """Both splits planned (plan_data), then made datasets."""
    multimodal = is_multimodal(inputs.processing)
    planned = plan_data(
        inputs.config,
        encoder,
        planning,
        multimodal=multimodal,
        train=inputs.train,
        train_root=inputs.train_root,
        validation=inputs.validation,
        validation_root=inputs.validation_root,
    )
    train, validation = planned.train.kept, planned.validation.kept
    columns = planning.image_columns
    return PreparedData(
        train=records_dataset(train, multimodal=multimodal, image_columns=columns),
        validation=records_dataset(validation, multimodal=multimodal, image_columns=columns)
        if validation
        else None,
        stats=planned.stats,
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
