"""ModelDeployment handlers: observe the FineTuneJobs its adapters name and its vLLM
Deployment, decide (resources/modeldeployment/decide.py), act."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune_operator.api.common import GROUP, VERSION
from kubetune_operator.api.finetunejob import FINE_TUNE_JOB
from kubetune_operator.api.modeldeployment import MODEL_DEPLOYMENT, ModelDeploymentSpec
from kubetune_operator.handlers.act import plain, reconcile_object, reconciling, resync_each
from kubetune_operator.handlers.context import Context, context_of
from kubetune_operator.observability import PHASES
from kubetune_operator.resources.common import LABEL_MODELDEPLOYMENT, Manifest, owned_by
from kubetune_operator.resources.conditions import unobserved
from kubetune_operator.resources.modeldeployment.adapters import resolve_adapters
from kubetune_operator.resources.modeldeployment.decide import (
    Observed,
    decide,
    finetunejob_names,
    serves,
    unsettled,
)
from kubetune_operator.resources.modeldeployment.status import pods_matter


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
            lambda _: observe(ctx, live, spec, deploy),
            lambda seen: decide(seen, ctx.settings),
        )


def observe(
    ctx: Context, md: Manifest, spec: ModelDeploymentSpec, deploy: Manifest | None
) -> Observed:
    """The FineTuneJobs its adapters name; once they can all be served, its Deployment
    (``deploy``, when an event delivered it) and, while that progresses, the server
    pods, which may say why it does not."""
    namespace, name = md["metadata"]["namespace"], md["metadata"]["name"]
    finetunejobs = {
        job: ctx.api.get_object(FINE_TUNE_JOB.plural, namespace, job)
        for job in finetunejob_names(spec)
    }
    if resolve_adapters(spec, finetunejobs)[1] is not None:
        return Observed(md, spec, finetunejobs)
    if deploy is None:
        deploy = ctx.api.get_deployment(namespace, name)
    ours = deploy is None or owned_by(deploy, md["metadata"]["uid"])
    pods = (
        ctx.api.list_pods(namespace, f"{LABEL_MODELDEPLOYMENT}={name}")
        if ours and pods_matter(md, spec, deploy)
        else []
    )
    return Observed(md, spec, finetunejobs, deployment=deploy, pods=pods)


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


def finetunejob_finished(ctx: Context, namespace: str, finetunejob: str) -> None:
    """Move on the ModelDeployments that wait for this FineTuneJob's adapter."""
    for md in ctx.watched.all(MODEL_DEPLOYMENT.plural, namespace):
        if serves(md, finetunejob):
            reconcile(ctx, namespace, md["metadata"]["name"])


def resync(ctx: Context) -> None:
    """Reconcile every ModelDeployment that is not Available: retries what failed and
    picks up adapters whose FineTuneJob finished while an event was missed."""
    resync_each(ctx, MODEL_DEPLOYMENT, unsettled, reconcile)
