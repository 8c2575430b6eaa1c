"""``kubetune evaluate --config job.json``: a finished run's tuned model beside its base,
on the run's own held-out examples (its validation file, or the same seeded split that
training held out), in the evaluation Job the operator starts when the run succeeds.

It writes evaluation.json beside the run's report.json (and to the run's S3 prefix) and
the same, cut to fit, as its termination message, which the operator turns into
``status.evaluation``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.contract.job import TrainingConfig
from kubetune_trainer.contract.summaries import EvaluationSummary, ModelScores, SampleAnswer
from kubetune_trainer.data.example import Example
from kubetune_trainer.training.evaluate import (
    Evaluation,
    Preference,
    Scores,
    load_scorer,
    with_references,
)
from kubetune_trainer.training.evaluate import score_examples as score_all
from kubetune_trainer.training.images import run_image_rules
from kubetune_trainer.training.inputs import JobError
from kubetune_trainer.training.report import write_json, write_termination_log
from kubetune_trainer.training.runner import split_data, verify_dataset
from kubetune_trainer.transfer import fetch_s3, upload_s3

log = logging.getLogger("kubetune.evaluate")

EVALUATION_FILE = "evaluation.json"
SAMPLES = 5  # sample answers in evaluation.json
MESSAGE_SAMPLES = 3  # and in the termination message, each text cut to MESSAGE_TEXT
MESSAGE_TEXT = 160


def model_scores(scores: Scores, pref: Preference | None) -> ModelScores:
    return ModelScores(
        examples=scores.examples,
        accuracy=scores.accuracy,
        loss=scores.loss,
        preference_accuracy=pref.accuracy if pref is not None else None,
        reward_margin=pref.margin if pref is not None else None,
    )


def summary_of(evaluation: Evaluation, examples: Sequence[Example]) -> EvaluationSummary:
    """The figures side by side, and the first examples with each model's answer."""
    base = evaluation.base
    samples = [
        SampleAnswer(
            prompt=example.prompt[-1].text if example.prompt else "",
            expected=example.chosen.text,
            base=base.replies[i] if base is not None and i < len(base.replies) else None,
            tuned=reply,
        )
        for i, (example, reply) in enumerate(zip(examples, evaluation.tuned.replies, strict=False))
    ]
    return EvaluationSummary(
        ok=True,
        tuned=model_scores(evaluation.tuned, evaluation.tuned_preference),
        base=model_scores(base, evaluation.base_preference) if base is not None else None,
        kl_to_base=evaluation.kl_to_base,
        samples=samples,
    )


def message_of(summary: EvaluationSummary) -> EvaluationSummary:
    """The summary cut to fit a termination message: fewer samples, shorter texts."""

    def cut(text: str | None) -> str | None:
        return None if text is None else text[:MESSAGE_TEXT]

    samples = [
        SampleAnswer(
            prompt=cut(s.prompt) or "",
            expected=cut(s.expected) or "",
            base=cut(s.base),
            tuned=cut(s.tuned) or "",
        )
        for s in (summary.samples or [])[:MESSAGE_SAMPLES]
    ]
    return summary.model_copy(update={"samples": samples})


def evaluate_run(
    config: TrainingConfig, *, max_examples: int, max_new_tokens: int, batch_size: int
) -> EvaluationSummary:
    """Score the run's output and its base on at most ``max_examples`` held-out
    examples, and write evaluation.json where the run's output is."""
    if config.validation is None:
        raise JobError("the run has no validation data to score on")
    verify_dataset(config)
    _, _, held_out, root = split_data(config)
    held_out = with_references(held_out)[:max_examples]
    if not held_out:
        raise JobError("the run's validation data holds no examples")
    output = Path(config.output_dir)
    if config.output_uri:
        # A fresh pod: the run's output is in S3 only.
        fetch_s3(config.output_uri.rstrip("/") + "/", output)
    if config.tuning == "lora":
        model, adapter, base = config.base_model, str(output), None
    else:
        model, adapter, base = str(output), None, config.base_model
    log.info("scoring %s against its base on %d held-out examples", output, len(held_out))
    scorer = load_scorer(
        model,
        adapter=adapter,
        base_path=base,
        max_pixels=config.hyperparameters.max_pixels,
        trust_remote_code=config.trust_remote_code,
        rules=run_image_rules(config),
    )
    evaluation = score_all(
        scorer,
        held_out,
        root,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        keep=SAMPLES,
    )
    summary = summary_of(evaluation, held_out)
    _write(config, summary)
    return summary


def as_json(summary: EvaluationSummary) -> dict[str, Any]:
    """The summary's JSON object, without the figures that do not apply (a preference
    accuracy on SFT data, a base where there is none)."""
    return summary.model_dump(by_alias=True, exclude_none=True)


def _write(config: TrainingConfig, summary: EvaluationSummary) -> None:
    """evaluation.json beside report.json, and in the run's S3 prefix when it has one."""
    if not config.output_uri:
        write_json(Path(config.output_dir) / EVALUATION_FILE, as_json(summary))
        return
    with tempfile.TemporaryDirectory() as folder:
        write_json(Path(folder) / EVALUATION_FILE, as_json(summary))
        upload_s3(Path(folder), config.output_uri)


def write_outcome(config: TrainingConfig, summary: EvaluationSummary) -> bool:
    return write_termination_log(config.termination_log, as_json(message_of(summary)))
