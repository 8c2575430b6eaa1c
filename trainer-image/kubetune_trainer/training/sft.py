"""Supervised fine-tuning: chat records with planned lengths, the collator and TRL's
SFTTrainer with the LM head at the trained positions only (trained_positions.py), with
preserve.py's loss when the job preserves general skills."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trl import SFTTrainer

from kubetune_trainer.training.batching import LengthGroupedBatches
from kubetune_trainer.training.checkpoints import ResumableCheckpoints
from kubetune_trainer.training.collate import ChatEncoder, SFTCollator, learned_tokens, plan_row
from kubetune_trainer.training.config_mapping import lora_config, sft_config
from kubetune_trainer.training.images import ImageFitter, ImageRules, run_image_rules
from kubetune_trainer.training.inputs import (
    DataStats,
    JobError,
    Plan,
    Planning,
    RecordPlan,
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
from kubetune_trainer.training.padding_free import enable_padding_free
from kubetune_trainer.training.preserve import PreserveSkillsLoss
from kubetune_trainer.training.records import ChatRecord, to_chat_record
from kubetune_trainer.training.trained_positions import TrainedPositionsLoss


class KubetuneSFTTrainer(
    TrainedPositionsLoss, ResumableCheckpoints, LengthGroupedBatches, SFTTrainer
):
    """TRL's SFTTrainer with the LM head at the trained positions only, checkpoints
    that resume correctly and batches of similar lengths."""


class PreserveSkillsSFTTrainer(PreserveSkillsLoss, KubetuneSFTTrainer):
    """KubetuneSFTTrainer with the preserve-general-skills loss (preserve.py)."""


def chat_encoder(processing: Any, max_pixels: int, rules: ImageRules | None = None) -> ChatEncoder:
    """The encoder of a run's chats, opening images under ``rules``; a JobError when
    the base model's chat template cannot mark the assistant's turns (then no token
    could be given a label)."""
    try:
        chat_template = training_chat_template(processing)
    except ValueError as exc:
        # The base model is the wrong one for chat fine-tuning: not worth a retry.
        name = tokenizer_of(processing).name_or_path
        raise JobError(
            f"base model {name}: its chat template cannot mark the assistant's turns for "
            f"training ({exc})"
        ) from exc
    return ChatEncoder(
        processing=processing,
        chat_template=chat_template,
        load_image=ImageFitter(max_pixels, rules or ImageRules()),
        multimodal=is_multimodal(processing),
        image_token_ids=image_token_ids(processing),
        pad_token_id=tokenizer_of(processing).pad_token_id or 0,
    )


def plan_example(
    encoder: ChatEncoder, record: ChatRecord, max_length: int
) -> RecordPlan[ChatRecord]:
    """One record kept whole, truncated, or dropped, with its ``keep`` length and its
    planned tokens."""
    keep, length, tokens = plan_row(encoder, record, max_length)
    if keep is None or tokens is None:
        return RecordPlan(record["line"], length)
    kept: ChatRecord = {**record, "keep": keep, "tokens": tokens}
    return RecordPlan(record["line"], length, kept, kept_tokens=keep, truncated=keep < length)


def plan_lengths(
    encoder: ChatEncoder, records: Sequence[ChatRecord], max_length: int
) -> Plan[ChatRecord]:
    """Each record planned (plan_example). Each example is encoded once here, images
    included, which also finds unreadable images before training starts rather than
    hours into it; its tokens stay with the record for the collator."""
    plan = Plan([plan_example(encoder, record, max_length) for record in records])
    encoder.check_reuse(plan.kept, plan.whole)
    return plan


PLANNING = Planning(to_chat_record, plan_lengths, learned_tokens, "examples")


def build_trainer(inputs: TrainerInputs) -> tuple[SFTTrainer, DataStats]:
    config = inputs.config
    encoder = chat_encoder(
        inputs.processing, config.hyperparameters.max_pixels, run_image_rules(config)
    )
    data = prepare_data(inputs, encoder, PLANNING)
    hyperparameters = config.hyperparameters
    packed = (
        hyperparameters.padding_free
        and hyperparameters.score_trained_tokens_only
        and enable_padding_free(inputs.model)
    )
    arguments: dict[str, Any] = {
        "model": inputs.model,
        "args": sft_config(config, inputs.hardware, has_eval=data.validation is not None),
        "data_collator": SFTCollator(encoder),
        "train_dataset": data.train,
        "eval_dataset": data.validation,
        "processing_class": inputs.processing,
        "peft_config": lora_config(config, default_lora_targets(inputs.model)),
        "callbacks": list(inputs.callbacks),
        "trained_positions_only": hyperparameters.score_trained_tokens_only,
        "packed_batches": packed,
    }
    preserve = config.preserve_general_skills
    if preserve.enabled and preserve.lambda_ > 0:
        trainer: SFTTrainer = PreserveSkillsSFTTrainer(
            kl_weight=preserve.lambda_, temperature=preserve.temperature, **arguments
        )
    else:
        trainer = KubetuneSFTTrainer(**arguments)
    return trainer, data.stats
