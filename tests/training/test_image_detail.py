"""Content-part ``detail``: a low-detail image is fitted to at most 512 x 512 pixels (its
image tokens follow), any other to maxPixels, in training and in `kubetune evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from training.support import count_opens

from kubetune_trainer.data.example import Example, ImageRef, Turn
from kubetune_trainer.training import images
from kubetune_trainer.training.collate import ChatEncoder
from kubetune_trainer.training.evaluate import evaluate
from kubetune_trainer.training.images import LOW_DETAIL_PIXELS, ImageFitter, pixel_budget
from kubetune_trainer.training.models import load_processing
from kubetune_trainer.training.preference import PreferenceCollator, to_preference_record
from kubetune_trainer.training.records import to_chat_record
from kubetune_trainer.training.sft import chat_encoder

MAX_PIXELS = 616 * 616  # above the low-detail budget; 616 is 22 x 28
SIDE = 800  # an image larger than both budgets


@pytest.mark.parametrize(
    ("detail", "max_pixels", "budget"),
    [
        ("low", MAX_PIXELS, 512 * 512),
        ("low", 3136, 3136),  # never more than the run allows
        ("high", MAX_PIXELS, MAX_PIXELS),
        ("auto", MAX_PIXELS, MAX_PIXELS),
        (None, MAX_PIXELS, MAX_PIXELS),
        ("high", 1_000_000, 1_000_000),
    ],
)
def test_pixel_budget(detail: str | None, max_pixels: int, budget: int) -> None:
    assert pixel_budget(detail, max_pixels) == budget


def big_image(root: Path, name: str = "big.png") -> str:
    Image.new("RGB", (SIDE, SIDE), (200, 30, 30)).save(root / name)
    return name


def test_a_low_detail_image_is_fitted_to_512_by_512_and_others_to_max_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = big_image(tmp_path)
    opened = count_opens(monkeypatch)
    fit = ImageFitter(max_pixels=MAX_PIXELS)
    low = fit(name, str(tmp_path), 1, "low")
    assert low.width * low.height <= LOW_DETAIL_PIXELS
    assert low.width * low.height > 0.99 * LOW_DETAIL_PIXELS
    for detail in ("high", "auto", None):
        other = fit(name, str(tmp_path), 1, detail)
        assert LOW_DETAIL_PIXELS < other.width * other.height <= MAX_PIXELS
    # The cache keeps one fitted image per budget: the low one is not the high one's.
    assert fit(name, str(tmp_path), 2, "low") is low
    assert opened == {name: 2}


def test_details_that_give_the_same_budget_share_one_fitted_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = big_image(tmp_path)
    opened = count_opens(monkeypatch)
    fit = ImageFitter(max_pixels=3136)
    assert fit(name, str(tmp_path), 1, "low") is fit(name, str(tmp_path), 1, "high")
    assert opened == {name: 1}


def chat(detail: str | None) -> Example:
    return Example(
        turns=(
            Turn("user", (ImageRef("big.png", detail), "What colour?")),
            Turn("assistant", ("red",)),
        ),
        line=1,
    )


@pytest.fixture
def encoder(tiny_qwen2_5_vl: Path) -> ChatEncoder:
    return chat_encoder(load_processing(str(tiny_qwen2_5_vl), trust_remote_code=False), MAX_PIXELS)


def test_the_image_tokens_follow_the_detail(encoder: ChatEncoder, tmp_path: Path) -> None:
    big_image(tmp_path)
    # The tiny model's processor caps images at 112 x 112; a real one's cap is far above
    # both budgets, as here.
    encoder.processing.image_processor.size["longest_edge"] = 4 * MAX_PIXELS

    def image_tokens(detail: str | None) -> int:
        record = to_chat_record(chat(detail), tmp_path, multimodal=True)
        ids = encoder.encode([record])["input_ids"][0]
        return sum(int((ids == token).sum()) for token in encoder.image_token_ids)

    # Qwen2.5-VL gives a token to each 28 x 28 pixels, rounding each side to a multiple
    # of 28: 512 x 512 pixels make 18 x 18 tokens, 616 x 616 make 22 x 22.
    assert image_tokens("low") == 18 * 18
    assert image_tokens("high") == image_tokens("auto") == image_tokens(None) == 22 * 22


def test_both_branches_of_a_pair_see_the_prompts_detail(
    encoder: ChatEncoder, tmp_path: Path
) -> None:
    seen: list[tuple[str, str | None]] = []

    def load(source: str, root: str, line: int, detail: str | None) -> Image.Image:
        seen.append((source, detail))
        return Image.new("RGB", (56, 56), "white")

    encoder.load_image = load
    pair = Example(
        turns=chat("low").turns,
        line=1,
        rejected=Turn("assistant", ("blue",)),
        rejected_images=(ImageRef("other.png"),),
    )
    batch = PreferenceCollator(encoder)([to_preference_record(pair, tmp_path, multimodal=True)])
    assert sorted(seen) == [("big.png", "low"), ("other.png", "low")]
    assert torch.equal(batch["image_grid_thw"][0], batch["image_grid_thw"][1])


def test_evaluate_fits_images_by_their_detail(
    tiny_qwen2_5_vl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big_image(tmp_path)
    fitted: list[tuple[int, int]] = []
    real = images.fit_to_max_pixels

    def recording(image: Image.Image, max_pixels: int) -> Image.Image:
        out = real(image, max_pixels)
        fitted.append((max_pixels, out.width * out.height))
        return out

    monkeypatch.setattr(images, "fit_to_max_pixels", recording)

    def line(detail: str) -> str:
        part = {"type": "image_url", "image_url": {"url": "big.png", "detail": detail}}
        return json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [part, {"type": "text", "text": "What colour?"}]},
                    {"role": "assistant", "content": "red"},
                ]
            }
        )

    data = tmp_path / "eval.jsonl"
    data.write_text(f"{line('low')}\n{line('high')}\n")
    result = evaluate(
        model_path=str(tiny_qwen2_5_vl),
        data=str(data),
        max_pixels=MAX_PIXELS,
        max_new_tokens=1,
        batch_size=2,
    )
    assert result["examples"] == 2
    budgets = dict(fitted)
    assert budgets.keys() == {LOW_DETAIL_PIXELS, MAX_PIXELS}
    assert budgets[LOW_DETAIL_PIXELS] <= LOW_DETAIL_PIXELS < budgets[MAX_PIXELS]
