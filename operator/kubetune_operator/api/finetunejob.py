"""The FineTuneJob custom resource: one fine-tuning run, from dataset to served model."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

from kubetune_operator.api.common import (
    AGE_COLUMN,
    Condition,
    CrdInfo,
    Image,
    LocalObjectRef,
    ModelRef,
    Name,
    PrinterColumn,
    PvcLocation,
    Resources,
    S3Location,
    Text,
)
from kubetune_operator.api.modeldeployment import Runtime
from kubetune_trainer.contract.base import CamelModel
from kubetune_trainer.contract.job import (
    EarlyStopping,
    Hyperparameters,
    Method,
    PreserveGeneralSkills,
    Tuning,
)
from kubetune_trainer.contract.rules import RULES, cel_rule
from kubetune_trainer.contract.summaries import (
    EvaluationFigures,
    PreflightFigures,
    TrainingFigures,
)


class JobPhase(StrEnum):
    PENDING = "Pending"
    WAITING_FOR_DATASET = "WaitingForDataset"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


# A run in one of these has ended for good: its spec's fields that define the run are
# immutable, so only deploy can change what follows from it.
FINISHED = frozenset({JobPhase.SUCCEEDED, JobPhase.FAILED})

_EXACTLY_ONE = "[{}].filter(x, x).size() == 1"


class Validation(CamelModel):
    """Where validation examples come from: a separate Dataset or a split of the
    training set, not both."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.dataset) != has(self.split)",
                    "message": "validation needs exactly one of dataset or split, not both",
                }
            ]
        }
    )

    dataset: LocalObjectRef | None = Field(
        None, description="A Dataset holding the validation examples."
    )
    split: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction of the training set held out, strictly between 0 and 1.",
    )


class OutputStorage(CamelModel):
    """Where the adapter or weights are written. Exactly one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": _EXACTLY_ONE.format("has(self.pvc), has(self.s3)"),
                    "message": "outputModel.storage needs exactly one of pvc or s3",
                }
            ]
        }
    )

    pvc: PvcLocation | None = Field(
        None, description="A folder on a PersistentVolumeClaim (also holds checkpoints)."
    )
    s3: S3Location | None = Field(None, description="An S3 prefix.")


class OutputModel(CamelModel):
    """The tuned model."""

    name: Name | None = Field(
        None,
        description="Name of the tuned model; the adapter's served name. Default: the "
        "FineTuneJob's name.",
    )
    storage: OutputStorage | None = Field(
        None,
        description="Where the output goes. Default: the cluster's model store (the chart "
        "value defaults.modelStore), at <store>/<namespace>/<FineTuneJob name>.",
    )


class Deploy(CamelModel):
    """Serve the tuned model when training succeeds, through a ModelDeployment."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.modelDeployment) || !has(self.runtime)",
                    "message": "deploy.runtime is the shared ModelDeployment's to set, not "
                    "the job's",
                }
            ]
        }
    )

    enabled: bool = Field(False, description="Serve the result when the job Succeeds.")
    model_deployment: Name | None = Field(
        None,
        description=(
            "Attach the adapter (named outputModel.name) to this running ModelDeployment, "
            "which must serve the same base model, instead of starting a server of its own."
        ),
    )
    replicas: int = Field(1, ge=0, le=1000, description="Server pods.")
    runtime: Runtime | None = Field(
        None, description="The vLLM server settings. Default: the ModelDeployment defaults."
    )


class Preflight(CamelModel):
    """Count what the run will train on before its GPUs are booked: a Job of one CPU pod
    (`kubetune preflight`) with the base model's tokenizer and processor, not its
    weights, once the Datasets are Ready."""

    enabled: bool = Field(
        True,
        description="Run the pre-flight before the training Job (status.preflight); false "
        "starts training without it.",
    )


class PreflightPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class PreflightStatus(PreflightFigures):
    """Tokens, steps and over-length examples, counted before training."""

    phase: PreflightPhase = Field(description="Running, Succeeded or Failed.")
    message: Text | None = Field(None, description="Where it stands, or why it failed.")
    job_name: Name | None = Field(None, description="Name of the pre-flight Job.")


class Evaluation(CamelModel):
    """Score the tuned model against its base on the held-out examples (the validation
    Dataset or split) when training succeeds, in an evaluation Job of one pod on the
    run's GPU type."""

    enabled: bool = Field(
        True,
        description="Score the run when it succeeds (a run without validation data is not scored).",
    )
    max_examples: int = Field(
        200, ge=1, le=100_000, description="Score at most this many held-out examples."
    )


class EvaluationPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"


class EvaluationStatus(EvaluationFigures):
    """The tuned model beside its base on the held-out examples."""

    phase: EvaluationPhase = Field(description="Running, Succeeded, Failed or Skipped.")
    message: Text | None = Field(None, description="Why it failed or was skipped.")
    job_name: Name | None = Field(None, description="Name of the evaluation Job.")


# Rules across the spec's fields, as CEL (they are written once, in the contract).
SPEC_RULES: tuple[dict[str, str], ...] = tuple(cel_rule(rule) for rule in RULES)


class TrainingResources(Resources):
    """Compute for the training pods."""

    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Training nodes (pods), data-parallel with the GPUs on each (torchrun). More "
            "than 1 needs the dataset and the output on storage every node can mount (a "
            "ReadWriteMany PersistentVolumeClaim, or S3)."
        ),
    )


class FineTuneJobSpec(CamelModel):
    """One fine-tuning run: a base model, a Dataset, a method and its settings."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [dict(r) for r in SPEC_RULES]}
    )

    display_name: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        None, description="A name for people; editable."
    )
    base_model: ModelRef = Field(description="The model to tune. Immutable.")
    method: Method = Field(
        "sft", description="sft (supervised fine-tuning) or dpo (preference tuning). Immutable."
    )
    tuning: Tuning = Field(
        "lora", description="lora (adapters) or full (all parameters). Immutable."
    )
    preserve_general_skills: PreserveGeneralSkills | None = Field(
        None,
        description="Keep the base model's general behaviour by a KL term towards it (sft only). Immutable.",
    )
    dataset: LocalObjectRef = Field(description="The training Dataset. Immutable.")
    validation: Validation | None = Field(None, description="Validation data. Immutable.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters,
        json_schema_extra={"default": {}},
        description="Training hyperparameters. Immutable.",
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop when the validation loss stops improving. Immutable."
    )
    output_model: OutputModel = Field(
        default_factory=OutputModel,
        json_schema_extra={"default": {}},
        description="Where the tuned model goes; optional where the cluster has a default "
        "model store. Immutable.",
    )
    resources: TrainingResources = Field(
        default_factory=TrainingResources,
        json_schema_extra={"default": {}},
        description="Compute for the training pods.",
    )
    queue_name: Name | None = Field(
        None, description="Kueue LocalQueue; the Job is admitted by Kueue."
    )
    deploy: Deploy | None = Field(None, description="Serve the result; editable.")
    preflight: Preflight = Field(
        default_factory=Preflight,
        json_schema_extra={"default": {}},
        description="Count tokens, steps and over-length examples on a CPU before the GPU "
        "Job; read until the training Job exists.",
    )
    evaluation: Evaluation = Field(
        default_factory=Evaluation,
        json_schema_extra={"default": {}},
        description="Score the tuned model against its base when training succeeds; read "
        "when it succeeds.",
    )
    image: Image | None = Field(
        None, description="Trainer image. Default: the operator's trainer image."
    )
    suspend: bool = Field(
        False, description="Suspend the training Job; false resumes it. Editable."
    )


class Progress(CamelModel):
    """Training progress, read from the trainer's metrics."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(None, ge=0, description="Epochs done (fractional).")
    percent: int | None = Field(None, ge=0, le=100, description="step / totalSteps, in percent.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds left.")


class TrainingMetrics(TrainingFigures):
    """Losses and the method's own figures, read from the trainer's metrics while it
    runs and from its final summary at the end (the best evaluation's, where kept)."""


class OutputModelStatus(CamelModel):
    """Where the tuned model was written."""

    uri: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        None, description="pvc://claim/path or s3://bucket/prefix of the adapter or weights."
    )


class DeploymentRef(CamelModel):
    """The ModelDeployment serving the result."""

    name: Name | None = Field(None, description="Name of the ModelDeployment.")


class FineTuneJobStatus(CamelModel):
    """Where the run stands."""

    phase: JobPhase = Field(
        JobPhase.PENDING,
        description="Pending, WaitingForDataset, Queued, Running, Succeeded, Failed or Suspended.",
    )
    message: Text | None = Field(
        None, description="A one-line summary of the phase, with the reason on failure."
    )
    job_name: Name | None = Field(None, description="Name of the training Job.")
    dataset_sha256: str | None = Field(
        None, max_length=64, description="SHA-256 of the dataset this run trains on."
    )
    start_time: str | None = Field(None, description="When training started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run ended (RFC 3339).")
    progress: Progress | None = Field(None, description="Training progress.")
    metrics: TrainingMetrics | None = Field(None, description="Training and validation losses.")
    output_model: OutputModelStatus | None = Field(
        None, description="Where the tuned model was written."
    )
    deployment: DeploymentRef | None = Field(
        None, description="The ModelDeployment serving the result."
    )
    preflight: PreflightStatus | None = Field(
        None, description="What the run trains on, counted before its GPUs were booked."
    )
    evaluation: EvaluationStatus | None = Field(
        None, description="The tuned model against its base on the held-out examples."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready and other conditions."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation last acted on."
    )


# The fields that define a training run cannot change after creation; suspend,
# displayName, resources, queueName and deploy stay editable.
IMMUTABLE_FIELDS = (
    "baseModel",
    "method",
    "tuning",
    "preserveGeneralSkills",
    "dataset",
    "validation",
    "hyperparameters",
    "earlyStopping",
    "outputModel",
)
TRANSITION_RULES: tuple[dict[str, str], ...] = tuple(
    {
        "rule": f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
        "message": f"{f} is immutable: create a new FineTuneJob to train with other settings",
        "fieldPath": f".{f}",
    }
    for f in IMMUTABLE_FIELDS
)

FINE_TUNE_JOB = CrdInfo(
    kind="FineTuneJob",
    plural="finetunejobs",
    singular="finetunejob",
    short_names=("ftj",),
    description="A fine-tuning run of a VLM or LLM: SFT (LoRA or full), DPO or skill-preserving SFT.",
    spec=FineTuneJobSpec,
    status=FineTuneJobStatus,
    printer_columns=(
        PrinterColumn("Phase", ".status.phase", "string", "Where the run stands."),
        PrinterColumn(
            "Progress", ".status.progress.percent", "integer", "Percent of training steps done."
        ),
        PrinterColumn("Train Loss", ".status.metrics.trainLoss", "number", "Latest training loss."),
        PrinterColumn("Eval Loss", ".status.metrics.evalLoss", "number", "Latest validation loss."),
        PrinterColumn(
            "Tokens",
            ".status.preflight.trainingTokens",
            "integer",
            "Tokens the run learns from (the pre-flight's count, over all epochs).",
        ),
        PrinterColumn(
            "Score",
            ".status.evaluation.tuned.accuracy",
            "number",
            "The tuned model's exact match on the held-out examples (0 to 1).",
        ),
        PrinterColumn(
            "Base Score",
            ".status.evaluation.base.accuracy",
            "number",
            "The base model's exact match on the same examples.",
            priority=1,
        ),
        PrinterColumn("Model", ".spec.baseModel.name", "string", "Base model.", priority=1),
        AGE_COLUMN,
    ),
    spec_transition_rules=TRANSITION_RULES,
)
