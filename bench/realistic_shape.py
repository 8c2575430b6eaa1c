"""The realistic shape of bench/train.py: a model with a real VLM's architecture and the
size and length spread of real VLM fine-tuning data, both built locally (no hub).

- The model is a Qwen2.5-VL with random weights, built from a config by hack/tiny.py's
  builder with its small trained tokenizer: on a CPU about 32M parameters (a vocabulary
  of 32k rows, which every logit pays for); on a GPU the Qwen2.5-VL-3B-Instruct
  configuration (36 layers of width 2048, a 32-block vision tower of width 1280, a
  151,936-row vocabulary).
- The data is seed-fixed: answers of 3 to about 450 words, log-normal (median 40), so
  most are short and a few are very long; questions of 4 to 30 words; images of 28 to
  448 px a side (log-uniform, aspect ratios 1:2 to 2:1), so an image is 1 to 256 image
  tokens at 448x448 maxPixels; 15% of the examples have no image.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

import tiny  # noqa: E402

MAX_PIXELS = 448 * 448
TEXT_ONLY_SHARE = 0.15

# (language model, vision tower, vocabulary rows) per size.
SIZES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "cpu": (
        {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [8, 12, 12],  # head_dim 64: 32 rotary frequencies
            },
        },
        {
            "depth": 4,
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_heads": 4,
            "window_size": 112,
            "fullatt_block_indexes": [3],
        },
        32_768,
    ),
    # Qwen2.5-VL-3B-Instruct's config.json.
    "3b": (
        {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128_000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        151_936,
    ),
}

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 40),
    "purple": (130, 40, 160),
    "white": (245, 245, 245),
}
SHAPES = ("square", "bar", "circle")
WORDS = [*tiny.COMMON_WORDS, *tiny.COLOURS, *tiny.SHAPES]


def build_model(out: Path, size: str, device: str) -> Path:
    language, vision, vocab_size = SIZES[size]
    return tiny.build_qwen2_5_vl(
        out,
        language=language,
        vision=vision,
        vocab_size=vocab_size,
        max_pixels=MAX_PIXELS,
        seed=0,
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
    )


def _image(rng: random.Random, colour: str, shape: str) -> Image.Image:
    side = math.exp(rng.uniform(math.log(28), math.log(448)))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    width = max(28, min(448, round(side * math.sqrt(aspect))))
    height = max(28, min(448, round(side / math.sqrt(aspect))))
    image = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    box = (width // 5, height // 5, width - width // 5, height - height // 5)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "bar":
        draw.rectangle((box[0], height * 2 // 5, box[2], height * 3 // 5), fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    return image


def _words(rng: random.Random, count: int) -> str:
    # Zipf-like: a few words common, most rare, as in text.
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    return " ".join(rng.choices(WORDS, weights=weights, k=count))


def write_dataset(folder: Path, examples: int, *, seed: int, name: str) -> Path:
    """``examples`` lines of the realistic shape in placeholder style (``<image>`` in the
    user's text, ``images`` beside it); the images sit in ``folder/images``."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(examples):
        answer_words = max(3, min(450, round(rng.lognormvariate(math.log(40), 1.0))))
        question = _words(rng, rng.randint(4, 30))
        record: dict[str, Any]
        if rng.random() < TEXT_ONLY_SHARE:
            record = {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": _words(rng, answer_words)},
                ]
            }
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            relative = f"images/{Path(name).stem}-{i}.jpg"
            _image(rng, colour, shape).save(folder / relative, quality=90)
            answer = f"{colour} {shape} " + _words(rng, answer_words - 2)
            record = {
                "messages": [
                    {"role": "user", "content": f"<image>{question}"},
                    {"role": "assistant", "content": answer},
                ],
                "images": [relative],
            }
        lines.append(json.dumps(record) + "\n")
    path = folder / name
    path.write_text("".join(lines))
    return path
