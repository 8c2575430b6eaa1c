"""The operator's few Kubernetes API calls, with the error handling they share:
create-if-missing (idempotence across restarts) and status writes guarded by
resourceVersion and retried on conflict."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune_operator.api.common import GROUP, VERSION
from kubetune_operator.observability import API_ERRORS
from kubetune_operator.resources.common import (
    KUEUE_GROUP,
    KUEUE_VERSION,
    LABEL_KUEUE_JOB_UID,
    Manifest,
)

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 8


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


# Server-side apply: the operator owns the fields it sets and nothing else.
FIELD_MANAGER = "kubetune-operator"
APPLY: dict[str, Any] = {
    "field_manager": FIELD_MANAGER,
    "force": True,
    "_content_type": "application/apply-patch+yaml",
}


@dataclass
class Api:
    core: client.CoreV1Api
    batch: client.BatchV1Api
    custom: client.CustomObjectsApi
    apps: client.AppsV1Api
    known_accounts: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def connect(cls, threads: int) -> Api:
        configuration = client.Configuration.get_default_copy()
        # One pooled connection per handler thread: a smaller pool drops connections
        # under load, and each new one costs a TLS handshake.
        configuration.connection_pool_maxsize = threads
        api_client = client.ApiClient(configuration)
        return cls(
            client.CoreV1Api(api_client),
            client.BatchV1Api(api_client),
            client.CustomObjectsApi(api_client),
            client.AppsV1Api(api_client),
        )

    # kubetune objects -------------------------------------------------------------

    def get_object(self, plural: str, namespace: str, name: str) -> Manifest | None:
        return _or_none(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name
            )
        )

    def create_object(self, plural: str, namespace: str, body: Manifest) -> None:
        _create(
            lambda: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body
            )
        )

    def apply_object(self, plural: str, body: Manifest) -> Manifest:
        """Create or update a kubetune object to `body` (server-side apply)."""
        meta = body["metadata"]
        applied: Manifest = _counted(
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], plural, meta["name"], body, **APPLY
            )
        )
        return applied

    def delete_object(self, plural: str, namespace: str, name: str) -> None:
        _or_none(
            lambda: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name
            )
        )

    def update_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        compute: Callable[[Manifest], Manifest | None],
        current: Manifest | None = None,
    ) -> Manifest | None:
        """Let `compute` derive a status patch from the object (`current`, or a fresh
        read), and write that patch only if nobody wrote in between; on a conflict, read
        and derive again."""
        for attempt in range(CONFLICT_RETRIES):
            obj = (
                current
                if attempt == 0 and current is not None
                else self.get_object(plural, namespace, name)
            )
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None
            patch = compute(obj)
            if not patch:
                return obj
            body = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": patch,
            }
            try:
                updated: Any = self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, plural, name, body
                )
                return dict(updated)
            except ApiException as exc:
                if exc.status != 409:
                    API_ERRORS.labels(str(exc.status)).inc()
                    raise
        raise RuntimeError(f"{plural}/{name}: status kept changing under {CONFLICT_RETRIES} writes")

    # Deployments and Services (model serving) --------------------------------------

    def get_deployment(self, namespace: str, name: str) -> Manifest | None:
        return _or_none(lambda: _json(self.apps.read_namespaced_deployment(name, namespace, **RAW)))

    def apply_deployment(self, body: Manifest) -> Manifest:
        meta = body["metadata"]
        payload: Any = body
        return cast(
            Manifest,
            _counted(
                lambda: _json(
                    self.apps.patch_namespaced_deployment(
                        meta["name"], meta["namespace"], payload, **APPLY, **RAW
                    )
                )
            ),
        )

    def ensure_service(self, body: Manifest) -> None:
        payload: Any = body
        _create(
            lambda: _drained(
                self.core.create_namespaced_service(body["metadata"]["namespace"], payload, **RAW)
            )
        )

    def post_event(self, body: Manifest) -> None:
        """Best effort, as a kubelet's Events are: a lost Event never fails a reconcile,
        whose status write already said the same."""
        payload: Any = body
        try:
            _drained(
                self.core.create_namespaced_event(body["metadata"]["namespace"], payload, **RAW)
            )
        except ApiException as exc:
            API_ERRORS.labels(str(exc.status)).inc()
            log.warning("could not post Event %s: %s", body["reason"], exc.reason)

    # Objects a spec names ------------------------------------------------------------

    def exists(self, kind: str, namespace: str, name: str) -> bool:
        """Whether the ConfigMap or PersistentVolumeClaim exists (metadata only: a
        ConfigMap's data is not the operator's to read)."""
        read = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
        }[kind]
        return _or_none(lambda: _drained(read(name, namespace, **METADATA_ONLY))) is not None

    # Jobs, pods and their companions ----------------------------------------------

    def get_job(self, namespace: str, name: str) -> Manifest | None:
        return _or_none(lambda: _json(self.batch.read_namespaced_job(name, namespace, **RAW)))

    def ensure_job(self, body: Manifest) -> Manifest | None:
        """Create the Job: None when created, else the one already there."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        payload: Any = body
        return _ensure(
            lambda: _drained(self.batch.create_namespaced_job(namespace, payload, **RAW)),
            lambda: self.get_job(namespace, name),
            f"Job {namespace}/{name}",
        )

    def set_job_suspended(self, namespace: str, name: str, suspend: bool) -> None:
        _counted(
            lambda: _drained(
                self.batch.patch_namespaced_job(
                    name, namespace, {"spec": {"suspend": suspend}}, **RAW
                )
            )
        )

    def list_jobs(self, namespace: str, selector: str) -> list[Manifest]:
        jobs = _counted(
            lambda: self.batch.list_namespaced_job(namespace, label_selector=selector, **RAW)
        )
        items: list[Manifest] = _json(jobs)["items"]
        return items

    def delete_job(self, namespace: str, name: str) -> None:
        _or_none(
            lambda: self.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background"
            )
        )

    def job_pods(self, namespace: str, job: str) -> list[Manifest]:
        return self.list_pods(namespace, f"batch.kubernetes.io/job-name={job}")

    def list_pods(self, namespace: str, selector: str) -> list[Manifest]:
        pods = _counted(
            lambda: self.core.list_namespaced_pod(namespace, label_selector=selector, **RAW)
        )
        items: list[Manifest] = _json(pods)["items"]
        return items

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> None:
        """Add or update one condition of a pod's status: a strategic merge patch merges
        the conditions by type, leaving the kubelet's as they are."""
        _counted(
            lambda: _drained(
                self.core.patch_namespaced_pod_status(
                    name,
                    namespace,
                    {"status": {"conditions": [condition]}},
                    _content_type="application/strategic-merge-patch+json",
                    **RAW,
                )
            )
        )

    def ensure_secret(self, body: Manifest) -> None:
        """Create the Secret unless one of its name exists; never read back."""
        payload: Any = body
        _create(
            lambda: _drained(
                self.core.create_namespaced_secret(body["metadata"]["namespace"], payload, **RAW)
            )
        )

    def ensure_config_map(self, body: Manifest) -> Manifest | None:
        """Create the ConfigMap: None when created, else the one already there (which
        a deleted namesake of its owner may have left)."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        payload: Any = body  # the client serialises plain dicts as they are
        return _ensure(
            lambda: _drained(self.core.create_namespaced_config_map(namespace, payload, **RAW)),
            lambda: _or_none(
                lambda: _json(self.core.read_namespaced_config_map(name, namespace, **RAW))
            ),
            f"ConfigMap {namespace}/{name}",
        )

    def job_workload(self, namespace: str, job_uid: str) -> Manifest | None:
        """Kueue's Workload of the Job, or None (not created yet, or no Kueue here)."""
        items = _or_none(
            lambda: self.custom.list_namespaced_custom_object(
                KUEUE_GROUP,
                KUEUE_VERSION,
                namespace,
                "workloads",
                label_selector=f"{LABEL_KUEUE_JOB_UID}={job_uid}",
            )
        )
        found: list[Manifest] = (items or {}).get("items") or []
        return found[0] if found else None

    def set_workload_active(self, namespace: str, name: str, active: bool) -> None:
        _counted(
            lambda: self.custom.patch_namespaced_custom_object(
                KUEUE_GROUP,
                KUEUE_VERSION,
                namespace,
                "workloads",
                name,
                {"spec": {"active": active}},
            )
        )

    def ensure_service_account(self, body: Manifest) -> None:
        namespace = body["metadata"]["namespace"]
        name = body["metadata"]["name"]
        if (namespace, name) in self.known_accounts:
            return
        if (
            _or_none(
                lambda: _drained(self.core.read_namespaced_service_account(name, namespace, **RAW))
            )
            is None
        ):
            payload: Any = body
            _create(
                lambda: _drained(
                    self.core.create_namespaced_service_account(namespace, payload, **RAW)
                )
            )
        # Pods name it; if someone deletes it later, pod creation says so in the Job.
        self.known_accounts.add((namespace, name))


# The raw JSON of a response: the client's typed models cost more CPU to build (and to
# turn back into dicts) than the operator's whole reconcile.
RAW: dict[str, Any] = {"_preload_content": False}
# Only the object's metadata comes back (the API server's PartialObjectMetadata).
METADATA_ONLY: dict[str, Any] = {
    **RAW,
    "_headers": {"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"},
}


def _json(response: Any) -> Any:
    return json.loads(response.data)


def _drained(response: Any) -> bool:
    """Read a raw response that is not needed: an unread one keeps its connection out
    of the pool, and the next request pays for a new TLS handshake."""
    response.drain_conn()
    response.release_conn()
    return True


def _counted(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as exc:
        API_ERRORS.labels(str(exc.status)).inc()
        raise


def _or_none(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as exc:
        if exc.status == 404:
            return None
        API_ERRORS.labels(str(exc.status)).inc()
        raise


def _ensure(
    create: Callable[[], Any], read: Callable[[], Manifest | None], what: str
) -> Manifest | None:
    """Create an object: None when created, else the one already there. One gone
    between the create and the read (the garbage collector removing a deleted
    namesake's) is created after all, rather than taken as made."""
    for _ in range(CONFLICT_RETRIES):
        if _create(create):
            return None
        existing = read()
        if existing is not None:
            return existing
    raise RuntimeError(f"{what} keeps appearing and vanishing")


def _create(call: Callable[[], Any]) -> Any:
    """Create, treating AlreadyExists as done (returning None): names are deterministic,
    so a restarted operator that repeats a create finds its own object."""
    try:
        return call()
    except ApiException as exc:
        if exc.status != 409:
            API_ERRORS.labels(str(exc.status)).inc()
            raise
        return None
