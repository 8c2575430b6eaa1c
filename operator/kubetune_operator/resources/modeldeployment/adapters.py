"""The LoRA adapters a ModelDeployment serves: its own (a source folder, or a
FineTuneJob's output) and those of the FineTuneJobs that attach to it
(spec.deploy.modelDeployment). Each resolves on its own to a folder and a rank, or to
the reason it cannot be served: one bad adapter never holds up the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kubetune_operator.api.common import PvcLocation, S3Location
from kubetune_operator.api.finetunejob import FineTuneJobSpec, JobPhase
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.conditions import phase_of
from kubetune_operator.resources.platform import ModelStore, output_problem, with_output


@dataclass(frozen=True)
class Wanted:
    """An adapter asked for: from a source folder, or a FineTuneJob's output."""

    name: str
    pvc: PvcLocation | None = None
    s3: S3Location | None = None
    fine_tune_job: str | None = None


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    pvc: PvcLocation | None
    s3: S3Location | None
    rank: int | None  # known for a FineTuneJob's adapter


@dataclass(frozen=True)
class Unservable:
    name: str
    reason: str
    message: str


Resolved = ServedAdapter | Unservable


def attached_to(ftj: Manifest | None) -> str | None:
    """The ModelDeployment a FineTuneJob asks to serve its result on
    (spec.deploy.modelDeployment, while deploy is enabled), if any."""
    deploy = ((ftj or {}).get("spec") or {}).get("deploy") or {}
    return deploy.get("modelDeployment") if deploy.get("enabled") else None


def wanted(spec: ModelDeploymentSpec, attached: Sequence[Manifest]) -> list[Wanted]:
    """The spec's adapters, then the attached FineTuneJobs' (by name), each under its
    outputModel.name."""
    asked = [
        Wanted(
            a.name,
            a.source.pvc if a.source else None,
            a.source.s3 if a.source else None,
            a.fine_tune_job,
        )
        for a in spec.adapters
    ]
    for ftj in sorted(attached, key=lambda f: f["metadata"]["name"]):
        out = ((ftj.get("spec") or {}).get("outputModel") or {}).get("name")
        asked.append(Wanted(out or ftj["metadata"]["name"], fine_tune_job=ftj["metadata"]["name"]))
    return asked


def resolve(
    spec: ModelDeploymentSpec,
    asked: Sequence[Wanted],
    finetunejobs: Mapping[str, Manifest | None],
    store: ModelStore | None = None,
) -> list[Resolved]:
    """Each adapter asked for, in order: where its folder is and its rank, or why it
    cannot be served (its FineTuneJob has not succeeded, trained another base model or
    all parameters, a rank above the server's maximum, a name already taken). ``store``
    is the platform's model store, where runs that name no output storage wrote."""
    resolved: list[Resolved] = []
    taken = {spec.base_model.name}
    for adapter in asked:
        if adapter.name in taken:
            resolved.append(
                Unservable(
                    adapter.name,
                    "NameTaken",
                    f"FineTuneJob '{adapter.fine_tune_job}' names its adapter "
                    f"'{adapter.name}', which this server already serves",
                )
            )
            continue
        taken.add(adapter.name)
        if adapter.fine_tune_job is None:
            resolved.append(ServedAdapter(adapter.name, adapter.pvc, adapter.s3, None))
        else:
            resolved.append(
                _from_finetunejob(spec, adapter, finetunejobs.get(adapter.fine_tune_job), store)
            )
    return resolved


def _from_finetunejob(
    spec: ModelDeploymentSpec, adapter: Wanted, ftj: Manifest | None, store: ModelStore | None
) -> Resolved:
    name = adapter.fine_tune_job
    if ftj is None:
        return Unservable(
            adapter.name, "FineTuneJobNotFound", f"FineTuneJob '{name}' does not exist"
        )
    phase = phase_of(ftj)
    if phase == JobPhase.FAILED:
        return Unservable(
            adapter.name, "FineTuneJobFailed", f"FineTuneJob '{name}' failed: nothing to serve"
        )
    if phase != JobPhase.SUCCEEDED:
        return Unservable(
            adapter.name,
            "WaitingForFineTuneJob",
            f"waiting for FineTuneJob '{name}' to succeed (now {phase or 'Pending'})",
        )
    job = with_output(FineTuneJobSpec.model_validate(ftj["spec"]), ftj["metadata"], store)
    if job.tuning != "lora":
        return Unservable(
            adapter.name,
            "NotAnAdapter",
            f"FineTuneJob '{name}' tuned all parameters, so its output is a whole model: "
            "serve it as baseModel (with source) instead of as an adapter",
        )
    if job.base_model.name != spec.base_model.name:
        return Unservable(
            adapter.name,
            "BaseModelMismatch",
            f"FineTuneJob '{name}' trained {job.base_model.name}, but this server serves "
            f"{spec.base_model.name}",
        )
    rank = job.hyperparameters.resolved(job.method, job.tuning).lora_rank
    limit = spec.runtime.max_lora_rank
    if rank is not None and rank > limit:
        return Unservable(
            adapter.name,
            "RankTooLarge",
            f"FineTuneJob '{name}' trained rank {rank}, above the server's maxLoraRank {limit}",
        )
    storage = job.output_model.storage
    if storage is None:
        # It succeeded under a default model store that the platform has since removed.
        return Unservable(adapter.name, "NoOutputStorage", output_problem(job) or "")
    return ServedAdapter(adapter.name, storage.pvc, storage.s3, rank)


def served(resolved: Sequence[Resolved]) -> list[ServedAdapter]:
    return [a for a in resolved if isinstance(a, ServedAdapter)]
