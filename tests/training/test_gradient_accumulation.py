"""Gradient accumulation changes how a step is computed, not what it learns: one
optimizer step over a batch of four examples and one over two accumulated micro-batches
of two (the same four) apply the same gradient, for SFT's loss and for the
preserve-skills loss. Both are sums over trained tokens divided by the Trainer's count
of them across the micro-batches, so examples of different lengths weigh the same
either way, and neither is divided by the accumulation steps a second time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from training.support import JobFactory, assert_same_gradients, build_trainer
from transformers import TrainerCallback

pytestmark = pytest.mark.training


class StepGradients(TrainerCallback):
    """The gradients the optimizer is about to apply, at the first step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in self.model.named_parameters()
                if p.grad is not None
            }


@pytest.mark.parametrize("preserve", [False, True], ids=["sft", "preserve-skills"])
def test_accumulated_micro_batches_apply_the_gradient_of_the_whole_batch(
    preserve: bool, tiny_qwen2_5_vl: Path, job: JobFactory, tmp_path: Path
) -> None:
    # One long answer among three short ones: however the four are split in two, the
    # micro-batches hold different counts of trained tokens.
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"say {word}"},
                        {"role": "assistant", "content": " ".join([word] * repeats)},
                    ]
                }
            )
            + "\n"
            for word, repeats in (("red", 1), ("cat", 12), ("sun", 1), ("dog", 1))
        )
    )

    def first_step(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
        config = job(
            tiny_qwen2_5_vl,
            data,
            outputDir=str(tmp_path / f"out-{batch_size}"),
            preserveGeneralSkills={"enabled": preserve, "lambda": 0.5},
            hyperparameters={
                "batchSize": batch_size,
                "gradientAccumulationSteps": accumulate,
                "loraDropout": 0.0,
                "groupByLength": False,
            },
        )
        trainer = build_trainer(config)
        # Clipping would scale both gradients to the same norm and hide a scale error.
        trainer.args.max_grad_norm = 0.0
        torch.manual_seed(0)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                # PEFT's zeros make the tuned model its base: the KL term and its
                # gradient would be zero.
                parameter.data.normal_(std=0.05)
        gradients = StepGradients(trainer.model)
        trainer.add_callback(gradients)
        trainer.train()
        assert trainer.state.global_step == 1
        return gradients.grads

    whole = first_step(4, 1)
    accumulated = first_step(2, 2)
    assert any(g.abs().max() > 0 for g in whole.values())
    assert_same_gradients(accumulated, whole, atol=1e-6)
