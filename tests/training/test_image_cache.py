"""A run decodes each image once, not once per epoch: fitted images are kept, within a
memory budget that keeps those slowest to make."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from training.support import JobFactory, count_opens, subset, train

from kubetune_trainer.data import DatasetError
from kubetune_trainer.training import images
from kubetune_trainer.training.images import FittedImages, ImageFitter, default_cache_budget

KEY_A, KEY_B, KEY_C = ("r", b"a"), ("r", b"b"), ("r", b"c")


def rgb(pixels: int) -> Image.Image:
    return Image.new("RGB", (pixels, 1))


@pytest.mark.training
def test_training_decodes_each_image_once_across_epochs_and_evaluations(
    tiny_qwen2_5_vl: Path,
    shapes_task: Any,
    job: JobFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = subset(shapes_task.train, 8, tmp_path / "train.jsonl")
    opened = count_opens(monkeypatch)
    report = train(
        job(
            tiny_qwen2_5_vl,
            data,
            imageRoot=str(shapes_task.train.parent),
            validation={"split": 0.25},
            hyperparameters={"epochs": 3},
        )
    )
    assert report["steps"] == 6  # 6 training examples in batches of 4, 3 times
    sources = [json.loads(line)["images"][0] for line in data.read_text().splitlines()]
    assert opened == dict.fromkeys(sources, 1)


def test_a_fitter_opens_an_image_once_per_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (100, 50), "red").save(tmp_path / "a.png")
    opened = count_opens(monkeypatch)
    fit = ImageFitter(max_pixels=800)
    first = fit("a.png", str(tmp_path), 1)
    assert first.size == (40, 20)
    assert fit("a.png", str(tmp_path), 2) is first
    assert fit("./a.png", str(tmp_path), 3).size == (40, 20)  # another source, opened
    assert opened == {"a.png": 1, "./a.png": 1}
    (tmp_path / "b").mkdir()
    Image.new("RGB", (10, 10), "blue").save(tmp_path / "b" / "a.png")
    assert fit("a.png", str(tmp_path / "b"), 4).getpixel((0, 0)) == (0, 0, 255)
    assert opened["a.png"] == 2


def test_failures_are_not_kept(tmp_path: Path) -> None:
    fit = ImageFitter(max_pixels=800)
    for line in (1, 2):
        with pytest.raises(DatasetError, match="image file not found") as info:
            fit("missing.png", str(tmp_path), line)
        assert info.value.line == line


def test_the_budget_keeps_the_images_slowest_to_make_per_byte() -> None:
    cache = FittedImages(budget=4 * 300)  # room for 300 RGB pixels
    cache.put(KEY_A, rgb(100), seconds=1.0)
    cache.put(KEY_B, rgb(100), seconds=3.0)
    cache.put(KEY_C, rgb(200), seconds=4.0)  # as slow per byte as B, slower than A
    assert cache.get(KEY_A) is None and cache.get(KEY_B) and cache.get(KEY_C)
    assert cache.used == 4 * 300
    cache.put(("r", b"d"), rgb(100), seconds=0.5)  # cheaper than all: not kept
    assert cache.get(("r", b"d")) is None and cache.used == 4 * 300


def test_nothing_is_dropped_for_an_image_that_cannot_fit_anyway() -> None:
    cache = FittedImages(budget=4 * 300)
    cache.put(KEY_A, rgb(100), seconds=1.0)
    cache.put(KEY_B, rgb(200), seconds=100.0)
    # Dropping A would not make room: C is only worth more than A, not than B.
    cache.put(KEY_C, rgb(250), seconds=10.0)
    assert cache.get(KEY_A) and cache.get(KEY_B) and cache.get(KEY_C) is None
    cache.put(("r", b"huge"), rgb(400), seconds=1e9)  # larger than the whole budget
    assert cache.get(("r", b"huge")) is None and cache.used == 4 * 300


def test_a_pickled_cache_starts_empty() -> None:
    """A spawned dataloader worker receives the fitter pickled: not its images."""
    fit = ImageFitter(max_pixels=800, cache=FittedImages(budget=1 << 20))
    fit.cache.put(KEY_A, rgb(10), seconds=1.0)
    copy = pickle.loads(pickle.dumps(fit))
    assert copy.max_pixels == 800 and copy.cache.budget == 1 << 20
    assert copy.cache.get(KEY_A) is None and copy.cache.used == 0


def test_the_default_budget_is_a_share_of_the_memory_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "memory_limit", lambda: 64 << 30)
    assert default_cache_budget() == 4 << 30
    monkeypatch.setattr(images, "memory_limit", lambda: 1 << 40)
    assert default_cache_budget() == images.CACHE_CAP


def test_the_memory_limit_is_the_cgroups_where_it_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(images, "CGROUP_LIMITS", (str(v2), str(v1)))
    physical = images.memory_limit()  # neither file exists
    assert physical > 1 << 20
    v2.write_text("3221225472\n")
    assert images.memory_limit() == 3 << 30
    v2.write_text("max\n")  # no limit in v2
    assert images.memory_limit() == physical
    v2.unlink()
    v1.write_text("1073741824\n")
    assert images.memory_limit() == 1 << 30
    v1.write_text(f"{physical * 4}\n")  # v1's "no limit" is a huge number
    assert images.memory_limit() == physical
