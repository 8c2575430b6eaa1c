"""hyperparameters.paddingFree (training/padding_free.py): a padded batch packed into
one row of its real tokens, with each example's own positions and attention, gives the
padded batch's loss and gradients on Qwen2.5-VL (3-D positions, images of two sizes),
LLaVA and Qwen2, full and LoRA; attention runs example by example and never over the
packed row; a model it is not proven on trains padded; the trainer switches it on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from training.support import (
    JobFactory,
    assert_same_gradients,
    build_trainer,
    fixed_batch,
    gradients,
    loaded,
)

from kubetune_trainer.training import padding_free
from kubetune_trainer.training.padding_free import (
    PACKED_ATTENTION,
    is_packed,
    segment_lengths,
    unpackable,
)
from kubetune_trainer.training.trained_positions import TRAINED_POSITIONS, patch_target

pytestmark = pytest.mark.training


def loss_of(model: Any, batch: dict[str, torch.Tensor], items: int) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, labels=batch["labels"], **{TRAINED_POSITIONS: "loss"})
    assert int(out.tokens) == int((batch["labels"][:, 1:] != -100).sum())
    return out.nll_sum / items


def trained_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs, labels=batch["labels"], **{TRAINED_POSITIONS: "logits"})
    assert out.logits is not None
    return out.logits


def attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool, bool]]:
    """(query length, whether a mask was given, whether causal: the language model's)
    of every sdpa call packed attention makes."""
    calls: list[tuple[int, bool, bool]] = []
    sdpa = padding_free.sdpa_attention_forward

    def spy(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((query.shape[2], args[2] is not None, getattr(module, "is_causal", True)))
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(padding_free, "sdpa_attention_forward", spy)
    return calls


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_a_packed_batch_has_the_padded_batch_s_loss_and_gradients(
    model_folder: Path, tuning: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = fixed_batch(model_folder, tmp_path)
    items = int((batch["labels"][:, 1:] != -100).sum())
    padded_model = loaded(model_folder, tuning)
    padded = loss_of(padded_model, batch, items)
    expected = gradients(padded_model, padded)

    model = loaded(model_folder, tuning, padding_free=True)
    assert is_packed(patch_target(model))
    # The logits, not only the loss: on random weights a loss barely moves when
    # positions are wrong (flat 1-D positions for Qwen2.5-VL's images change it by 1e-5
    # of itself, its logits by 3e-3).
    torch.testing.assert_close(
        trained_logits(model, batch), trained_logits(padded_model, batch), rtol=0, atol=1e-5
    )
    calls = attention_calls(monkeypatch)
    loss = loss_of(model, batch, items)
    torch.testing.assert_close(loss, padded, rtol=1e-5, atol=1e-6)
    assert_same_gradients(gradients(model, loss), expected, atol=1e-5)

    # The language model's attention ran on each example alone, never on the packed
    # row (the rest, a vision tower's windows, unpacked and unmasked).
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    layers = patch_target(model).config.get_text_config().num_hidden_layers
    text_calls = [length for length, _, causal in calls if causal]
    assert sorted(text_calls) == sorted(lengths * layers)
    assert not any(masked for _, masked, _ in calls)


def test_a_padded_batch_on_packed_attention_is_sdpa_as_it_was(
    tiny_qwen2_5_vl: Path, tmp_path: Path
) -> None:
    """Evaluation and generation send padded batches: with the padding mask, packed
    attention is sdpa, with the same logits."""
    batch = fixed_batch(tiny_qwen2_5_vl, tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = loaded(tiny_qwen2_5_vl, "full")(**inputs).logits
        got = loaded(tiny_qwen2_5_vl, "full", padding_free=True)(**inputs).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_segments_are_found_where_positions_start_again() -> None:
    assert segment_lengths(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [3, 2, 4]
    assert segment_lengths(torch.tensor([[0, 1, 2, 3]])) is None  # one example
    assert segment_lengths(torch.tensor([[0, 1], [0, 1]])) is None  # padded rows
    assert segment_lengths(torch.tensor([[5, 6, 7]])) is None  # a cache's continuation


def test_a_model_without_proven_packing_trains_padded(
    tiny_qwen2_5_vl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = loaded(tiny_qwen2_5_vl, "full")
    assert unpackable(model) is None
    model.config.model_type = "gemma3"
    assert "not among those" in str(unpackable(model))
    caplog.set_level("INFO", logger="kubetune.train")
    assert not padding_free.enable_padding_free(model)
    assert model.config._attn_implementation == "sdpa"
    assert "training with padded batches" in caplog.text


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_packs_only_with_padding_free_on(
    tiny_qwen2_5_vl: Path, shapes_task: Any, job: JobFactory, on: bool
) -> None:
    trainer = build_trainer(
        job(tiny_qwen2_5_vl, shapes_task.train, hyperparameters={"paddingFree": on})
    )
    implementation = patch_target(trainer.model).config._attn_implementation
    assert implementation == (PACKED_ATTENTION if on else "sdpa")
