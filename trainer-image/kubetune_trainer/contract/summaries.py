"""What a finished kubetune container tells the operator: a JSON summary in its
termination message (Kubernetes keeps 4096 bytes of it).

``kubetune train`` writes a ``TrainingSummary`` (report.json is the same plus the loss
curves), ``kubetune evaluate --config`` an ``EvaluationSummary``, ``kubetune preflight
--config`` a ``PreflightSummary``, ``kubetune validate --summary-file`` a
``ValidationSummary``. The writers use the models as they are, so a key cannot drift
from what is defined here, except ``kubetune validate``, which writes the same JSON
from its own report without importing pydantic (tests/data/test_data_report_shape.py
holds the two together); the operator reads them with ``read_summary``, which ignores
keys it does not know (a newer trainer image may add some).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from kubetune_trainer.contract import metrics
from kubetune_trainer.contract.base import CamelModel

# Re-exported: defined in limits.py, which `kubetune validate` imports without pydantic.
from kubetune_trainer.contract.limits import TERMINATION_LIMIT as TERMINATION_LIMIT


class Outcome(CamelModel):
    """What every summary says when its command failed: ``ok`` false and why."""

    ok: bool | None = None
    message: str | None = None


class TrainingFigures(CamelModel):
    """The losses and each method's own figures of a run, each with the gauge that
    shows it while the run goes on."""

    train_loss: Annotated[float | None, metrics.TRAIN_LOSS] = Field(
        None, description="Latest training loss."
    )
    eval_loss: Annotated[float | None, metrics.EVAL_LOSS] = Field(
        None, description="Latest validation loss."
    )
    best_eval_loss: Annotated[float | None, metrics.BEST_EVAL_LOSS] = Field(
        None, description="Lowest validation loss so far."
    )
    best_step: Annotated[int | None, metrics.BEST_STEP] = Field(
        None, ge=0, description="Step of the lowest validation loss."
    )
    train_reward_margin: Annotated[float | None, metrics.TRAIN_REWARD_MARGIN] = Field(
        None, description="DPO: mean reward margin (chosen minus rejected), latest logging step."
    )
    eval_reward_margin: Annotated[float | None, metrics.EVAL_REWARD_MARGIN] = Field(
        None, description="DPO: mean reward margin on the validation pairs."
    )
    train_preference_accuracy: Annotated[float | None, metrics.TRAIN_PREFERENCE_ACCURACY] = Field(
        None,
        description="DPO: share of training pairs whose chosen reply got the higher reward.",
    )
    eval_preference_accuracy: Annotated[float | None, metrics.EVAL_PREFERENCE_ACCURACY] = Field(
        None, description="DPO: share of validation pairs whose chosen reply got the higher reward."
    )
    train_kl: Annotated[float | None, metrics.TRAIN_KL] = Field(
        None, description="preserveGeneralSkills: mean per-token KL(base || tuned) in training."
    )
    eval_kl: Annotated[float | None, metrics.EVAL_KL] = Field(
        None, description="preserveGeneralSkills: mean per-token KL(base || tuned) on validation."
    )


def figure_gauges() -> dict[str, metrics.Gauge]:
    """The gauge behind each figure, by the figure's field name."""
    return {
        name: next(m for m in field.metadata if isinstance(m, metrics.Gauge))
        for name, field in TrainingFigures.model_fields.items()
    }


class TrainingSummary(Outcome, TrainingFigures):
    """``kubetune train``'s termination message: the facts of the run (a failed one
    has only ``ok``, ``phase`` and ``message``). Every field may be absent."""

    phase: Literal["Succeeded", "Failed"] | None = None
    method: str | None = None
    tuning: str | None = None
    base_model: str | None = None
    output_dir: str | None = None
    output_uri: str | None = None
    steps: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    early_stopped: bool | None = None
    resumed_from: str | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    truncated_examples: int | None = None
    dropped_examples: int | None = None
    trained_tokens: int | None = None
    train_runtime_seconds: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    peak_gpu_memory_bytes: int | None = None


class LossHistory(CamelModel):
    train: list[tuple[int, float]] = Field(default_factory=list)
    eval: list[tuple[int, float]] = Field(default_factory=list)


class TrainingReport(TrainingSummary):
    """report.json: the summary plus the loss curves (against step)."""

    history: LossHistory | None = None


class ModelScores(CamelModel):
    """One model's figures on the held-out examples (``kubetune evaluate``)."""

    examples: int | None = Field(None, ge=0, description="Held-out examples scored.")
    accuracy: float | None = Field(
        None,
        description="Share of examples whose greedy reply equals the reference (whitespace trimmed).",
    )
    loss: float | None = Field(None, description="Mean per-token loss on the reference replies.")
    preference_accuracy: float | None = Field(
        None, description="DPO: share of pairs whose chosen reply gets the higher log-probability."
    )
    reward_margin: float | None = Field(
        None, description="DPO: mean log-probability of the chosen reply minus the rejected one's."
    )


class SampleAnswer(CamelModel):
    """One held-out example and what each model answered (cut to a few hundred characters)."""

    prompt: str = Field(description="The final user turn's text.")
    expected: str = Field(description="The reference reply.")
    base: str | None = Field(None, description="The base model's reply.")
    tuned: str = Field(description="The tuned model's reply.")


class EvaluationFigures(CamelModel):
    """The tuned model beside its base on the run's held-out examples."""

    tuned: ModelScores | None = Field(None, description="The tuned model's figures.")
    base: ModelScores | None = Field(None, description="The base model's figures.")
    kl_to_base: float | None = Field(
        None,
        description="Mean per-token KL(base || tuned) on the reference replies: how far tuning "
        "moved the model.",
    )
    samples: list[SampleAnswer] | None = Field(
        None, description="A few held-out examples with the base's and the tuned model's answers."
    )


class EvaluationSummary(Outcome, EvaluationFigures):
    """``kubetune evaluate --config``'s termination message; evaluation.json beside the
    run's report.json holds the same."""


class LongestExample(CamelModel):
    """The training example with the most tokens."""

    line: int = Field(ge=0, description="Its line in the training file.")
    tokens: int = Field(ge=0, description="Its tokens, image tokens included, before any cut.")


class OverLength(CamelModel):
    """The training examples longer than maxContextLength, and what training does with them."""

    count: int = Field(ge=0, description="How many there are.")
    lines: list[int] = Field(
        default_factory=list, max_length=20, description="The first 20 of their lines."
    )
    truncated: int = Field(
        ge=0,
        description="Of them, cut to maxContextLength (the cut keeps every image token and part "
        "of the reply).",
    )
    dropped: int = Field(
        ge=0,
        description="Of them, left out: a cut would go through image tokens or leave nothing "
        "to learn.",
    )


class PreflightFigures(CamelModel):
    """What the run will train on, counted on a CPU with the base model's tokenizer and
    processor (not its weights) before its GPUs are booked."""

    examples: int | None = Field(
        None, ge=0, description="Training examples (pairs, for DPO) left after drops."
    )
    tokens: int | None = Field(
        None,
        ge=0,
        description="Their tokens in one pass, image tokens included, as they will train "
        "(after cuts).",
    )
    training_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens learned over the run (the labelled tokens of trained turns, times "
        "epochs), as hosted services bill trained tokens.",
    )
    steps: int | None = Field(
        None, ge=0, description="Optimizer steps planned (early stopping may end the run sooner)."
    )
    longest_example: LongestExample | None = Field(
        None, description="The longest training example."
    )
    over_length: OverLength | None = Field(
        None, description="Training examples longer than maxContextLength."
    )


class PreflightSummary(Outcome, PreflightFigures):
    """``kubetune preflight --config``'s termination message (and its ``--json`` output)."""


class LineProblem(CamelModel):
    line: int
    message: str


class ValidationSummary(Outcome):
    """``kubetune validate``'s report (``--json``) and, without the warnings and cut to
    fit, its termination message. A file that could not be read at all gives only
    ``valid`` false and ``error``."""

    valid: bool
    examples: int | None = None
    images: int | None = None
    text_only_examples: int | None = None
    remote_images: int | None = None
    remote_images_sha256: str | None = None
    sha256: str | None = None
    errors: list[LineProblem] = Field(default_factory=list)
    warnings: list[LineProblem] | None = None
    error_count: int | None = None
    warning_count: int | None = None
    truncated_errors: int | None = None
    truncated_warnings: int | None = None
    error: str | None = None


def dump(summary: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    """A summary as its JSON object: the fields its writer set, by their JSON names."""
    return summary.model_dump(by_alias=True, exclude_unset=True, exclude=exclude)


Summary = TypeVar("Summary", bound=BaseModel)


def read_summary(model: type[Summary], value: Any) -> Summary | None:
    """``value`` (a JSON object, or its text) as ``model``, keys it does not know
    ignored; None when it is not one (say, the log tail that FallbackToLogsOnError puts
    in the termination message after a crash)."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    known = {field.alias or name for name, field in model.model_fields.items()}
    try:
        return model.model_validate({k: v for k, v in value.items() if k in known})
    except ValidationError:
        return None
