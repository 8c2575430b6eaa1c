"""The vLLM server a ModelDeployment becomes, and the status read back, without a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kubetune_operator.api.finetunejob import Deploy, FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.conditions import Verdict
from kubetune_operator.resources.finetunejob.deploy import model_deployment
from kubetune_operator.resources.modeldeployment import server as serving
from kubetune_operator.resources.modeldeployment import status
from kubetune_operator.resources.modeldeployment.adapters import ServedAdapter, resolve_adapters

IMAGE = "registry.local/kubetune/trainer:test"
BASE = {
    "name": "Qwen/Qwen2.5-VL-3B-Instruct",
    "source": {"pvc": {"claimName": "models", "path": "qwen"}},
}


def md(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "shapes", "namespace": "team-a", "uid": "md-uid", "generation": 1},
        "spec": {"baseModel": BASE, **spec},
    }


def ftj(phase: str | None = "Succeeded", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "team-a", "uid": "ftj-uid", "generation": 1},
        "spec": {
            "baseModel": BASE,
            "dataset": {"name": "shapes"},
            "outputModel": {
                "name": "shapes-lora",
                "storage": {"pvc": {"claimName": "models", "path": "out/tune"}},
            },
            **spec,
        },
        "status": {"phase": phase} if phase else {},
    }


def _spec(body: dict[str, Any]) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(body["spec"])


def resolved(body: dict[str, Any], jobs: dict[str, Any]) -> tuple[list[Any], Verdict | None]:
    return resolve_adapters(_spec(body), jobs)


def plan(body: dict[str, Any], adapters: list[ServedAdapter], image: str) -> serving.Serving:
    return serving.plan(body, _spec(body), adapters, image)


def serving_status(
    body: dict[str, Any], deploy: dict[str, Any] | None, pods: Sequence[dict[str, Any]] = ()
) -> tuple[dict[str, Any], str]:
    return status.serving_status(body, _spec(body), deploy, pods)


def for_finetunejob(job: dict[str, Any], deploy: Deploy) -> dict[str, Any]:
    return model_deployment(job, FineTuneJobSpec.model_validate(job["spec"]), deploy)


def test_an_adapter_from_a_succeeded_finetunejob_is_its_output_folder() -> None:
    adapters, blocked = resolved(
        md(adapters=[{"name": "shapes", "fineTuneJob": "tune"}]), {"tune": ftj()}
    )
    assert blocked is None
    assert [(a.name, a.pvc.claim_name, a.pvc.path, a.rank) for a in adapters if a.pvc] == [
        ("shapes", "models", "out/tune", 8)
    ]


@pytest.mark.parametrize(
    ("job", "phase", "reason", "words"),
    [
        (None, "Pending", "FineTuneJobNotFound", "does not exist"),
        (ftj("Running"), "Pending", "WaitingForFineTuneJob", "now Running"),
        (ftj("Failed"), "Failed", "FineTuneJobFailed", "failed"),
        (ftj(tuning="full"), "Failed", "NotAnAdapter", "serve it as baseModel"),
        (ftj(baseModel={"name": "other/model"}), "Failed", "BaseModelMismatch", "other/model"),
    ],
)
def test_an_adapter_waits_for_or_refuses_its_finetunejob(
    job: dict[str, Any] | None, phase: str, reason: str, words: str
) -> None:
    body = md(adapters=[{"name": "shapes", "fineTuneJob": "tune"}])
    adapters, blocked = resolved(body, {"tune": job})
    assert adapters == [] and blocked is not None
    assert (blocked.phase, blocked.reason) == (phase, reason)
    assert words in blocked.message


def deployment_of(body: dict[str, Any], jobs: dict[str, Any] | None = None) -> dict[str, Any]:
    adapters, blocked = resolved(body, jobs or {})
    assert blocked is None
    return serving.deployment(plan(body, adapters, IMAGE))


def test_the_server_loads_the_base_model_and_every_adapter() -> None:
    body = md(
        adapters=[
            {"name": "shapes", "fineTuneJob": "tune"},
            {
                "name": "colours",
                "source": {"s3": {"uri": "s3://bucket/colours", "secretRef": {"name": "s3-creds"}}},
            },
        ],
        runtime={
            "maxModelLen": 4096,
            "limitMmPerPrompt": {"image": 2},
            "extraArgs": ["--seed", "7"],
        },
        resources={"gpus": 2},
    )
    job = ftj(hyperparameters={"loraRank": 20})
    deploy = deployment_of(body, {"tune": job})
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert container["command"] == ["vllm", "serve"]
    assert args[0] == "/models/base/qwen"
    assert args[args.index("--served-model-name") + 1] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert args[args.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
    assert "--enable-lora" in args
    assert args[args.index("--max-loras") + 1] == "2"
    # Rank 20 needs vLLM's next allowed rank; the S3 adapter's rank is unknown (16).
    assert args[args.index("--max-lora-rank") + 1] == "32"
    modules = args[args.index("--lora-modules") + 1 : args.index("--lora-modules") + 3]
    assert modules == ["shapes=/models/adapters/0/out/tune", "colours=/models/adapters/1"]
    assert args[-2:] == ["--seed", "7"]  # extraArgs last, so that they win
    # The FineTuneJob's output PVC read-only; the S3 adapter fetched by the trainer image.
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert claims["adapter-0"] == {"claimName": "models", "readOnly": True}
    fetch = [c for c in pod["initContainers"] if c["name"] == "fetch-adapter-1"]
    assert fetch and fetch[0]["image"] == IMAGE
    assert {e["name"] for e in fetch[0]["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(
        m.get("readOnly")
        for m in container["volumeMounts"]
        if m["name"].startswith(("adapter", "base"))
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # A rollout never asks for more GPUs than the replicas hold.
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert deploy["metadata"]["ownerReferences"][0]["uid"] == "md-uid"


def test_a_model_without_adapters_is_served_without_lora() -> None:
    args = deployment_of(md())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-lora" not in args and "--lora-modules" not in args


def test_remote_code_runs_only_when_the_spec_opts_in() -> None:
    def args(base: dict[str, Any]) -> list[str]:
        body = md()
        body["spec"]["baseModel"] = base
        container = deployment_of(body)["spec"]["template"]["spec"]["containers"][0]
        return list(container["args"])

    assert "--trust-remote-code" not in args(BASE)
    assert "--trust-remote-code" in args({**BASE, "trustRemoteCode": True})


def test_the_spec_hash_follows_the_spec() -> None:
    one = deployment_of(md(replicas=1))["metadata"]["annotations"][serving.SPEC_HASH]
    again = deployment_of(md(replicas=1))["metadata"]["annotations"][serving.SPEC_HASH]
    two = deployment_of(md(replicas=2))["metadata"]["annotations"][serving.SPEC_HASH]
    assert one == again != two


def test_the_service_selects_the_server_pods() -> None:
    body = md()
    svc = serving.service(body)
    pods = serving.deployment(plan(body, [], IMAGE))["spec"]["template"]["metadata"]
    assert all(pods["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    assert serving.endpoint(body) == "http://shapes.team-a.svc:8000/v1"


def condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("replicas", "deploy_status", "phase", "reason"),
    [
        (1, None, "Progressing", "Progressing"),
        (
            1,
            {
                "readyReplicas": 1,
                "updatedReplicas": 1,
                "conditions": [condition("Available", "True")],
            },
            "Available",
            "Available",
        ),
        (
            2,
            {
                "readyReplicas": 1,
                "updatedReplicas": 1,
                "conditions": [condition("Available", "True")],
            },
            "Progressing",
            "Progressing",
        ),
        (
            1,
            {
                "conditions": [
                    condition("Progressing", "False", "ProgressDeadlineExceeded", "too slow")
                ]
            },
            "Failed",
            "ProgressDeadlineExceeded",
        ),
        (
            1,
            {"conditions": [condition("ReplicaFailure", "True", "FailedCreate", "forbidden: PSA")]},
            "Failed",
            "FailedCreate",
        ),
        (0, {}, "Pending", "ScaledToZero"),
    ],
)
def test_status_is_read_from_the_deployment(
    replicas: int, deploy_status: dict[str, Any] | None, phase: str, reason: str
) -> None:
    body = md(replicas=replicas, adapters=[{"name": "shapes", "fineTuneJob": "tune"}])
    deploy = None if deploy_status is None else {"status": deploy_status}
    fields, why = serving_status(body, deploy)
    assert (fields["phase"], why) == (phase, reason)
    assert fields["servedModels"] == ["Qwen/Qwen2.5-VL-3B-Instruct", "shapes"]
    assert fields["endpoint"] == "http://shapes.team-a.svc:8000/v1"


def _server_pod(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "shapes-abc", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": status,
    }


@pytest.mark.parametrize(
    ("pod_status", "reason", "says"),
    [
        (
            {
                "conditions": [
                    condition(
                        "PodScheduled",
                        "False",
                        "Unschedulable",
                        "0/3 nodes: Insufficient nvidia.com/gpu",
                    )
                ]
            },
            "Unschedulable",
            "Insufficient nvidia.com/gpu",
        ),
        (
            {
                "containerStatuses": [
                    {
                        "name": "vllm",
                        "state": {
                            "waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}
                        },
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    }
                ]
            },
            "CrashLoopBackOff",
            "container vllm: last exit OOMKilled (code 137)",
        ),
        (
            {
                "initContainerStatuses": [
                    {
                        "name": "fetch-base-model",
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": 'secret "hf" not found',
                            }
                        },
                    }
                ]
            },
            "CreateContainerConfigError",
            'secret "hf" not found',
        ),
        (
            {"containerStatuses": [{"name": "vllm", "state": {"running": {}}}]},
            "Progressing",
            "vLLM loads",
        ),
    ],
)
def test_a_server_pod_that_cannot_serve_says_why(
    pod_status: dict[str, Any], reason: str, says: str
) -> None:
    """Until the Deployment's progress deadline, only its newest pod tells what is wrong."""
    body = md(replicas=1, adapters=[{"name": "shapes", "fineTuneJob": "tune"}])
    deploy = {"status": {"conditions": [condition("Progressing", "True", "ReplicaSetUpdated", "")]}}
    fields, why = serving_status(body, deploy, [_server_pod(pod_status)])
    assert (fields["phase"], why) == ("Progressing", reason)
    assert says in fields["message"], fields["message"]


def test_a_finetunejob_deploys_its_adapter_or_its_whole_model() -> None:
    lora = for_finetunejob(
        ftj(deploy={"enabled": True, "replicas": 2}), Deploy(enabled=True, replicas=2)
    )
    spec = ModelDeploymentSpec.model_validate(lora["spec"])
    assert spec.base_model.name == BASE["name"] and spec.replicas == 2
    assert [(a.name, a.fine_tune_job) for a in spec.adapters] == [("shapes-lora", "tune")]
    assert lora["metadata"]["ownerReferences"][0]["uid"] == "ftj-uid"

    full = for_finetunejob(ftj(tuning="full"), Deploy(enabled=True))
    spec = ModelDeploymentSpec.model_validate(full["spec"])
    assert spec.adapters == []
    assert spec.base_model.name == "shapes-lora"
    assert spec.base_model.source is not None and spec.base_model.source.pvc is not None
    assert spec.base_model.source.pvc.path == "out/tune"
