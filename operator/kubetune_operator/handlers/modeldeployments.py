"""ModelDeployment handlers: observe the FineTuneJobs its adapters name or that attach
to it, its vLLM Deployment and what each server pod has loaded, decide
(resources/modeldeployment/decide.py), act (handlers/act.py)."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune_operator import servers
from kubetune_operator.api.common import GROUP, VERSION
from kubetune_operator.api.finetunejob import FINE_TUNE_JOB
from kubetune_operator.api.modeldeployment import MODEL_DEPLOYMENT, ModelDeploymentSpec
from kubetune_operator.handlers.act import plain, reconcile_object, reconciling, resync_each
from kubetune_operator.handlers.context import Context, context_of
from kubetune_operator.observability import PHASES
from kubetune_operator.resources.common import LABEL_MODELDEPLOYMENT, Manifest, owned_by
from kubetune_operator.resources.conditions import phase_of, unobserved
from kubetune_operator.resources.modeldeployment.adapters import attached_to
from kubetune_operator.resources.modeldeployment.decide import (
    Observed,
    decide,
    finetunejob_names,
    serves,
    unsettled,
)
from kubetune_operator.resources.modeldeployment.loading import gate_open, server_pods
from kubetune_operator.resources.modeldeployment.server import admin_token
from kubetune_operator.resources.workloads import ServerPod


def reconcile(
    ctx: Context,
    namespace: str,
    name: str,
    md: Manifest | None = None,
    deploy: Manifest | None = None,
) -> None:
    with reconciling(ctx, MODEL_DEPLOYMENT, namespace, name, md) as live:
        if live is None:
            return
        spec = ModelDeploymentSpec.model_validate(live["spec"])
        if deploy is not None and not owned_by(deploy, live["metadata"]["uid"]):
            deploy = None  # an event of a deleted namesake's Deployment
        reconcile_object(
            ctx,
            MODEL_DEPLOYMENT,
            live,
            lambda found: observe(ctx, live, spec, deploy if found is None else None),
            lambda seen: decide(seen, ctx.settings),
        )


def observe(
    ctx: Context, md: Manifest, spec: ModelDeploymentSpec, deploy: Manifest | None
) -> Observed:
    """The FineTuneJobs its adapters name and those that attach to it; its Deployment
    (``deploy``, when an event delivered it); its pods, and what the server in each
    running one has loaded."""
    namespace, name = md["metadata"]["namespace"], md["metadata"]["name"]
    attached = [
        ftj for ftj in ctx.watched.all(FINE_TUNE_JOB.plural, namespace) if attached_to(ftj) == name
    ]
    finetunejobs: dict[str, Manifest | None] = {
        job: ctx.api.get_object(FINE_TUNE_JOB.plural, namespace, job)
        for job in finetunejob_names(spec)
    }
    finetunejobs |= {ftj["metadata"]["name"]: ftj for ftj in attached}
    if deploy is None:
        deploy = ctx.api.get_deployment(namespace, name)
    if deploy is not None and not owned_by(deploy, md["metadata"]["uid"]):
        return Observed(md, spec, finetunejobs, attached, deployment=deploy)
    pods = ctx.api.list_pods(namespace, f"{LABEL_MODELDEPLOYMENT}={name}")
    token = admin_token(ctx.settings.admin_key, namespace, name)
    running = [
        ServerPod(
            namespace=namespace,
            name=pod["metadata"]["name"],
            uid=pod["metadata"]["uid"],
            ip=pod["status"]["podIP"],
            server=name,
            gate_open=gate_open(pod),
            loaded=servers.loaded(pod["status"]["podIP"], token, ctx.settings.scrape_timeout),
        )
        for pod in server_pods(pods)
    ]
    failures = ctx.load_failures.of(namespace, name, {p["metadata"]["uid"] for p in pods})
    return Observed(
        md,
        spec,
        finetunejobs,
        attached,
        deployment=deploy,
        pods=pods,
        servers=running,
        failures=failures,
    )


@kopf.on.event(GROUP, VERSION, MODEL_DEPLOYMENT.plural)
def modeldeployment_event(
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Reconciled when its spec is new or changed, and at the operator's start; the
    Deployment's events keep its status current after that."""
    if not namespace:
        return
    ctx = context_of(memo)
    if type == "DELETED":
        ctx.watched.forget(MODEL_DEPLOYMENT.plural, namespace, name)
        PHASES.record(MODEL_DEPLOYMENT.kind, namespace, name, None)
        return
    md = plain(body)
    ctx.watched.remember(MODEL_DEPLOYMENT.plural, md)
    if unobserved(md) or type is None:
        reconcile(ctx, namespace, name, md=md)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MODELDEPLOYMENT: kopf.PRESENT})
def deployment_event(
    type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    owner = (body.get("metadata", {}).get("labels") or {}).get(LABEL_MODELDEPLOYMENT)
    if owner and namespace:
        deploy = None if type == "DELETED" else plain(body)
        reconcile(context_of(memo), namespace, owner, deploy=deploy)


@kopf.on.event("", "v1", "pods", labels={LABEL_MODELDEPLOYMENT: kopf.PRESENT})
def server_pod_event(
    type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """A server pod whose containers just became ready gets its adapters (and then its
    readiness gate) at once, not at the next resync."""
    owner = (body.get("metadata", {}).get("labels") or {}).get(LABEL_MODELDEPLOYMENT)
    pod = plain(body)
    if owner and namespace and type != "DELETED" and server_pods([pod]) and not gate_open(pod):
        reconcile(context_of(memo), namespace, owner)


def finetunejob_changed(
    ctx: Context, namespace: str, finetunejob: str, *bodies: Manifest | None
) -> None:
    """Move on the ModelDeployments a FineTuneJob's change concerns: those whose adapter
    it is, and those its bodies (before and after the change) attach to."""
    names = {attached_to(body) for body in bodies} - {None}
    for md in ctx.watched.all(MODEL_DEPLOYMENT.plural, namespace):
        if serves(md, finetunejob) or md["metadata"]["name"] in names:
            reconcile(ctx, namespace, md["metadata"]["name"])


def serving_changed(before: Manifest | None, after: Manifest | None) -> bool:
    """Whether a FineTuneJob's change may change what a server it attaches to serves of
    it: it succeeded, its deploy or output changed, it is gone."""
    attached = attached_to(before) or attached_to(after)
    return bool(attached) and _served_as(before) != _served_as(after)


def _served_as(ftj: Manifest | None) -> tuple[Any, ...] | None:
    if ftj is None:
        return None
    spec = ftj.get("spec") or {}
    return (phase_of(ftj), spec.get("deploy"), spec.get("outputModel"))


def resync(ctx: Context) -> None:
    """Reconcile every ModelDeployment that is not settled (decide.unsettled): retries
    what failed and picks up adapters whose FineTuneJob finished while an event was
    missed."""
    resync_each(ctx, MODEL_DEPLOYMENT, unsettled, reconcile)
