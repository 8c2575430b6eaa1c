"""`kubectl kubetune deploy`, the pure part: from flags and what the cluster holds to the
ModelDeployment written, and when `--wait` is over."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from kubetune_cli import serving
from kubetune_cli.serving import (
    SPEC_FLAGS,
    AdapterArg,
    DeployError,
    UsageError,
    base_model_ref,
    parse_adapter,
    plan,
    settled,
)

BASE = {"name": "tiny-vlm", "source": {"pvc": {"claimName": "models", "path": "tiny-vlm"}}}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kubectl kubetune")
    serving.register(root.add_subparsers())
    return root


def args(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["deploy", *argv])


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"baseModel": BASE, "dataset": {"name": "shapes"}, **spec},
    }


def existing(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "qwen-vl",
            "namespace": "team",
            "labels": {"team": "vision"},
            "resourceVersion": "42",
            "uid": "u-1",
            "generation": 3,
        },
        "spec": {"baseModel": BASE, "replicas": 1, **spec},
        "status": {"phase": "Available"},
    }


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("shapes-lora", AdapterArg(None, fine_tune_job="shapes-lora")),
        ("v2=shapes-lora", AdapterArg("v2", fine_tune_job="shapes-lora")),
        (
            "wide=pvc://models/adapters/wide/",
            AdapterArg("wide", source={"pvc": {"claimName": "models", "path": "adapters/wide"}}),
        ),
        (
            "cap=s3://team/adapters/cap/",
            AdapterArg("cap", source={"s3": {"uri": "s3://team/adapters/cap"}}),
        ),
    ],
)
def test_an_adapter_is_a_run_or_a_named_folder(text: str, want: AdapterArg) -> None:
    assert parse_adapter(text) == want


@pytest.mark.parametrize("text", ["pvc://models/a", "=job", "name=", "x=pvc:///path"])
def test_an_adapter_that_cannot_be_read_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_adapter(text)


def test_a_base_model_is_a_hub_id_or_a_folder_served_under_its_name() -> None:
    assert base_model_ref("Qwen/Qwen2.5-VL-3B-Instruct") == {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}
    assert base_model_ref("pvc://models/tiny-vlm") == BASE
    assert base_model_ref("s3://zoo/qwen/3b/", "qwen-3b") == {
        "name": "qwen-3b",
        "source": {"s3": {"uri": "s3://zoo/qwen/3b"}},
    }


def test_a_run_alone_makes_a_server_of_its_base_model_with_its_adapter() -> None:
    jobs = {"shapes-lora": ftj("shapes-lora", outputModel={"name": "shapes-v1"})}
    manifest = plan("shapes", "team", args("shapes", "--adapter", "shapes-lora"), None, jobs)
    assert manifest == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "shapes", "namespace": "team"},
        "spec": {
            "baseModel": BASE,
            "adapters": [{"name": "shapes-v1", "fineTuneJob": "shapes-lora"}],
        },
    }


def test_every_spec_flag_sets_its_one_field() -> None:
    argv = [
        "qwen-vl",
        "--base-model",
        "pvc://models/tiny-vlm",
        "--adapter",
        "wide=pvc://models/adapters/wide",
        "--replicas",
        "2",
        "--trust-remote-code",
        "--gpus",
        "0",
        "--gpu-resource",
        "amd.com/gpu",
        "--cpu",
        "500m",
        "--memory",
        "8Gi",
        "--image",
        "vllm/vllm-openai:v0.11.0",
        "--max-model-len",
        "4096",
        "--gpu-memory-utilization",
        "0.8",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "2",
        "--max-pixels",
        "3136",
        "--limit-mm-per-prompt",
        "image=2",
        "--limit-mm-per-prompt",
        "video=0",
        "--extra-arg=--enforce-eager",
        "--extra-arg=--seed=1",
        "--api-key-secret",
        "team-key",
    ]
    spec = plan("qwen-vl", "team", args(*argv), None, {})["spec"]
    assert spec == {
        "baseModel": {**BASE, "trustRemoteCode": True},
        "adapters": [
            {"name": "wide", "source": {"pvc": {"claimName": "models", "path": "adapters/wide"}}}
        ],
        "replicas": 2,
        "resources": {"gpus": 0, "gpuResource": "amd.com/gpu", "cpu": "500m", "memory": "8Gi"},
        "runtime": {
            "image": "vllm/vllm-openai:v0.11.0",
            "maxModelLen": 4096,
            "gpuMemoryUtilization": 0.8,
            "maxLoraRank": 16,
            "maxLoras": 2,
            "maxPixels": 3136,
            "limitMmPerPrompt": {"image": 2, "video": 0},
            "extraArgs": ["--enforce-eager", "--seed=1"],
        },
        "auth": {"apiKeySecretRef": {"name": "team-key"}},
    }
    # Every flag of the table was given once: none is left out of this test.
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    assert {f.flag for f in SPEC_FLAGS} <= given


def test_each_flag_shows_its_fields_description_from_the_api_models() -> None:
    commands = argparse.ArgumentParser().add_subparsers()
    serving.register(commands)
    text = " ".join(commands.choices["deploy"].format_help().split())
    for flag in SPEC_FLAGS:
        description = flag.model.model_fields[flag.field].description
        metavar = f" {flag.metavar or flag.dest.upper()}" if flag.type is not None else ""
        assert description and f"{flag.flag}{metavar} {description}" in text, flag.flag
    assert "--base-model MODEL Model id, e.g. Qwen/Qwen2.5-VL-3B-Instruct" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "-1"], "replicas"),
        (["--max-lora-rank", "7"], "runtime.maxLoraRank"),
        (["--gpu-memory-utilization", "1.5"], "runtime.gpuMemoryUtilization"),
        (["--memory", "lots"], "resources.memory"),
        (["--limit-mm-per-prompt", "image"], "KIND=N"),
    ],
)
def test_a_value_the_api_models_refuse_is_a_usage_error_naming_the_field(
    flags: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        plan("qwen-vl", "team", args("qwen-vl", "--base-model", "m", *flags), None, {})


def test_a_new_server_needs_a_base_model_from_somewhere() -> None:
    with pytest.raises(UsageError, match="--base-model is needed"):
        plan("x", "team", args("x", "--adapter", "wide=pvc://models/wide"), None, {})


def test_a_name_that_kubernetes_refuses_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="pattern"):
        plan("Qwen_VL", "team", args("Qwen_VL", "--base-model", "m"), None, {})


def test_a_run_that_cannot_be_an_adapter_here_is_refused() -> None:
    with pytest.raises(DeployError, match="not found"):
        plan("x", "team", args("x", "--adapter", "gone"), None, {"gone": None})
    full = {"full": ftj("full", tuning="full")}
    with pytest.raises(DeployError, match="whole model"):
        plan("x", "team", args("x", "--adapter", "full"), None, full)
    other = {"run": ftj("run")}
    with pytest.raises(DeployError, match="trained base model 'tiny-vlm'"):
        plan(
            "x", "team", args("x", "--base-model", "Qwen/Qwen2-VL", "--adapter", "run"), None, other
        )


def test_an_adapter_may_not_take_the_base_models_name() -> None:
    with pytest.raises(DeployError, match="base model's name"):
        plan("x", "team", args("x", "--adapter", "tiny-vlm=run"), None, {"run": ftj("run")})


def test_attaching_adds_the_adapter_and_keeps_the_rest() -> None:
    present = existing(
        adapters=[{"name": "alpha", "fineTuneJob": "alpha"}], runtime={"maxLoras": 2}
    )
    jobs = {"beta": ftj("beta")}
    manifest = plan(
        "qwen-vl", "team", args("qwen-vl", "--adapter", "beta", "--replicas", "2"), present, jobs
    )
    assert manifest == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        # Only what a user writes: no uid, resourceVersion or status.
        "metadata": {"name": "qwen-vl", "namespace": "team", "labels": {"team": "vision"}},
        "spec": {
            "baseModel": BASE,
            "replicas": 2,
            "runtime": {"maxLoras": 2},
            "adapters": [
                {"name": "alpha", "fineTuneJob": "alpha"},
                {"name": "beta", "fineTuneJob": "beta"},
            ],
        },
    }


def test_attaching_what_is_already_there_changes_nothing() -> None:
    present = existing(adapters=[{"name": "alpha", "fineTuneJob": "alpha"}])
    manifest = plan(
        "qwen-vl", "team", args("qwen-vl", "--adapter", "alpha"), present, {"alpha": ftj("alpha")}
    )
    assert manifest["spec"] == present["spec"]


def test_attaching_under_a_name_taken_by_another_adapter_is_refused() -> None:
    present = existing(adapters=[{"name": "alpha", "fineTuneJob": "alpha"}])
    with pytest.raises(DeployError, match="already served, from FineTuneJob 'alpha'"):
        plan(
            "qwen-vl",
            "team",
            args("qwen-vl", "--adapter", "alpha=beta"),
            present,
            {"beta": ftj("beta")},
        )


def test_attaching_to_a_server_of_another_base_model_is_refused() -> None:
    other = existing(baseModel={"name": "Qwen/Qwen2-VL"})
    with pytest.raises(DeployError, match="trained base model 'tiny-vlm'"):
        plan("qwen-vl", "team", args("qwen-vl", "--adapter", "run"), other, {"run": ftj("run")})
    with pytest.raises(DeployError, match="serves base model 'Qwen/Qwen2-VL', not 'tiny-vlm'"):
        plan("qwen-vl", "team", args("qwen-vl", "--base-model", "pvc://models/tiny-vlm"), other, {})


def _md(generation: int, observed: int, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {"observedGeneration": observed, **status},
    }


def test_wait_is_over_when_the_server_serves_every_adapter_asked_for() -> None:
    endpoint = "http://qwen-vl.team.svc:8000/v1"
    available = {"phase": "Available", "endpoint": endpoint}
    # The operator has not yet acted on this spec: an Available status is an old one.
    assert settled(_md(2, 1, **available, servedModels=["tiny-vlm"]), []) is None
    loading = {"name": "alpha", "reason": "Loading", "message": "loading into 1 pods"}
    assert (
        settled(_md(2, 2, **available, servedModels=["tiny-vlm"], adapters=[loading]), ["alpha"])
        is None
    )
    assert settled(_md(2, 2, phase="Progressing"), []) is None
    assert settled(_md(2, 2, **available, servedModels=["tiny-vlm", "alpha"]), ["alpha"]) == (
        True,
        f"Available: serves tiny-vlm, alpha at {endpoint}",
    )


def test_wait_fails_when_the_server_fails_or_an_adapter_needs_the_user() -> None:
    assert settled(_md(1, 1, phase="Failed", message="progress deadline"), []) == (
        False,
        "Failed: progress deadline",
    )
    rank = {"name": "wide", "reason": "RankTooLarge", "message": "rank 128 > 64"}
    verdict = settled(_md(1, 1, phase="Available", adapters=[rank]), ["wide"])
    assert verdict == (False, "adapter 'wide' is not served: RankTooLarge: rank 128 > 64")
    waiting = {"name": "run", "reason": "WaitingForFineTuneJob", "message": "now Running"}
    assert settled(_md(1, 1, phase="Available", adapters=[waiting]), ["run"]) is None


def test_a_runs_own_server_is_left_to_the_run() -> None:
    owned = existing()
    owned["metadata"]["ownerReferences"] = [
        {"kind": "FineTuneJob", "name": "shapes-lora", "uid": "u-2", "controller": True}
    ]
    with pytest.raises(DeployError, match="FineTuneJob 'shapes-lora''s own server"):
        plan("qwen-vl", "team", args("qwen-vl", "--replicas", "2"), owned, {})


def test_a_manifest_for_git_may_name_a_run_that_does_not_exist_yet() -> None:
    argv = ("x", "--base-model", "pvc://models/tiny-vlm", "--adapter", "later", "--dry-run=client")
    manifest = plan("x", "team", args(*argv), None, {"later": None})
    assert manifest["spec"]["adapters"] == [{"name": "later", "fineTuneJob": "later"}]
