"""Pieces every object kubetune creates shares: labels, owner references, the
restricted security context, the names of things and the trainer's ServiceAccount."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from kubetune_operator.api.common import API_VERSION, Resources

Manifest = dict[str, Any]

MANAGED_BY = "kubetune-operator"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_DATASET = "kubetune.io/dataset"
LABEL_MODELDEPLOYMENT = "kubetune.io/modeldeployment"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# Kueue's Workload of a queued Job carries the Job's uid in this label.
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
LABEL_KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"
METRICS_PORT_NAME = "metrics"
TRAINER_SERVICE_ACCOUNT = "kubetune-trainer"
# Kubernetes caps the termination message at 4096 bytes; the trainer keeps under it.
TERMINATION_LOG = "/dev/termination-log"
# A Job's podFailurePolicy rule: a pod preempted, evicted or drained (the API server or
# the kubelet marks it DisruptionTarget) is replaced without counting as a failure.
IGNORE_DISRUPTIONS = {
    "action": "Ignore",
    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
}


def labels(component: str, instance: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **(extra or {}),
    }


def owner_reference(owner: Mapping[str, Any]) -> Manifest:
    """An ownerReference that makes the garbage collector delete the child with its owner."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether `obj` names the object with this uid as an owner: a child found by name
    may instead belong to a deleted object of the same name, until the garbage
    collector removes it."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def owner_name(obj: Mapping[str, Any], kind: str) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == kind:
            name: str = ref["name"]
            return name
    return None


def child_name(owner: str, suffix: str) -> str:
    """A DNS-1123 name for a child object; long owner names are shortened with a hash so
    that the name stays unique and within 63 characters (Job names end up in labels)."""
    name = f"{owner}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    return f"{owner[: 63 - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        # The trainer image's user (trainer-image/Dockerfile).
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_resources(res: Resources) -> Manifest:
    """Requests and limits: GPUs and memory limited to what is requested; CPU only
    requested, so that a pod may use idle cores."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.gpus:
        requests[res.gpu_resource] = limits[res.gpu_resource] = str(res.gpus)
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def scheduling(res: Resources) -> Manifest:
    """The pod spec fields that place a pod: node selector, tolerations, priority."""
    fields: Manifest = {}
    if res.node_selector:
        fields["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        fields["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations
        ]
    if res.priority_class_name:
        fields["priorityClassName"] = res.priority_class_name
    return fields


def event(obj: Mapping[str, Any], type_: str, reason: str, message: str, now: str) -> Manifest:
    """A core/v1 Event about ``obj``: what `kubectl describe` and `kubectl get events`
    show. Built here, not posted through kopf, whose posting only works inside its own
    handlers and not in the operator's resync thread."""
    meta = obj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion", API_VERSION),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def trainer_service_account(
    namespace: str, annotations: Mapping[str, str] | None = None
) -> Manifest:
    """The identity of validation, training and server pods: no API permissions are
    bound to it and no token is mounted. ``annotations`` give it a cloud identity (IRSA's
    eks.amazonaws.com/role-arn, GKE's iam.gke.io/gcp-service-account), through which
    they reach S3 without a Secret; they are set when it is made."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": TRAINER_SERVICE_ACCOUNT,
            "namespace": namespace,
            "labels": labels("trainer", namespace),
            **({"annotations": dict(annotations)} if annotations else {}),
        },
        "automountServiceAccountToken": False,
    }
