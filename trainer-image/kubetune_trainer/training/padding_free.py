"""Padding-free batches (hyperparameters.paddingFree).

A padded batch of B rows sends B x (its longest example) positions through the model,
the padding included. Padding-free, the rows are laid end to end in one row of their
real tokens only, each example with its own positions from 0, and attention never
crosses from one example into another: the model computes exactly the tokens there
are, whatever the spread of lengths in the batch.

- **Positions.** A plain LM's count from 0 in each example. Qwen2.5-VL's are 3-D
  rotary positions (temporal, height, width for image tokens), which the model's own
  ``compute_3d_position_ids`` makes on the padded batch; they are flattened, and a
  leading row of text positions tells transformers where each example starts.
- **Attention.** ``PACKED_ATTENTION``, registered with transformers' attention
  interface, runs each example's causal attention on its own (sdpa per example). Any
  other call (a padded batch, as in evaluation; the vision tower's windows; generation)
  is sdpa itself. Its mask function makes no mask for a batch without padding, so no
  tokens x tokens block mask is ever built, where sdpa on a packed row would build one
  and compute attention across every example pair, masked.
- **The loss.** trained_positions.py maps each trained position of the padded batch to
  its place in the packed row, so the loss is over the same tokens.

The padded batch is still what the collator builds and what the Trainer counts tokens
on; it is packed inside the model's patched forward. Models: those whose packed loss
tests/training/test_padding_free.py proves equal to the padded one (Qwen2.5-VL, LLaVA
on Llama, Qwen2 and Llama LMs). Others train padded, said once in the log.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kubetune_trainer.training.collate import SEQUENCE_KEYS

log = logging.getLogger("kubetune.train")

PACKED_ATTENTION = "kubetune_packed"

# (model type, its text model's type) pairs whose packing the tests prove.
PACKABLE = {
    ("qwen2_5_vl", "qwen2_5_vl_text"),
    ("llava", "llama"),
    ("qwen2", "qwen2"),
    ("llama", "llama"),
}


def segment_lengths(position_ids: torch.Tensor) -> list[int] | None:
    """The lengths of the examples laid end to end in a one-row ``position_ids`` (each
    starts again from 0), or None where it holds one example or several rows."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if starts[:1] != [0] or len(starts) == 1:
        return None
    ends = [*starts[1:], position_ids.shape[1]]
    return [end - start for start, end in zip(starts, ends, strict=True)]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa, run example by example on a packed row (no mask, position ids restarting
    at 0 per example); sdpa as it is on anything else."""
    position_ids = kwargs.get("position_ids")
    lengths = (
        segment_lengths(position_ids)
        if attention_mask is None and position_ids is not None and query.shape[2] > 1
        else None
    )
    if lengths is None or query.shape[2] != sum(lengths):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outputs, dim=1), None


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask, except none for a batch without padding: a packed row's attention
    finds its examples from the position ids."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)


def unpackable(model: Any) -> str | None:
    """Why ``model`` cannot train padding-free, or None when it can."""
    config = model.config
    text = config.get_text_config()
    pair = (config.model_type, text.model_type)
    if pair not in PACKABLE:
        return f"{pair[0]} models are not among those whose packed batches are tested"
    if getattr(text, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()
    ):
        return "its attention uses sliding windows"
    if config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        return f"it runs {config._attn_implementation} attention, not sdpa"
    return None


def enable_padding_free(model: Any) -> bool:
    """Switch ``model`` (a transformers model, before PEFT wraps it) to packed
    attention, so that trained_positions_forward packs its batches; False, with a log
    line, where it cannot."""
    reason = unpackable(model)
    if reason is not None:
        log.info("paddingFree: training with padded batches: %s", reason)
        return False
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def is_packed(model: Any) -> bool:
    return bool(model.config._attn_implementation == PACKED_ATTENTION)


def pack(model: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    """``inputs`` (a padded batch with its attention mask) as one packed row, and for
    each position of the padded batch its index in that row (-1 at padding)."""
    mask = inputs["attention_mask"].bool()
    flat_index = mask.flatten().long().cumsum(0).view(mask.shape) - 1
    flat_index = flat_index.masked_fill(~mask, -1)
    positions = mask.long().cumsum(1) - 1
    text_positions = positions[mask][None]
    packed = {k: v for k, v in inputs.items() if k != "attention_mask"}
    for key in SEQUENCE_KEYS:
        if key != "attention_mask" and inputs.get(key) is not None:
            packed[key] = inputs[key][mask][None]
    rope = getattr(model.base_model, "compute_3d_position_ids", None)
    if rope is not None:
        spatial = None
        if inputs.get("image_grid_thw") is not None:
            spatial = rope(
                input_ids=inputs["input_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                video_grid_thw=inputs.get("video_grid_thw"),
                inputs_embeds=None,
                attention_mask=inputs["attention_mask"],
                cache=None,
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
            )
        spatial = text_positions.expand(3, -1) if spatial is None else spatial[:, mask]
        packed["position_ids"] = torch.cat([text_positions, spatial])[:, None, :]
    else:
        packed["position_ids"] = text_positions
    return packed, flat_index
