"""Chat records -> padded model inputs with labels on the assistant turns only.

TRL's collators are not used for this: they take images already decoded in the dataset
(a large dataset would sit decoded in memory; here each image is opened under the
dataset rules and resized when its batch is built, and kept for later epochs only
within a memory budget: images.ImageFitter), and they truncate at
max_length wherever it falls, image tokens included, which makes a VLM fail (its image
features must match its image tokens). The label masking itself is transformers' own:
the chat template's ``{% generation %}`` markers, from TRL's training variant of the
template when the model's lacks them.

Each example is encoded once while planning (its kept length has to be known before
training anyway). Its token sequences travel with the record, so that building a batch
is padding them and running the image processor, not rendering and tokenizing again:
where a processor's batches are more than that (checked on real records before
training), every batch goes through the processor instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from kubetune_trainer.data import DatasetError
from kubetune_trainer.training.records import ChatRecord, PlannedTokens

IGNORE_INDEX = -100

# The per-token tensors a processor returns (shape batch x sequence); everything else
# (pixel values, image grids) describes images and is left as it is by truncation.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")

log = logging.getLogger("kubetune.train")

ImageLoader = Callable[[str, str, int, str | None], Image.Image]
"""(image source, image root, dataset line, content-part detail) -> an RGB image fitted
to the pixel budget of that detail (images.pixel_budget)."""


@dataclass
class ChatEncoder:
    """Renders chat records with the training chat template and tokenizes them, images
    included. ``processing`` is a VLM's processor or an LLM's tokenizer."""

    processing: Any
    chat_template: str | None
    load_image: ImageLoader
    multimodal: bool
    image_token_ids: frozenset[int] = field(default_factory=frozenset)
    pad_token_id: int = 0
    # Whether batches are built from records' planned tokens: None until check_reuse has
    # compared them with the processor's own batches, False once any comparison failed.
    reuse_tokens: bool | None = None

    def conversations(
        self, records: Sequence[ChatRecord], *, prompt_only: bool
    ) -> list[list[dict[str, Any]]]:
        chats = []
        for record in records:
            messages = json.loads(record["messages"])
            if prompt_only:
                messages = messages[:-1]
            if self.multimodal:
                images = iter(self.load_images(record))
                for message in messages:
                    message["content"] = [
                        {"type": "image", "image": next(images)}
                        if part["type"] == "image"
                        else part
                        for part in message["content"]
                    ]
            chats.append(messages)
        return chats

    def load_images(self, record: ChatRecord) -> list[Image.Image]:
        return [
            self.load_image(source, record["root"], record["line"], detail)
            for source, detail in zip(record["images"], record["image_details"], strict=True)
        ]

    def encode(
        self,
        records: Sequence[ChatRecord],
        *,
        prompt_only: bool = False,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, image tensors and (for whole chats) the
        ``assistant_masks`` of the batch. ``prompt_only`` drops the final reply and ends
        with the generation prompt, for generating that reply."""
        if (
            self.reuse_tokens
            and not prompt_only
            and padding_side == "right"
            and all("tokens" in record for record in records)
        ):
            return self.from_tokens(records)
        chats = self.conversations(records, prompt_only=prompt_only)
        common: dict[str, Any] = {
            "chat_template": self.chat_template,
            "tokenize": True,
            "return_dict": True,
            "return_tensors": "pt",
            "add_generation_prompt": prompt_only,
            "return_assistant_tokens_mask": not prompt_only,
        }
        if self.multimodal:
            # Rendered text already holds the template's special tokens; adding them again
            # would double the BOS of Llama-style tokenizers (a tokenizer's own
            # apply_chat_template already leaves them out).
            padding = {"padding": True, "padding_side": padding_side, "add_special_tokens": False}
            out = self.processing.apply_chat_template(chats, processor_kwargs=padding, **common)
        else:
            out = self.processing.apply_chat_template(
                chats, padding=True, tokenizer_kwargs={"padding_side": padding_side}, **common
            )
        return dict(out)

    def planned_tokens(self, encoded: Mapping[str, torch.Tensor], keep: int) -> PlannedTokens:
        """The per-token sequences of a one-example encoding, cut to ``keep`` tokens: a
        record's ``tokens``."""
        return {
            key: encoded[key][0, :keep].tolist()
            for key in (*SEQUENCE_KEYS, "assistant_masks")
            if key in encoded
        }

    def from_tokens(self, records: Sequence[ChatRecord]) -> dict[str, torch.Tensor]:
        """The batch from the records' planned tokens, right-padded, and their images
        through the image processor (nested per record, as a processor passes them)."""
        rows = [record["tokens"] for record in records]
        width = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, Any] = {}
        for key in rows[0]:
            pad = self.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor(
                [row[key] + [pad] * (width - len(row[key])) for row in rows], dtype=torch.long
            )
        if self.multimodal:
            images = [self.load_images(record) for record in records]
            if any(images):
                batch.update(self.processing.image_processor(images=images, return_tensors="pt"))
        return batch

    def check_reuse(self, kept: Sequence[ChatRecord], whole: Sequence[ChatRecord]) -> None:
        """Compare a batch built from planned tokens with the processor's own batch of the
        same records, and reuse tokens only while every such comparison matched. ``whole``
        holds the records of ``kept`` left untruncated (a truncated row differs in its
        padding); the sample is three of them, two with images, so that padding and
        images across rows are compared. Images that only truncated records have cannot
        be compared, so their batches are encoded in full."""
        with_images = [r for r in whole if r.get("images")][:2]
        sample = with_images + [r for r in whole if not r.get("images")][: 3 - len(with_images)]
        if self.reuse_tokens is False:
            return
        if not with_images and any(r.get("images") for r in kept):
            self.reuse_tokens = False
            return
        if not sample:
            return
        fresh = self.encode([without_tokens(r) for r in sample])
        reused = self.from_tokens(sample)
        same = fresh.keys() == reused.keys() and all(
            fresh[key].dtype == reused[key].dtype and torch.equal(fresh[key], reused[key])
            for key in fresh
        )
        if not same:
            log.info(
                "this processor's batches are not its tokens plus its image processor's "
                "output: encoding each batch in full"
            )
        self.reuse_tokens = same


def without_tokens(record: ChatRecord) -> ChatRecord:
    """The record without its planned tokens: encoding it runs the processor."""
    unplanned = record.copy()
    unplanned.pop("tokens", None)
    return unplanned


def turn_numbers(mask: torch.Tensor) -> torch.Tensor:
    """For each token of an assistant mask, which contiguous run of assistant tokens it
    is in, from 0: which assistant turn, as the chat template marks each turn as one
    run. -1 outside the runs."""
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    return torch.where(mask, torch.cumsum(starts.int(), dim=1) - 1, -1)


def learned_mask(
    assistant_masks: torch.Tensor,
    attention_mask: torch.Tensor,
    untrained: Sequence[Collection[int]] = (),
    *,
    final_turn_only: bool = False,
) -> torch.Tensor:
    """The tokens that carry a label: assistant tokens that are not padding, less those
    of each row's ``untrained`` assistant turns (weight 0: context only). With
    ``final_turn_only``, only the last assistant turn counts."""
    mask = assistant_masks.bool() & attention_mask.bool()
    turns = turn_numbers(mask)
    learned = mask.clone()
    if final_turn_only:
        learned &= turns == turns.max(dim=1, keepdim=True).values
    for row, skipped in enumerate(untrained):
        for turn in skipped:
            learned[row] &= turns[row] != turn
    return learned


def assistant_labels(
    input_ids: torch.Tensor,
    assistant_masks: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    final_turn_only: bool = False,
    untrained: Sequence[Collection[int]] = (),
) -> torch.Tensor:
    """Labels equal to the input ids on the tokens ``learned_mask`` picks and
    IGNORE_INDEX elsewhere (system, user, image and padding tokens, and the turns that
    are context only)."""
    labels = input_ids.clone()
    labels[
        ~learned_mask(assistant_masks, attention_mask, untrained, final_turn_only=final_turn_only)
    ] = IGNORE_INDEX
    return labels


def learned_tokens(record: ChatRecord, *, final_turn_only: bool = False) -> int:
    """How many of a planned record's kept tokens carry a label: what it trains on."""
    tokens = record["tokens"]
    return int(
        learned_mask(
            torch.tensor([tokens["assistant_masks"]]),
            torch.tensor([tokens["attention_mask"]]),
            [record["untrained"]],
            final_turn_only=final_turn_only,
        ).sum()
    )


def keep_length(
    input_ids: Sequence[int],
    assistant_mask: Sequence[int],
    image_token_ids: Collection[int],
    max_length: int,
) -> int | None:
    """How many leading tokens of an example to train on, or None to drop it.

    An example that fits is kept whole. A longer one is truncated at ``max_length`` when
    that leaves every image token in place and at least one assistant token to learn;
    otherwise it is dropped (cutting an image's tokens would make the model fail)."""
    if len(input_ids) <= max_length:
        return len(input_ids)
    if any(token in image_token_ids for token in input_ids[max_length:]):
        return None
    if not any(assistant_mask[:max_length]):
        return None
    return max_length


def plan_row(
    encoder: ChatEncoder,
    record: ChatRecord,
    max_length: int,
    *,
    final_turn_only: bool = False,
) -> tuple[int | None, int, PlannedTokens | None]:
    """Encode one chat: (kept length or None to drop it, full length, its planned tokens).
    The loss falls on every assistant turn not weighted 0, or with ``final_turn_only`` on
    the last one (DPO's completion); a chat whose template marks none is refused, and so
    is one with a turn weighted 0 whose template does not mark each turn apart."""
    encoded = encoder.encode([record])
    input_ids = encoded["input_ids"][0].tolist()
    masks, attention = encoded["assistant_masks"], encoded["attention_mask"]
    if not masks.any():
        raise DatasetError(
            record["line"], "the chat template marks no token of this example as the assistant's"
        )
    if record["untrained"]:
        replies = sum(m["role"] == "assistant" for m in json.loads(record["messages"]))
        marked = int(turn_numbers(masks.bool() & attention.bool()).max()) + 1
        if marked != replies:
            raise DatasetError(
                record["line"],
                f"the chat template marks {marked} assistant turns where the example has "
                f"{replies}, so the turns with weight 0 cannot be told apart",
            )
    learned = learned_mask(
        masks, attention, [record["untrained"]], final_turn_only=final_turn_only
    )[0]
    keep = keep_length(input_ids, learned.tolist(), encoder.image_token_ids, max_length)
    tokens = None if keep is None else encoder.planned_tokens(encoded, keep)
    return keep, len(input_ids), tokens


@dataclass
class SFTCollator:
    """Builds training batches: encodes the chats, labels the assistant turns (those not
    weighted 0) and cuts each row to the length planned for it (the record's
    ``keep``)."""

    encoder: ChatEncoder
    final_turn_only: bool = False

    def __call__(self, records: Sequence[ChatRecord]) -> dict[str, torch.Tensor]:
        batch = self.encoder.encode(records)
        batch["labels"] = assistant_labels(
            batch["input_ids"],
            batch.pop("assistant_masks"),
            batch["attention_mask"],
            final_turn_only=self.final_turn_only,
            untrained=[record["untrained"] for record in records],
        )
        keep = [record.get("keep") for record in records]
        if any(k is not None and k < batch["input_ids"].shape[1] for k in keep):
            truncate_rows(batch, keep)
        return batch


def truncate_rows(batch: dict[str, torch.Tensor], keep: Sequence[int | None]) -> None:
    """Cut each right-padded row to its kept length and the batch to the longest row."""
    for row, k in enumerate(keep):
        if k is not None:
            batch["attention_mask"][row, k:] = 0
            batch["labels"][row, k:] = IGNORE_INDEX
    width = int(batch["attention_mask"].sum(dim=1).max())
    for key in SEQUENCE_KEYS:
        if key in batch:
            batch[key] = batch[key][:, :width]
