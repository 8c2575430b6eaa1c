"""Per-turn weights in a real run: the answers that sit only in weight-0 turns are not
learned, where the same run with weight 1 learns them, and the trained-token count
leaves them out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from training.support import WORDS, JobFactory, train

from kubetune_trainer.training.evaluate import evaluate

pytestmark = pytest.mark.training

SYSTEM = {"role": "system", "content": "Answer with one word."}
HYPERPARAMETERS = {"epochs": 6, "batchSize": 8, "learningRate": 3e-3}


def secret(word: str) -> str:
    """The answers to learn (or not): each word's fifth neighbour in WORDS."""
    return WORDS[(WORDS.index(word) + 5) % len(WORDS)]


def other(word: str) -> str:
    return WORDS[(WORDS.index(word) + 7) % len(WORDS)]


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def conversations(path: Path, answer: Callable[[str], str], weight: int) -> Path:
    """Each word asked about, answered with ``answer`` at ``weight``, then a follow-up
    question whose reply, "done", is learned in every run."""
    return write(
        path,
        [
            {
                "messages": [
                    SYSTEM,
                    {"role": "user", "content": f"say {word}"},
                    {"role": "assistant", "content": answer(word), "weight": weight},
                    {"role": "user", "content": "anything else?"},
                    {"role": "assistant", "content": "done"},
                ]
            }
            for word in WORDS * 4
        ],
    )


def probe(path: Path, answer: Callable[[str], str]) -> Path:
    """The first exchange alone, its answer the reply to score."""
    return write(
        path,
        [
            {
                "messages": [
                    SYSTEM,
                    {"role": "user", "content": f"say {word}"},
                    {"role": "assistant", "content": answer(word)},
                ]
            }
            for word in WORDS
        ],
    )


def test_answers_in_weight_0_turns_are_not_learned(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    reports: dict[str, dict[str, Any]] = {}

    def tuned(name: str, answer: Callable[[str], str], weight: int) -> str:
        data = conversations(tmp_path / f"{name}.jsonl", answer, weight)
        config = job(
            tiny_qwen2,
            data,
            tuning="full",
            outputDir=str(tmp_path / name),
            hyperparameters=HYPERPARAMETERS,
        )
        reports[name] = train(config)
        return str(reports[name]["outputDir"])

    secrets = probe(tmp_path / "secrets.jsonl", secret)

    def loss(model: Path | str) -> float:
        result = evaluate(
            model_path=str(model),
            data=str(secrets),
            max_pixels=3136,
            max_new_tokens=2,
            batch_size=12,
        )
        return float(result["loss"])

    untuned = loss(tiny_qwen2)
    learned = loss(tuned("learned", secret, 1))
    context = loss(tuned("context", secret, 0))
    elsewhere = loss(tuned("elsewhere", other, 0))
    print(
        f"loss on the secret answers: untuned {untuned:.2f}, learned {learned:.2f}, "
        f"as weight-0 context {context:.2f}, other answers as context {elsewhere:.2f}"
    )
    # Every run learns the follow-up's reply, whose end-of-turn tokens the secret
    # replies share: all three move away from the untuned model.
    assert max(learned, context, elsewhere) < untuned
    # Weight 1 learns the secrets; weight 0 leaves the model where a run that never saw
    # them leaves it.
    assert learned < context - 0.5
    assert context == pytest.approx(elsewhere, abs=0.05)

    # The report counts what was learned: the weight-0 turns' tokens are not in it.
    trained = {name: report["trainedTokens"] for name, report in reports.items()}
    assert trained["context"] == trained["elsewhere"] < trained["learned"]
