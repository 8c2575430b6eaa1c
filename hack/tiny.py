"""Tiny random-weight models for tests, the demo and the benchmarks:
``.venv/bin/python hack/tiny.py OUT --family F``.

No model hub is reachable from CI or a laptop demo, so this builds, in seconds, a small
transformers model with a locally trained byte-level BPE tokenizer, the family's real
chat template and a processor, saved exactly like a hub checkpoint (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``chat_template.jinja``, processor config).
Everything that loads a hub model loads these the same way.

Families:
- ``qwen2_5_vl``: Qwen2.5-VL (Qwen2VLImageProcessor, patch 14, merge 2); a 56x56 image is
  four image tokens.
- ``llava``: LLaVA with a tiny CLIP vision tower and a Llama language model; an image is
  resized to 28x28, four image tokens.
- ``qwen2``: a Qwen2 causal LM for text-only data.

The tokenizer has ~500 tokens. A tokenizer that small must still spell whole answers in
few tokens, so its training corpus holds the chat template's fixed strings, the colour and
shape words of the synthetic image task and a few hundred common words; pass
``extra_words`` (``--word``) to add a task's own vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2_5_vl", "llava", "qwen2")
VOCAB_SIZE = 512

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "gray")
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star", "ring", "bar")
COMMON_WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "not",
    "is",
    "are",
    "was",
    "be",
    "this",
    "that",
    "it",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "what",
    "which",
    "who",
    "how",
    "why",
    "when",
    "where",
    "yes",
    "no",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "shape",
    "colour",
    "color",
    "image",
    "picture",
    "photo",
    "describe",
    "answer",
    "question",
    "word",
    "words",
    "small",
    "large",
    "big",
    "tiny",
    "name",
    "please",
    "tell",
    "me",
    "you",
    "your",
    "i",
    "we",
    "they",
    "he",
    "she",
    "hello",
    "hi",
    "thanks",
    "thank",
    "good",
    "bad",
    "ok",
    "okay",
    "true",
    "false",
    "left",
    "right",
    "top",
    "bottom",
    "up",
    "down",
    "day",
    "night",
    "time",
    "number",
    "count",
    "text",
    "say",
    "said",
    "can",
    "will",
    "would",
    "should",
    "do",
    "does",
    "did",
    "have",
    "has",
    "had",
    "there",
    "here",
    "these",
    "those",
    "some",
    "many",
    "all",
    "any",
    "each",
    "every",
    "more",
    "less",
    "than",
    "then",
    "so",
    "very",
    "just",
    "also",
    "only",
    "again",
    "other",
    "same",
    "different",
    "first",
    "last",
    "next",
    "new",
    "old",
    "cat",
    "dog",
    "bird",
    "fish",
    "car",
    "tree",
    "house",
    "sun",
    "moon",
    "sky",
    "water",
    "fire",
    "book",
    "story",
    "code",
    "python",
    "list",
]


# The language model of every family: the same small size, so that the families learn
# alike and a test's budget fits all of them. Attention heads of 32: vLLM's CPU
# attention serves no smaller head size.
LANGUAGE_MODEL_SIZE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def _tokenizer_corpus(family: str, extra_words: Iterable[str]) -> list[str]:
    words = [*COLOURS, *SHAPES, *COMMON_WORDS, *extra_words]
    phrases = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    fixed = {
        "qwen2_5_vl": ["system\nYou are a helpful assistant.", "user\n", "assistant\n"],
        "llava": ["[INST] ", " [/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"],
        "qwen2": [
            "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            "user\n",
            "assistant\n",
        ],
    }[family]
    sentences = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    # Repetition gives the fixed strings and the answer words the highest pair counts,
    # so BPE merges them into whole tokens before spending merges on anything else.
    return fixed * 200 + [f" {w}" for w in words] * 20 + words * 20 + phrases * 10 + sentences


def _train_tokenizer(family: str, special_tokens: Sequence[str], extra_words: Iterable[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: any text, in any language, still encodes (as bytes) without an <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(family, extra_words), trainer)
    return tok


def _fast_tokenizer(tok: Any, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


# The tiny vision tower: two blocks, the last with full attention as in the real model.
VISION_SIZE: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "window_size": 56,
    "fullatt_block_indexes": [1],
}


def _build_qwen2_5_vl(
    extra_words: Iterable[str],
    *,
    language: dict[str, Any] = LANGUAGE_MODEL_SIZE,
    vision: dict[str, Any] = VISION_SIZE,
    vocab_size: int | None = None,
    max_pixels: int = 112 * 112,
) -> tuple[Any, Any]:
    """The tiny Qwen2.5-VL, or with ``language``/``vision`` sizes (and a ``vocab_size``
    above the tokenizer's, whose extra rows no text reaches but every logit pays for)
    one of a real checkpoint's shape, as bench/train.py's realistic shape builds."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )
    from trl.chat_template_utils import qwen2_5_vl_chat_template

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tokenizer = _fast_tokenizer(
        _train_tokenizer("qwen2_5_vl", specials, extra_words),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    # min/max pixels keep image token counts tiny: a 56x56 image is a 4x4 patch grid,
    # merged 2x2 into four tokens.
    min_pixels = 28 * 28
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        chat_template=qwen2_5_vl_chat_template,  # the hub checkpoint's template, byte for byte
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size or len(tokenizer),
            # mrope sections split head_dim/2 = 16 rotary frequencies over (time, height,
            # width)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
            },
            **language,
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "out_hidden_size": language["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _build_llava(extra_words: Iterable[str]) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from trl.chat_template_utils import llava_next_chat_template

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = _fast_tokenizer(
        _train_tokenizer("llava", specials, extra_words),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    image_size, patch_size = 28, 14
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=llava_next_chat_template,
    )
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            **LANGUAGE_MODEL_SIZE,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_qwen2(extra_words: Iterable[str]) -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.chat_template_utils import qwen2_5_chat_template

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = _fast_tokenizer(
        _train_tokenizer("qwen2", specials, extra_words),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = qwen2_5_chat_template
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        **LANGUAGE_MODEL_SIZE,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config), tokenizer


_BUILDERS = {"qwen2_5_vl": _build_qwen2_5_vl, "llava": _build_llava, "qwen2": _build_qwen2}


def build(out: str | Path, family: str, *, seed: int = 0, extra_words: Iterable[str] = ()) -> Path:
    """Build the tiny ``family`` model into ``out`` and return the folder."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _save(out, seed, lambda: _BUILDERS[family](extra_words))


def build_qwen2_5_vl(
    out: str | Path,
    *,
    language: dict[str, Any],
    vision: dict[str, Any],
    vocab_size: int,
    max_pixels: int,
    extra_words: Iterable[str] = (),
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """A Qwen2.5-VL of the given sizes (see _build_qwen2_5_vl) into ``out``, its random
    weights made on ``device`` in ``dtype``: a 3B model's initialisation takes minutes on
    a CPU and a second on a GPU."""
    import torch

    def make() -> tuple[Any, Any]:
        default = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            with torch.device(device):
                model, processor = _build_qwen2_5_vl(
                    extra_words,
                    language=language,
                    vision=vision,
                    vocab_size=vocab_size,
                    max_pixels=max_pixels,
                )
        finally:
            torch.set_default_dtype(default)
        model.config.dtype = dtype
        return model, processor

    return _save(out, seed, make)


def _save(out: str | Path, seed: int, make: Callable[[], tuple[Any, Any]]) -> Path:
    import torch

    torch.manual_seed(seed)  # same seed, same weights: test caches and the demo stay reproducible
    model, processing = make()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = model.config.get_text_config().pad_token_id
    model.save_pretrained(out)
    processing.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/tiny.py",
        description="Build a tiny random-weight model with a local tokenizer, saved like a hub checkpoint.",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--word",
        action="append",
        default=[],
        help="add a word to the tokenizer corpus (repeatable)",
    )
    args = parser.parse_args(argv)
    out = build(args.out, args.family, seed=args.seed, extra_words=args.word)
    print(f"built tiny {args.family} model in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
