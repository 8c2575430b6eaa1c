"""Preserve general skills: SFT whose loss adds a distillation term towards the frozen
base model,

    loss = CE(assistant tokens) + lambda * T^2 * KL(softmax(z_base / T) || softmax(z / T))

with the KL averaged over the same assistant tokens and z_base the base model's logits
on the same inputs, images included.

Written by hand on top of TRL's SFTTrainer: TRL has distillation trainers (GKD and
distillation) but they generate on-policy and take a separate teacher model, and the
SFTTrainer's fused LM head returns log-probabilities of the labels only, not the
logits over the vocabulary that a KL needs. So the loss here asks the model for its
logits at the assistant tokens only (trained_positions.py: the LM head runs on those
positions alone, for the tuned model and for the base) and computes both terms itself. With LoRA the base is the same model
with the adapter switched off (no second copy); with full tuning, a frozen copy.

``PreserveSkillsLoss`` is a mixin: sft.py puts it ahead of its own SFT trainer to make
``PreserveSkillsSFTTrainer``, so this module needs nothing from sft.py.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from kubetune_trainer.training.trained_positions import (
    TRAINED_POSITIONS,
    TrainedPositionsLoss,
    TrainedPositionsOutput,
    trained_positions_forward,
)


def distillation_kl(
    logits: torch.Tensor, base_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(base / T) || softmax(tuned / T)) per row (the last dimension is the
    vocabulary), in float32."""
    base_logps = F.log_softmax(base_logits.float() / temperature, dim=-1)
    logps = F.log_softmax(logits.float() / temperature, dim=-1)
    return (base_logps.exp() * (base_logps - logps)).sum(dim=-1)


class PreserveSkillsLoss(TrainedPositionsLoss):
    """SFT plus ``kl_weight`` x T^2 x KL to the frozen base on the assistant tokens.
    Logs ``kl`` (the mean per-token KL at temperature T) beside the loss.

    Its base is TrainedPositionsLoss, whose patched forward gives it the logits at the
    trained positions and whose token figures it logs; it goes first among the bases of
    the trainer it is mixed into."""

    # The Trainer types its model as optional, but it is set before any loss is computed.
    model: Any

    def __init__(
        self,
        *,
        model: Any,
        kl_weight: float,
        temperature: float,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        # Full tuning: a frozen copy of the base, taken before SFTTrainer patches the
        # model's forward with its fused LM head (a copy of the patched forward would
        # still call the original, trained model).
        base = None if peft_config is not None else copy.deepcopy(model)
        super().__init__(model=model, peft_config=peft_config, **kwargs)
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.base_model: torch.nn.Module | None = None
        if base is not None:
            base.eval().requires_grad_(False)
            self.base_model = self.accelerator.prepare_model(base, evaluation_mode=True)
        else:
            assert isinstance(self.model, PeftModel)

    def _base_context(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        if self.base_model is not None:
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.disable_adapter()

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        # The logits at the trained positions only (trained_positions.py): both terms
        # are over those tokens alone.
        ask = {"labels": labels, TRAINED_POSITIONS: "logits"}
        outputs = model(**model_inputs, **ask)
        logits, targets = outputs.logits, outputs.targets
        with torch.no_grad(), self._base_context(model):
            if self.base_model is not None:
                base = self.accelerator.unwrap_model(self.base_model)
                base_outputs = trained_positions_forward(base, labels, "logits", **model_inputs)
            else:
                base_outputs = model(**model_inputs, **ask)
            base_logits = base_outputs.logits
            assert base_logits is not None

        targets = targets.to(logits.device)
        ce_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        kl = distillation_kl(logits, base_logits, self.temperature)
        total = ce_sum + self.kl_weight * self.temperature**2 * kl.sum()
        loss = self.per_token(total, targets.numel(), num_items_in_batch)

        with torch.no_grad():
            n = self.accelerator.gather_for_metrics(
                torch.as_tensor(targets.numel(), device=logits.device)
            ).sum()
            kl_sum = self.accelerator.gather_for_metrics(kl.detach().sum()).sum()
            self._metrics[mode]["kl"].append((kl_sum / n).item() if n > 0 else 0.0)
            figures = TrainedPositionsOutput(
                tokens=torch.as_tensor(targets.numel(), device=logits.device),
                correct=(logits.argmax(-1) == targets).sum(),
            )
        self.log_token_figures(mode, figures, inputs)
        return (loss, outputs) if return_outputs else loss
