"""Canonical examples -> chat records, the validation split and the dataset checksum."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune_trainer.data import DatasetError
from kubetune_trainer.data.example import Example, ImageRef, Turn
from kubetune_trainer.training.inputs import JobError
from kubetune_trainer.training.records import file_sha256, split_validation, to_chat_record

EXAMPLE = Example(
    turns=(Turn("user", ("Look: ", ImageRef("a.png"), " what?")), Turn("assistant", ("a cat",))),
    line=7,
)


def test_a_vlm_record_keeps_parts_in_order_and_image_sources_apart() -> None:
    record = to_chat_record(EXAMPLE, "/data", multimodal=True)
    assert json.loads(record["messages"]) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image"},
                {"type": "text", "text": " what?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
    ]
    assert (record["images"], record["root"], record["line"]) == (["a.png"], "/data", 7)


def test_a_text_model_gets_string_content_and_refuses_images() -> None:
    text_only = Example(turns=(Turn("user", ("hi",)), Turn("assistant", ("hello",))), line=1)
    assert json.loads(to_chat_record(text_only, "/", multimodal=False)["messages"])[1] == {
        "role": "assistant",
        "content": "hello",
    }
    with pytest.raises(DatasetError, match="line 7"):
        to_chat_record(EXAMPLE, "/", multimodal=False)


def test_validation_split_is_seeded_disjoint_and_never_empty() -> None:
    items = list(range(40))
    train, held_out = split_validation(items, 0.25, seed=3)
    assert len(held_out) == 10 and sorted(train + held_out) == items
    assert split_validation(items, 0.25, seed=3) == (train, held_out)
    assert split_validation(items, 0.25, seed=4) != (train, held_out)
    assert [len(part) for part in split_validation([1, 2], 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in split_validation([1, 2], 0.99, seed=0)] == [1, 1]
    with pytest.raises(JobError):
        split_validation([1], 0.5, seed=0)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"x" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
