"""Plain helpers for the training tests: running jobs and writing small datasets."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainingConfig

KUBETUNE = str(Path(sys.executable).with_name("kubetune"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Small, fast defaults: tests override what they are about.
FAST_HYPERPARAMETERS = {
    "epochs": 1,
    "batchSize": 4,
    "maxPixels": 3136,
    "loggingSteps": 2,
    "learningRate": 1e-3,
}

JobFactory = Callable[..., TrainingConfig]


def train(config: TrainingConfig, **kwargs: Any) -> dict[str, Any]:
    """Run the job in this process; return its report.json."""
    from kubetune_trainer.training.runner import run

    assert run(config, **kwargs) == 0
    report: dict[str, Any] = json.loads((Path(config.output_dir) / "report.json").read_text())
    return report


def write_job(config: TrainingConfig, path: Path) -> Path:
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    return path


WORDS = (
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "fish",
    "sun",
    "moon",
    "tree",
    "house",
    "car",
)


def write_text_dataset(
    path: Path, n: int, *, seed: int = 0, answer: Callable[[str], str] = lambda w: w
) -> Path:
    """Text-only chats with a system prompt: "say WORD" -> ``answer(WORD)``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = rng.choice(WORDS)
        lines.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer with one word."},
                    {"role": "user", "content": f"say {word}"},
                    {"role": "assistant", "content": answer(word)},
                ]
            }
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
