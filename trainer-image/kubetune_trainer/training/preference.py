"""DPO preference tuning: preference records, the pair collator and TRL's DPOTrainer.

TRL's DPOTrainer supplies the loss, the reference model handling (with LoRA the adapter
switched off, so no second copy; with full tuning the frozen copy passed in here) and
the reward metrics. Its data preparation is not used, for the reasons collate.py gives
for SFT: its vision collator takes images already decoded in the dataset and truncates
wherever max_length falls (image tokens included), and its text path tokenizes the
whole dataset up front. Here each pair is encoded when its batch is built, with the same
chat template, image loading and truncation plan as SFT, and the completion is the
final assistant reply only.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl import DPOTrainer

from kubetune_trainer.data import DatasetError
from kubetune_trainer.data.example import Example
from kubetune_trainer.training.batching import LengthGroupedBatches
from kubetune_trainer.training.checkpoints import ResumableCheckpoints
from kubetune_trainer.training.collate import (
    IGNORE_INDEX,
    ChatEncoder,
    assistant_labels,
    learned_tokens,
    plan_row,
    truncate_rows,
)
from kubetune_trainer.training.config_mapping import dpo_config, lora_config
from kubetune_trainer.training.images import run_image_rules
from kubetune_trainer.training.inputs import (
    DataStats,
    Plan,
    Planning,
    RecordPlan,
    TrainerInputs,
    prepare_data,
)
from kubetune_trainer.training.models import default_lora_targets
from kubetune_trainer.training.records import (
    ChatRecord,
    PlannedTokens,
    PreferenceRecord,
    to_chat_record,
    to_messages,
)
from kubetune_trainer.training.sft import chat_encoder


def to_preference_record(
    example: Example, image_root: Any, *, multimodal: bool
) -> PreferenceRecord:
    """The preference record of a pair: its rejected branch has the example's
    ``rejected_images`` (when given) in place of the prompt's."""
    if example.rejected is None:
        raise DatasetError(
            example.line,
            "method dpo needs preference pairs: this example has no rejected reply",
        )
    prompt_images = [image.source for turn in example.prompt for image in turn.images]
    rejected_images = (
        [image.source for image in example.rejected_images]
        if example.rejected_images is not None
        else prompt_images
    )
    rejected_images += [image.source for image in example.rejected.images]
    rejected_turns = (*example.prompt, example.rejected)
    return {
        **to_chat_record(example, image_root, multimodal=multimodal),
        "rejected_messages": json.dumps(
            to_messages(rejected_turns, example.line, multimodal=multimodal)
        ),
        "rejected_images": rejected_images,
    }


def _branch(
    pair: PreferenceRecord,
    messages: str,
    images: list[str],
    keep: int | None,
    tokens: PlannedTokens | None,
) -> ChatRecord:
    # Both branches show their images in the prompt's places, so at the prompt's detail.
    # DPO learns only the final reply, which is never weighted 0 (formats.py): the
    # weights of the prompt's assistant turns change nothing here.
    branch: ChatRecord = {
        "messages": messages,
        "images": images,
        "image_details": pair["image_details"],
        "root": pair["root"],
        "line": pair["line"],
        "untrained": [],
    }
    if keep is not None:
        branch["keep"] = keep
    if tokens is not None:
        branch["tokens"] = tokens
    return branch


def branches(records: Sequence[PreferenceRecord]) -> tuple[list[ChatRecord], list[ChatRecord]]:
    """(chosen, rejected): each pair as two plain chat records for the encoder, with the
    planned length and tokens of each branch once planning has set them."""
    chosen = [
        _branch(r, r["messages"], r.get("images", []), r.get("keep"), r.get("tokens"))
        for r in records
    ]
    rejected = [
        _branch(
            r,
            r["rejected_messages"],
            r.get("rejected_images", []),
            r.get("rejected_keep"),
            r.get("rejected_tokens"),
        )
        for r in records
    ]
    return chosen, rejected


@dataclass
class PreferenceCollator:
    """Builds DPO batches as TRL's DPOTrainer takes them: the chosen chats then the
    rejected ones (2 x batch rows), right-padded, with ``completion_mask`` on the final
    assistant reply, and the images of both branches in the same order."""

    encoder: ChatEncoder

    def __call__(self, records: Sequence[PreferenceRecord]) -> dict[str, torch.Tensor]:
        chosen, rejected = branches(records)
        rows = chosen + rejected
        batch = self.encoder.encode(rows)
        labels = assistant_labels(
            batch["input_ids"],
            batch.pop("assistant_masks"),
            batch["attention_mask"],
            final_turn_only=True,
        )
        batch["labels"] = labels
        keep = [row.get("keep") for row in rows]
        if any(k is not None and k < batch["input_ids"].shape[1] for k in keep):
            truncate_rows(batch, keep)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return batch


def plan_pair(
    encoder: ChatEncoder, record: PreferenceRecord, max_length: int
) -> RecordPlan[PreferenceRecord]:
    """One pair with the ``keep`` length and tokens of its chosen and (``rejected_keep``,
    ``rejected_tokens``) rejected chat, truncated when either is cut; dropped when either
    would have to lose image tokens or its whole reply."""
    # Both chats are encoded even when the first is dropped: a dropped pair's length is
    # that of its longer chat (pre-flight's longest example).
    (keep, length, tokens), (rejected_keep, rejected_length, rejected_tokens) = (
        plan_row(encoder, branch[0], max_length, final_turn_only=True)
        for branch in branches([record])
    )
    longer = max(length, rejected_length)
    if keep is None or tokens is None or rejected_keep is None or rejected_tokens is None:
        return RecordPlan(record["line"], longer)
    kept: PreferenceRecord = {
        **record,
        "keep": keep,
        "rejected_keep": rejected_keep,
        "longer_keep": max(keep, rejected_keep),
        "tokens": tokens,
        "rejected_tokens": rejected_tokens,
    }
    return RecordPlan(
        record["line"],
        longer,
        kept,
        kept_tokens=keep + rejected_keep,
        truncated=keep < length or rejected_keep < rejected_length,
    )


def plan_pairs(
    encoder: ChatEncoder, records: Sequence[PreferenceRecord], max_length: int
) -> Plan[PreferenceRecord]:
    """Each pair planned (plan_pair)."""
    plan = Plan([plan_pair(encoder, record, max_length) for record in records])
    encoder.check_reuse(_chats(plan.kept), _chats(plan.whole))
    return plan


def _chats(records: Sequence[PreferenceRecord]) -> list[ChatRecord]:
    chosen, rejected = branches(records)
    return [chat for pair in zip(chosen, rejected, strict=True) for chat in pair]


def pair_learned_tokens(record: PreferenceRecord) -> int:
    """The completion tokens of both branches of a planned pair: what DPO trains on."""
    chosen, rejected = branches([record])
    return sum(learned_tokens(branch, final_turn_only=True) for branch in chosen + rejected)


PLANNING = Planning(
    to_preference_record,
    plan_pairs,
    pair_learned_tokens,
    "pairs",
    image_columns=("images", "rejected_images"),
)


class KubetuneDPOTrainer(ResumableCheckpoints, LengthGroupedBatches, DPOTrainer):
    """TRL's DPOTrainer with checkpoints that resume correctly and batches of pairs of
    similar lengths, on records that PreferenceCollator encodes batch by batch."""

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        # TRL would tokenize a text dataset up front into its own columns; the records
        # here are encoded, masked and truncated by PreferenceCollator instead.
        return dataset


def build_trainer(inputs: TrainerInputs) -> tuple[DPOTrainer, DataStats]:
    config = inputs.config
    encoder = chat_encoder(
        inputs.processing, config.hyperparameters.max_pixels, run_image_rules(config)
    )
    data = prepare_data(inputs, encoder, PLANNING)

    # With LoRA the reference is the model with its adapter switched off (TRL does that
    # when ref_model is None and the model is a PEFT model): no second copy. With full
    # tuning the reference is a frozen copy of the base, taken before training moves it.
    ref_model = None
    if config.tuning == "full":
        ref_model = copy.deepcopy(inputs.model).eval().requires_grad_(False)

    trainer = KubetuneDPOTrainer(
        model=inputs.model,
        ref_model=ref_model,
        args=dpo_config(config, inputs.hardware, has_eval=data.validation is not None),
        data_collator=PreferenceCollator(encoder),
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=inputs.processing,
        peft_config=lora_config(config, default_lora_targets(inputs.model)),
        callbacks=list(inputs.callbacks),
    )
    return trainer, data.stats
