"""`torchrun --nproc_per_node 2` runs the same job data-parallel (gloo on the CPU)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from training.support import KUBETUNE, TORCHRUN, JobFactory, subset, write_job

pytestmark = pytest.mark.training


def test_two_processes_split_each_batch(
    tiny_qwen2_5_vl: Path, shapes_task: Any, job: JobFactory, tmp_path: Path
) -> None:
    data = subset(shapes_task.train, 16, tmp_path / "train.jsonl")
    config = job(
        tiny_qwen2_5_vl,
        data,
        tuning="full",
        imageRoot=str(shapes_task.train.parent),
        validation={"split": 0.25},
        hyperparameters={"epochs": 2},
    )
    result = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            KUBETUNE,
            "train",
            "--config",
            str(write_job(config, tmp_path / "job.json")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(Path(config.output_dir, "report.json").read_text())
    # 12 training examples, 4 per process per step on 2 processes: 2 steps an epoch
    # (one process alone would take 3).
    assert report["steps"] == report["totalSteps"] == 4
    assert report["trainExamples"] == 12
    assert (Path(config.output_dir) / "model.safetensors").exists()
    assert result.stderr.count("training for 4 steps") == 1  # only the main process reports
