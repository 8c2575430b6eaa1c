"""ModelDeployment → vLLM's OpenAI-compatible server: the Deployment and Service that
serve the base model and the adapters, with what each pod mounts or fetches."""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.common import ModelSource
from kubetune_operator.api.modeldeployment import API_KEY_SECRET_KEY, ModelDeploymentSpec, Runtime
from kubetune_operator.resources.common import (
    LABEL_MODELDEPLOYMENT,
    TRAINER_SERVICE_ACCOUNT,
    Manifest,
    container_resources,
    container_security_context,
    labels,
    owner_reference,
    pod_security_context,
    scheduling,
)
from kubetune_operator.resources.modeldeployment.adapters import ServedAdapter
from kubetune_operator.resources.platform import PodDefaults
from kubetune_operator.resources.policy import reserved
from kubetune_operator.resources.storage import Mounted, base_model_input, model_folder_input
from kubetune_trainer.serving import guard

SERVE_PORT = 8000
BASE_MODEL = "/models/base"
CLAIMS = "/models/claims"
FETCHED_ADAPTERS = "/models/adapters"
# The guard module's folder, filled by an init container from the trainer image.
GUARD_FOLDER = "/opt/kubetune"
ADMIN_TOKEN_KEY = "token"
# The pod condition the operator sets once it has loaded the adapters into the pod: a
# readiness gate, so the Service sends no request to a pod that lacks them.
ADAPTERS_LOADED = "kubetune.io/adapters-loaded"
SPEC_HASH = "kubetune.io/spec-hash"
# Loading a large model takes minutes: the startup probe allows 20 before the pod restarts.
STARTUP_SECONDS = 20 * 60


@dataclass(frozen=True)
class Serving:
    """The resolved ModelDeployment: what the server loads and how it is laid out."""

    modeldeployment: Mapping[str, Any]
    spec: ModelDeploymentSpec
    adapters: tuple[ServedAdapter, ...]
    mounted: Mounted
    args: tuple[str, ...]
    trainer_image: str
    # runtime.image, or the platform's default where the spec names none.
    server_image: str


def server_args(spec: ModelDeploymentSpec, model_path: str) -> list[str]:
    """`vllm serve` arguments. `--trust-remote-code` only where the spec opts in."""
    runtime: Runtime = spec.runtime
    args = [
        model_path,
        "--served-model-name",
        spec.base_model.name,
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVE_PORT),
        "--gpu-memory-utilization",
        str(runtime.gpu_memory_utilization),
    ]
    if spec.resources.gpus > 1:
        args += ["--tensor-parallel-size", str(spec.resources.gpus)]
    if runtime.max_model_len is not None:
        args += ["--max-model-len", str(runtime.max_model_len)]
    if runtime.limit_mm_per_prompt:
        args += ["--limit-mm-per-prompt", json.dumps(runtime.limit_mm_per_prompt, sort_keys=True)]
    if runtime.max_pixels is not None:
        args += ["--mm-processor-kwargs", json.dumps({"max_pixels": runtime.max_pixels})]
    if spec.base_model.trust_remote_code:
        args.append("--trust-remote-code")
    return args


def claim_folder(claim: str) -> str:
    return posixpath.join(CLAIMS, claim)


def _volume_name(prefix: str, key: str) -> str:
    """A volume name for a claim or adapter name, which may be longer than one allows."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def adapter_path(adapter: ServedAdapter) -> str:
    """Where the server pod finds the adapter's folder: on its claim's mount, or where
    an init container fetched it from S3."""
    if adapter.pvc is not None:
        return posixpath.join(claim_folder(adapter.pvc.claim_name), adapter.pvc.path)
    return posixpath.join(FETCHED_ADAPTERS, adapter.name)


def plan(
    md: Mapping[str, Any],
    spec: ModelDeploymentSpec,
    adapters: Sequence[ServedAdapter],
    fetch_image: str,
    default_server_image: str,
) -> Serving:
    """What the server pods load, and the image that serves it (runtime.image, else the
    platform's ``default_server_image``). Adapters are not in the pod template (the
    operator loads them into each running pod), but their folders must be in the pod:
    each PersistentVolumeClaim that holds the base model or an adapter is mounted whole,
    so an adapter on a claim already mounted joins without a new pod; an adapter in S3
    is fetched by an init container, so adding one rolls the pods.

    extraArgs come last, so that they win over vLLM's defaults; they can never carry a
    flag the operator sets (the decision refuses such a spec before it gets here)."""
    extra = spec.runtime.extra_args or []
    taken = [arg for arg in extra if reserved(arg) is not None]
    if taken:
        raise ValueError(f"runtime.extraArgs carry flags the operator sets: {taken}")
    mounted = Mounted(path=BASE_MODEL)
    source = spec.base_model.source
    claims = {a.pvc.claim_name for a in adapters if a.pvc is not None}
    if source is not None and source.pvc is not None:
        claims.add(source.pvc.claim_name)
        base_path = posixpath.join(claim_folder(source.pvc.claim_name), source.pvc.path)
    else:
        base = base_model_input(spec.base_model, BASE_MODEL, fetch_image)
        mounted.merge(base)
        base_path = base.path
    for claim in sorted(claims):
        volume = _volume_name("claim", claim)
        mounted.volumes.append(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounted.mounts.append({"name": volume, "mountPath": claim_folder(claim), "readOnly": True})
    for adapter in sorted(adapters, key=lambda a: a.name):
        if adapter.s3 is not None:
            mounted.merge(
                model_folder_input(
                    _volume_name("adapter", adapter.name),
                    ModelSource(s3=adapter.s3),
                    adapter_path(adapter),
                    fetch_image,
                )
            )
    args = [
        *server_args(spec, base_path),
        "--enable-lora",
        "--max-loras",
        str(spec.runtime.max_loras),
        "--max-lora-rank",
        str(spec.runtime.max_lora_rank),
        "--middleware",
        guard.MIDDLEWARE,
        *extra,
    ]
    image = spec.runtime.image or default_server_image
    return Serving(md, spec, tuple(adapters), mounted, tuple(args), fetch_image, image)


def admin_secret_name(md: Mapping[str, Any]) -> str:
    return f"{md['metadata']['name']}-server-admin"


def admin_token(key: str, namespace: str, name: str) -> str:
    """The token the operator uses on ModelDeployment ``name``'s adapter routes: derived
    from the operator's key and the ModelDeployment's name, so the operator never reads
    it back (it needs no access to Secrets beyond creating them), and a namesake made
    again finds the same token in a Secret the garbage collector has not removed yet."""
    return hmac.new(key.encode(), f"{namespace}/{name}".encode(), hashlib.sha256).hexdigest()


def admin_secret(md: Mapping[str, Any], key: str) -> Manifest:
    meta = md["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": admin_secret_name(md),
            "namespace": meta["namespace"],
            "labels": labels("serving", meta["name"], {LABEL_MODELDEPLOYMENT: meta["name"]}),
            "ownerReferences": [owner_reference(md)],
        },
        "type": "Opaque",
        "stringData": {ADMIN_TOKEN_KEY: admin_token(key, meta["namespace"], meta["name"])},
    }


def endpoint(md: Mapping[str, Any]) -> str:
    meta = md["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{SERVE_PORT}/v1"


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def deployment(serving: Serving, pod_defaults: PodDefaults | None = None) -> Manifest:
    """The server's Deployment, with the platform's pod defaults in its template (and
    so in its spec hash: a change of them rolls the pods)."""
    md, spec, mounted = serving.modeldeployment, serving.spec, serving.mounted
    meta = md["metadata"]
    selector = {LABEL_MODELDEPLOYMENT: meta["name"]}
    pod_labels = labels("serving", meta["name"], selector)
    install_guard = {
        "name": "install-guard",
        "image": serving.trainer_image,
        "command": ["kubetune", "install-guard", GUARD_FOLDER],
        "volumeMounts": [{"name": "guard", "mountPath": GUARD_FOLDER}],
        "securityContext": container_security_context(),
    }
    auth_env = [
        {
            "name": guard.ADMIN_TOKEN_VARIABLE,
            "valueFrom": {"secretKeyRef": {"name": admin_secret_name(md), "key": ADMIN_TOKEN_KEY}},
        }
    ]
    api_key = spec.auth.api_key_secret_ref
    if api_key is not None:
        auth_env.append(
            {
                "name": guard.API_KEY_VARIABLE,
                "valueFrom": {"secretKeyRef": {"name": api_key.name, "key": API_KEY_SECRET_KEY}},
            }
        )
    pod_spec: Manifest = {
        # The identity that reaches S3 without a Secret where the platform annotates it.
        "serviceAccountName": TRAINER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "readinessGates": [{"conditionType": ADAPTERS_LOADED}],
        "initContainers": [install_guard, *mounted.init_containers],
        "containers": [
            {
                "name": "vllm",
                "image": serving.server_image,
                "command": ["vllm", "serve"],
                "args": list(serving.args),
                "env": [
                    # The root filesystem is read-only: caches go to the emptyDirs. The
                    # user id has no passwd entry, and torch's compile cache asks for
                    # a user name.
                    {"name": "HOME", "value": "/tmp"},
                    {"name": "USER", "value": "vllm"},
                    {"name": "HF_HOME", "value": "/cache/huggingface"},
                    {"name": "VLLM_CACHE_ROOT", "value": "/cache/vllm"},
                    {"name": "XDG_CACHE_HOME", "value": "/cache"},
                    {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/cache/torchinductor"},
                    {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
                    {"name": "NUMBA_CACHE_DIR", "value": "/cache/numba"},
                    {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
                    # Adapters come and go while it serves, through the guarded routes.
                    {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
                    {"name": "PYTHONPATH", "value": GUARD_FOLDER},
                    *auth_env,
                    *mounted.env,
                ],
                "ports": [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}],
                "resources": container_resources(spec.resources),
                "startupProbe": _probe("/health", 10, STARTUP_SECONDS // 10),
                "readinessProbe": _probe("/health", 5, 3),
                "livenessProbe": _probe("/health", 10, 6),
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "cache", "mountPath": "/cache"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "guard", "mountPath": GUARD_FOLDER, "readOnly": True},
                    *mounted.mounts,
                ],
                "securityContext": container_security_context(),
            }
        ],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            # Tensor-parallel workers exchange data through /dev/shm, tiny by default.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "guard", "emptyDir": {}},
            *mounted.volumes,
        ],
    }
    pod_spec |= scheduling(spec.resources)
    body: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": pod_labels,
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "replicas": spec.replicas,
            # GPUs are scarce: a rollout replaces pods one at a time instead of first
            # asking for a GPU more than the replicas hold.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            # Loading the model may take the startup probe's whole allowance.
            "progressDeadlineSeconds": STARTUP_SECONDS + 300,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }
    if pod_defaults is not None:
        body = pod_defaults.apply(body)
    body["metadata"]["annotations"] = {SPEC_HASH: spec_hash(body)}
    return body


def spec_hash(body: Mapping[str, Any]) -> str:
    """A digest of what the operator sets: a Deployment whose annotation matches needs no
    write."""
    desired = {"spec": body["spec"], "labels": body["metadata"].get("labels")}
    return hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:16]


def service(md: Mapping[str, Any]) -> Manifest:
    meta = md["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": labels("serving", meta["name"], {LABEL_MODELDEPLOYMENT: meta["name"]}),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "selector": {LABEL_MODELDEPLOYMENT: meta["name"]},
            "ports": [
                {"name": "http", "port": SERVE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
