"""Images are fitted to maxPixels, aspect ratio kept, and always come out RGB."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from kubetune_trainer.contract.job import DatasetLimits, TrainingConfig, TrainValidation
from kubetune_trainer.data import DatasetError
from kubetune_trainer.training.images import (
    ImageFitter,
    fit_to_max_pixels,
    run_image_rules,
    to_rgb,
)


@pytest.mark.parametrize(
    ("size", "budget"),
    [((1000, 500), 3136), ((640, 480), 401408), ((37, 5000), 784), ((3000, 1), 784)],
)
def test_fitted_image_is_within_budget_with_its_aspect_ratio(
    size: tuple[int, int], budget: int
) -> None:
    fitted = fit_to_max_pixels(Image.new("RGB", size), budget)
    w, h = fitted.size
    assert w * h <= budget
    assert w >= 1 and h >= 1
    if min(size) * (budget / (size[0] * size[1])) ** 0.5 >= 4:  # not degenerate: ratio kept
        assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.1


def test_small_images_are_left_alone() -> None:
    image = Image.new("RGB", (40, 30))
    assert fit_to_max_pixels(image, 3136) is image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    assert to_rgb(Image.new(mode, (8, 8))).mode == "RGB"


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert to_rgb(opaque).getpixel((0, 0)) == (255, 0, 0)


def test_each_file_s_images_are_opened_under_its_own_dataset_s_limits(tmp_path: Path) -> None:
    """The training file's Dataset allows big images, the validation file's does not:
    the collator's loader applies each, by the image root the record carries."""
    train, held = tmp_path / "train", tmp_path / "held"
    for folder in (train, held):
        folder.mkdir()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "a.png")
    size = (train / "a.png").stat().st_size
    config = TrainingConfig(
        base_model="m",
        dataset=str(train / "d.jsonl"),
        dataset_limits=DatasetLimits(max_image_bytes=size),
        validation=TrainValidation(
            dataset=str(held / "d.jsonl"), limits=DatasetLimits(max_image_bytes=size - 1)
        ),
        output_dir=str(tmp_path / "out"),
    )
    fitter = ImageFitter(3136, run_image_rules(config))
    assert fitter("a.png", str(train), 1).size == (56, 56)
    with pytest.raises(
        DatasetError,
        match=f"line 2: a.png: image is {size:,} bytes, more than the limit of {size - 1:,}",
    ):
        fitter("a.png", str(held), 2)
