"""``kubetune train``, ``kubetune preflight`` and ``kubetune evaluate``.

torch, transformers and TRL are imported inside the command functions only: the CLI
imports this module at start-up, and ``kubetune validate`` must stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kubetune_trainer.contract.job import EXIT_INVALID_JOB, Hyperparameters, TrainingConfig

_DEFAULT_MAX_PIXELS = Hyperparameters.model_fields["max_pixels"].default


def register(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune a model as a job file says",
        description="Run the training job described by a TrainingConfig JSON file (the job.json "
        "the operator mounts): the same command in the cluster and on a laptop.",
    )
    train.add_argument(
        "--config", required=True, metavar="PATH", help="the TrainingConfig JSON file"
    )
    train.set_defaults(func=train_command)

    preflight = sub.add_parser(
        "preflight",
        help="count what a job will train on, before it trains",
        description="Plan a TrainingConfig's data as its training will, with the base model's "
        "tokenizer and processor only (not its weights, no GPU), and report the training "
        "examples left, their tokens (image tokens included), the tokens learned over the run, "
        "the optimizer steps, the longest example and those longer than maxContextLength "
        "(truncated or dropped). The summary also goes to the job's terminationLog. Exits 3 "
        "when the job cannot succeed: a bad line, nothing that fits, a chat template that "
        "cannot mark the assistant's turns.",
    )
    preflight.add_argument(
        "--config", required=True, metavar="PATH", help="the TrainingConfig JSON file"
    )
    preflight.add_argument(
        "--processes",
        type=_positive,
        default=1,
        metavar="N",
        help="training processes that share the batches (GPUs times nodes) (1)",
    )
    preflight.add_argument("--json", action="store_true", help="print the summary as JSON")
    preflight.set_defaults(func=preflight_command)

    evaluate = sub.add_parser(
        "evaluate",
        help="score a model's replies against a dataset",
        description="Generate the reply to each example's final user turn and report exact-match "
        "accuracy (whitespace trimmed) and the mean loss on the reference replies; on preference "
        "data also preferenceAccuracy (pairs where the chosen reply gets the higher log-probability) "
        "and rewardMargin (mean log-probability margin). With --adapter or --base, the base model's "
        "figures too and klToBase (mean per-token KL from the base on the reference replies). "
        "With --config instead of --model and --data: a finished run's output against its base "
        "on the run's held-out examples, written to evaluation.json beside its report.json.",
    )
    evaluate.add_argument(
        "--config",
        metavar="PATH",
        help="a finished run's TrainingConfig JSON file (job.json): score its output",
    )
    evaluate.add_argument(
        "--max-examples",
        type=int,
        default=200,
        metavar="N",
        help="with --config: score at most N held-out examples (200)",
    )
    evaluate.add_argument("--model", metavar="PATH", help="model folder or hub id")
    evaluate.add_argument(
        "--adapter", metavar="PATH", help="a LoRA adapter (PEFT format) for the model"
    )
    evaluate.add_argument(
        "--base",
        metavar="PATH",
        help="the base model of a fully tuned --model, to report klToBase and the base's figures",
    )
    evaluate.add_argument("--data", metavar="FILE.jsonl", help="examples to score")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="reply length cap (64)"
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="examples per batch (8)"
    )
    evaluate.add_argument(
        "--max-pixels",
        type=int,
        default=_DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"resize images to at most N pixels, as in training ({_DEFAULT_MAX_PIXELS})",
    )
    evaluate.add_argument(
        "--image-root", metavar="DIR", help="where relative image paths resolve (the data's folder)"
    )
    evaluate.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model folder"
    )
    evaluate.set_defaults(func=evaluate_command)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Tokenizers would warn at every dataloader worker fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()  # per-file save/load bars; our log lines suffice


def read_job(command: str, path: str) -> TrainingConfig | None:
    """job.json as a TrainingConfig, or None after saying why it is not one."""
    from pydantic import ValidationError

    try:
        return TrainingConfig.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        print(f"kubetune {command}: cannot read {path}: {exc.strerror}", file=sys.stderr)
    except ValidationError as exc:
        print(f"kubetune {command}: {path} is not a valid job:\n{exc}", file=sys.stderr)
    return None


def train_command(args: argparse.Namespace) -> int:
    config = read_job("train", args.config)
    if config is None:
        return EXIT_INVALID_JOB
    _quiet_libraries()
    from kubetune_trainer.training.runner import run

    return run(config)


def preflight_command(args: argparse.Namespace) -> int:
    config = read_job("preflight", args.config)
    if config is None:
        return EXIT_INVALID_JOB
    _quiet_libraries()
    from kubetune_trainer.contract.summaries import dump
    from kubetune_trainer.training.preflight import describe, run

    code, summary = run(config, processes=args.processes)
    if args.json:
        print(json.dumps(dump(summary)))
    elif summary.ok:  # a failure's message is in the log already
        print("\n".join(describe(summary, config)))
    return code


def evaluate_command(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.model or args.data or args.adapter or args.base:
            print(
                "kubetune evaluate: --config takes the model and data from the job; "
                "drop --model, --data, --adapter and --base",
                file=sys.stderr,
            )
            return EXIT_INVALID_JOB
        return evaluate_run_command(args)
    if not (args.model and args.data):
        print("kubetune evaluate: give --model and --data, or --config", file=sys.stderr)
        return EXIT_INVALID_JOB
    if args.adapter and args.base:
        print("kubetune evaluate: give either --adapter or --base, not both", file=sys.stderr)
        return EXIT_INVALID_JOB
    _quiet_libraries()
    from kubetune_trainer.data import DatasetError
    from kubetune_trainer.training.evaluate import evaluate

    try:
        result = evaluate(
            model_path=args.model,
            adapter=args.adapter,
            base_path=args.base,
            data=args.data,
            image_root=args.image_root,
            max_pixels=args.max_pixels,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            trust_remote_code=args.trust_remote_code,
        )
    except (DatasetError, OSError) as exc:
        print(f"kubetune evaluate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    _print_scores("model", result, result.get("base"), result.get("klToBase"))
    return 0


def _print_scores(
    name: str, tuned: dict[str, Any], base: dict[str, Any] | None, kl: float | None
) -> None:
    for who, scores in ((name, tuned), ("base", base)):
        if scores:
            loss = "-" if scores.get("loss") is None else f"{scores['loss']:.4f}"
            line = f"{who}: {scores['examples']} examples, accuracy {scores['accuracy']:.1%}, loss {loss}"
            if scores.get("preferenceAccuracy") is not None:
                line += (
                    f", preference accuracy {scores['preferenceAccuracy']:.1%},"
                    f" reward margin {scores['rewardMargin']:.4f}"
                )
            if who == name and kl is not None:
                line += f", KL to base {kl:.4f}"
            print(line)


def evaluate_run_command(args: argparse.Namespace) -> int:
    """A finished run's output against its base; the outcome also goes to the
    termination log, as ``kubetune train``'s does."""
    config = read_job("evaluate", args.config)
    if config is None:
        return EXIT_INVALID_JOB
    _quiet_libraries()
    from kubetune_trainer.contract.job import EXIT_CANNOT_SUCCEED, EXIT_FAILED
    from kubetune_trainer.contract.summaries import EvaluationSummary
    from kubetune_trainer.data import DatasetError
    from kubetune_trainer.training.evaluate_run import as_json, evaluate_run, write_outcome
    from kubetune_trainer.training.inputs import JobError
    from kubetune_trainer.transfer import FetchError

    try:
        summary = evaluate_run(
            config,
            max_examples=args.max_examples,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
    except (DatasetError, JobError, FetchError, OSError) as exc:
        print(f"kubetune evaluate: {exc}", file=sys.stderr)
        write_outcome(config, EvaluationSummary(ok=False, message=str(exc)[-400:]))
        return EXIT_CANNOT_SUCCEED if isinstance(exc, DatasetError | JobError) else EXIT_FAILED
    write_outcome(config, summary)
    result = as_json(summary)
    if args.json:
        print(json.dumps(result))
    else:
        _print_scores("tuned", result["tuned"], result.get("base"), result.get("klToBase"))
    return 0
