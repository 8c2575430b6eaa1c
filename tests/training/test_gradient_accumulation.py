"""Gradient accumulation and data parallelism change how a step is computed, not what it
learns: one optimizer step over a batch of four examples, one over two accumulated
micro-batches of two, and one over two processes with two examples each (the same four)
apply the same gradient, for SFT's loss and for the preserve-skills loss. Both are sums
over trained tokens divided by the Trainer's count of them across the micro-batches and
processes, so examples of different lengths weigh the same every way, and no loss is
divided by the accumulation steps or the processes a second time."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from training.step_gradients import first_step_gradients
from training.support import TORCHRUN, JobFactory, assert_same_gradients, write_job

from kubetune_trainer.contract.job import TrainingConfig

pytestmark = pytest.mark.training


@pytest.fixture
def four_examples(tmp_path: Path) -> Path:
    """One long answer among three short ones: however the four are split in two, the
    halves hold different counts of trained tokens."""
    data = tmp_path / "train.jsonl"
    chats = (
        {
            "messages": [
                {"role": "user", "content": f"say {word}"},
                {"role": "assistant", "content": " ".join([word] * repeats)},
            ]
        }
        for word, repeats in (("red", 1), ("cat", 12), ("sun", 1), ("dog", 1))
    )
    data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return data


def one_step(
    job: JobFactory,
    model: Path,
    data: Path,
    out: Path,
    batch_size: int,
    accumulate: int,
    **fields: Any,
) -> TrainingConfig:
    """The job that trains the four examples in one step."""
    return job(
        model,
        data,
        outputDir=str(out),
        **fields,
        hyperparameters={
            "batchSize": batch_size,
            "gradientAccumulationSteps": accumulate,
            "loraDropout": 0.0,
            "groupByLength": False,
        },
    )


@pytest.mark.parametrize("preserve", [False, True], ids=["sft", "preserve-skills"])
def test_accumulated_micro_batches_apply_the_gradient_of_the_whole_batch(
    preserve: bool, tiny_qwen2_5_vl: Path, four_examples: Path, job: JobFactory, tmp_path: Path
) -> None:
    def first_step(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
        config = one_step(
            job,
            tiny_qwen2_5_vl,
            four_examples,
            tmp_path / f"out-{batch_size}",
            batch_size,
            accumulate,
            preserveGeneralSkills={"enabled": preserve, "lambda": 0.5},
        )
        return first_step_gradients(config)

    whole = first_step(4, 1)
    assert any(g.abs().max() > 0 for g in whole.values())
    assert_same_gradients(first_step(2, 2), whole, atol=1e-6)


def test_two_processes_apply_the_gradient_of_the_whole_batch(
    tiny_qwen2_5_vl: Path, four_examples: Path, job: JobFactory, tmp_path: Path
) -> None:
    whole = first_step_gradients(
        one_step(job, tiny_qwen2_5_vl, four_examples, tmp_path / "one", 4, 1)
    )
    config = one_step(job, tiny_qwen2_5_vl, four_examples, tmp_path / "two", 2, 1)
    saved = tmp_path / "gradients.pt"
    result = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).with_name("step_gradients.py")),
            str(write_job(config, tmp_path / "job.json")),
            str(saved),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_gradients(torch.load(saved), whole, atol=1e-6)
