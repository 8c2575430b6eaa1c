"""hyperparameters.scoreTrainedTokensOnly: the LM head at the trained positions only
(training/trained_positions.py). On fixed padded batches, with images, prompt tokens
and padding, its loss is the model's own (transformers' ForCausalLMLoss, with and
without num_items_in_batch) and so are the gradients of the trained parameters, full
and LoRA; through the trainer it is TRL's loss with TRL's logged figures; a row or a
batch without trained tokens behaves as TRL's loss does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from training.support import (
    JobFactory,
    assert_same_gradients,
    build_trainer,
    fixed_batch,
    gradients,
    loaded,
)

from kubetune_trainer.training import trained_positions
from kubetune_trainer.training.trained_positions import TRAINED_POSITIONS, LinearCrossEntropy

pytestmark = pytest.mark.training


def ours(model: Any, batch: dict[str, torch.Tensor], items: int | None) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, labels=batch["labels"], **{TRAINED_POSITIONS: "loss"})
    assert int(out.tokens) == int((batch["labels"][:, 1:] != -100).sum())
    return out.nll_sum / (out.tokens if items is None else items)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_the_loss_and_gradients_are_the_model_s_own(
    model_folder: Path, tuning: str, tmp_path: Path
) -> None:
    batch = fixed_batch(model_folder, tmp_path)
    model = loaded(model_folder, tuning)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    for items in (None, trained + 5):
        extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
        theirs = model(**batch, **extra).loss
        expected = gradients(model, theirs)
        loss = ours(model, batch, items)
        torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-6)
        assert_same_gradients(gradients(model, loss), expected, atol=1e-6)


def test_an_all_ignored_row_adds_nothing_and_a_batch_without_trained_tokens_is_zero(
    tiny_qwen2_5_vl: Path, tmp_path: Path
) -> None:
    batch = fixed_batch(tiny_qwen2_5_vl, tmp_path)
    model = loaded(tiny_qwen2_5_vl, "lora")
    # One row with nothing trained (as an example truncated before its answer).
    one_ignored = {**batch, "labels": batch["labels"].clone()}
    one_ignored["labels"][0] = -100
    theirs = model(**one_ignored).loss
    torch.testing.assert_close(ours(model, one_ignored, None), theirs, rtol=1e-5, atol=1e-6)

    # No trained token at all: transformers' mean is 0 / 0 (NaN) and its sum over
    # num_items_in_batch 0; ours, like TRL's loss, clamps the count, so a finite zero
    # that backward still runs through, with zero gradients.
    none = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert torch.isnan(model(**none).loss)
    with_items = model(**none, num_items_in_batch=torch.tensor(7)).loss
    assert with_items.item() == 0.0
    out = model(
        **{k: v for k, v in none.items() if k != "labels"},
        labels=none["labels"],
        **{TRAINED_POSITIONS: "loss"},
    )
    assert int(out.tokens) == 0
    loss = out.nll_sum / out.tokens.clamp(min=1)
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in gradients(model, loss).values())


@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_head_in_chunks_is_linear_then_cross_entropy(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 3 rows (of 10): the sum, argmax hits and entropy, and the gradients of
    the rows, the weight and the bias, as autograd through F.linear and cross_entropy."""
    monkeypatch.setattr(trained_positions, "CHUNK_ELEMENTS", 3 * 50)
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=bias)
    targets = torch.randint(0, 50, (10,))

    logits = head(hidden)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    (2.5 * expected).backward()
    want = [hidden.grad, head.weight.grad, head.bias.grad if bias else None]
    hidden.grad = None
    head.zero_grad(set_to_none=True)

    out = trained_positions.head_loss(head, hidden, targets)
    assert out.nll_sum is not None and out.entropy_sum is not None
    torch.testing.assert_close(out.nll_sum, expected)
    assert int(out.correct) == int((logits.argmax(-1) == targets).sum())
    logps = F.log_softmax(logits.detach(), -1)
    torch.testing.assert_close(out.entropy_sum, -(logps.exp() * logps).sum())
    (2.5 * out.nll_sum).backward()
    got = [hidden.grad, head.weight.grad, head.bias.grad if bias else None]
    for g, w in zip(got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w)

    # Without gradients (evaluation) the same figures, and no gradient work.
    with torch.no_grad():
        nll, correct, _ = LinearCrossEntropy.apply(
            hidden, head.weight, head.bias, targets, torch.float32
        )
    torch.testing.assert_close(nll, expected.detach())
    assert int(correct) == int(out.correct)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_through_the_trainer_it_is_trl_s_loss_with_trl_s_figures(
    tiny_qwen2_5_vl: Path,
    shapes_task: Any,
    job: JobFactory,
    tuning: str,
    tmp_path: Path,
) -> None:
    """The switch on (the default) and off (TRL's own loss, which on a CPU scores every
    position): the same loss, gradients, token accuracy, entropy and token count."""
    batch = fixed_batch(tiny_qwen2_5_vl, tmp_path)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for on in (True, False):
        trainer = build_trainer(
            job(
                tiny_qwen2_5_vl,
                shapes_task.train,
                tuning=tuning,
                hyperparameters={
                    "scoreTrainedTokensOnly": on,
                    **({"loraDropout": 0.0} if tuning == "lora" else {}),
                },
            )
        )
        assert trainer.trained_positions_only is on
        assert trainer._trained_positions_apply() is on
        model = trainer.model
        model.train()
        torch.manual_seed(0)
        # LoRA: the same adapter weights in both runs, and B not zero.
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.02)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(trained))
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        figures = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.detach(), grads, figures))
    (loss_on, grads_on, figures_on), (loss_off, grads_off, figures_off) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert (
        figures_on.keys()
        == figures_off.keys()
        >= {
            "mean_token_accuracy",
            "entropy",
            "num_tokens",
        }
    )
    for key, value in figures_off.items():
        assert figures_on[key] == pytest.approx(value, rel=1e-4), key
