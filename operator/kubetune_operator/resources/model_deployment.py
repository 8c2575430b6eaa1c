"""ModelDeployment → vLLM's OpenAI-compatible server: where the base model and each
adapter come from, the Deployment and Service that serve them, the ModelDeployment a
FineTuneJob asks for, and the status read back from the Deployment."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.common import ModelSource, PvcLocation, S3Location
from kubetune_operator.api.finetunejob import Deploy, FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec, Runtime
from kubetune_operator.resources.common import (
    Manifest,
    container_resources,
    container_security_context,
    labels,
    owner_reference,
    pod_security_context,
    scheduling,
)
from kubetune_operator.resources.status import (
    PERMANENT_START_FAILURES,
    RETRIED_START_FAILURES,
    newest_pod,
    waiting_container,
)
from kubetune_operator.resources.storage import Mounted, base_model_input, model_folder_input

SERVE_PORT = 8000
BASE_MODEL = "/models/base"
ADAPTERS = "/models/adapters"
LABEL_MODELDEPLOYMENT = "kubetune.io/modeldeployment"
SPEC_HASH = "kubetune.io/spec-hash"
# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's own default, kept where an adapter's rank is not known (a source folder).
VLLM_DEFAULT_LORA_RANK = 16
# Loading a large model takes minutes: the startup probe allows 20 before the pod restarts.
STARTUP_SECONDS = 20 * 60


@dataclass(frozen=True)
class Blocked:
    """Why the server cannot be built yet (phase Pending) or at all (phase Failed)."""

    phase: str
    reason: str
    message: str


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    pvc: PvcLocation | None
    s3: S3Location | None
    rank: int | None  # known for a FineTuneJob's adapter


@dataclass(frozen=True)
class Serving:
    """The resolved ModelDeployment: what the server loads and how it is laid out."""

    modeldeployment: Mapping[str, Any]
    spec: ModelDeploymentSpec
    adapters: tuple[ServedAdapter, ...]
    mounted: Mounted
    args: tuple[str, ...]


def resolve_adapters(
    spec: ModelDeploymentSpec, finetunejobs: Mapping[str, Manifest | None]
) -> tuple[list[ServedAdapter], Blocked | None]:
    """Each adapter's folder: its source, or the output of the FineTuneJob it names,
    which must have Succeeded with a LoRA adapter trained on this base model."""
    adapters = []
    for adapter in spec.adapters:
        if adapter.source is not None:
            adapters.append(
                ServedAdapter(adapter.name, adapter.source.pvc, adapter.source.s3, None)
            )
            continue
        name = adapter.fine_tune_job
        ftj = finetunejobs.get(name or "")
        if ftj is None:
            return [], Blocked(
                "Pending", "FineTuneJobNotFound", f"FineTuneJob '{name}' does not exist yet"
            )
        phase = (ftj.get("status") or {}).get("phase")
        if phase == "Failed":
            return [], Blocked(
                "Failed", "FineTuneJobFailed", f"FineTuneJob '{name}' failed: nothing to serve"
            )
        if phase != "Succeeded":
            return [], Blocked(
                "Pending",
                "WaitingForFineTuneJob",
                f"waiting for FineTuneJob '{name}' to succeed (now {phase or 'Pending'})",
            )
        job = FineTuneJobSpec.model_validate(ftj["spec"])
        if job.tuning != "lora":
            return [], Blocked(
                "Failed",
                "NotAnAdapter",
                f"FineTuneJob '{name}' tuned all parameters, so its output is a whole model: "
                "serve it as baseModel (with source) instead of as an adapter",
            )
        if job.base_model.name != spec.base_model.name:
            return [], Blocked(
                "Failed",
                "BaseModelMismatch",
                f"adapter '{adapter.name}' was trained on {job.base_model.name}, but this "
                f"deployment serves {spec.base_model.name}",
            )
        storage = job.output_model.storage
        rank = job.hyperparameters.resolved(job.method, job.tuning).lora_rank
        adapters.append(ServedAdapter(adapter.name, storage.pvc, storage.s3, rank))
    return adapters, None


def max_lora_rank(adapters: Sequence[ServedAdapter]) -> int:
    """The smallest rank vLLM accepts that fits every adapter whose rank is known."""
    wanted = max(
        (a.rank if a.rank is not None else VLLM_DEFAULT_LORA_RANK for a in adapters),
        default=VLLM_DEFAULT_LORA_RANK,
    )
    return next((r for r in LORA_RANKS if r >= wanted), LORA_RANKS[-1])


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


def plan(md: Mapping[str, Any], adapters: Sequence[ServedAdapter], fetch_image: str) -> Serving:
    spec = ModelDeploymentSpec.model_validate(md["spec"])
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


def served_models(spec: ModelDeploymentSpec) -> list[str]:
    return [spec.base_model.name, *(a.name for a in spec.adapters)]


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
    deploy: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]] = (),
) -> tuple[Manifest, str]:
    """Status fields and the Ready condition's reason, read from the Deployment and,
    while it is not available, its newest pod."""
    spec = ModelDeploymentSpec.model_validate(md["spec"])
    st = (deploy or {}).get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    fields: Manifest = {
        "endpoint": endpoint(md),
        "servedModels": served_models(spec),
        "readyReplicas": ready,
    }
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    progressing = conditions.get("Progressing") or {}
    failure = conditions.get("ReplicaFailure") or {}
    available = conditions.get("Available") or {}
    if (
        progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded"
    ):
        return {**fields, "phase": "Failed", "message": progressing.get("message") or ""}, (
            "ProgressDeadlineExceeded"
        )
    if failure.get("status") == "True":
        message = f"server pods cannot be created: {failure.get('message') or ''}".strip()
        return {**fields, "phase": "Failed", "message": message}, failure.get("reason") or (
            "ReplicaFailure"
        )
    if spec.replicas == 0:
        return {**fields, "phase": "Pending", "message": "scaled to 0 replicas"}, "ScaledToZero"
    updated = int(st.get("updatedReplicas") or 0)
    if available.get("status") == "True" and ready >= 1 and updated >= spec.replicas:
        message = f"{ready}/{spec.replicas} replicas ready at {endpoint(md)}"
        return {**fields, "phase": "Available", "message": message}, "Available"
    trouble = pod_trouble(pods)
    if trouble is not None:
        reason, detail = trouble
        message = (
            f"{ready}/{spec.replicas} replicas ready; the newest server pod: {reason}: {detail}"
        )
        return {**fields, "phase": "Progressing", "message": message}, reason
    message = f"{ready}/{spec.replicas} replicas ready; vLLM loads the model before it serves"
    return {**fields, "phase": "Progressing", "message": message}, "Progressing"


def for_finetunejob(ftj: Mapping[str, Any], deploy: Deploy) -> Manifest:
    """The ModelDeployment a FineTuneJob with deploy.enabled asks for, named after it
    and owned by it: its adapter on the base model, or with full tuning its output as
    the model."""
    meta = ftj["metadata"]
    spec = FineTuneJobSpec.model_validate(ftj["spec"])
    out = spec.output_model
    served: dict[str, Any]
    if spec.tuning == "lora":
        served = {
            "baseModel": spec.base_model.model_dump(by_alias=True, exclude_none=True),
            "adapters": [{"name": out.name, "fineTuneJob": meta["name"]}],
        }
    else:
        source = out.storage.model_dump(by_alias=True, exclude_none=True)
        served = {
            "baseModel": {
                "name": out.name,
                "source": source,
                "trustRemoteCode": spec.base_model.trust_remote_code,
            }
        }
    md_spec: Manifest = {**served, "replicas": deploy.replicas}
    if deploy.runtime is not None:
        md_spec["runtime"] = deploy.runtime.model_dump(by_alias=True, exclude_none=True)
    # The server runs where the trainer ran, on as many GPUs: serving needs less
    # memory than training did.
    md_spec["resources"] = spec.resources.model_dump(
        by_alias=True,
        exclude_none=True,
        include={"gpus", "gpu_resource", "node_selector", "tolerations", "priority_class_name"},
    )
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": labels("serving", meta["name"], {"kubetune.io/finetunejob": meta["name"]}),
            "ownerReferences": [owner_reference(ftj)],
        },
        "spec": md_spec,
    }
