"""A run killed mid-way resumes from its latest checkpoint and ends where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from training.support import KUBETUNE, JobFactory, train, write_job

from kubetune_trainer.training.checkpoints import latest_checkpoint

pytestmark = pytest.mark.training

HYPERPARAMETERS = {"epochs": 6, "batchSize": 2, "saveSteps": 2, "learningRate": 3e-3}


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(
    tiny_qwen2_5_vl: Path, shapes_task: Any, job: JobFactory, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(shapes_task.train.read_text().splitlines(keepends=True)[:24]))

    def config(name: str) -> Any:
        return job(
            tiny_qwen2_5_vl,
            data,
            tuning="full",
            outputDir=str(tmp_path / name),
            imageRoot=str(shapes_task.train.parent),
            validation={"split": 0.25},
            hyperparameters=HYPERPARAMETERS,
        )

    uninterrupted = train(config("uninterrupted"))

    killed = config("killed")
    job_file = write_job(killed, tmp_path / "job.json")
    checkpoints = Path(killed.effective_checkpoint_dir)
    process = subprocess.Popen(
        [KUBETUNE, "train", "--config", str(job_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while (
            latest_checkpoint(checkpoints) is None
            or latest_checkpoint(checkpoints).name == "checkpoint-2"
        ) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not Path(killed.output_dir, "report.json").exists()  # it really stopped mid-way
    stopped_at = latest_checkpoint(checkpoints)
    assert stopped_at is not None

    restarted = subprocess.run(
        [KUBETUNE, "train", "--config", str(job_file)], capture_output=True, text=True, timeout=300
    )
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming from" in restarted.stderr
    resumed = train_report(killed)
    assert resumed["resumedFrom"] is not None
    assert resumed["steps"] == uninterrupted["steps"] == 54
    assert resumed["trainLoss"] == pytest.approx(uninterrupted["trainLoss"], rel=1e-2)
    assert resumed["evalLoss"] == pytest.approx(uninterrupted["evalLoss"], rel=1e-2)
    # The curves cover the whole run, from before the kill too.
    assert resumed["history"]["train"][0][0] == uninterrupted["history"]["train"][0][0]


def train_report(config: Any) -> dict[str, Any]:
    import json

    report: dict[str, Any] = json.loads(Path(config.output_dir, "report.json").read_text())
    return report
