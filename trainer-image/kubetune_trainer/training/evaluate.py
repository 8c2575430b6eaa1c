"""``kubetune evaluate``: exact-match accuracy of the generated replies and the mean loss
on the reference replies, for a model and (with an adapter or a base model) for its base
as well. On preference data also the preference accuracy and margin; against a base,
the KL divergence from it on the reference replies."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.data import read_examples
from kubetune_trainer.data.example import Example
from kubetune_trainer.training.collate import IGNORE_INDEX, ChatEncoder, SFTCollator
from kubetune_trainer.training.config_mapping import Hardware
from kubetune_trainer.training.images import ImageRules
from kubetune_trainer.training.models import (
    is_multimodal,
    load_model,
    load_processing,
    tokenizer_of,
)
from kubetune_trainer.training.preference import PreferenceCollator, to_preference_record
from kubetune_trainer.training.records import ChatRecord, PreferenceRecord, to_chat_record
from kubetune_trainer.training.sft import chat_encoder

Context = Callable[[], contextlib.AbstractContextManager[Any]]
"""Switches a model to the variant to score (e.g. its adapter off) for a ``with`` block."""


@dataclass(frozen=True)
class Scores:
    examples: int
    accuracy: float
    loss: float | None  # mean per-token loss on the reference replies
    replies: tuple[str, ...] = ()  # the generated replies of the first examples, as asked

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "accuracy": self.accuracy, "loss": self.loss}


@dataclass(frozen=True)
class Preference:
    """How a model ranks the chosen reply against the rejected one, by the total
    log-probability it gives each (its implicit reward, up to DPO's beta and the
    reference model's share, which cancels when two models are compared)."""

    accuracy: float  # share of pairs where the chosen reply scores higher
    margin: float  # mean log p(chosen) - log p(rejected)

    def as_dict(self) -> dict[str, Any]:
        return {"preferenceAccuracy": self.accuracy, "rewardMargin": self.margin}


@torch.no_grad()
def score(
    model: Any,
    encoder: ChatEncoder,
    examples: Sequence[Example],
    records: Sequence[ChatRecord],
    *,
    max_new_tokens: int,
    batch_size: int,
    keep: int = 0,
) -> Scores:
    """Generate (greedily) the reply to each example's final user turn and compare it,
    whitespace-trimmed, with the reference; and measure the loss on the reference. The
    replies to the first ``keep`` examples come back too."""
    tokenizer = tokenizer_of(encoder.processing)
    loss_collator = SFTCollator(encoder, final_turn_only=True)
    correct = 0
    loss_sum = 0.0
    loss_tokens = 0
    kept: list[str] = []
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
        kept += replies[: max(keep - len(kept), 0)]
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
        replies=tuple(kept),
    )


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits (float32) for every position but the last."""
    return model(**inputs, use_cache=False).logits[:, :-1].float()


@torch.no_grad()
def preference(
    model: Any, encoder: ChatEncoder, records: Sequence[PreferenceRecord], *, batch_size: int
) -> Preference:
    """Preference accuracy and margin of ``model`` on preference records."""
    collator = PreferenceCollator(encoder)
    margins: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        inputs = _to(collator(records[start : start + batch_size]), model.device)
        completion = inputs.pop("completion_mask")[:, 1:].bool()
        targets = inputs["input_ids"][:, 1:]
        logps = torch.log_softmax(_logits(model, inputs), dim=-1)
        token_logps = logps.gather(2, targets[..., None]).squeeze(2)
        sequence = (token_logps * completion).sum(dim=1)
        chosen, rejected = sequence.chunk(2)
        margins.append((chosen - rejected).cpu())
    margin = torch.cat(margins) if margins else torch.zeros(0)
    return Preference(
        accuracy=float((margin > 0).float().mean()) if len(margin) else 0.0,
        margin=float(margin.mean()) if len(margin) else 0.0,
    )


def token_kl(
    base_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(base / T) || softmax(tuned / T)) per position (the last dimension is
    the vocabulary)."""
    base_logps = torch.log_softmax(base_logits / temperature, dim=-1)
    logps = torch.log_softmax(logits / temperature, dim=-1)
    return (base_logps.exp() * (base_logps - logps)).sum(dim=-1)


@torch.no_grad()
def kl_to_base(
    model: Any,
    base: Any,
    as_base: Context,
    encoder: ChatEncoder,
    records: Sequence[ChatRecord],
    *,
    batch_size: int,
) -> float | None:
    """Mean per-token KL(base || model) on the reference replies (the final assistant
    turn): how far tuning moved the model's next-token distribution. ``base`` is
    scored inside ``as_base()`` (with an adapter: the same model, adapter off)."""
    collator = SFTCollator(encoder, final_turn_only=True)
    total = 0.0
    tokens = 0
    for start in range(0, len(records), batch_size):
        inputs = _to(collator(records[start : start + batch_size]), model.device)
        mask = inputs.pop("labels")[:, 1:] != IGNORE_INDEX
        logits = _logits(model, inputs)[mask]
        with as_base():
            base_logits = _logits(base, inputs)[mask]
        total += float(token_kl(base_logits, logits).sum())
        tokens += int(mask.sum())
    return total / tokens if tokens else None


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass(frozen=True)
class Scorer:
    """A model loaded for scoring, with its base where there is one: with an adapter,
    the same model with the adapter switched off (no second copy is loaded)."""

    model: Any
    base: Any
    as_base: Context
    encoder: ChatEncoder
    multimodal: bool


def load_scorer(
    model_path: str,
    *,
    adapter: str | None = None,
    base_path: str | None = None,
    max_pixels: int,
    trust_remote_code: bool = False,
    rules: ImageRules | None = None,
) -> Scorer:
    """The model (with its base, where it has one) and an encoder that opens images
    under ``rules`` (a run's, from its job.json)."""
    if adapter and base_path:
        raise ValueError("give either an adapter or a base model, not both")
    hardware = Hardware.detect()
    processing = load_processing(model_path, trust_remote_code=trust_remote_code)
    multimodal = is_multimodal(processing)
    device = "cuda" if hardware.cuda else "cpu"
    dtype = "bfloat16" if hardware.bf16 else "float32"

    def load(path: str) -> Any:
        return load_model(
            path, multimodal=multimodal, trust_remote_code=trust_remote_code, dtype=dtype
        )

    model: Any = load(model_path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    base: Any = None
    as_base: Context = contextlib.nullcontext
    if adapter:
        base, as_base = model, model.disable_adapter
    elif base_path:
        base = load(base_path).to(device).eval()
    return Scorer(model, base, as_base, chat_encoder(processing, max_pixels, rules), multimodal)


@dataclass(frozen=True)
class Evaluation:
    """A model's figures on a set of examples, and its base's where it has one."""

    tuned: Scores
    tuned_preference: Preference | None = None
    base: Scores | None = None
    base_preference: Preference | None = None
    kl_to_base: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"examples", "accuracy", "loss"}``, with ``"preferenceAccuracy"`` and
        ``"rewardMargin"`` on preference pairs; with a base, also ``"klToBase"`` and
        ``"base"`` holding the base's own figures."""

        def figures(scores: Scores, pref: Preference | None) -> dict[str, Any]:
            return scores.as_dict() | (pref.as_dict() if pref is not None else {})

        result = figures(self.tuned, self.tuned_preference)
        if self.base is not None:
            result["klToBase"] = self.kl_to_base
            result["base"] = figures(self.base, self.base_preference)
        return result


def with_references(examples: Sequence[Example]) -> list[Example]:
    """The examples that have a reference reply to score the model against: a final
    reply weighted 0 is one the user chose not to teach, so matching it is no merit."""
    return [e for e in examples if e.chosen.learned]


def score_examples(
    scorer: Scorer,
    examples: Sequence[Example],
    root: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    keep: int = 0,
) -> Evaluation:
    """Score the model, and its base where it has one, on ``examples`` (relative image
    paths resolve under ``root``; ``with_references`` picks them); preference figures
    when every example is a pair."""
    multimodal = scorer.multimodal
    records = [to_chat_record(e, root, multimodal=multimodal) for e in examples]
    pairs = (
        [to_preference_record(e, root, multimodal=multimodal) for e in examples]
        if examples and all(e.rejected is not None for e in examples)
        else None
    )

    def scores(target: Any) -> tuple[Scores, Preference | None]:
        result = score(
            target,
            scorer.encoder,
            examples,
            records,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            keep=keep,
        )
        pref = (
            preference(target, scorer.encoder, pairs, batch_size=batch_size)
            if pairs is not None
            else None
        )
        return result, pref

    tuned, tuned_preference = scores(scorer.model)
    if scorer.base is None:
        return Evaluation(tuned, tuned_preference)
    kl = kl_to_base(
        scorer.model, scorer.base, scorer.as_base, scorer.encoder, records, batch_size=batch_size
    )
    with scorer.as_base():
        base, base_preference = scores(scorer.base)
    return Evaluation(tuned, tuned_preference, base, base_preference, kl)


def evaluate(
    *,
    model_path: str,
    data: str,
    adapter: str | None = None,
    base_path: str | None = None,
    image_root: str | None = None,
    max_pixels: int,
    max_new_tokens: int,
    batch_size: int,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """A model's figures on a JSONL file (``Evaluation.as_dict``). Given an adapter or a
    base model (``base_path``, for a fully tuned model), its base's too."""
    scorer = load_scorer(
        model_path,
        adapter=adapter,
        base_path=base_path,
        max_pixels=max_pixels,
        trust_remote_code=trust_remote_code,
    )
    examples = list(read_examples(data))
    # Not resolved here: the image-root guard must see a symlinked folder to refuse it.
    root = Path(image_root) if image_root else Path(data).absolute().parent
    return score_examples(
        scorer,
        with_references(examples),
        root,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    ).as_dict()
