"""Load the base model with its processor (VLM) or tokenizer (LLM)."""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from trl.chat_template_utils import get_training_chat_template


def load_processing(name: str, *, trust_remote_code: bool) -> Any:
    """A VLM's processor, or an LLM's tokenizer (AutoProcessor returns the tokenizer for
    a model that has no processor)."""
    processing = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    tokenizer = tokenizer_of(processing)
    if tokenizer.pad_token is None:
        # Padding positions are masked out, so any token will do; EOS is what TRL uses.
        tokenizer.pad_token = tokenizer.eos_token
    return processing


def is_multimodal(processing: Any) -> bool:
    return isinstance(processing, ProcessorMixin)


def tokenizer_of(processing: Any) -> Any:
    return processing.tokenizer if is_multimodal(processing) else processing


def image_token_ids(processing: Any) -> frozenset[int]:
    token_id = getattr(processing, "image_token_id", None)
    return frozenset() if token_id is None else frozenset({token_id})


def training_chat_template(processing: Any) -> str | None:
    """The template with ``{% generation %}`` markers that masks labels to the assistant
    turns: None when the model's own has them, else TRL's training variant of it."""
    if not processing.chat_template:
        raise ValueError("the base model has no chat template; kubetune trains on chat data only")
    return get_training_chat_template(processing)


def load_model(
    name: str, *, multimodal: bool, trust_remote_code: bool, dtype: str
) -> PreTrainedModel:
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model: PreTrainedModel = auto.from_pretrained(
        name, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
    )
    return model


def default_lora_targets(model: PreTrainedModel) -> str:
    """A PEFT target regex for every linear layer of the language model (attention and
    MLP projections), leaving the vision tower, the projector and the LM head without
    adapters."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in decoder.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    if not leaves:
        raise ValueError(f"found no linear layers in {type(decoder).__name__}; set targetModules")
    anchor = f"{re.escape(prefix)}\\." if prefix else ""
    return f"{anchor}.*\\.({'|'.join(map(re.escape, leaves))})"
