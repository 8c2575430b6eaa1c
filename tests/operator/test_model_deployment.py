"""The vLLM server a ModelDeployment becomes, and the status read back, without a cluster."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest

from kubetune_operator.api.finetunejob import Deploy, FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.finetunejob.deploy import model_deployment
from kubetune_operator.resources.modeldeployment import server as serving
from kubetune_operator.resources.modeldeployment import status
from kubetune_operator.resources.modeldeployment.adapters import (
    ServedAdapter,
    Unservable,
    resolve,
    served,
    wanted,
)

IMAGE = "registry.local/kubetune/trainer:test"
SERVER_IMAGE = "registry.local/vllm/vllm-openai:test"
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


def resolved(
    body: dict[str, Any], jobs: dict[str, Any], attached: Sequence[dict[str, Any]] = ()
) -> list[ServedAdapter | Unservable]:
    spec = _spec(body)
    return resolve(spec, wanted(spec, attached), jobs)


def plan(body: dict[str, Any], adapters: list[ServedAdapter], image: str) -> serving.Serving:
    return serving.plan(body, _spec(body), adapters, image, SERVER_IMAGE)


def serving_status(
    body: dict[str, Any], deploy: dict[str, Any] | None, pods: Sequence[dict[str, Any]] = ()
) -> tuple[dict[str, Any], str]:
    return status.serving_status(body, _spec(body), deploy, pods)


def for_finetunejob(job: dict[str, Any], deploy: Deploy) -> dict[str, Any]:
    return model_deployment(job, FineTuneJobSpec.model_validate(job["spec"]), deploy)


def test_an_adapter_from_a_succeeded_finetunejob_is_its_output_folder() -> None:
    adapters = resolved(md(adapters=[{"name": "shapes", "fineTuneJob": "tune"}]), {"tune": ftj()})
    assert adapters == [ServedAdapter("shapes", adapters[0].pvc, None, 8)]
    assert adapters[0].pvc is not None
    assert (adapters[0].pvc.claim_name, adapters[0].pvc.path) == ("models", "out/tune")


@pytest.mark.parametrize(
    ("job", "reason", "words"),
    [
        (None, "FineTuneJobNotFound", "does not exist"),
        (ftj("Running"), "WaitingForFineTuneJob", "now Running"),
        (ftj("Failed"), "FineTuneJobFailed", "failed"),
        (ftj(tuning="full"), "NotAnAdapter", "serve it as baseModel"),
        (ftj(baseModel={"name": "other/model"}), "BaseModelMismatch", "other/model"),
        (ftj(hyperparameters={"loraRank": 128}), "RankTooLarge", "rank 128, above"),
    ],
)
def test_an_adapter_that_cannot_be_served_says_why_and_the_others_still_are(
    job: dict[str, Any] | None, reason: str, words: str
) -> None:
    body = md(
        adapters=[
            {"name": "shapes", "fineTuneJob": "tune"},
            {"name": "colours", "source": {"pvc": {"claimName": "models", "path": "colours"}}},
        ]
    )
    bad, good = resolved(body, {"tune": job})
    assert isinstance(bad, Unservable) and (bad.name, bad.reason) == ("shapes", reason)
    assert words in bad.message
    assert isinstance(good, ServedAdapter) and good.name == "colours"


def test_finetunejobs_that_attach_serve_under_their_output_name_unless_it_is_taken() -> None:
    body = md(adapters=[{"name": "shapes-lora", "fineTuneJob": "tune"}])
    second = ftj(deploy={"enabled": True, "modelDeployment": "shapes"})
    second["metadata"]["name"] = "tune-2"
    second["spec"]["outputModel"] = {
        "name": "colours",
        "storage": {"pvc": {"claimName": "models", "path": "out/tune-2"}},
    }
    third = copy.deepcopy(second)
    third["metadata"]["name"] = "tune-3"
    third["spec"]["outputModel"]["name"] = "shapes-lora"
    adapters = resolved(body, {"tune": ftj(), "tune-2": second, "tune-3": third}, [third, second])
    assert [(a.name, type(a).__name__) for a in adapters] == [
        ("shapes-lora", "ServedAdapter"),
        ("colours", "ServedAdapter"),
        ("shapes-lora", "Unservable"),
    ]
    taken = adapters[2]
    assert isinstance(taken, Unservable) and taken.reason == "NameTaken"
    assert "tune-3" in taken.message


def deployment_of(body: dict[str, Any], jobs: dict[str, Any] | None = None) -> dict[str, Any]:
    adapters = resolved(body, jobs or {})
    assert all(isinstance(a, ServedAdapter) for a in adapters)
    return serving.deployment(plan(body, served(adapters), IMAGE))


def test_the_server_mounts_what_the_adapters_need_but_loads_them_at_runtime() -> None:
    body = md(
        adapters=[
            {"name": "shapes", "fineTuneJob": "tune"},
            {
                "name": "colours",
                "source": {"s3": {"uri": "s3://bucket/colours", "secretRef": {"name": "s3-creds"}}},
            },
            {"name": "sizes", "source": {"pvc": {"claimName": "team-store", "path": "sizes"}}},
        ],
        runtime={
            "maxModelLen": 4096,
            "limitMmPerPrompt": {"image": 2},
            "maxLoraRank": 32,
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
    assert args[0] == "/models/claims/models/qwen"
    assert args[args.index("--served-model-name") + 1] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert args[args.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
    assert "--enable-lora" in args and "--lora-modules" not in args
    assert args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--max-lora-rank") + 1] == "32"
    assert args[args.index("--middleware") + 1] == "kubetune_server_guard.ServerGuard"
    assert args[-2:] == ["--seed", "7"]  # extraArgs last, so that they win
    # Each claim once, whole and read-only, whatever the adapters on it; the S3 adapter
    # fetched by the trainer image.
    claims = sorted(
        (v["persistentVolumeClaim"]["claimName"], v["persistentVolumeClaim"]["readOnly"])
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    )
    assert claims == [("models", True), ("team-store", True)]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models/claims/models"]["readOnly"] is True
    assert mounts["/models/claims/team-store"]["readOnly"] is True
    fetch = [c for c in pod["initContainers"] if c["name"].startswith("fetch-adapter-")]
    assert len(fetch) == 1 and fetch[0]["image"] == IMAGE
    assert fetch[0]["command"][-1] == "/models/adapters/colours"
    assert {e["name"] for e in fetch[0]["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(
        m.get("readOnly")
        for m in container["volumeMounts"]
        if m["name"] != "tmp" and m["name"] not in ("cache", "dshm")
    )
    # The guard comes from the trainer image; the admin token from the operator's Secret.
    assert pod["initContainers"][0]["command"] == ["kubetune", "install-guard", "/opt/kubetune"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PYTHONPATH"]["value"] == "/opt/kubetune"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["KUBETUNE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "shapes-server-admin",
        "key": "token",
    }
    assert "KUBETUNE_API_KEY" not in env
    assert pod["readinessGates"] == [{"conditionType": "kubetune.io/adapters-loaded"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # A rollout never asks for more GPUs than the replicas hold.
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert deploy["metadata"]["ownerReferences"][0]["uid"] == "md-uid"


def test_adding_an_adapter_on_a_mounted_claim_leaves_the_pod_template_as_it_is() -> None:
    """What makes an adapter join without new pods."""
    one = md(adapters=[{"name": "a", "source": {"pvc": {"claimName": "models", "path": "a"}}}])
    two = md(
        adapters=[
            {"name": "a", "source": {"pvc": {"claimName": "models", "path": "a"}}},
            {"name": "b", "source": {"pvc": {"claimName": "models", "path": "b"}}},
        ]
    )
    assert deployment_of(md())["spec"] == deployment_of(one)["spec"] == deployment_of(two)["spec"]


def test_an_api_key_comes_from_the_users_secret() -> None:
    body = md(auth={"apiKeySecretRef": {"name": "team-key"}})
    env = {
        e["name"]: e
        for e in deployment_of(body)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-key",
        "key": "apiKey",
    }


def test_the_admin_secret_holds_a_token_derived_from_the_operators_key() -> None:
    body = md()
    secret = serving.admin_secret(body, "operator-key")
    token = secret["stringData"]["token"]
    assert token == serving.admin_token("operator-key", "team-a", "shapes")
    assert token != serving.admin_token("other-key", "team-a", "shapes")
    assert token != serving.admin_token("operator-key", "team-b", "shapes")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "md-uid"


def test_remote_code_runs_only_when_the_spec_opts_in() -> None:
    def args(base: dict[str, Any]) -> list[str]:
        body = md()
        body["spec"]["baseModel"] = base
        container = deployment_of(body)["spec"]["template"]["spec"]["containers"][0]
        return list(container["args"])

    assert "--trust-remote-code" not in args(BASE)
    assert args({**BASE, "trustRemoteCode": True}).count("--trust-remote-code") == 1


@pytest.mark.parametrize("flag", ["--trust-remote-code", "--trust_remote_code=true", "--port"])
@pytest.mark.parametrize("opted_in", [False, True])
def test_extra_args_never_carry_a_flag_the_operator_sets(flag: str, opted_in: bool) -> None:
    """Whatever the policy allows, and with or without the spec's opt-in: the decision
    refuses such a spec first, and the builder will not build it for another caller."""
    body = md(runtime={"extraArgs": ["--seed", "7", flag]})
    body["spec"]["baseModel"] = {**BASE, "trustRemoteCode": opted_in}
    with pytest.raises(ValueError, match=r"^runtime\.extraArgs carry flags the operator sets: \["):
        plan(body, [], IMAGE)


def test_the_spec_hash_follows_the_spec() -> None:
    one = deployment_of(md(replicas=1))["metadata"]["annotations"][serving.SPEC_HASH]
    again = deployment_of(md(replicas=1))["metadata"]["annotations"][serving.SPEC_HASH]
    two = deployment_of(md(replicas=2))["metadata"]["annotations"][serving.SPEC_HASH]
    assert one == again != two


def test_the_server_image_is_the_spec_s_or_else_the_platform_s() -> None:
    def image(body: dict[str, Any]) -> str:
        pod = serving.deployment(plan(body, [], IMAGE))["spec"]["template"]["spec"]
        return str(pod["containers"][0]["image"])

    assert image(md()) == image(md(runtime={"maxModelLen": 4096})) == SERVER_IMAGE
    assert image(md(runtime={"image": "corp.io/vllm:2"})) == "corp.io/vllm:2"


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
    # Images at serve time are sized as in training (the default budget here).
    assert spec.runtime.max_pixels == 401408
    small = ftj(hyperparameters={"maxPixels": 3136})
    assert for_finetunejob(small, Deploy(enabled=True))["spec"]["runtime"]["maxPixels"] == 3136
    chosen = Deploy.model_validate({"enabled": True, "runtime": {"maxPixels": 1024}})
    assert for_finetunejob(small, chosen)["spec"]["runtime"]["maxPixels"] == 1024
    assert lora["metadata"]["ownerReferences"][0]["uid"] == "ftj-uid"

    # The server image only where deploy names one: otherwise the platform's default
    # when the ModelDeployment is served, so that a new default reaches it too.
    assert "image" not in lora["spec"]["runtime"]
    named = Deploy.model_validate({"enabled": True, "runtime": {"image": "corp.io/vllm:2"}})
    assert for_finetunejob(ftj(), named)["spec"]["runtime"]["image"] == "corp.io/vllm:2"

    full = for_finetunejob(ftj(tuning="full"), Deploy(enabled=True))
    spec = ModelDeploymentSpec.model_validate(full["spec"])
    assert spec.adapters == []
    assert spec.base_model.name == "shapes-lora"
    assert spec.base_model.source is not None and spec.base_model.source.pvc is not None
    assert spec.base_model.source.pvc.path == "out/tune"
