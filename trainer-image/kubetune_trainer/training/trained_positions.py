"""The LM head at the trained positions only (hyperparameters.scoreTrainedTokensOnly).

SFT trains the assistant's tokens only (labels != -100); image, prompt and padding
positions carry no loss. Yet a causal LM's forward scores every position with the LM
head, and so does TRL's SFTTrainer off Triton devices (its fused head scores the trained
positions only where Triton runs, every position elsewhere, plus entropy and accuracy
over all of them). With a vocabulary of 32k-150k rows that head costs as much per
position as a small model's whole body.

Here the model's body runs as usual (``model.base_model``: the language model with its
vision tower, returning the hidden states after the final norm; with PEFT the LoRA
layers in it still run), and the hidden states are gathered at the positions whose
next token is trained, shifted by one as transformers' ``ForCausalLMLoss`` shifts the
labels. Only those rows go through the LM head. The cross-entropy is float32 and
reduced as transformers reduces it: the sum over trained tokens divided by
``num_items_in_batch`` when the Trainer passes it, else their mean. Every trained
position is scored exactly as the model's own forward scores it, and the others carry
no loss, so the loss and its gradients are the model's own up to float rounding.

For an ordinary ``nn.Linear`` head, the cross-entropy is fused with it in chunks of
rows (``LinearCrossEntropy``): each chunk's logits are made, folded into the loss and
turned into their gradients at once, so no more than one chunk of logits is ever held,
and the backward pass only scales the gradients the forward kept (as Liger's fused
linear cross-entropy does, in plain torch). Other heads (an adapter on the head, a
sharded one) are called as modules on the gathered rows; a model that scales or caps
its logits (Gemma's softcapping, Granite's logit scale) keeps its own forward.

The model is reached through its forward (``add_trained_positions_head``), as TRL's
fused head is, so that DDP's forward still runs and its gradient sync stays right.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers.utils import ModelOutput
from trl import SFTTrainer

from kubetune_trainer.training.collate import IGNORE_INDEX
from kubetune_trainer.training.padding_free import is_packed, pack

# The keyword the patched forward answers to, with what it should return: "loss" (the
# summed cross-entropy and the logged figures) or "logits" (the logits at the trained
# positions, for a loss of the caller's own).
TRAINED_POSITIONS = "kubetune_trained_positions"

# Rows x vocabulary of one chunk of float32 logits (64 MiB): 512 rows of a 32k vocabulary.
CHUNK_ELEMENTS = 2**24

# Config fields by which a model scales or caps its logits after the head.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


@dataclass
class TrainedPositionsOutput(ModelOutput):
    """What the patched forward returns: over the trained positions of the batch, the
    summed cross-entropy (float32, differentiable), the number of tokens, of tokens
    whose label is the argmax, and the summed entropy of the predictions; or, asked for
    "logits", those positions' logits."""

    nll_sum: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def trained_mask(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is trained: labels shifted left by one, as
    transformers' ForCausalLMLoss shifts them (the last position predicts nothing)."""
    return labels[:, 1:] != IGNORE_INDEX


def plain_logits(model: Any) -> bool:
    """Whether the model's logits are its LM head's output, with no scaling or capping
    after it (which the gathered rows would miss)."""
    text_config = model.config.get_text_config()
    return all(getattr(text_config, name, None) is None for name in _LOGIT_TRANSFORMS)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), in float32,
    in chunks of rows; also the number of argmax hits and the summed entropy (not
    differentiable). The gradients are made in the forward, chunk by chunk, so only one
    chunk of logits is held at a time; the backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        device = hidden.device
        nll_sum = torch.zeros((), device=device, dtype=torch.float32)
        entropy_sum = torch.zeros((), device=device, dtype=torch.float32)
        correct = torch.zeros((), device=device, dtype=torch.long)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if needs_bias and bias is not None else None
        )
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, rows, chunk):
                end = min(start + chunk, rows)
                h = hidden[start:end].to(dtype)
                t = targets[start:end]
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                nll_sum += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                correct += (logits.argmax(dim=-1) == t).sum()
                logps = logits.sub_(lse[:, None])  # in place: the logits become log p
                probs = logps.exp()
                entropy_sum -= torch.vdot(probs.flatten(), logps.flatten())
                del logits, logps
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                # d(lse - z_t)/dz = softmax - onehot(t)
                probs[torch.arange(end - start, device=device), t] -= 1
                grad_logits = probs.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad_logits.t() @ h).float()
                if grad_bias is not None:
                    grad_bias += probs.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct, entropy_sum)
        return nll_sum, correct, entropy_sum

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_nll.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_nll).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_nll).to(bias_dtype),
            None,
            None,
        )


def _fusable(head: Any) -> bool:
    """A plain Linear whose weight is an ordinary tensor here (not a DeepSpeed or FSDP
    shard, which its module call would gather)."""
    if type(head) is not torch.nn.Linear:
        return False
    weight = head.weight
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and not hasattr(weight, "ds_id")


def head_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> TrainedPositionsOutput:
    """The LM head on ``hidden`` (rows at trained positions) and the summed float32
    cross-entropy against ``targets``, with the logged figures."""
    if _fusable(head):
        dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        hidden = hidden.to(head.weight.device)
        nll_sum, correct, entropy_sum = LinearCrossEntropy.apply(
            hidden, head.weight, head.bias, targets.to(hidden.device), dtype
        )
    else:
        logits = head(hidden).float()
        targets = targets.to(logits.device)
        nll_sum = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            logps = F.log_softmax(logits, dim=-1)
            correct = (logits.argmax(dim=-1) == targets).sum()
            entropy_sum = -(logps.exp() * logps).sum()
    tokens = torch.as_tensor(targets.numel(), device=nll_sum.device)
    return TrainedPositionsOutput(
        nll_sum=nll_sum, tokens=tokens, correct=correct, entropy_sum=entropy_sum
    )


def trained_positions_forward(
    model: Any, labels: torch.Tensor, what: str = "loss", **inputs: Any
) -> TrainedPositionsOutput:
    """``model`` (a transformers model; with PEFT, its base model, whose layers hold the
    adapters) on ``inputs``, its LM head at the trained positions of ``labels`` only:
    ``what`` "loss" gives head_loss's figures, "logits" those positions' logits and
    targets. A model whose logits are not the head's plain output runs its own forward
    and has its logits gathered. A model switched to packed attention (padding_free.py)
    runs the batch packed into one row."""
    inputs["use_cache"] = False
    mask = trained_mask(labels)
    targets = labels[:, 1:][mask]
    rows = None
    if is_packed(model) and "attention_mask" in inputs:
        inputs, flat_index = pack(model, inputs)
        rows = flat_index[:, :-1][mask.to(flat_index.device)]

    def at_trained(states: torch.Tensor) -> torch.Tensor:
        if rows is not None:
            return states[0, rows.to(states.device)]
        return states[:, :-1][mask.to(states.device)]

    if not plain_logits(model):
        logits = at_trained(model(**inputs).logits)
        if what == "logits":
            return TrainedPositionsOutput(logits=logits, targets=targets)
        return head_loss(torch.nn.Identity(), logits, targets)  # already the logits
    hidden = at_trained(model.base_model(**inputs).last_hidden_state)
    head = model.get_output_embeddings()
    if what == "logits":
        return TrainedPositionsOutput(logits=head(hidden), targets=targets)
    return head_loss(head, hidden, targets)


def add_trained_positions_head(model: Any) -> None:
    """Patch ``model.forward`` (a transformers model; add it to a PEFT model's base
    model) so that ``model(..., labels=..., kubetune_trained_positions="loss")`` runs
    trained_positions_forward. Without that keyword the forward is the one before."""
    if getattr(model, "_kubetune_trained_positions", False):
        return
    original_forward = model.forward

    # The original signature: generate and the Trainer inspect it.
    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        what = kwargs.pop(TRAINED_POSITIONS, None)
        if what is None:
            return original_forward(*args, **kwargs)
        if args:
            raise TypeError(f"{TRAINED_POSITIONS} takes the model's inputs by keyword")
        labels = kwargs.pop("labels")
        # PEFT passes these on as None; the body takes neither.
        for key in ("num_items_in_batch", "shift_labels"):
            kwargs.pop(key, None)
        return trained_positions_forward(self, labels, what, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._kubetune_trained_positions = True


def patch_target(model: Any) -> Any:
    """The transformers model whose forward carries the head: PEFT's base model, where
    TRL's fused head sits too."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class TrainedPositionsLoss(SFTTrainer):
    """Trainer mixin: SFT's loss with the LM head at the trained positions only, when
    ``trained_positions_only``; TRL's own loss otherwise, and wherever TRL's loss does
    something this one does not (label smoothing, a custom loss, DFT, MoE aux loss,
    sequence parallelism). Logs what TRL's loss logs: mean_token_accuracy and entropy
    over the trained tokens, and num_tokens."""

    model: Any

    def __init__(self, *args: Any, trained_positions_only: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Always patched: preserve.py's loss, a subclass, goes through it either way.
        add_trained_positions_head(patch_target(self.model))
        self.trained_positions_only = trained_positions_only
        if not self._sequence_parallel():
            # The loss is computed here (or in TRL's compute_loss), not by the model, and
            # divided by the Trainer's count of trained tokens across the accumulated
            # micro-batches: have the Trainer count them, whatever the model says of its
            # own loss. Qwen2.5-VL and other VLMs say they take no count; then each
            # micro-batch's mean would weigh the same however many tokens it holds.
            self.model_accepts_loss_kwargs = True

    def _sequence_parallel(self) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return parallelism is not None and bool(getattr(parallelism, "sp_enabled", False))

    def _trained_positions_apply(self) -> bool:
        return (
            self.trained_positions_only
            and self.compute_loss_func is None
            and self.label_smoother is None
            and getattr(self.args, "loss_type", "nll") == "nll"
            and not self.aux_loss_enabled
            and not self._sequence_parallel()
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not self._trained_positions_apply():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, labels=inputs["labels"], **{TRAINED_POSITIONS: "loss"})
        loss = self.per_token(outputs.nll_sum, outputs.tokens, num_items_in_batch)
        self.log_token_figures(mode, outputs, inputs)
        # The Trainer's evaluation reads only the loss (it keeps outputs as predictions
        # for compute_metrics alone, which SFT has none of): no second forward for them.
        return (loss, outputs) if return_outputs else loss

    def per_token(self, total: torch.Tensor, tokens: Any, num_items_in_batch: Any) -> torch.Tensor:
        """A loss summed over this batch's ``tokens`` trained tokens, made per token as
        transformers' ForCausalLMLoss and Trainer.compute_loss make it: divided by
        ``num_items_in_batch`` (every accumulated micro-batch's tokens, every rank's
        when averaged across devices) where the Trainer counts it, and then the Trainer
        does not divide by the accumulation steps; else by the batch's own tokens.
        Clamped as TRL's loss is: a batch without a trained token gives a zero that
        backward still runs through, not 0 / 0."""
        count = tokens if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            # num_items_in_batch counts every rank's tokens and DDP averages the
            # gradients across ranks.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def log_token_figures(
        self, mode: str, outputs: TrainedPositionsOutput, inputs: dict[str, Any]
    ) -> None:
        """mean_token_accuracy and entropy over the trained tokens, and num_tokens (every
        non-padding input token so far), as TRL's SFTTrainer logs them."""
        gather = self.accelerator.gather_for_metrics
        with torch.no_grad():
            n = gather(outputs.tokens).sum()
            correct = gather(outputs.correct).sum()
            self._metrics[mode]["mean_token_accuracy"].append(
                (correct / n).item() if n > 0 else 0.0
            )
            if outputs.entropy_sum is not None:
                entropy = gather(outputs.entropy_sum.detach()).sum()
                self._metrics[mode]["entropy"].append((entropy / n).item() if n > 0 else 0.0)
            if mode == "train":
                seen = gather(inputs["attention_mask"].sum()).sum()
                self._total_train_tokens += int(seen.item()) // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
