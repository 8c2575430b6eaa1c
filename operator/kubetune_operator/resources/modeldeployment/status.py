"""A ModelDeployment's status, read from its Deployment and, while that is not
available, from its newest server pod."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_operator.api.modeldeployment import DeploymentPhase, ModelDeploymentSpec
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.modeldeployment.server import endpoint
from kubetune_operator.resources.workloads import (
    PERMANENT_START_FAILURES,
    RETRIED_START_FAILURES,
    newest_pod,
    waiting_container,
)

# What a server pod can wait on for good while its Deployment still "progresses".
SERVER_POD_TROUBLE = RETRIED_START_FAILURES | PERMANENT_START_FAILURES | {"CrashLoopBackOff"}


def pod_trouble(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """Why the newest server pod does not serve, as the scheduler or the kubelet says
    it: (reason, message), or None when it says nothing is wrong. Until the
    Deployment's progress deadline, its own status only says it is not ready."""
    pod = newest_pod(pods)
    if pod is None:
        return None
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("reason") or "Unschedulable", condition.get("message") or ""
    cs = waiting_container(pod)
    if cs is None or cs["state"]["waiting"].get("reason") not in SERVER_POD_TROUBLE:
        return None
    waiting = cs["state"]["waiting"]
    last = (cs.get("lastState") or {}).get("terminated")
    detail = (
        f"last exit {last.get('reason') or 'Error'} (code {last.get('exitCode')})"
        if last
        else waiting.get("message") or ""
    )
    return waiting["reason"], f"container {cs.get('name')}: {detail}"


def serving_status(
    md: Mapping[str, Any],
    spec: ModelDeploymentSpec,
    deploy: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]] = (),
) -> tuple[Manifest, str]:
    """Status fields and the Ready condition's reason, read from the Deployment and,
    while it is not available, its newest pod."""
    st = (deploy or {}).get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    fields: Manifest = {"endpoint": endpoint(md), "readyReplicas": ready}
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    progressing = conditions.get("Progressing") or {}
    failure = conditions.get("ReplicaFailure") or {}
    available = conditions.get("Available") or {}
    if (
        progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded"
    ):
        return {
            **fields,
            "phase": DeploymentPhase.FAILED,
            "message": progressing.get("message") or "",
        }, ("ProgressDeadlineExceeded")
    if failure.get("status") == "True":
        message = f"server pods cannot be created: {failure.get('message') or ''}".strip()
        return {**fields, "phase": DeploymentPhase.FAILED, "message": message}, failure.get(
            "reason"
        ) or ("ReplicaFailure")
    if spec.replicas == 0:
        return {
            **fields,
            "phase": DeploymentPhase.PENDING,
            "message": "scaled to 0 replicas",
        }, "ScaledToZero"
    updated = int(st.get("updatedReplicas") or 0)
    if available.get("status") == "True" and ready >= 1 and updated >= spec.replicas:
        message = f"{ready}/{spec.replicas} replicas ready at {endpoint(md)}"
        return {**fields, "phase": DeploymentPhase.AVAILABLE, "message": message}, "Available"
    trouble = pod_trouble(pods)
    if trouble is not None:
        reason, detail = trouble
        message = (
            f"{ready}/{spec.replicas} replicas ready; the newest server pod: {reason}: {detail}"
        )
        return {**fields, "phase": DeploymentPhase.PROGRESSING, "message": message}, reason
    message = f"{ready}/{spec.replicas} replicas ready; vLLM loads the model before it serves"
    return {**fields, "phase": DeploymentPhase.PROGRESSING, "message": message}, "Progressing"
