"""The Dataset custom resource: where a chat-JSONL file lives and how it is checked."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from kubetune_operator.api.common import (
    AGE_COLUMN,
    Condition,
    CrdInfo,
    HttpUrl,
    Name,
    PrinterColumn,
    PvcLocation,
    RelativePath,
    S3Location,
    SecretRef,
    Text,
)
from kubetune_trainer.contract.base import CamelModel
from kubetune_trainer.contract.job import DatasetLimits, Task


class DatasetPhase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    READY = "Ready"
    INVALID = "Invalid"
    FAILED = "Failed"


# Validation has settled: nothing changes until the spec does.
VALIDATED = frozenset({DatasetPhase.READY, DatasetPhase.INVALID, DatasetPhase.FAILED})
DatasetFormat = Literal["auto", "placeholder", "content-parts"]


class HttpSource(CamelModel):
    """A JSONL file served over http(s)."""

    url: HttpUrl = Field(description="URL of the JSONL file.")


class ConfigMapSource(CamelModel):
    """A small JSONL file kept in a ConfigMap (handy for tries; no storage needed)."""

    name: Name = Field(description="Name of the ConfigMap.")
    key: Annotated[
        str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    ] = Field(description="Key holding the JSONL text.")


class HuggingFaceSource(CamelModel):
    """A file in a model hub dataset repository."""

    repo: Annotated[
        str, StringConstraints(min_length=1, max_length=256, pattern=r"^[\w.-]+(/[\w.-]+)?$")
    ] = Field(description="Repository id, e.g. org/name.")
    file: RelativePath = Field(description="Path of the JSONL file in the repository.")
    revision: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="Branch, tag or commit. Default: main."
    )
    token_secret_ref: SecretRef | None = Field(
        None, description="Secret with HF_TOKEN for private repositories."
    )


class DatasetSource(CamelModel):
    """Where the JSONL file is. Exactly one source."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.pvc), has(self.s3), has(self.http), has(self.configMap), "
                    "has(self.huggingFace)].filter(x, x).size() == 1",
                    "message": "source needs exactly one of pvc, s3, http, configMap or huggingFace",
                }
            ]
        }
    )

    pvc: PvcLocation | None = Field(
        None, description="The JSONL file on a PersistentVolumeClaim; path is the file."
    )
    s3: S3Location | None = Field(None, description="The JSONL object in S3.")
    http: HttpSource | None = Field(None, description="The JSONL file at an http(s) URL.")
    config_map: ConfigMapSource | None = Field(
        None, description="The JSONL text in a ConfigMap key."
    )
    hugging_face: HuggingFaceSource | None = Field(
        None, description="The JSONL file in a hub dataset repository."
    )


class DatasetSpec(CamelModel):
    """A chat-JSONL dataset for fine-tuning: placeholder style (`<image>` plus an
    images list) or OpenAI-style content parts, or preference pairs for DPO."""

    source: DatasetSource = Field(description="Where the JSONL file is. Exactly one source.")
    image_root: RelativePath | None = Field(
        None,
        description=(
            "Folder that relative image paths resolve in, relative to the source's volume. "
            "Default: the JSONL file's folder. Paths never escape it."
        ),
    )
    format: DatasetFormat = Field(
        "auto",
        description=(
            "auto (detected per line), placeholder (`<image>` in text plus an images list, as "
            "ms-swift and Model Studio use) or content-parts (OpenAI-style image_url parts)."
        ),
    )
    task: Task = Field("sft", description="sft (conversations) or dpo (preference pairs).")
    limits: DatasetLimits = Field(
        default_factory=DatasetLimits,
        json_schema_extra={"default": {}},
        description="Bounds the dataset must keep to be Ready.",
    )
    deep: bool = Field(
        False,
        description=(
            "Decode every image fully while validating, so that a truncated or corrupt "
            "image is an error on its line here rather than a failure in training. Slower: "
            "by default only image headers are read."
        ),
    )
    queue_name: Name | None = Field(
        None,
        description=(
            "Kueue LocalQueue of the validation Job. Needed where Kueue manages every Job "
            "in the namespace (manageJobsWithoutQueueName): an unqueued Job would wait there "
            "for ever."
        ),
    )


class LineError(CamelModel):
    """One problem, by line of the JSONL file."""

    line: int = Field(ge=0, description="1-based line number; 0 for the file as a whole.")
    message: Text = Field(description="What is wrong there.")


class DatasetStatus(CamelModel):
    """What validation found."""

    phase: DatasetPhase = Field(
        DatasetPhase.PENDING, description="Pending, Validating, Ready, Invalid or Failed."
    )
    message: Text | None = Field(None, description="A one-line summary of the phase.")
    examples: int | None = Field(None, ge=0, description="Examples in the file.")
    images: int | None = Field(None, ge=0, description="Image references in the file.")
    text_only_examples: int | None = Field(None, ge=0, description="Examples without images.")
    remote_images: int | None = Field(
        None,
        ge=0,
        description="Images named by an http(s) URL (with limits.allowRemoteImages); each "
        "run fetches them once before it starts.",
    )
    remote_images_sha256: str | None = Field(
        None,
        max_length=64,
        description="One SHA-256 over the remote images' URLs and bytes as validation "
        "fetched them; the fetch before a run checks that it brings the same.",
    )
    sha256: str | None = Field(None, max_length=64, description="SHA-256 of the validated file.")
    error_count: int | None = Field(
        None, ge=0, description="Problems that make the dataset Invalid."
    )
    warning_count: int | None = Field(
        None, ge=0, description="Problems that do not block training."
    )
    errors: list[LineError] = Field(
        default_factory=list,
        max_length=20,
        description="The first 20 errors, with their line numbers.",
    )
    warnings: list[LineError] = Field(
        default_factory=list,
        max_length=20,
        description=(
            "The first 20 warnings (what is ignored or odd but does not block training), "
            "with their line numbers."
        ),
    )
    validation_job: Name | None = Field(None, description="Name of the validation Job.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready and other conditions."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation last acted on."
    )


DATASET = CrdInfo(
    kind="Dataset",
    plural="datasets",
    singular="dataset",
    short_names=("kds",),
    description="A fine-tuning dataset in chat-JSONL, validated before any GPU is booked.",
    spec=DatasetSpec,
    status=DatasetStatus,
    printer_columns=(
        PrinterColumn(
            "Phase", ".status.phase", "string", "Pending, Validating, Ready, Invalid or Failed."
        ),
        PrinterColumn("Examples", ".status.examples", "integer", "Examples in the file."),
        PrinterColumn("Images", ".status.images", "integer", "Image references in the file."),
        PrinterColumn("Errors", ".status.errorCount", "integer", "Problems found.", priority=1),
        AGE_COLUMN,
    ),
)
