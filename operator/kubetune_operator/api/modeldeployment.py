"""The ModelDeployment custom resource: a base model plus LoRA adapters served by
vLLM's OpenAI-compatible server. (Not named Deployment, so that it never collides
with apps/v1 Deployment in kubectl.)"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from kubetune_operator.api.common import (
    AGE_COLUMN,
    Condition,
    CrdInfo,
    Image,
    ModelRef,
    Name,
    PrinterColumn,
    PvcLocation,
    Resources,
    S3Location,
    SecretRef,
    Text,
)
from kubetune_trainer.contract.base import CamelModel

# The --max-lora-rank values vLLM accepts (vllm/config/lora.py MaxLoRARanks).
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
DEFAULT_MAX_LORA_RANK: LoraRank = 64


class DeploymentPhase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    AVAILABLE = "Available"
    FAILED = "Failed"


class Runtime(CamelModel):
    """The vLLM OpenAI-compatible server."""

    image: Image | None = Field(
        None,
        description=(
            "vLLM server image. Default: the platform's (the chart value defaults.serverImage)."
        ),
    )
    max_model_len: int | None = Field(None, ge=16, le=10_000_000, description="--max-model-len.")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="--gpu-memory-utilization: fraction of GPU memory vLLM may use.",
    )
    limit_mm_per_prompt: (
        dict[Literal["image", "video", "audio"], Annotated[int, Field(ge=0, le=1000)]] | None
    ) = Field(None, description="--limit-mm-per-prompt, e.g. {image: 4}.")
    max_pixels: int | None = Field(
        None,
        ge=784,
        le=100_000_000,
        description="Largest image area the processor keeps (width x height).",
    )
    max_lora_rank: LoraRank = Field(
        DEFAULT_MAX_LORA_RANK,
        description=(
            "--max-lora-rank: the largest adapter rank the server takes. Fixed while it "
            "serves; an adapter of a higher rank is reported in status and not loaded."
        ),
    )
    max_loras: int = Field(
        4, ge=1, le=256, description="--max-loras: adapters one batch of requests may mix."
    )
    extra_args: list[Annotated[str, StringConstraints(max_length=1024)]] | None = Field(
        None, max_length=64, description="More vLLM server arguments, passed as they are."
    )


class AdapterSource(CamelModel):
    """Where a LoRA adapter folder is. Exactly one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.pvc), has(self.s3)].filter(x, x).size() == 1",
                    "message": "adapter source needs exactly one of pvc or s3",
                }
            ]
        }
    )

    pvc: PvcLocation | None = Field(
        None, description="The adapter folder on a PersistentVolumeClaim."
    )
    s3: S3Location | None = Field(None, description="The adapter folder (prefix) in S3.")


class Adapter(CamelModel):
    """A LoRA adapter served next to the base model (vLLM --lora-modules)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.source) != has(self.fineTuneJob)",
                    "message": "an adapter needs exactly one of source or fineTuneJob",
                }
            ]
        }
    )

    name: Name = Field(description="Model name clients ask for in the OpenAI API.")
    source: AdapterSource | None = Field(None, description="Where the adapter folder is.")
    fine_tune_job: Name | None = Field(
        None, description="A Succeeded FineTuneJob whose output to serve."
    )


# The key of the Secret that auth.apiKeySecretRef names.
API_KEY_SECRET_KEY = "apiKey"


class ServerAuth(CamelModel):
    """Who may use the server."""

    api_key_secret_ref: SecretRef | None = Field(
        None,
        description=(
            f"A Secret whose key {API_KEY_SECRET_KEY} is the API key clients must send "
            "(Authorization: Bearer KEY, or an api-key header, which is how it passes the "
            "API server's service proxy) on every route but /health, /ping, /metrics and "
            "/version."
        ),
    )


class ModelDeploymentSpec(CamelModel):
    """Serve a base model and LoRA adapters from vLLM's OpenAI-compatible server.
    Adapters are added and removed while it serves."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.adapters) || "
                    "self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
                    "message": "adapter names must be unique",
                },
                {
                    "rule": "!has(self.adapters) || self.adapters.all(a, a.name != self.baseModel.name)",
                    "message": "an adapter cannot take the base model's name",
                },
            ]
        }
    )

    base_model: ModelRef = Field(description="The base model.")
    adapters: list[Adapter] = Field(
        default_factory=list, max_length=64, description="LoRA adapters to serve."
    )
    runtime: Runtime = Field(
        default_factory=Runtime, json_schema_extra={"default": {}}, description="The vLLM server."
    )
    replicas: int = Field(1, ge=0, le=1000, description="Server pods.")
    resources: Resources = Field(
        default_factory=Resources,
        json_schema_extra={"default": {}},
        description="Compute per server pod.",
    )
    auth: ServerAuth = Field(
        default_factory=ServerAuth, json_schema_extra={"default": {}}, description="Access."
    )


class AdapterState(CamelModel):
    """One adapter on the server's replicas."""

    name: Name = Field(description="The adapter's model name.")
    loaded: int = Field(0, ge=0, description="Ready server pods that serve it.")
    replicas: int = Field(0, ge=0, description="Ready server pods.")
    reason: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        None, description="Why it is not served everywhere (absent when it is)."
    )
    message: Text | None = Field(None, description="The reason, for people.")


class ModelDeploymentStatus(CamelModel):
    """Where the model is served and how many replicas are up."""

    phase: DeploymentPhase = Field(
        DeploymentPhase.PENDING, description="Pending, Progressing, Available or Failed."
    )
    message: Text | None = Field(None, description="A one-line summary of the phase.")
    endpoint: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        None, description="OpenAI-compatible base URL inside the cluster."
    )
    served_models: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list, description="Model names the endpoint answers to."
    )
    adapters: list[AdapterState] = Field(
        default_factory=list,
        description=(
            "Each adapter: its own and the FineTuneJobs' that attach to this server "
            "(spec.deploy.modelDeployment)."
        ),
    )
    ready_replicas: int | None = Field(None, ge=0, description="Server pods ready.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready and other conditions."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The .metadata.generation last acted on."
    )


MODEL_DEPLOYMENT = CrdInfo(
    kind="ModelDeployment",
    plural="modeldeployments",
    singular="modeldeployment",
    short_names=("mdep",),
    description="A base model and LoRA adapters served by vLLM's OpenAI-compatible server.",
    spec=ModelDeploymentSpec,
    status=ModelDeploymentStatus,
    printer_columns=(
        PrinterColumn(
            "Phase", ".status.phase", "string", "Pending, Progressing, Available or Failed."
        ),
        PrinterColumn("Endpoint", ".status.endpoint", "string", "OpenAI-compatible base URL."),
        PrinterColumn("Ready", ".status.readyReplicas", "integer", "Server pods ready."),
        AGE_COLUMN,
    ),
)
