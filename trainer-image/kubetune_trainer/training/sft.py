"""Supervised fine-tuning: chat records with planned lengths, the collator and TRL's
SFTTrainer, with preserve.py's loss when the job preserves general skills."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trl import SFTTrainer

from kubetune_trainer.training.checkpoints import ResumableCheckpoints
from kubetune_trainer.training.collate import ChatEncoder, SFTCollator, learned_tokens, plan_row
from kubetune_trainer.training.config_mapping import lora_config, sft_config
from kubetune_trainer.training.images import ImageFitter
from kubetune_trainer.training.inputs import (
    DataStats,
    TrainerInputs,
    prepare_data,
)
from kubetune_trainer.training.models import (
    default_lora_targets,
    image_token_ids,
    is_multimodal,
    tokenizer_of,
    training_chat_template,
)
from kubetune_trainer.training.preserve import PreserveSkillsLoss
from kubetune_trainer.training.records import ChatRecord, to_chat_record


class KubetuneSFTTrainer(ResumableCheckpoints, SFTTrainer):
    """TRL's SFTTrainer with checkpoints that resume correctly."""


class PreserveSkillsSFTTrainer(PreserveSkillsLoss, KubetuneSFTTrainer):
    """KubetuneSFTTrainer with the preserve-general-skills loss (preserve.py)."""


def chat_encoder(processing: Any, max_pixels: int) -> ChatEncoder:
    return ChatEncoder(
        processing=processing,
        chat_template=training_chat_template(processing),
        load_image=ImageFitter(max_pixels),
        multimodal=is_multimodal(processing),
        image_token_ids=image_token_ids(processing),
        pad_token_id=tokenizer_of(processing).pad_token_id or 0,
    )


def plan_lengths(
    encoder: ChatEncoder, records: Sequence[ChatRecord], max_length: int
) -> tuple[list[ChatRecord], int, int]:
    """The records to train on, each with its ``keep`` length, and how many were
    truncated and dropped. Each example is encoded once here, images included, which
    also finds unreadable images before training starts rather than hours into it; its
    tokens stay with the record for the collator."""
    kept: list[ChatRecord] = []
    whole: list[ChatRecord] = []
    truncated = dropped = 0
    for record in records:
        keep, length, tokens = plan_row(encoder, record, max_length)
        if keep is None or tokens is None:
            dropped += 1
            continue
        truncated += keep < length
        kept.append({**record, "keep": keep, "tokens": tokens})
        if keep == length:
            whole.append(kept[-1])
    encoder.check_reuse(kept, whole)
    return kept, truncated, dropped


def build_trainer(inputs: TrainerInputs) -> tuple[SFTTrainer, DataStats]:
    config = inputs.config
    encoder = chat_encoder(inputs.processing, config.hyperparameters.max_pixels)
    data = prepare_data(inputs, encoder, to_chat_record, plan_lengths, learned_tokens, "examples")
    arguments: dict[str, Any] = {
        "model": inputs.model,
        "args": sft_config(config, inputs.hardware, has_eval=data.validation is not None),
        "data_collator": SFTCollator(encoder),
        "train_dataset": data.train,
        "eval_dataset": data.validation,
        "processing_class": inputs.processing,
        "peft_config": lora_config(config, default_lora_targets(inputs.model)),
        "callbacks": list(inputs.callbacks),
    }
    preserve = config.preserve_general_skills
    if preserve.enabled and preserve.lambda_ > 0:
        trainer: SFTTrainer = PreserveSkillsSFTTrainer(
            kl_weight=preserve.lambda_, temperature=preserve.temperature, **arguments
        )
    else:
        trainer = KubetuneSFTTrainer(**arguments)
    return trainer, data.stats
