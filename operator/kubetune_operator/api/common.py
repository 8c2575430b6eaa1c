"""Types shared by the three custom resources: references, storage locations,
conditions and the CRD metadata each resource class carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kubetune_trainer.contract.base import CamelModel, S3Uri

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetune"

# Bounded strings keep the CEL cost estimate of the immutability rules finite.
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
]
Text = Annotated[str, StringConstraints(max_length=4096)]
RelativePath = Annotated[
    str,
    StringConstraints(
        max_length=1024,
        # A path inside its volume: relative, and no segment is '..'. RE2 (which the
        # API server uses) has no look-ahead, so a segment is spelled out as "anything
        # but '..'".
        pattern=r"^$|^(?:[^/.][^/]*|\.|\.[^/.][^/]*|\.\.[^/]+)(?:/(?:[^/.][^/]*|\.|\.[^/.][^/]*|\.\.[^/]+))*/?$",
    ),
]
HttpUrl = Annotated[str, StringConstraints(max_length=4096, pattern=r"^https?://[^\s/]+(/\S*)?$")]
Quantity = Annotated[
    str,
    StringConstraints(
        max_length=64, pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
    ),
]
Image = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class SecretRef(CamelModel):
    """A Secret in the resource's own namespace. Credentials come only from Secrets."""

    name: Name = Field(description="Name of the Secret.")


class LocalObjectRef(CamelModel):
    """A kubetune object in the same namespace."""

    name: Name = Field(description="Name of the object.")


class PvcLocation(CamelModel):
    """A path on a PersistentVolumeClaim in the same namespace."""

    claim_name: Name = Field(description="Name of the PersistentVolumeClaim.")
    path: RelativePath = Field(
        "", description="Path inside the volume; no leading '/' and no '..'."
    )


class S3Location(CamelModel):
    """An S3 (or S3-compatible) object or prefix."""

    uri: S3Uri = Field(description="s3://bucket/key URI.")
    endpoint: HttpUrl | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, Ceph...). Default: AWS."
    )
    secret_ref: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_REGION). Without one, the pods reach S3 with their own identity (the "
        "kubetune-trainer ServiceAccount, which the platform annotates for IRSA or "
        "Workload Identity).",
    )


class Condition(CamelModel):
    """The Kubernetes condition convention (metav1.Condition)."""

    type: Annotated[str, StringConstraints(max_length=316)] = Field(
        description="Condition type, e.g. Ready."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=1024)] = Field(
        "", description="One CamelCase word a program can match."
    )
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        "", description="What happened, for a person."
    )
    last_transition_time: str | None = Field(
        None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation this condition was set for."
    )


class Toleration(CamelModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(
        None, max_length=316, description="Taint key; empty with operator Exists matches all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(None, max_length=63, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated before eviction."
    )


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "date", "boolean"]
    description: str
    priority: int = 0


@dataclass(frozen=True)
class CrdInfo:
    """What a CustomResourceDefinition says beyond the schema."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    printer_columns: tuple[PrinterColumn, ...] = field(default_factory=tuple)
    # Rules on the whole spec that compare it with the stored object (immutability).
    spec_transition_rules: tuple[dict[str, str], ...] = field(default_factory=tuple)


AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date", "Time since creation.")


def model_description(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


class HuggingFaceModel(CamelModel):
    """Weights from a model hub repository."""

    revision: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="Branch, tag or commit. Default: main."
    )
    token_secret_ref: SecretRef | None = Field(
        None, description="Secret with HF_TOKEN for gated or private models."
    )


class ModelSource(CamelModel):
    """Where the base model's weights are. Exactly one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.pvc), has(self.s3), has(self.huggingFace)].filter(x, x).size() == 1",
                    "message": "baseModel.source needs exactly one of pvc, s3 or huggingFace",
                }
            ]
        }
    )

    pvc: PvcLocation | None = Field(None, description="A model folder on a PersistentVolumeClaim.")
    s3: S3Location | None = Field(None, description="A model folder (prefix) in S3.")
    hugging_face: HuggingFaceModel | None = Field(
        None, description="The hub repository named by baseModel.name."
    )


class ModelRef(CamelModel):
    """The base model to tune or serve."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="Model id, e.g. Qwen/Qwen2.5-VL-3B-Instruct; also the served model name."
    )
    source: ModelSource | None = Field(
        None, description="Where the weights are. Default: the model hub, by name."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped in the model repository. Off unless you trust it.",
    )


class Resources(CamelModel):
    """Compute for the pods."""

    gpus: int = Field(1, ge=0, le=64, description="GPUs per pod (node).")
    gpu_resource: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(
        "nvidia.com/gpu", description="Extended resource name of the GPU."
    )
    cpu: Quantity | None = Field(
        None, description="CPU request, e.g. 8 or 500m (no limit: a pod may use idle cores)."
    )
    memory: Quantity | None = Field(None, description="Memory request and limit, e.g. 64Gi.")
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] | None = Field(
        None, max_length=64, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=64, description="Taints the pods tolerate."
    )
    priority_class_name: Name | None = Field(None, description="PriorityClass of the pods.")
