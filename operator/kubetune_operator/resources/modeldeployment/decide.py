"""ModelDeployment: what to do and what status to write, given what the cluster shows.

Its vLLM Deployment and Service are made at once (and the Deployment updated when
what the operator sets changes); each adapter that can be served is loaded into every
running server pod as it becomes servable, and unloaded when it goes. Its status
follows the Deployment, with each adapter's state beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kubetune_operator.api.modeldeployment import DeploymentPhase, ModelDeploymentSpec
from kubetune_operator.resources.actions import Action, Apply, Create, Decision
from kubetune_operator.resources.common import Manifest, owned_by, trainer_service_account
from kubetune_operator.resources.conditions import Notice, StatusUpdate, Verdict, unobserved
from kubetune_operator.resources.modeldeployment.adapters import resolve, served, wanted
from kubetune_operator.resources.modeldeployment.loading import (
    LoadFailures,
    ServerPod,
    plan_loading,
)
from kubetune_operator.resources.modeldeployment.server import (
    SPEC_HASH,
    admin_secret,
    deployment,
    plan,
    service,
)
from kubetune_operator.resources.modeldeployment.status import serving_status
from kubetune_operator.resources.policy import NOT_ALLOWED, modeldeployment_refusal, was_refused
from kubetune_operator.settings import Settings

NOTICED = frozenset({DeploymentPhase.AVAILABLE, DeploymentPhase.FAILED})


@dataclass(frozen=True)
class Observed:
    """What one reconcile of a ModelDeployment saw: the FineTuneJobs its adapters name
    and those that attach to it, its Deployment, that Deployment's pods while they can
    tell more than it, the running server pods and what each has loaded, and the loads
    that failed."""

    modeldeployment: Manifest
    spec: ModelDeploymentSpec
    finetunejobs: Mapping[str, Manifest | None] = field(default_factory=dict)
    attached: Sequence[Manifest] = ()
    deployment: Manifest | None = None
    pods: Sequence[Manifest] = ()
    servers: Sequence[ServerPod] = ()
    failures: LoadFailures = field(default_factory=dict)


def finetunejob_names(spec: ModelDeploymentSpec) -> list[str]:
    return [a.fine_tune_job for a in spec.adapters if a.fine_tune_job]


def serves(md: Manifest, finetunejob: str) -> bool:
    """Whether an adapter of this ModelDeployment is that FineTuneJob's output."""
    adapters = (md.get("spec") or {}).get("adapters") or []
    return any(a.get("fineTuneJob") == finetunejob for a in adapters)


def unsettled(md: Manifest) -> bool:
    """Whether the ModelDeployment is worth another look without an event: not yet
    acted on, not Available, or an adapter not served on every replica (its
    FineTuneJob may have finished while an event was missed; a load may work now). One
    the policy refused waits for its spec to change."""
    status = md.get("status") or {}
    if unobserved(md):
        return True
    return not was_refused(md) and (
        status.get("phase") != DeploymentPhase.AVAILABLE
        or any(a.get("reason") for a in status.get("adapters") or [])
    )


def decide(seen: Observed, settings: Settings) -> Decision:
    md, spec = seen.modeldeployment, seen.spec
    refusal = modeldeployment_refusal(spec, settings.policy)
    if refusal is not None:
        # Nothing is made or loaded; a server made for an earlier spec keeps serving it.
        return _decision(
            seen, Verdict(DeploymentPhase.FAILED, NOT_ALLOWED, refusal), {"message": refusal}
        )
    name = md["metadata"]["name"]
    resolved = resolve(spec, wanted(spec, seen.attached), seen.finetunejobs, settings.model_store)
    loading, states = plan_loading(resolved, seen.servers, seen.failures)
    fields: Manifest = {
        "adapters": [s.model_dump(by_alias=True, exclude_none=True) for s in states],
        "servedModels": [spec.base_model.name, *(s.name for s in states if s.loaded)],
    }
    current = seen.deployment
    if current is not None and not owned_by(current, md["metadata"]["uid"]):
        message = (
            f"Deployment {name} exists but does not belong to this ModelDeployment; waiting "
            "for it to be deleted"
        )
        return _decision(
            seen,
            Verdict(DeploymentPhase.PENDING, "WaitingForCleanup", message),
            {**fields, "message": message},
        )
    desired = deployment(
        plan(md, spec, served(resolved), settings.trainer_image, settings.server_image),
        settings.pod_defaults,
    )
    serving, reason = serving_status(md, spec, current, seen.pods)
    actions: tuple[Action, ...] = ()
    current_hash = ((current or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)
    if current_hash != desired["metadata"]["annotations"][SPEC_HASH]:
        actions = (
            Create(admin_secret(md, settings.admin_key)),
            Create(
                trainer_service_account(md["metadata"]["namespace"], settings.identity_annotations)
            ),
            Apply(desired),
            Create(service(md)),
        )
    elif serving["phase"] != DeploymentPhase.AVAILABLE:
        # Made again if someone deleted it: a server pod waits for it (a create that
        # finds it costs one request, and only while the server is not available).
        actions = (Create(admin_secret(md, settings.admin_key)),)
    fields |= serving
    trouble = [s for s in states if s.reason]
    if serving["phase"] == DeploymentPhase.AVAILABLE and trouble:
        first = trouble[0]
        fields["message"] = (
            f"{serving['message']}; {len(states) - len(trouble)}/{len(states)} adapters "
            f"served, {first.name}: {first.reason}"
        )
    return _decision(
        seen, Verdict(fields["phase"], reason, fields["message"]), fields, actions + tuple(loading)
    )


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
