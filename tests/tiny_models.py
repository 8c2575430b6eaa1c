"""Pytest plugin: tiny real models and a synthetic image task, built once per session.

Registered from tests/conftest.py with ``pytest_plugins = ["tiny_models"]``, so the
training tests and the operator's end-to-end tests share them.

- ``tiny_qwen2_5_vl``, ``tiny_llava``, ``tiny_qwen2``: folders holding a tiny
  random-weight model saved like a hub checkpoint (see hack/tiny.py, which must be
  importable as ``tiny``: pytest's pythonpath has hack/). They are cached under
  ``.cache/tiny-models/<family>-<hash of tiny.py>``, so a session reuses the last one
  and an edit to tiny.py rebuilds.
- ``write_shapes_dataset``: a colours x shapes image dataset (placeholder-style JSONL
  plus PNG files), the learnability task; ``shapes_task``: a session-wide train set,
  a held-out set and the same train set with every image blanked.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

# Nothing here may reach a model hub; the tiny models are local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tiny-models"
TINY_SOURCE = REPO / "hack" / "tiny.py"

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("square", "triangle")
QUESTION = "What colour and shape is this?"
IMAGE_SIZE = 56  # 4 image tokens for the tiny Qwen2.5-VL (patch 14, merge 2)


def tiny_model(family: str) -> Path:
    """The cached tiny ``family`` model, built first if tiny.py changed since."""
    key = hashlib.sha256(TINY_SOURCE.read_bytes()).hexdigest()[:12]
    path = CACHE / f"{family}-{key}"
    if (path / "config.json").is_file():
        return path
    import tiny

    # Build beside the final folder and rename: a half-built model is never reused,
    # and parallel sessions do not trip over each other.
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = CACHE / f".{family}-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tiny.build(staging, family)
    try:
        staging.rename(path)
    except OSError:  # another session finished first
        shutil.rmtree(staging, ignore_errors=True)
    for stale in CACHE.glob(f"{family}-*"):  # builds from older versions of tiny.py
        if stale != path:
            shutil.rmtree(stale, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl() -> Path:
    return tiny_model("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_llava() -> Path:
    return tiny_model("llava")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    return tiny_model("qwen2")


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """``shape`` in ``colour`` on white, near the centre, its size and place jittered.

    The shapes fill most of the image and differ in every quadrant (a triangle leaves
    the top corners white), which is what the four image tokens of the tiny Qwen2.5-VL
    summarise: its random vision tower learns them in a few epochs, where small shapes
    anywhere, or a circle against a square, take longer than a test can spend."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    extent = rng.randint(size - 16, size - 6)
    x0 = rng.randint(2, size - extent - 2)
    y0 = rng.randint(2, size - extent - 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    draw = ImageDraw.Draw(image)
    if shape == "triangle":
        x1, y1 = box[2], box[3]
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=COLOURS[colour])
    else:
        draw.rectangle(box, fill=COLOURS[colour])
    return image


def write_shapes_dataset(
    folder: Path, per_class: int, *, seed: int, blank: bool = False, name: str = "data.jsonl"
) -> Path:
    """``per_class`` examples of each colour x shape class, shuffled: the user shows an
    image and asks what it is; the assistant answers e.g. "red circle". With ``blank``,
    every image is plain white (the answers stay), so only the answer prior is left to
    learn. Returns the JSONL path; the images sit in ``folder/images``."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    items = [cls for cls in classes for _ in range(per_class)]
    rng.shuffle(items)
    lines = []
    for i, (colour, shape) in enumerate(items):
        image = draw_shape(colour, shape, rng)
        if blank:
            image = Image.new("RGB", image.size, (255, 255, 255))
        relative = f"images/{Path(name).stem}-{i}.png"
        image.save(folder / relative)
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"<image>{QUESTION}"},
                    {"role": "assistant", "content": f"{colour} {shape}"},
                ],
                "images": [relative],
            }
        )
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@dataclass(frozen=True)
class ShapesTask:
    train: Path
    held_out: Path
    blanked_train: Path
    classes: int


@pytest.fixture(scope="session")
def shapes_task(tmp_path_factory: pytest.TempPathFactory) -> ShapesTask:
    folder = tmp_path_factory.mktemp("shapes")
    return ShapesTask(
        train=write_shapes_dataset(folder, 16, seed=1, name="train.jsonl"),
        held_out=write_shapes_dataset(folder, 6, seed=2, name="held_out.jsonl"),
        blanked_train=write_shapes_dataset(folder, 16, seed=1, blank=True, name="blanked.jsonl"),
        classes=len(COLOURS) * len(SHAPES),
    )
