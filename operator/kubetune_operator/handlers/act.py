"""The imperative shell every kind shares: read the object a reconcile is about, run
observe → decide → act, write the decided status once, and the periodic resync."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from kubetune_operator import servers
from kubetune_operator.api.common import CrdInfo
from kubetune_operator.api.modeldeployment import MODEL_DEPLOYMENT
from kubetune_operator.handlers.context import Context, now
from kubetune_operator.kube import Api
from kubetune_operator.observability import PHASES, RECONCILE_ERRORS, RECONCILE_SECONDS
from kubetune_operator.resources.actions import (
    Action,
    Activate,
    Apply,
    Create,
    Decision,
    Delete,
    LoadAdapter,
    OpenGate,
    ServerAction,
    Suspend,
    UnloadAdapter,
)
from kubetune_operator.resources.common import Manifest, event, owned_by
from kubetune_operator.resources.conditions import (
    StatusUpdate,
    phase_of,
    status_patch,
    unobserved,
)
from kubetune_operator.resources.modeldeployment.server import ADAPTERS_LOADED, admin_token

log = logging.getLogger(__name__)

Observed = TypeVar("Observed")

# A reconcile that keeps finding objects in the way of what it creates, or servers
# that do not show the adapters it loaded, gives up; the periodic resync tries again.
MAX_LOOKS = 4


def plain(body: Mapping[str, Any]) -> Manifest:
    """A kopf body as the plain, mutable dict the API client returns."""
    return copy.deepcopy(dict(body))


@contextmanager
def reconciling(
    ctx: Context, crd: CrdInfo, namespace: str, name: str, body: Manifest | None = None
) -> Iterator[Manifest | None]:
    """Hold the object's reconcile lock, time the reconcile and count it if it ends in
    an exception (which goes on up, for kopf or the next resync to retry); yields the
    object to reconcile (see live_object). Every reconcile of every kind runs in here,
    so each failed one is counted once, however many API calls it retried."""
    with (
        ctx.locks.hold(crd.kind, namespace, name),
        RECONCILE_SECONDS.labels(crd.kind).time(),
        RECONCILE_ERRORS.labels(crd.kind).count_exceptions(),
    ):
        yield live_object(ctx, crd, namespace, name, body)


def live_object(
    ctx: Context, crd: CrdInfo, namespace: str, name: str, body: Manifest | None = None
) -> Manifest | None:
    """The object to reconcile: `body` (what an event delivered) or a fresh read. None,
    and no longer counted by phase, when it is gone or being deleted."""
    obj = body if body is not None else ctx.api.get_object(crd.plural, namespace, name)
    if obj is None:
        # Deleted while the watch was away (a relist sends no DELETED event): the
        # resync must stop picking its copy.
        ctx.watched.forget(crd.plural, namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        PHASES.record(crd.kind, namespace, name, None)
        return None
    return obj


def reconcile_object(
    ctx: Context,
    crd: CrdInfo,
    obj: Manifest,
    observe: Callable[[Manifest | None], Observed],
    decide: Callable[[Observed], Decision],
) -> Decision:
    """Observe, decide and act for one object. An object found in the way of a create
    is observed with the rest and decided on again, and so are servers whose adapters
    changed (status says what they serve, not what was asked of them); then the status
    is written (once, only if it changed) and what must follow it is done."""
    seen = observe(None)
    for _ in range(MAX_LOOKS):
        decision = decide(seen)
        found = act(ctx, decision.actions)
        reloaded = any(isinstance(a, LoadAdapter | UnloadAdapter) for a in decision.actions)
        if found is None and not reloaded:
            break
        seen = observe(found)
    else:
        raise RuntimeError(
            f"{crd.kind} {obj['metadata']['name']}: objects kept appearing in the way of "
            "what it creates, or servers kept not showing what was loaded"
        )
    if decision.log:
        log.info("%s/%s: %s", obj["metadata"]["namespace"], obj["metadata"]["name"], decision.log)
    if decision.status is not None:
        write_status(ctx, crd, obj, decision.status)
    act(ctx, decision.after_status)
    return decision


def act(ctx: Context, actions: tuple[Action, ...]) -> Manifest | None:
    """Carry out the actions in order. Returns the object a Create found in its way (and
    stops there), or None when all went as decided."""
    for action in actions:
        if isinstance(action, LoadAdapter | UnloadAdapter | OpenGate):
            _on_server(ctx, action)
            continue
        found = _carry_out(ctx.api, action)
        if found is not None:
            return found
    return None


def _on_server(ctx: Context, action: ServerAction) -> None:
    """Load or unload an adapter on one server pod, or open its readiness gate. A load
    the server refuses is remembered, with its reason, for status; it is not tried
    again on that pod from the same folder."""
    pod = action.pod
    if isinstance(action, OpenGate):
        condition = {"type": ADAPTERS_LOADED, "status": "True", "lastTransitionTime": now()}
        ctx.api.set_pod_condition(pod.namespace, pod.name, condition)
        return
    token = admin_token(ctx.settings.admin_key, pod.namespace, pod.server)
    if isinstance(action, UnloadAdapter):
        problem = servers.unload(pod.ip, token, action.name)
        if problem is not None:
            log.warning("%s/%s: unloading %s: %s", pod.namespace, pod.name, action.name, problem)
        return
    problem = servers.load(pod.ip, token, action.name, action.path)
    if problem is not None:
        log.warning("%s/%s: loading %s: %s", pod.namespace, pod.name, action.name, problem)
        ctx.load_failures.record(pod, action.name, action.path, problem)


def _carry_out(api: Api, action: Action) -> Manifest | None:
    if isinstance(action, Create):
        return _create(api, action.body)
    if isinstance(action, Apply):
        if action.body["kind"] == "Deployment":
            api.apply_deployment(action.body)
        else:
            api.apply_object(MODEL_DEPLOYMENT.plural, action.body)
        return None
    if isinstance(action, Delete):
        if action.kind == "Job":
            api.delete_job(action.namespace, action.name)
        else:
            api.delete_object(MODEL_DEPLOYMENT.plural, action.namespace, action.name)
        return None
    if isinstance(action, Suspend):
        api.set_job_suspended(action.namespace, action.name, action.suspend)
    if isinstance(action, Activate):
        api.set_workload_active(action.namespace, action.name, action.active)
    return None


def _create(api: Api, body: Manifest) -> Manifest | None:
    kind = body["kind"]
    if kind == "Secret":
        api.ensure_secret(body)
        return None
    if kind == "ServiceAccount":
        api.ensure_service_account(body)
        return None
    if kind == "Service":
        api.ensure_service(body)
        return None
    existing = api.ensure_job(body) if kind == "Job" else api.ensure_config_map(body)
    if existing is None:
        return None
    owners = body["metadata"].get("ownerReferences") or []
    if kind == "Job" or not any(owned_by(existing, ref["uid"]) for ref in owners):
        return existing
    return None


def write_status(
    ctx: Context, crd: CrdInfo, obj: Manifest, update: StatusUpdate
) -> Manifest | None:
    """Write the decided status (retried on conflict against a fresh read), count the
    object by phase, and post the decision's Event when the write moved the object into
    its phase."""
    meta = obj["metadata"]
    before = phase_of(obj)
    updated = ctx.api.update_status(
        crd.plural,
        meta["namespace"],
        meta["name"],
        lambda current: status_patch(current, update, now()),
        current=obj,
    )
    after = phase_of(updated) if updated is not None else None
    PHASES.record(crd.kind, meta["namespace"], meta["name"], after)
    notice = update.notice
    if updated is not None and notice is not None and after != before and after == update.phase:
        ctx.api.post_event(event(updated, notice.type, notice.reason, notice.message, now()))
    return updated


def resync_each(
    ctx: Context,
    crd: CrdInfo,
    wanted: Callable[[Manifest], bool],
    reconcile: Callable[[Context, str, str], None],
) -> None:
    """Reconcile each watched object that ``wanted`` picks, from a fresh read, in the
    resync pool (the loop waits on none of them): the watch's copy only chooses, so
    finished objects, which pile up in a long-lived cluster, cost no request at all.
    A new or changed spec the watch delivered within the period is its event's to
    reconcile (a burst of applies would otherwise be reconciled twice); a later round
    retries it if that failed."""
    for body in ctx.watched.all(crd.plural):
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        fresh = unobserved(body) and ctx.watched.delivered_within(
            crd.plural, namespace, name, ctx.settings.resync_seconds
        )
        if wanted(body) and not fresh:
            ctx.resyncs.submit(
                (crd.kind, namespace, name), functools.partial(reconcile, ctx, namespace, name)
            )
