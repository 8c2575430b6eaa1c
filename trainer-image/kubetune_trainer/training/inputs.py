"""What the runner hands to a method's trainer builder, what the builder reports back
about the data, and the error either raises for a job that cannot run."""

from __future__ import annotations

from collections.abc import Sequence
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
