"""ModelDeployment → vLLM's OpenAI-compatible server: the Deployment and Service that
serve the base model and the adapters, with what each pod mounts or fetches."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.common import ModelSource
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec, Runtime
from kubetune_operator.resources.common import (
    LABEL_MODELDEPLOYMENT,
    Manifest,
    container_resources,
    container_security_context,
    labels,
    owner_reference,
    pod_security_context,
    scheduling,
)
from kubetune_operator.resources.modeldeployment.adapters import ServedAdapter, max_lora_rank
from kubetune_operator.resources.storage import Mounted, base_model_input, model_folder_input

SERVE_PORT = 8000
BASE_MODEL = "/models/base"
ADAPTERS = "/models/adapters"
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


def server_args(spec: ModelDeploymentSpec, model_path: str) -> list[str]:
    """`vllm serve` arguments. extraArgs come last, so that they win."""
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


def plan(
    md: Mapping[str, Any],
    spec: ModelDeploymentSpec,
    adapters: Sequence[ServedAdapter],
    fetch_image: str,
) -> Serving:
    mounted = Mounted(path=BASE_MODEL)
    base = base_model_input(spec.base_model, BASE_MODEL, fetch_image)
    mounted.merge(base)
    args = server_args(spec, base.path)
    if adapters:
        modules = []
        for index, adapter in enumerate(adapters):
            folder = model_folder_input(
                f"adapter-{index}",
                ModelSource(pvc=adapter.pvc, s3=adapter.s3),
                posixpath.join(ADAPTERS, str(index)),
                fetch_image,
            )
            mounted.merge(folder)
            modules.append(f"{adapter.name}={folder.path}")
        args += [
            "--enable-lora",
            "--max-loras",
            str(len(adapters)),
            "--max-lora-rank",
            str(max_lora_rank(adapters)),
            "--lora-modules",
            *modules,
        ]
    args += list(spec.runtime.extra_args or [])
    return Serving(md, spec, tuple(adapters), mounted, tuple(args))


def endpoint(md: Mapping[str, Any]) -> str:
    meta = md["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{SERVE_PORT}/v1"


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def deployment(serving: Serving) -> Manifest:
    md, spec, mounted = serving.modeldeployment, serving.spec, serving.mounted
    meta = md["metadata"]
    selector = {LABEL_MODELDEPLOYMENT: meta["name"]}
    pod_labels = labels("serving", meta["name"], selector)
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "initContainers": mounted.init_containers,
        "containers": [
            {
                "name": "vllm",
                "image": spec.runtime.image,
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
