"""What a run reads: each file under its own Dataset's limits (the ones its validation
approved it by) and with its own image root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.contract.job import TrainingConfig
from kubetune_trainer.data import DatasetError
from kubetune_trainer.training.runner import split_data


def many_images(path: Path, count: int, lines: int = 3) -> str:
    chat = {
        "messages": [
            {"role": "user", "content": "<image>" * count + "how many?"},
            {"role": "assistant", "content": str(count)},
        ],
        "images": ["dot.png"] * count,
    }
    path.write_text("".join(json.dumps(chat) + "\n" for _ in range(lines)))
    return str(path)


def config(tmp_path: Path, **fields: object) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {"baseModel": "m", "outputDir": str(tmp_path / "out"), **fields}
    )


def test_a_dataset_validated_with_raised_limits_is_read_under_them(tmp_path: Path) -> None:
    data = many_images(tmp_path / "train.jsonl", 70)
    raised = config(tmp_path, dataset=data, datasetLimits={"maxImagesPerExample": 100})
    train, _, _, _ = split_data(raised)
    assert [len(e.images) for e in train] == [70, 70, 70]
    with pytest.raises(DatasetError, match="line 1: 70 images, more than the limit of 64"):
        split_data(config(tmp_path, dataset=data))


def test_the_validation_file_has_its_own_limits_and_image_root(tmp_path: Path) -> None:
    train = many_images(tmp_path / "train.jsonl", 1)
    (tmp_path / "held").mkdir()
    held = many_images(tmp_path / "held" / "val.jsonl", 2)

    def run(max_images: int) -> TrainingConfig:
        validation = {"maxImagesPerExample": max_images}
        return config(
            tmp_path,
            dataset=train,
            validation={"dataset": held, "imageRoot": "/elsewhere", "limits": validation},
        )

    with pytest.raises(DatasetError, match="line 1: 2 images, more than the limit of 1"):
        split_data(run(1))
    _, train_root, held_out, held_root = split_data(run(2))
    assert len(held_out) == 3
    assert (train_root, held_root) == (tmp_path, Path("/elsewhere"))
