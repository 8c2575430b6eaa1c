"""`kubetune preflight --config`: the run's data counted with the base model's tokenizer
and processor only, before a GPU is booked; every figure is what the real training run
then reports, and a job that training would refuse fails here with exit 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tiny_models import COLOURS, SHAPES
from training.support import (
    JobFactory,
    capture_trainers,
    subset,
    train,
    with_rejected,
    write_job,
    write_text_dataset,
)

from kubetune_trainer import cli
from kubetune_trainer.contract.job import EXIT_CANNOT_SUCCEED, TrainingConfig
from kubetune_trainer.contract.summaries import LongestExample, OverLength, PreflightSummary
from kubetune_trainer.training.inputs import Plan, RecordPlan
from kubetune_trainer.training.preflight import describe, planned_steps, summary_of
from kubetune_trainer.training.runner import run

pytestmark = pytest.mark.training


def preflight(
    config: TrainingConfig, path: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, Any]]:
    """(exit code, the --json summary), after checking that the termination log holds
    the same summary."""
    capsys.readouterr()
    code = cli.main(["preflight", "--config", str(write_job(config, path)), "--json", *args])
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    message = Path(config.termination_log).read_bytes()
    assert json.loads(message) == printed and len(message) < 4096
    return code, printed


def without_weights(model: Path, out: Path) -> Path:
    """The model folder without its weights: all pre-flight may read."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def chat(user: str, reply: str) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
    )


def test_sft_preflight_counts_what_the_vlm_run_trains_on_without_its_weights(
    tiny_qwen2_5_vl: Path,
    shapes_task: Any,
    job: JobFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = shapes_task.train.read_text().splitlines()[:8]
    text = write_text_dataset(tmp_path / "text.jsonl", 8).read_text().splitlines()
    long_prompt = {"role": "user", "content": "blue " * 80}
    lines = [
        *(x for pair in zip(images, text, strict=True) for x in pair),
        chat("say it", "red " * 60),  # line 17: cut after the prompt, part of the reply kept
        chat(long_prompt["content"], "ok"),  # 18: a cut would leave no reply: dropped
        json.dumps(  # 19: a cut would go through the image's tokens: dropped
            {
                "messages": [
                    {"role": "user", "content": "green " * 40 + "<image>What is this?"},
                    {"role": "assistant", "content": "red square"},
                ],
                "images": json.loads(images[0])["images"],
            }
        ),
        chat("say blue", "blue"),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = job(
        tiny_qwen2_5_vl,
        data,
        tuning="full",
        imageRoot=str(shapes_task.train.parent),
        hyperparameters={"maxContextLength": 48},
    )

    weightless = without_weights(tiny_qwen2_5_vl, tmp_path / "tokenizer-only")
    code, summary = preflight(
        config.model_copy(update={"base_model": str(weightless)}), tmp_path / "job.json", capsys
    )
    assert code == 0 and summary["ok"] is True
    assert summary["overLength"] == {
        "count": 3,
        "lines": [17, 18, 19],
        "truncated": 1,
        "dropped": 2,
    }
    # The longest is the long prompt, counted as the tokenizer counts its chat.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_5_vl))
    prompt_tokens = len(
        tokenizer.apply_chat_template(
            [long_prompt, {"role": "assistant", "content": "ok"}], tokenize=True, return_dict=True
        )["input_ids"]
    )
    assert summary["longestExample"] == {"line": 18, "tokens": prompt_tokens}

    trainers = capture_trainers(monkeypatch, "sft")
    report = train(config)
    assert summary["examples"] == report["trainExamples"] == 18
    assert (summary["overLength"]["truncated"], summary["overLength"]["dropped"]) == (
        report["truncatedExamples"],
        report["droppedExamples"],
    )
    assert summary["trainingTokens"] == report["trainedTokens"] > 0
    assert summary["steps"] == report["totalSteps"] == 5
    # TRL counts the tokens of the batches it trained on (attention mask, after cuts).
    history = trainers[0].state.log_history
    assert summary["tokens"] == next(
        e["num_tokens"] for e in reversed(history) if "num_tokens" in e
    )

    assert describe(PreflightSummary.model_validate(summary), config) == [
        f"18 training examples, {summary['tokens']} tokens",
        f"{summary['trainingTokens']} training tokens over 1 epoch, 5 steps",
        f"longest: line 18, {prompt_tokens} tokens",
        "3 longer than maxContextLength=48 (1 truncated, 2 dropped): lines 17, 18, 19",
    ]


def test_dpo_preflight_counts_pairs_as_the_run_does(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    pairs = with_rejected(
        write_text_dataset(tmp_path / "chats.jsonl", 10), tmp_path / "pairs.jsonl", classes, seed=1
    ).read_text()

    def pair(user: str, chosen: str, rejected: str) -> str:
        return json.dumps(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": chosen},
                ],
                "rejected_response": rejected,
            }
        )

    data = tmp_path / "train.jsonl"
    data.write_text(
        pairs
        + pair("say it", "red " * 60, "blue")  # line 11: the chosen reply is cut
        + "\n"
        + pair("say it", "red " * 60, "blue " * 60)  # 12: both are cut, one pair truncated
        + "\n"
        + pair("blue " * 80, "ok", "no")  # 13: no reply would be left: dropped
        + "\n"
    )
    held_out = subset(tmp_path / "pairs.jsonl", 4, tmp_path / "held_out.jsonl")
    config = job(
        tiny_qwen2,
        data,
        method="dpo",
        validation={"dataset": str(held_out)},
        hyperparameters={"maxContextLength": 40, "batchSize": 2, "gradientAccumulationSteps": 2},
    )
    code, summary = preflight(config, tmp_path / "job.json", capsys)
    assert code == 0
    assert summary["overLength"] == {
        "count": 3,
        "lines": [11, 12, 13],
        "truncated": 2,
        "dropped": 1,
    }
    assert summary["longestExample"]["line"] == 13

    report = train(config)
    assert summary["examples"] == report["trainExamples"] == 12
    assert report["evalExamples"] == 4
    assert (report["truncatedExamples"], report["droppedExamples"]) == (2, 1)
    assert summary["trainingTokens"] == report["trainedTokens"] > 0
    assert summary["steps"] == report["totalSteps"] == 3  # 6 batches of 2, 2 a step


@pytest.mark.parametrize(
    ("examples", "batch", "accumulate", "epochs"),
    [(7, 2, 3, 2), (9, 4, 1, 3)],
)
def test_planned_steps_are_the_steps_a_run_plans(
    tiny_qwen2: Path,
    job: JobFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    examples: int,
    batch: int,
    accumulate: int,
    epochs: int,
) -> None:
    config = job(
        tiny_qwen2,
        write_text_dataset(tmp_path / "text.jsonl", examples),
        tuning="full",
        hyperparameters={
            "batchSize": batch,
            "gradientAccumulationSteps": accumulate,
            "epochs": epochs,
            "loggingSteps": 100,
        },
    )
    code, summary = preflight(config, tmp_path / "job.json", capsys)
    assert code == 0
    report = train(config)
    assert summary["steps"] == report["totalSteps"]
    assert summary["trainingTokens"] == report["trainedTokens"]
    assert summary["steps"] == planned_steps(
        examples,
        batch_size=batch,
        gradient_accumulation_steps=accumulate,
        epochs=epochs,
        processes=1,
    )


@pytest.mark.parametrize(
    ("examples", "batch", "accumulate", "epochs", "processes"),
    [
        (12, 4, 1, 2, 2),  # test_torchrun's run: 4 steps, measured
        (17, 4, 1, 1, 1),
        (100, 3, 4, 3, 8),
        (5, 8, 2, 1, 4),  # fewer batches than processes: each still takes one step
        (33, 2, 5, 2, 3),
        (64, 4, 2, 1, 8),
    ],
)
def test_planned_steps_for_several_processes_are_the_trainers(
    tmp_path: Path, examples: int, batch: int, accumulate: int, epochs: int, processes: int
) -> None:
    """Against transformers' own step count on the dataloader that accelerate shards for
    one of ``processes`` processes, as the Trainer's accelerator would."""
    import torch
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        num_train_epochs=epochs,
        use_cpu=True,
        report_to="none",
    )
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args)
    accelerator = trainer.accelerator
    loader = prepare_data_loader(
        DataLoader(list(range(examples)), batch_size=batch, drop_last=args.dataloader_drop_last),
        num_processes=processes,
        process_index=processes - 1,
        put_on_device=False,
        split_batches=accelerator.split_batches,
        even_batches=accelerator.even_batches,
        dispatch_batches=accelerator.dispatch_batches,
    )
    *_, max_steps = trainer.set_initial_training_values(args, loader)
    assert (
        planned_steps(
            examples,
            batch_size=batch,
            gradient_accumulation_steps=accumulate,
            epochs=epochs,
            processes=processes,
        )
        == max_steps
    )


def test_over_length_names_the_first_20_lines_and_longest_the_first_of_a_tie(
    job: JobFactory, tmp_path: Path
) -> None:
    config = job(tmp_path, tmp_path, hyperparameters={"maxContextLength": 16})
    rows: list[RecordPlan[Any]] = [
        RecordPlan(line, 20, {"line": line}, kept_tokens=16, truncated=True)
        if line % 2
        else RecordPlan(line, 30 if line in (4, 8) else 17)
        for line in range(1, 31)
    ]
    rows.append(RecordPlan(31, 5, {"line": 31}, kept_tokens=5))
    summary = summary_of(Plan(rows), 40, config, 1)
    assert summary.over_length == OverLength(
        count=30, lines=list(range(1, 21)), truncated=15, dropped=15
    )
    assert summary.longest_example == LongestExample(line=4, tokens=30)
    assert (summary.examples, summary.tokens, summary.training_tokens) == (16, 15 * 16 + 5, 40)


def test_a_job_with_nothing_that_fits_fails_as_training_would(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_text_dataset(tmp_path / "text.jsonl", 4)
    tight = job(tiny_qwen2, data, hyperparameters={"maxContextLength": 16})
    code, summary = preflight(tight, tmp_path / "job.json", capsys)
    assert code == EXIT_CANNOT_SUCCEED
    assert summary == {
        "ok": False,
        "message": "JobError: no training example fits maxContextLength=16",
    }

    long = tmp_path / "long.jsonl"
    long.write_text(chat("blue " * 80, "ok") + "\n")
    validation = job(
        tiny_qwen2,
        data,
        validation={"dataset": str(long)},
        hyperparameters={"maxContextLength": 64},
    )
    code, summary = preflight(validation, tmp_path / "job.json", capsys)
    assert code == EXIT_CANNOT_SUCCEED
    assert summary["message"] == "JobError: no validation example fits maxContextLength=64"


def test_a_bad_line_fails_naming_it(
    tiny_qwen2: Path, job: JobFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_text_dataset(tmp_path / "text.jsonl", 4)
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "no reply"}]})
    data.write_text("\n".join(lines) + "\n")
    code, summary = preflight(job(tiny_qwen2, data), tmp_path / "job.json", capsys)
    assert code == EXIT_CANNOT_SUCCEED
    assert summary["ok"] is False and summary["message"].startswith("DatasetError: line 3: ")


@pytest.mark.parametrize(
    "template",
    [
        # Renders the chat, but nothing in it marks the assistant's turns ({% generation %}),
        # and TRL has no training variant of it.
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        None,  # no chat template at all
    ],
)
def test_a_base_model_whose_chat_template_cannot_mark_replies_fails_before_training(
    tiny_qwen2: Path,
    job: JobFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    template: str | None,
) -> None:
    model = tmp_path / "plain-template"
    shutil.copytree(tiny_qwen2, model)
    if template is None:
        (model / "chat_template.jinja").unlink()
    else:
        (model / "chat_template.jinja").write_text(template)
    config = job(model, write_text_dataset(tmp_path / "text.jsonl", 4))
    code, summary = preflight(config, tmp_path / "job.json", capsys)
    assert code == EXIT_CANNOT_SUCCEED
    message = summary["message"]
    assert message.startswith(
        f"JobError: base model {model}: its chat template cannot mark the assistant's turns"
    )
    # Training, which loads the weights first, refuses it as finally.
    assert run(config) == EXIT_CANNOT_SUCCEED
    trained = json.loads(Path(config.termination_log).read_text())["message"]
    assert "its chat template cannot mark the assistant's turns" in trained
