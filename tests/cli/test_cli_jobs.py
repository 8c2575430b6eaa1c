"""`job create | list | get | follow`, the pure parts: flags to a FineTuneJob checked
by the API models, help from the models' own descriptions, the tables, and how
`follow` shows a run and decides its exit code."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_cli import jobs
from kubetune_cli import main as cli
from kubetune_cli.flags import described
from kubetune_cli.jobs import (
    HYPERPARAMETER_FLAGS,
    SPEC_FLAGS,
    PlainView,
    TerminalView,
    describe,
    failure,
    follow,
    job_manifest,
    list_table,
    outcome,
    related,
)
from kubetune_cli.output import CommandError, UsageError
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_trainer.contract.job import Hyperparameters


def create_parser() -> argparse.ArgumentParser:
    root = cli.parser()
    return root


def args_of(*argv: str) -> argparse.Namespace:
    return create_parser().parse_args(["job", "create", *argv])


def manifest_of(*argv: str) -> dict[str, Any]:
    return job_manifest("run", "team", args_of("run", *argv))


def test_each_flag_sets_its_one_field() -> None:
    manifest = manifest_of(
        "--base-model",
        "pvc://models/qwen-vl",
        "--dataset",
        "shapes",
        "--validation-dataset",
        "held-out",
        "--method",
        "sft",
        "--tuning",
        "lora",
        "--epochs",
        "2",
        "--learning-rate",
        "2e-4",
        "--batch-size",
        "8",
        "--lora-rank",
        "16",
        "--target-modules",
        "q_proj",
        "--target-modules",
        "v_proj",
        "--no-group-by-length",
        "--preserve-skills",
        "--lambda",
        "0.3",
        "--temperature",
        "1.5",
        "--gpus",
        "4",
        "--nodes",
        "2",
        "--queue",
        "team-a",
        "--deploy",
        "--to",
        "qwen-vl",
        "--output-name",
        "shapes-v1",
        "--output-uri",
        "s3://models/out",
        "--no-evaluation",
    )
    assert manifest == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "run", "namespace": "team"},
        "spec": {
            "baseModel": {
                "name": "qwen-vl",
                "source": {"pvc": {"claimName": "models", "path": "qwen-vl"}},
            },
            "dataset": {"name": "shapes"},
            "outputModel": {"storage": {"s3": {"uri": "s3://models/out"}}, "name": "shapes-v1"},
            "method": "sft",
            "tuning": "lora",
            "validation": {"dataset": {"name": "held-out"}},
            "hyperparameters": {
                "epochs": 2,
                "batchSize": 8,
                "learningRate": 2e-4,
                "loraRank": 16,
                "targetModules": ["q_proj", "v_proj"],
                "groupByLength": False,
            },
            "preserveGeneralSkills": {"enabled": True, "lambda": 0.3, "temperature": 1.5},
            "resources": {"gpus": 4, "nodes": 2},
            "queueName": "team-a",
            "deploy": {"enabled": True, "modelDeployment": "qwen-vl"},
            "evaluation": {"enabled": False},
        },
    }
    FineTuneJobSpec.model_validate(manifest["spec"])


def test_a_model_id_is_loaded_by_name_and_only_flags_given_are_written() -> None:
    spec = manifest_of("--base-model", "Qwen/Qwen2.5-VL-3B-Instruct", "--dataset", "d")["spec"]
    assert spec == {"baseModel": {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}, "dataset": {"name": "d"}}


def test_every_hyperparameter_has_its_flag() -> None:
    assert {f.field for f in HYPERPARAMETER_FLAGS} == set(Hyperparameters.model_fields)


def test_each_flags_help_is_its_fields_description_from_the_api_models() -> None:
    parser = create_parser()
    create = next(
        a
        for a in parser._subparsers._group_actions[0].choices["job"]._subparsers._group_actions  # type: ignore[union-attr]
    ).choices["create"]
    helps = {a.dest: a.help for a in create._actions}
    for flag in SPEC_FLAGS:
        description = flag.model.model_fields[flag.field].description
        assert description, flag.flag
        assert helps[flag.dest] == described(flag.model, flag.field, flag.how), flag.flag
        assert description.replace("%", "%%") in (helps[flag.dest] or "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--lambda", "0.2"), "--lambda and --temperature go with --preserve-skills"),
        (("--to", "qwen"), "--to names the ModelDeployment of --deploy"),
        (
            ("--method", "dpo", "--preserve-skills"),
            "preserveGeneralSkills applies only to method: sft",
        ),
        (("--tuning", "full", "--lora-rank", "8"), "loraRank applies only to tuning: lora"),
        (("--validation-split", "1"), "spec.validation.split: Input should be less than 1"),
        (("--gpus", "-1"), "spec.resources.gpus"),
        (("--output-uri", "/tmp/x"), "a folder is pvc://CLAIM/PATH or s3://BUCKET/PREFIX"),
    ],
)
def test_mistakes_are_told_before_anything_is_sent(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError) as refused:
        manifest_of("--base-model", "m", "--dataset", "d", *argv)
    assert message in str(refused.value)


def test_a_bad_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a valid name"):
        job_manifest("Run_1", "team", args_of("x", "--base-model", "m", "--dataset", "d"))


def run(phase: str = "Running", generation: int = 1, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "shapes", "namespace": "team", "generation": generation},
        "spec": {
            "baseModel": {"name": "tiny", "source": {"pvc": {"claimName": "m", "path": "tiny"}}},
            "dataset": {"name": "shapes"},
            "validation": {"split": 0.25},
        },
        "status": {"phase": phase, "observedGeneration": 1, **status},
    }


EVALUATED = {
    "phase": "Succeeded",
    "jobName": "shapes-evaluate",
    "tuned": {"examples": 36, "accuracy": 1.0, "loss": 0.02},
    "base": {"examples": 36, "accuracy": 0.0, "loss": 4.1},
    "klToBase": 0.8,
    "samples": [{"prompt": "What?", "expected": "red square", "tuned": "red square", "base": "x"}],
}


def test_a_run_ends_when_it_is_settled_and_scored() -> None:
    assert outcome(run("Running")) is None
    assert outcome(run("Succeeded", evaluation={"phase": "Running"})) is None
    assert outcome(run("Succeeded", generation=2)) is None  # an older spec's verdict
    assert outcome(run("Succeeded", evaluation=EVALUATED)) == 0
    assert outcome(run("Succeeded")) == 0
    assert outcome(run("Failed")) == 1


def test_a_failure_says_its_reason() -> None:
    failed = run(
        "Failed",
        message="no example fits maxContextLength=16",
        conditions=[{"type": "Ready", "status": "False", "reason": "CannotSucceed"}],
    )
    assert failure(failed) == "CannotSucceed: no example fits maxContextLength=16"


def test_list_shows_phase_progress_losses_score_and_age() -> None:
    done = run(
        "Succeeded",
        progress={"percent": 100, "step": 20, "totalSteps": 20},
        metrics={"trainLoss": 0.123456, "evalLoss": 0.2},
        evaluation=EVALUATED,
    )
    rows = list_table([done, run("Pending")]).splitlines()
    assert [c.strip() for c in rows[0].split("   ") if c.strip()] == [
        "NAME",
        "PHASE",
        "PROGRESS",
        "TRAIN LOSS",
        "EVAL LOSS",
        "SCORE",
        "AGE",
    ]
    assert rows[1].split() == [
        "shapes",
        "Succeeded",
        "100%",
        "0.1235",
        "0.2",
        "100.0%",
        "(base",
        "0.0%)",
        "<unknown>",
    ]


def test_get_shows_the_evaluation_beside_the_base_the_output_and_events() -> None:
    done = run(
        "Succeeded",
        progress={"percent": 100, "step": 20, "totalSteps": 20, "epoch": 4.0},
        metrics={"trainLoss": 0.1, "evalLoss": 0.2, "bestEvalLoss": 0.15, "bestStep": 16},
        outputModel={"uri": "pvc://models/tuned/team/shapes"},
        deployment={"name": "shapes"},
        evaluation=EVALUATED,
    )
    event = {
        "type": "Normal",
        "reason": "Succeeded",
        "message": "trained 20 steps",
        "involvedObject": {"kind": "FineTuneJob", "name": "shapes"},
        "lastTimestamp": None,
    }
    shown = describe(done, [event])
    assert "pvc://models/tuned/team/shapes" in shown
    assert "100% (step 20/20, epoch 4.00)" in shown
    assert "best 0.15 at step 16" in shown
    assert "Validation:" in shown and "0.25 of the training set" in shown
    lines = shown.splitlines()
    header = next(line for line in lines if "TUNED" in line)
    assert header.split() == ["TUNED", "BASE"]
    assert next(line for line in lines if "exact match" in line).split() == [
        "exact",
        "match",
        "100.0%",
        "0.0%",
    ]
    assert "KL to base: 0.8" in shown
    assert "expected: red square" in shown
    assert "Events:" in shown and "finetunejob/shapes" in shown and "trained 20 steps" in shown


def test_the_events_of_a_run_are_its_own_its_jobs_and_their_pods() -> None:
    job = run(jobName="shapes-train", evaluation={"phase": "Running", "jobName": "shapes-evaluate"})

    def about(kind: str, name: str) -> dict[str, Any]:
        return {"involvedObject": {"kind": kind, "name": name}}

    assert related(about("FineTuneJob", "shapes"), job)
    assert related(about("Job", "shapes-train"), job)
    assert related(about("Pod", "shapes-train-0-x7k2p"), job)
    assert related(about("Pod", "shapes-evaluate-abcde"), job)
    assert not related(about("FineTuneJob", "shapes-2"), job)
    assert not related(about("Pod", "other-train-abcde"), job)
    assert not related(about("Dataset", "shapes"), job)


def script(states: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from states
    while True:
        yield states[-1]


def test_follow_prints_a_line_per_change_and_the_events_once_and_exits_0_on_success() -> None:
    states = script(
        [
            run("Pending", message="waiting for Dataset shapes"),
            # Before the trainer has counted its steps, no progress is shown.
            run(
                "Pending",
                message="waiting for Dataset shapes",
                progress={"step": 0, "totalSteps": 0},
            ),
            run(
                "Running", progress={"step": 2, "totalSteps": 10, "percent": 20, "etaSeconds": 130}
            ),
            run(
                "Running", progress={"step": 2, "totalSteps": 10, "percent": 20, "etaSeconds": 130}
            ),
            run(
                "Running",
                progress={"step": 6, "totalSteps": 10, "percent": 60, "etaSeconds": 40},
                metrics={"trainLoss": 1.5, "evalLoss": 1.7},
            ),
            run(
                "Succeeded",
                progress={"step": 10, "totalSteps": 10, "percent": 100},
                evaluation={"phase": "Running"},
            ),
            run(
                "Succeeded",
                progress={"step": 10, "totalSteps": 10, "percent": 100},
                evaluation=EVALUATED,
            ),
        ]
    )
    event = {
        "metadata": {"uid": "e1"},
        "count": 1,
        "type": "Normal",
        "reason": "Running",
        "message": "training started",
        "involvedObject": {"kind": "FineTuneJob", "name": "shapes"},
    }
    out = io.StringIO()
    job, code = follow(
        lambda: next(states), lambda job: [event], PlainView(out), sleep=lambda s: None
    )
    assert code == 0 and job["status"]["evaluation"]["phase"] == "Succeeded"
    lines = out.getvalue().splitlines()
    assert lines[0] == "event: Normal Running finetunejob/shapes: training started"
    assert lines[1:] == [
        "Pending | waiting for Dataset shapes",
        "Running | 20% (step 2/10), ETA 2m10s",
        "Running | 60% (step 6/10), ETA 40s | train loss 1.5, eval loss 1.7",
        "Succeeded | 100% (step 10/10) | evaluation Running",
        "Succeeded | 100% (step 10/10) | evaluation Succeeded",
    ]


def test_follow_exits_1_on_failure_and_gives_up_after_its_timeout() -> None:
    out = io.StringIO()
    _, code = follow(lambda: run("Failed"), lambda job: [], PlainView(out), sleep=lambda s: None)
    assert code == 1
    ticks = iter(range(100))
    with pytest.raises(CommandError, match="timed out after 3s; the run goes on: Running"):
        follow(
            lambda: run("Running"),
            lambda job: [],
            PlainView(io.StringIO()),
            timeout=3,
            clock=lambda: float(next(ticks)),
            sleep=lambda s: None,
        )
    with pytest.raises(CommandError, match="deleted"):
        follow(lambda: None, lambda job: [], PlainView(io.StringIO()), sleep=lambda s: None)


def test_on_a_terminal_follow_draws_a_bar_of_steps_with_the_losses_and_eta() -> None:
    out = io.StringIO()
    view = TerminalView(out)
    view.show(
        run(
            "Running",
            progress={"step": 3, "totalSteps": 12, "etaSeconds": 90},
            metrics={"trainLoss": 0.5},
        )
    )
    view.event("Normal Running started")
    view.close()
    text = out.getvalue()
    assert "3/12 steps" in text and "train loss 0.5" in text and "ETA 90s" in text
    assert "Normal Running started" in text
    assert jobs.state_line(run("Queued", message="admitted by no queue yet")) == (
        "Queued | admitted by no queue yet"
    )


def test_a_running_line_says_why_a_run_waits_between_trainers_and_not_while_it_trains() -> None:
    progress = {"step": 3, "totalSteps": 12}

    def ready(reason: str) -> list[dict[str, str]]:
        return [{"type": "Ready", "status": "False", "reason": reason}]

    training = run("Running", progress=progress, message="step 3/12", conditions=ready("Training"))
    assert "step 3/12" not in jobs.state_line(training).split(" | ")[2:]
    requeued = run(
        "Running",
        progress=progress,
        message="queued again in 'gpus'; waiting for Kueue",
        conditions=ready("Requeued"),
    )
    assert jobs.state_line(requeued).endswith("| queued again in 'gpus'; waiting for Kueue")
