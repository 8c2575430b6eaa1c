"""ModelDeployment: what to do and what status to write, given what the cluster shows.

Once every adapter it names can be served, its vLLM Deployment and Service are made
(and the Deployment updated when what the operator sets changes); its status follows
the Deployment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kubetune_operator.api.modeldeployment import DeploymentPhase, ModelDeploymentSpec
from kubetune_operator.resources.actions import Action, Apply, Create, Decision
from kubetune_operator.resources.common import Manifest, owned_by
from kubetune_operator.resources.conditions import Notice, StatusUpdate, Verdict, unobserved
from kubetune_operator.resources.modeldeployment.adapters import resolve_adapters
from kubetune_operator.resources.modeldeployment.server import SPEC_HASH, deployment, plan, service
from kubetune_operator.resources.modeldeployment.status import served_models, serving_status
from kubetune_operator.settings import Settings

NOTICED = frozenset({DeploymentPhase.AVAILABLE, DeploymentPhase.FAILED})


@dataclass(frozen=True)
class Observed:
    """What one reconcile of a ModelDeployment saw: the FineTuneJobs its adapters name,
    its Deployment, and that Deployment's pods while they can tell more than it."""

    modeldeployment: Manifest
    spec: ModelDeploymentSpec
    finetunejobs: Mapping[str, Manifest | None] = field(default_factory=dict)
    deployment: Manifest | None = None
    pods: Sequence[Manifest] = ()


def finetunejob_names(spec: ModelDeploymentSpec) -> list[str]:
    return [a.fine_tune_job for a in spec.adapters if a.fine_tune_job]


def serves(md: Manifest, finetunejob: str) -> bool:
    """Whether an adapter of this ModelDeployment is that FineTuneJob's output."""
    adapters = (md.get("spec") or {}).get("adapters") or []
    return any(a.get("fineTuneJob") == finetunejob for a in adapters)


def unsettled(md: Manifest) -> bool:
    """Whether the ModelDeployment is worth another look without an event: not yet
    acted on, or not Available (an adapter's FineTuneJob may have finished while an
    event was missed)."""
    return unobserved(md) or (md.get("status") or {}).get("phase") != DeploymentPhase.AVAILABLE


def decide(seen: Observed, settings: Settings) -> Decision:
    md, spec = seen.modeldeployment, seen.spec
    name = md["metadata"]["name"]
    served = {"servedModels": served_models(spec)}
    adapters, waiting = resolve_adapters(spec, seen.finetunejobs)
    if waiting is not None:
        return _decision(seen, waiting, {"message": waiting.message, **served})
    current = seen.deployment
    if current is not None and not owned_by(current, md["metadata"]["uid"]):
        message = (
            f"Deployment {name} exists but does not belong to this ModelDeployment; waiting "
            "for it to be deleted"
        )
        return _decision(
            seen,
            Verdict(DeploymentPhase.PENDING, "WaitingForCleanup", message),
            {"message": message, **served},
        )
    desired = deployment(plan(md, spec, adapters, settings.trainer_image))
    actions: tuple[Action, ...] = ()
    current_hash = ((current or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)
    if current_hash != desired["metadata"]["annotations"][SPEC_HASH]:
        actions = (Apply(desired), Create(service(md)))
    fields, reason = serving_status(md, spec, current, seen.pods)
    return _decision(seen, Verdict(fields["phase"], reason, fields["message"]), fields, actions)


def _decision(
    seen: Observed, verdict: Verdict, fields: Manifest, actions: tuple[Action, ...] = ()
) -> Decision:
    phase = DeploymentPhase(verdict.phase)
    notice = None
    if phase in NOTICED:
        kind = "Warning" if phase == DeploymentPhase.FAILED else "Normal"
        notice = Notice(kind, verdict.reason, str(fields.get("message") or phase))
    update = StatusUpdate(
        fields={**fields, "phase": phase},
        reason=verdict.reason,
        ready=phase == DeploymentPhase.AVAILABLE,
        generation=seen.modeldeployment["metadata"].get("generation"),
        notice=notice,
    )
    return Decision(actions=actions, status=update)
