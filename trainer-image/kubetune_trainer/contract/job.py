"""The job description the operator hands to the trainer (``job.json``), and the
exit codes of ``kubetune train``.

The FineTuneJob custom resource embeds the types below, so a field is named and
described once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from kubetune_trainer.contract.base import CamelModel, S3Uri
from kubetune_trainer.contract.limits import LIMITS, count_bounds_problem

# Re-exported: defined in limits.py, which `kubetune validate` imports without pydantic.
from kubetune_trainer.contract.limits import Task as Task
from kubetune_trainer.contract.rules import APPLICABILITY, broken

Method = Literal["sft", "dpo"]
Tuning = Literal["lora", "full"]

# Defaults a hosted service picks for a small VLM. LoRA and DPO settings have no
# schema default because the CRD forbids them where they do not apply; the trainer
# fills them in with Hyperparameters.resolved().
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_ALPHA = 32
DEFAULT_LORA_DROPOUT = 0.05
DEFAULT_DPO_BETA = 0.1

# `kubetune train` exit codes. The operator's training Job fails at once on the final
# ones rather than spend its retries, each a GPU pod loading the model again.
EXIT_FAILED = 1  # may succeed when run again: a crash, a lost node, storage away
EXIT_INVALID_JOB = 2  # job.json unreadable or not a valid TrainingConfig
EXIT_CANNOT_SUCCEED = 3  # the job as written cannot succeed: its data or settings
FINAL_EXIT_CODES = (EXIT_INVALID_JOB, EXIT_CANNOT_SUCCEED)


class Hyperparameters(CamelModel):
    """Training hyperparameters. Omitted fields take the documented defaults."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training set.")
    batch_size: int = Field(
        4, ge=1, le=4096, description="Examples per device per optimizer micro-step."
    )
    learning_rate: float = Field(
        1e-4, gt=0, le=1, description="Peak learning rate of the linear schedule (after warmup)."
    )
    lora_rank: int | None = Field(
        None, ge=1, le=1024, description="LoRA rank r. Only with tuning: lora. Default 8."
    )
    lora_alpha: int | None = Field(
        None, ge=1, le=4096, description="LoRA scaling alpha. Only with tuning: lora. Default 32."
    )
    lora_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout on the LoRA path. Only with tuning: lora. Default 0.05.",
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None,
        max_length=256,
        description=(
            "Module names (or name suffixes) that get LoRA adapters. Only with tuning: lora. "
            "Default: every linear layer of the language model; the vision tower stays frozen "
            "unless its modules are named here."
        ),
    )
    max_context_length: int = Field(
        2048,
        ge=16,
        le=1048576,
        description=(
            "Longest tokenized example, image tokens included. Longer examples are truncated "
            "without cutting through image tokens, or dropped with a counted warning."
        ),
    )
    warmup_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fraction of the training steps spent warming up the learning rate.",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="Micro-steps accumulated into one optimizer step."
    )
    group_by_length: bool = Field(
        True,
        description=(
            "Batch together examples of similar length (image tokens included) so that less "
            "padding is computed; the batches come in random order and each example is still "
            "seen once per epoch. false: batches of examples drawn at random."
        ),
    )
    score_trained_tokens_only: bool = Field(
        True,
        description=(
            "SFT: run the LM head only at the positions whose next token is trained (the "
            "assistant's), not at image, prompt and padding positions; the loss and its "
            "gradients are the same. false: TRL's loss, which off Triton GPUs scores every "
            "position."
        ),
    )
    padding_free: bool = Field(
        True,
        description=(
            "SFT with scoreTrainedTokensOnly: run each batch as one row of its examples laid "
            "end to end, each with its own positions and attention, so that no padding is "
            "computed; the loss and its gradients are the same. Applies to the model families "
            "it is tested on (Qwen2.5-VL, LLaVA, Qwen2, Llama) with sdpa attention; others "
            "train padded. false: padded batches."
        ),
    )
    activation_checkpointing: bool | None = Field(
        None,
        description=(
            "Recompute activations in the backward pass instead of keeping them: far less "
            "GPU memory for long examples and large batches, at about a third more compute. "
            "Default: on on GPUs, off on CPUs."
        ),
    )
    max_pixels: int = Field(
        401408,
        ge=784,
        le=100_000_000,
        description="Images are resized so that width x height is at most this, keeping the aspect ratio.",
    )
    beta: float | None = Field(
        None, gt=0, le=100, description="DPO temperature beta. Only with method: dpo. Default 0.1."
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**31 - 1,
        description="Seed for initialisation, shuffling and the validation split.",
    )
    logging_steps: int = Field(
        10, ge=1, le=1_000_000, description="Optimizer steps between log lines and metric updates."
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Evaluate every N optimizer steps as well as at the end of each epoch. Default: once per epoch.",
    )
    save_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Write a resumable checkpoint every N optimizer steps as well as at each evaluation.",
    )

    def resolved(self, method: Method, tuning: Tuning) -> Self:
        """A copy with the method- and tuning-specific defaults filled in."""
        updates: dict[str, object] = {}
        if tuning == "lora":
            updates["lora_rank"] = self.lora_rank or DEFAULT_LORA_RANK
            updates["lora_alpha"] = self.lora_alpha or DEFAULT_LORA_ALPHA
            updates["lora_dropout"] = (
                DEFAULT_LORA_DROPOUT if self.lora_dropout is None else self.lora_dropout
            )
        if method == "dpo":
            updates["beta"] = self.beta or DEFAULT_DPO_BETA
        return self.model_copy(update=updates)


class PreserveGeneralSkills(CamelModel):
    """Keep the base model's general behaviour while tuning (sft only): adds
    lambda * T^2 * KL(base || tuned) over the assistant tokens to the loss."""

    enabled: bool = Field(
        False, description="Add the distillation term towards the frozen base model."
    )
    lambda_: float = Field(
        0.5, alias="lambda", ge=0, le=1000, description="Weight of the KL term; 0 turns it off."
    )
    temperature: float = Field(
        2.0, gt=0, le=100, description="Softmax temperature T of both distributions."
    )


class EarlyStopping(CamelModel):
    """Stop when the validation loss has not improved for `patience` evaluations;
    the best checkpoint is the one exported."""

    patience: int = Field(
        3, ge=1, le=1000, description="Evaluations without improvement before stopping."
    )


def _limit(name: str) -> Any:
    limit = LIMITS[name]
    bounds: dict[str, Any] = {"ge": limit.ge, "le": limit.le}
    return Field(
        limit.default,
        description=limit.description,
        **{key: value for key, value in bounds.items() if value is not None},
    )


class DatasetLimits(CamelModel):
    """Bounds a dataset must keep to be Ready."""

    # Defaults, bounds and descriptions are in limits.LIMITS (see there why).
    min_examples: int = _limit("min_examples")
    max_examples: int = _limit("max_examples")
    max_images_per_example: int = _limit("max_images_per_example")
    max_image_bytes: int = _limit("max_image_bytes")
    allow_remote_images: bool = _limit("allow_remote_images")

    @model_validator(mode="after")
    def _min_le_max(self) -> Self:
        problem = count_bounds_problem(self.min_examples, self.max_examples)
        if problem:
            raise ValueError(problem)
        return self


class TrainValidation(CamelModel):
    """Where validation examples come from: a separate file or a seeded split."""

    dataset: str | None = Field(None, description="Path of a validation JSONL file.")
    image_root: str | None = Field(
        None,
        description="Where the validation file's relative image paths resolve. Default: its folder.",
    )
    limits: DatasetLimits = Field(
        default_factory=DatasetLimits,
        description="The validation Dataset's limits, which the file is read under.",
    )
    split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of the training set held out for validation."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.dataset is None) == (self.split is None):
            raise ValueError("validation needs exactly one of dataset or split")
        return self


class TrainingConfig(CamelModel):
    """Everything `kubetune train --config job.json` needs; the same file runs in the
    cluster's GPU pod and on a laptop."""

    base_model: str = Field(
        min_length=1, description="Local path or model hub id of the base model."
    )
    method: Method = "sft"
    tuning: Tuning = "lora"
    preserve_general_skills: PreserveGeneralSkills = Field(default_factory=PreserveGeneralSkills)
    dataset: str = Field(min_length=1, description="Path of the training JSONL file.")
    dataset_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="When set, the trainer refuses a dataset file whose SHA-256 differs.",
    )
    image_root: str | None = Field(
        None, description="Relative image paths resolve here. Default: the dataset's folder."
    )
    dataset_limits: DatasetLimits = Field(
        default_factory=DatasetLimits,
        description=(
            "The training Dataset's limits: training reads the file under the rules its "
            "validation approved it by."
        ),
    )
    remote_images: str | None = Field(
        None,
        description=(
            "The folder that the step before the run fetched the http(s) images of both "
            "files into (`kubetune fetch-images`): training reads them there and opens no "
            "connection."
        ),
    )
    validation: TrainValidation | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    early_stopping: EarlyStopping | None = None
    output_dir: str = Field(
        min_length=1, description="Where the adapter or weights, report.json and loss.png go."
    )
    output_uri: S3Uri | None = Field(
        None,
        description=(
            "When set, the exported model (outputDir without its checkpoints) is copied to "
            "this s3:// prefix after training; credentials come from the AWS_* environment."
        ),
    )
    checkpoint_dir: str | None = Field(
        None, description="Where resumable checkpoints go. Default: <outputDir>/checkpoints."
    )
    checkpoint_uri: S3Uri | None = Field(
        None,
        description=(
            "When set, each checkpoint is copied to this s3:// prefix as it is written, "
            "and a run whose checkpointDir has none (a pod on a fresh disk) resumes from "
            "the latest copy. Removed when the run has succeeded."
        ),
    )
    resume: bool = Field(
        True,
        description=(
            "Resume from the latest checkpoint in checkpointDir (or, with checkpointUri, "
            "its latest copy there) if one exists."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model repository to run."
    )
    metrics_port: int = Field(
        9090, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it."
    )
    termination_log: str = Field(
        "/dev/termination-log",
        description="Where the final JSON summary is written, if that path is writable.",
    )

    @model_validator(mode="after")
    def _applicable_fields(self) -> Self:
        # Rules the job needs to be well formed; contract/rules.py's REQUIREMENTS are
        # checked when it runs.
        problems = broken(APPLICABILITY, self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def effective_checkpoint_dir(self) -> str:
        return self.checkpoint_dir or f"{self.output_dir.rstrip('/')}/checkpoints"
