"""``kubetune evaluate``: exact-match accuracy of the generated replies and the mean loss
on the reference replies, for a model and (with an adapter) for its base as well."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.data import read_examples
from kubetune_trainer.data.example import Example
from kubetune_trainer.training.collate import IGNORE_INDEX, ChatEncoder, SFTCollator
from kubetune_trainer.training.config_mapping import Hardware
from kubetune_trainer.training.models import (
    is_multimodal,
    load_model,
    load_processing,
    tokenizer_of,
)
from kubetune_trainer.training.records import to_record
from kubetune_trainer.training.sft import chat_encoder


@dataclass(frozen=True)
class Scores:
    examples: int
    accuracy: float
    loss: float | None  # mean per-token loss on the reference replies


@torch.no_grad()
def score(
    model: Any,
    encoder: ChatEncoder,
    examples: Sequence[Example],
    records: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> Scores:
    """Generate (greedily) the reply to each example's final user turn and compare it,
    whitespace-trimmed, with the reference; and measure the loss on the reference."""
    tokenizer = tokenizer_of(encoder.processing)
    loss_collator = SFTCollator(encoder, final_turn_only=True)
    correct = 0
    loss_sum = 0.0
    loss_tokens = 0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = _to(encoder.encode(batch, prompt_only=True, padding_side="left"), model.device)
        generated = model.generate(
            **prompts,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies = tokenizer.batch_decode(
            generated[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True
        )
        references = [e.chosen.text for e in examples[start : start + batch_size]]
        correct += sum(r.strip() == ref.strip() for r, ref in zip(replies, references, strict=True))

        inputs = _to(loss_collator(batch), model.device)
        labels = inputs.pop("labels")[:, 1:]
        logits = model(**inputs).logits[:, :-1].float()
        loss_sum += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        loss_tokens += int((labels != IGNORE_INDEX).sum())
    return Scores(
        examples=len(records),
        accuracy=correct / len(records) if records else 0.0,
        loss=loss_sum / loss_tokens if loss_tokens else None,
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(
    *,
    model_path: str,
    data: str,
    adapter: str | None = None,
    image_root: str | None = None,
    max_pixels: int,
    max_new_tokens: int,
    batch_size: int,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """``{"examples", "accuracy", "loss"}``, plus ``"base"`` with the same figures for
    the base model when an adapter is given (the adapter switched off: no second copy
    of the model is loaded)."""
    hardware = Hardware.detect()
    processing = load_processing(model_path, trust_remote_code=trust_remote_code)
    multimodal = is_multimodal(processing)
    model: Any = load_model(
        model_path,
        multimodal=multimodal,
        trust_remote_code=trust_remote_code,
        dtype="bfloat16" if hardware.bf16 else "float32",
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to("cuda" if hardware.cuda else "cpu").eval()

    examples = list(read_examples(data))
    root = Path(image_root) if image_root else Path(data).resolve().parent
    records = [to_record(e, root, multimodal=multimodal) for e in examples]
    encoder = chat_encoder(processing, max_pixels)

    def run() -> Scores:
        return score(
            model, encoder, examples, records, max_new_tokens=max_new_tokens, batch_size=batch_size
        )

    result: dict[str, Any] = asdict(run())
    if adapter:
        with model.disable_adapter():
            result["base"] = asdict(run())
    return result
