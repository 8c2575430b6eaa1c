"""The LoRA adapters a ModelDeployment serves: each one's folder (its source, or the
output of the FineTuneJob it names) and the rank the server must allow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kubetune_operator.api.common import PvcLocation, S3Location
from kubetune_operator.api.finetunejob import FineTuneJobSpec, JobPhase
from kubetune_operator.api.modeldeployment import DeploymentPhase, ModelDeploymentSpec
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.conditions import Verdict, phase_of

# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's own default, kept where an adapter's rank is not known (a source folder).
VLLM_DEFAULT_LORA_RANK = 16


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    pvc: PvcLocation | None
    s3: S3Location | None
    rank: int | None  # known for a FineTuneJob's adapter


def resolve_adapters(
    spec: ModelDeploymentSpec, finetunejobs: Mapping[str, Manifest | None]
) -> tuple[list[ServedAdapter], Verdict | None]:
    """Each adapter's folder: its source, or the output of the FineTuneJob it names,
    which must have Succeeded with a LoRA adapter trained on this base model."""
    adapters = []
    for adapter in spec.adapters:
        if adapter.source is not None:
            adapters.append(
                ServedAdapter(adapter.name, adapter.source.pvc, adapter.source.s3, None)
            )
            continue
        name = adapter.fine_tune_job
        ftj = finetunejobs.get(name or "")
        if ftj is None:
            return [], Verdict(
                DeploymentPhase.PENDING,
                "FineTuneJobNotFound",
                f"FineTuneJob '{name}' does not exist yet",
            )
        phase = phase_of(ftj)
        if phase == JobPhase.FAILED:
            return [], Verdict(
                DeploymentPhase.FAILED,
                "FineTuneJobFailed",
                f"FineTuneJob '{name}' failed: nothing to serve",
            )
        if phase != JobPhase.SUCCEEDED:
            return [], Verdict(
                DeploymentPhase.PENDING,
                "WaitingForFineTuneJob",
                f"waiting for FineTuneJob '{name}' to succeed (now {phase or 'Pending'})",
            )
        job = FineTuneJobSpec.model_validate(ftj["spec"])
        if job.tuning != "lora":
            return [], Verdict(
                DeploymentPhase.FAILED,
                "NotAnAdapter",
                f"FineTuneJob '{name}' tuned all parameters, so its output is a whole model: "
                "serve it as baseModel (with source) instead of as an adapter",
            )
        if job.base_model.name != spec.base_model.name:
            return [], Verdict(
                DeploymentPhase.FAILED,
                "BaseModelMismatch",
                f"adapter '{adapter.name}' was trained on {job.base_model.name}, but this "
                f"deployment serves {spec.base_model.name}",
            )
        storage = job.output_model.storage
        rank = job.hyperparameters.resolved(job.method, job.tuning).lora_rank
        adapters.append(ServedAdapter(adapter.name, storage.pvc, storage.s3, rank))
    return adapters, None


def max_lora_rank(adapters: Sequence[ServedAdapter]) -> int:
    """The smallest rank vLLM accepts that fits every adapter whose rank is known."""
    wanted = max(
        (a.rank if a.rank is not None else VLLM_DEFAULT_LORA_RANK for a in adapters),
        default=VLLM_DEFAULT_LORA_RANK,
    )
    return next((r for r in LORA_RANKS if r >= wanted), LORA_RANKS[-1])
