"""Real (tiny) training runs: LoRA and full, VLM and LLM, the second VLM family, mixed
data, the eval split, early stopping, metrics and the refusal of a wrong dataset."""

from __future__ import annotations

import json
import math
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from training.support import JobFactory, subset, train, write_job, write_text_dataset
from transformers import TrainerCallback

from kubetune_trainer import cli
from kubetune_trainer.contract.job import EXIT_CANNOT_SUCCEED, EXIT_FAILED, EXIT_INVALID_JOB
from kubetune_trainer.training.evaluate import evaluate
from kubetune_trainer.training.runner import run

pytestmark = pytest.mark.training


def test_vlm_lora_exports_a_peft_adapter_that_evaluate_compares_with_its_base(
    tiny_qwen2_5_vl: Path,
    shapes_task: Any,
    job: JobFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = subset(shapes_task.train, 24, tmp_path / "train.jsonl")
    report = train(
        job(
            tiny_qwen2_5_vl,
            data,
            tuning="lora",
            imageRoot=str(shapes_task.train.parent),
            validation={"dataset": str(shapes_task.held_out)},
        )
    )
    out = Path(report["outputDir"])
    assert report["tuning"] == "lora" and report["steps"] == 6
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and adapter["lora_alpha"] == 32
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(
        "lora_" in k and "language_model" in k for k in keys
    )  # the vision tower has none
    assert (out / "preprocessor_config.json").exists() or (out / "processor_config.json").exists()
    assert (out / "loss.png").stat().st_size > 0

    capsys.readouterr()
    code = cli.main(
        [
            "evaluate",
            "--model",
            str(tiny_qwen2_5_vl),
            "--adapter",
            str(out),
            "--data",
            str(shapes_task.held_out),
            "--json",
            "--max-pixels",
            "3136",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "12",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == result["base"]["examples"] == 36
    assert 0 <= result["accuracy"] <= 1
    assert (
        result["loss"] < result["base"]["loss"]
    )  # the adapter moved the model towards the answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScrapeAtEnd(TrainerCallback):
    """Reads /metrics while the run's server is still up."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.values: dict[str, float] = {}

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("kubetune_"):
                    name, value = line.split()
                    self.values[name] = float(value)


def test_llm_full_tuning_with_an_eval_split_serves_metrics_and_reports(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    data = write_text_dataset(tmp_path / "text.jsonl", 48)
    port = free_port()
    config = job(
        tiny_qwen2,
        data,
        tuning="full",
        validation={"split": 0.25},
        metricsPort=port,
        hyperparameters={"epochs": 2, "learningRate": 3e-3},
    )
    scrape = ScrapeAtEnd(port)
    report = train(config, callbacks=[scrape])
    assert (report["trainExamples"], report["evalExamples"]) == (36, 12)
    assert report["steps"] == report["totalSteps"] == 18
    assert len(report["history"]["eval"]) == 2  # once per epoch
    assert report["trainLoss"] < report["history"]["train"][0][1]
    out = Path(report["outputDir"])
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    values = scrape.values
    assert values["kubetune_train_step"] == values["kubetune_train_total_steps"] == 18
    assert values["kubetune_epoch"] == 2
    assert values["kubetune_train_loss"] == pytest.approx(report["trainLoss"])
    assert values["kubetune_eval_loss"] == pytest.approx(report["evalLoss"])
    assert values["kubetune_train_tokens_per_second"] > 0 and values["kubetune_learning_rate"] > 0

    summary = json.loads(Path(config.termination_log).read_text())
    assert summary["ok"] is True and summary["phase"] == "Succeeded"
    for key in ("trainLoss", "evalLoss", "bestEvalLoss", "bestStep", "steps", "outputDir"):
        assert summary[key] == report[key]
    assert len(Path(config.termination_log).read_bytes()) < 4096

    # `kubetune evaluate --config`, as the evaluation Job runs it: the fully tuned model
    # against its base on the same 12 examples the seeded split held out.
    code = cli.main(
        [
            "evaluate",
            "--config",
            str(write_job(config, tmp_path / "job.json")),
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0
    scored = json.loads((out / "evaluation.json").read_text())
    assert scored["tuned"]["examples"] == scored["base"]["examples"] == 12
    assert scored["tuned"]["loss"] < scored["base"]["loss"] and scored["klToBase"] > 0
    samples = scored["samples"]
    assert len(samples) == 5 and all(
        s["tuned"] is not None and s["base"] is not None for s in samples
    )
    held_out = {
        json.loads(line)["messages"][-1]["content"] for line in data.read_text().splitlines()
    }
    assert {s["expected"] for s in samples} <= held_out
    message = json.loads(Path(config.termination_log).read_text())
    assert message["ok"] and message["tuned"] == scored["tuned"] and len(message["samples"]) == 3
    assert len(Path(config.termination_log).read_bytes()) < 4096
    # At most --max-examples, and a job without validation data is refused as it stands.
    assert (
        cli.main(
            [
                "evaluate",
                "--config",
                str(tmp_path / "job.json"),
                "--max-examples",
                "3",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((out / "evaluation.json").read_text())["tuned"]["examples"] == 3
    unscorable = write_job(config.model_copy(update={"validation": None}), tmp_path / "none.json")
    assert cli.main(["evaluate", "--config", str(unscorable)]) == EXIT_CANNOT_SUCCEED
    assert "no validation data" in json.loads(Path(config.termination_log).read_text())["message"]


def test_llm_lora_exports_an_adapter(tiny_qwen2: Path, job: JobFactory, tmp_path: Path) -> None:
    data = write_text_dataset(tmp_path / "text.jsonl", 16)
    report = train(
        job(
            tiny_qwen2,
            data,
            tuning="lora",
            hyperparameters={"loraRank": 4, "targetModules": ["q_proj", "v_proj"]},
        )
    )
    adapter = json.loads((Path(report["outputDir"]) / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert report["evalLoss"] is None and report["steps"] == 4


def test_second_vlm_family_llava_trains(
    tiny_llava: Path, shapes_task: Any, job: JobFactory, tmp_path: Path
) -> None:
    data = subset(shapes_task.train, 16, tmp_path / "train.jsonl")
    report = train(
        job(
            tiny_llava,
            data,
            tuning="full",
            imageRoot=str(shapes_task.train.parent),
            validation={"split": 0.25},
        )
    )
    assert report["steps"] == 3 and math.isfinite(report["evalLoss"])
    config = json.loads((Path(report["outputDir"]) / "config.json").read_text())
    assert config["model_type"] == "llava"


def test_mixed_text_and_image_data_with_overlong_examples(
    tiny_qwen2_5_vl: Path, shapes_task: Any, job: JobFactory, tmp_path: Path
) -> None:
    images = shapes_task.train.read_text().splitlines()[:8]
    text = write_text_dataset(tmp_path / "text.jsonl", 8).read_text().splitlines()
    long_reply = {
        "messages": [
            {"role": "user", "content": "say it"},
            {"role": "assistant", "content": "red " * 60},
        ]
    }
    long_prompt = {
        "messages": [
            {"role": "user", "content": "blue " * 80},
            {"role": "assistant", "content": "ok"},
        ]
    }
    lines = [x for pair in zip(images, text, strict=True) for x in pair] + [
        json.dumps(long_reply),
        json.dumps(long_prompt),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    report = train(
        job(
            tiny_qwen2_5_vl,
            data,
            tuning="full",
            imageRoot=str(shapes_task.train.parent),
            hyperparameters={"maxContextLength": 48},
        )
    )
    assert (report["truncatedExamples"], report["droppedExamples"]) == (1, 1)
    assert report["trainExamples"] == 17 and report["steps"] == 5


def test_early_stopping_exports_the_best_checkpoint(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    # The validation set wants a different word than training teaches: once the model
    # has learnt the format, its validation loss can only rise.
    train_data = write_text_dataset(tmp_path / "train.jsonl", 32)
    contrary = write_text_dataset(
        tmp_path / "val.jsonl", 4, seed=5, answer=lambda w: "moon" if w != "moon" else "sun"
    )
    config = job(
        tiny_qwen2,
        train_data,
        tuning="full",
        validation={"dataset": str(contrary)},
        earlyStopping={"patience": 2},
        hyperparameters={"epochs": 20, "learningRate": 5e-3, "evalSteps": 4},
    )
    report = train(config)
    assert report["earlyStopped"] is True
    assert report["steps"] < report["totalSteps"]
    assert report["bestStep"] < report["steps"]
    assert report["bestEvalLoss"] < report["evalLoss"]
    exported = evaluate(
        model_path=report["outputDir"],
        data=str(contrary),
        max_pixels=3136,
        max_new_tokens=2,
        batch_size=4,
    )
    assert exported["loss"] == pytest.approx(report["bestEvalLoss"], rel=1e-3)


def test_a_dataset_whose_checksum_differs_is_refused(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    data = write_text_dataset(tmp_path / "text.jsonl", 4)
    config = job(tiny_qwen2, data, datasetSha256="0" * 64)
    assert run(config) == EXIT_CANNOT_SUCCEED
    summary = json.loads(Path(config.termination_log).read_text())
    assert summary["ok"] is False and "SHA-256" in summary["message"]
    assert not Path(config.output_dir, "report.json").exists()


def test_early_stopping_without_validation_is_refused(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path
) -> None:
    config = job(
        tiny_qwen2, write_text_dataset(tmp_path / "text.jsonl", 4), earlyStopping={"patience": 1}
    )
    assert run(config) == EXIT_CANNOT_SUCCEED
    assert "validation" in json.loads(Path(config.termination_log).read_text())["message"]


def test_exit_codes_tell_final_failures_from_those_worth_a_retry(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, s3_endpoint: str
) -> None:
    """The operator's Job fails at once on 2 and 3 and retries 1 (see podFailurePolicy
    in resources/finetunejob/training_job.py)."""
    data = write_text_dataset(tmp_path / "text.jsonl", 4)
    # Storage that cannot be read now (here a bucket not made yet) may be for the next pod.
    away = job(tiny_qwen2, data, checkpointUri="s3://not-made-yet/checkpoints")
    assert run(away) == EXIT_FAILED
    assert "cannot read the checkpoint copies" in Path(away.termination_log).read_text()
    invalid = tmp_path / "job.json"
    invalid.write_text(json.dumps({"baseModel": "m", "dataset": str(data)}))  # no outputDir
    assert cli.main(["train", "--config", str(invalid)]) == EXIT_INVALID_JOB


def test_output_is_uploaded_to_s3_without_checkpoints(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, s3_endpoint: str
) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="models")
    data = write_text_dataset(tmp_path / "text.jsonl", 8)
    config = job(tiny_qwen2, data, outputUri="s3://models/runs/llm", hyperparameters={"epochs": 1})
    train(config)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix="runs/llm/")["Contents"]}
    assert {"runs/llm/adapter_config.json", "runs/llm/report.json"} <= keys
    assert not any("/checkpoints/" in k for k in keys)
    summary = json.loads(Path(config.termination_log).read_text())
    assert summary["outputUri"] == "s3://models/runs/llm"
