"""A run killed mid-way resumes from its latest checkpoint and ends where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from training.support import KUBETUNE, JobFactory, subset, train, write_job

from kubetune_trainer.training.checkpoints import latest_checkpoint

pytestmark = pytest.mark.training

HYPERPARAMETERS = {"epochs": 6, "batchSize": 2, "saveSteps": 2, "learningRate": 3e-3}


def run_factory(
    model: Path, shapes_task: Any, job: JobFactory, tmp_path: Path, **fields: Any
) -> Callable[[str], Any]:
    """Configs of one 54-step run on 24 shapes examples, by the folder it writes to."""
    data = subset(shapes_task.train, 24, tmp_path / "train.jsonl")

    def config(folder: str) -> Any:
        return job(
            model,
            data,
            tuning="full",
            outputDir=str(tmp_path / folder),
            imageRoot=str(shapes_task.train.parent),
            validation={"split": 0.25},
            hyperparameters=HYPERPARAMETERS,
            **fields,
        )

    return config


def kill_when(job_file: Path, ready: Callable[[], bool], poll: float) -> None:
    """Start `kubetune train`, SIGKILL it once `ready()` holds (as a preempted pod is)."""
    process = subprocess.Popen(
        [KUBETUNE, "train", "--config", str(job_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready() and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            time.sleep(poll)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def restart(job_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBETUNE, "train", "--config", str(job_file)], capture_output=True, text=True, timeout=300
    )


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(
    tiny_qwen2_5_vl: Path, shapes_task: Any, job: JobFactory, tmp_path: Path
) -> None:
    config = run_factory(tiny_qwen2_5_vl, shapes_task, job, tmp_path)
    uninterrupted = train(config("uninterrupted"))

    killed = config("killed")
    job_file = write_job(killed, tmp_path / "job.json")
    checkpoints = Path(killed.effective_checkpoint_dir)

    def past_the_first() -> bool:
        latest = latest_checkpoint(checkpoints)
        return latest is not None and latest.name != "checkpoint-2"

    kill_when(job_file, past_the_first, poll=0.02)
    assert not Path(killed.output_dir, "report.json").exists()  # it really stopped mid-way
    stopped_at = latest_checkpoint(checkpoints)
    assert stopped_at is not None

    restarted = restart(job_file)
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


def test_a_run_on_a_fresh_disk_resumes_from_its_checkpoint_copies_in_s3(
    tiny_qwen2_5_vl: Path, shapes_task: Any, job: JobFactory, tmp_path: Path, s3_endpoint: str
) -> None:
    """With checkpointUri, a replacement pod whose disk is empty (an emptyDir after
    preemption) brings the latest complete copy back and goes on from it; once the run
    has succeeded, the copies are removed."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="kubetune-runs")
    config = run_factory(
        tiny_qwen2_5_vl,
        shapes_task,
        job,
        tmp_path,
        checkpointUri="s3://kubetune-runs/shapes/checkpoints",
    )

    def copied() -> list[int]:
        listing = s3.list_objects_v2(Bucket="kubetune-runs", Prefix="shapes/checkpoints/")
        return sorted(
            int(obj["Key"].split("/")[2].removeprefix("checkpoint-"))
            for obj in listing.get("Contents", [])
            if obj["Key"].endswith("/trainer_state.json")
        )

    first = write_job(config("first-pod"), tmp_path / "first.json")
    kill_when(first, lambda: any(step >= 10 for step in copied()), poll=0.05)
    assert not Path(tmp_path / "first-pod" / "report.json").exists()  # stopped mid-way
    latest = max(copied())
    assert latest >= 10
    # Five checkpoints were written by then; the ones rotated away locally are gone
    # from S3 too.
    assert len(copied()) <= 3

    second = config("second-pod")  # a fresh, empty disk
    restarted = restart(write_job(second, tmp_path / "second.json"))
    assert restarted.returncode == 0, restarted.stderr
    report = train_report(second)
    assert report["resumedFrom"] is not None
    assert int(report["resumedFrom"].rsplit("-", 1)[1]) >= latest
    assert report["steps"] == 54
    assert copied() == []
