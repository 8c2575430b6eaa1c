"""Preference pairs -> records and batches: both branches share the prompt, the rejected
branch takes ``rejected_images`` when given, and only the final reply is the completion."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from kubetune_trainer.data.example import Example, ImageRef, Turn
from kubetune_trainer.training.collate import ChatEncoder
from kubetune_trainer.training.models import load_processing
from kubetune_trainer.training.preference import PreferenceCollator, to_preference_record
from kubetune_trainer.training.sft import chat_encoder


def pair(rejected_images: tuple[ImageRef, ...] | None = None) -> Example:
    return Example(
        turns=(
            Turn("user", (ImageRef("a.png"), "What is it?")),
            Turn("assistant", ("red square",)),
            Turn("user", ("Sure?",)),
            Turn("assistant", ("yes",)),
        ),
        line=3,
        rejected=Turn("assistant", ("no",)),
        rejected_images=rejected_images,
    )


def test_the_rejected_branch_shares_the_prompt_and_may_swap_its_images() -> None:
    record = to_preference_record(pair(), "/data", multimodal=True)
    chosen, rejected = json.loads(record["messages"]), json.loads(record["rejected_messages"])
    assert chosen[:-1] == rejected[:-1]
    assert (chosen[-1]["content"][0]["text"], rejected[-1]["content"][0]["text"]) == ("yes", "no")
    assert record["images"] == record["rejected_images"] == ["a.png"]
    swapped = to_preference_record(pair((ImageRef("b.png"),)), "/data", multimodal=True)
    assert swapped["images"] == ["a.png"] and swapped["rejected_images"] == ["b.png"]


def test_a_batch_is_chosen_rows_then_rejected_rows_with_the_final_reply_as_completion(
    tiny_qwen2_5_vl: Path,
) -> None:
    processing = load_processing(str(tiny_qwen2_5_vl), trust_remote_code=False)
    encoder: ChatEncoder = chat_encoder(processing, 3136)
    encoder.load_image = lambda source, root, line, detail: Image.new("RGB", (56, 56), "white")
    records = [to_preference_record(pair(), "/data", multimodal=True)] * 2
    batch = PreferenceCollator(encoder)(records)
    assert batch["input_ids"].shape[0] == 4
    assert batch["image_grid_thw"].shape[0] == 4  # one image per row, both branches
    tokenizer = processing.tokenizer
    completions = [
        tokenizer.decode(row[mask.bool()]).strip()
        for row, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)
    ]
    assert [c.split("<")[0].strip() for c in completions] == ["yes", "yes", "no", "no"]
    assert torch.equal(batch["completion_mask"][0], batch["completion_mask"][1])
