"""The gradient of a job's first optimizer step, as the optimizer is about to apply it:
after gradient accumulation and, under torchrun, the all-reduce across processes.

``python tests/training/step_gradients.py JOB_JSON OUT`` (with ``tests`` on PYTHONPATH,
as pytest has it) saves it to OUT with torch.save, from the main process."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from training.support import build_trainer
from transformers import TrainerCallback

from kubetune_trainer.contract.job import TrainingConfig


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


def first_step_gradients(config: TrainingConfig) -> dict[str, torch.Tensor]:
    """Trains ``config`` (whose data makes one step) and returns that step's gradient.
    LoRA's B matrices start random, as the same seed draws them in every process:
    PEFT's zeros would make the tuned model its base, and the preserve-skills KL and
    its gradient zero."""
    trainer = build_trainer(config)
    # Clipping would scale every gradient to the same norm and hide a scale error.
    trainer.args.max_grad_norm = 0.0
    torch.manual_seed(0)
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.05)
    gradients = StepGradients(trainer.model)
    trainer.add_callback(gradients)
    trainer.train()
    assert trainer.state.global_step == 1
    return gradients.grads


if __name__ == "__main__":
    job, out = (Path(a) for a in sys.argv[1:3])
    grads = first_step_gradients(TrainingConfig.model_validate_json(job.read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(grads, out)
