"""ModelDeployment → (adapters resolved) → vLLM Deployment + Service → status read
back from the Deployment."""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf

from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.handlers.common import (
    context,
    live_object,
    one_at_a_time,
    resync_each,
    write_phase,
)
from kubetune_operator.kube import Manifest, owned_by
from kubetune_operator.observability import PHASES, RECONCILE_SECONDS
from kubetune_operator.resources import model_deployment as serving
from kubetune_operator.resources.status import unobserved

log = logging.getLogger(__name__)

PLURAL = "modeldeployments"
EVENT_PHASES = ("Available", "Failed")


def _write(md: Manifest, fields: Manifest, reason: str) -> Manifest | None:
    ready = fields["phase"] == "Available"
    return write_phase(
        PLURAL, "ModelDeployment", md, fields, reason, ready=ready, event_phases=EVENT_PHASES
    )


def reconcile(
    namespace: str, name: str, md: Manifest | None = None, deploy: Manifest | None = None
) -> None:
    with (
        one_at_a_time("ModelDeployment", namespace, name),
        RECONCILE_SECONDS.labels("ModelDeployment").time(),
    ):
        _reconcile(namespace, name, md, deploy)


def _reconcile(namespace: str, name: str, md: Manifest | None, deploy: Manifest | None) -> None:
    ctx = context()
    api = ctx.api
    md = live_object(PLURAL, "ModelDeployment", namespace, name, md)
    if md is None:
        return
    spec = ModelDeploymentSpec.model_validate(md["spec"])
    finetunejobs = {
        a.fine_tune_job: api.get_object("finetunejobs", namespace, a.fine_tune_job)
        for a in spec.adapters
        if a.fine_tune_job
    }
    adapters, blocked = serving.resolve_adapters(spec, finetunejobs)
    served = {"servedModels": serving.served_models(spec)}
    if blocked is not None:
        _write(md, {"phase": blocked.phase, "message": blocked.message, **served}, blocked.reason)
        return
    desired = serving.deployment(serving.plan(md, adapters, ctx.settings.trainer_image))
    uid = md["metadata"]["uid"]
    if deploy is not None and not owned_by(deploy, uid):
        deploy = None  # an event of a deleted namesake's Deployment
    if deploy is None:
        deploy = api.get_deployment(namespace, name)
    if deploy is not None and not owned_by(deploy, uid):
        message = (
            f"Deployment {name} exists but does not belong to this ModelDeployment; waiting "
            "for it to be deleted"
        )
        _write(md, {"phase": "Pending", "message": message, **served}, "WaitingForCleanup")
        return
    current_hash = ((deploy or {}).get("metadata", {}).get("annotations") or {}).get(
        serving.SPEC_HASH
    )
    if current_hash != desired["metadata"]["annotations"][serving.SPEC_HASH]:
        deploy = api.apply_deployment(desired)
        api.ensure_service(serving.service(md))
    fields, reason = serving.serving_status(md, deploy)
    if fields["phase"] == "Progressing":
        pods = api.list_pods(namespace, f"{serving.LABEL_MODELDEPLOYMENT}={name}")
        fields, reason = serving.serving_status(md, deploy, pods)
    _write(md, fields, reason)


@kopf.on.event("kubetune.io", "v1alpha1", PLURAL)
def modeldeployment_event(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    """Reconciled when its spec is new or changed, and at the operator's start; the
    Deployment's events keep its status current after that."""
    if not namespace:
        return
    if type == "DELETED":
        context().watched.forget(PLURAL, namespace, name)
        PHASES.record("ModelDeployment", namespace, name, None)
        return
    md = copy.deepcopy(dict(body))
    context().watched.remember(PLURAL, md)
    if unobserved(md) or type is None:
        reconcile(namespace, name, md=md)


@kopf.on.event("apps", "v1", "deployments", labels={serving.LABEL_MODELDEPLOYMENT: kopf.PRESENT})
def deployment_event(type: str | None, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    owner = (body.get("metadata", {}).get("labels") or {}).get(serving.LABEL_MODELDEPLOYMENT)
    if owner and namespace:
        deploy = None if type == "DELETED" else copy.deepcopy(dict(body))
        reconcile(namespace, owner, deploy=deploy)


def finetunejob_finished(namespace: str, finetunejob: str) -> None:
    """Move on the ModelDeployments that wait for this FineTuneJob's adapter."""
    for md in context().watched.all(PLURAL, namespace):
        adapters = (md.get("spec") or {}).get("adapters") or []
        if any(a.get("fineTuneJob") == finetunejob for a in adapters):
            reconcile(namespace, md["metadata"]["name"])


def resync() -> None:
    """Reconcile every ModelDeployment that is not Available: retries what failed and
    picks up adapters whose FineTuneJob finished while an event was missed."""
    resync_each(
        PLURAL,
        lambda md: unobserved(md) or (md.get("status") or {}).get("phase") != "Available",
        reconcile,
    )
