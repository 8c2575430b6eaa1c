"""Canonical examples -> the chat records the collator encodes, plus the validation split
and the dataset checksum.

A record is a plain dict, typed as a ``TypedDict``, so that it can live in a
``datasets.Dataset`` (which TRL's trainers require). Images are opened only when a
batch is collated, so a large dataset never sits decoded in memory.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar

from kubetune_trainer.data import DatasetError
from kubetune_trainer.data.example import Example, ImageRef, Turn
from kubetune_trainer.training.inputs import JobError

T = TypeVar("T")

PlannedTokens = dict[str, list[int]]
"""A chat's per-token sequences (input ids, attention and assistant masks...) as planning
encoded them, cut to its kept length."""


class ChatRecord(TypedDict):
    """One chat as the collator encodes it."""

    messages: str  # the chat as JSON, image parts as {"type": "image"} placeholders
    images: list[str]  # their sources, in order; a text-only model's dataset drops them
    image_details: list[str | None]  # each image's content-part detail (low|high|auto)
    root: str  # where relative image paths resolve: each data file may have its own
    # The assistant turns that are context only (weight 0), counted among the assistant
    # turns from 0: their tokens get no labels.
    untrained: list[int]
    line: int  # the example's line in its file, for error messages
    # Set by planning: how many leading tokens to train on, and the tokens themselves.
    keep: NotRequired[int]
    tokens: NotRequired[PlannedTokens]


class PreferenceRecord(ChatRecord):
    """A chat record for the chosen branch of a preference pair plus the rejected one:
    the same prompt ending in the rejected reply."""

    rejected_messages: str
    rejected_images: list[str]
    rejected_keep: NotRequired[int]
    rejected_tokens: NotRequired[PlannedTokens]
    # The larger of keep and rejected_keep: both chats are padded to one width.
    longer_keep: NotRequired[int]


def _content(turn: Turn, line: int, *, multimodal: bool) -> Any:
    if multimodal:
        return [
            {"type": "image"} if isinstance(part, ImageRef) else {"type": "text", "text": part}
            for part in turn.parts
        ]
    if turn.images:
        raise DatasetError(
            line, "example has images but the base model is a text-only language model"
        )
    # Text-only chat templates (Qwen2.5's, Llama's) expect a string, not content parts.
    return turn.text


def to_messages(turns: Sequence[Turn], line: int, *, multimodal: bool) -> list[dict[str, Any]]:
    return [{"role": t.role, "content": _content(t, line, multimodal=multimodal)} for t in turns]


def to_chat_record(example: Example, image_root: str | Path, *, multimodal: bool) -> ChatRecord:
    replies = [turn for turn in example.turns if turn.role == "assistant"]
    return {
        "messages": json.dumps(to_messages(example.turns, example.line, multimodal=multimodal)),
        "images": [image.source for image in example.images],
        "image_details": [image.detail for image in example.images],
        "root": str(image_root),
        "line": example.line,
        "untrained": [i for i, turn in enumerate(replies) if not turn.learned],
    }


def split_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded (train, validation) split holding out ``fraction`` of the items, at least
    one, and leaving at least one to train on."""
    if len(items) < 2:
        raise JobError(
            f"a validation split needs at least 2 examples, the dataset has {len(items)}"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held_out = set(order[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held_out]
    validation = [item for i, item in enumerate(items) if i in held_out]
    return train, validation


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
