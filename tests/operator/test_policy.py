"""The platform policy (resources/policy.py): which images and vLLM flags a spec may
name, the message that names the refused field, and how the operator's settings carry
the chart's lists. The chart's admission policy is checked against the same function
in tests/api/test_chart.py."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from kubetune_operator.__main__ import main
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.modeldeployment import server
from kubetune_operator.resources.policy import (
    DEFAULT_SERVER_FLAGS,
    RESERVED_FLAGS,
    Policy,
    finetunejob_refusal,
    image_allowed,
    modeldeployment_refusal,
    repository_patterns,
)
from kubetune_operator.settings import Settings, add_arguments, from_arguments

POLICY = Policy(
    trainer_images=("ghcr.io/kubetune/trainer:*", "ghcr.io/kubetune/trainer@*", "corp.io/ml/**"),
    server_images=("vllm/vllm-openai:*",),
    server_flags=("--max-num-seqs", "--seed", "--enable-prefix-caching"),
)


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("ghcr.io/kubetune/trainer:0.2.0", True),
        ("ghcr.io/kubetune/trainer@sha256:" + "a" * 64, True),
        ("ghcr.io/kubetune/trainer:0.2.0@sha256:" + "a" * 64, True),
        ("corp.io/ml/team/trainer:1", True),
        # A neighbouring repository, a prefix, another registry, a path after the tag.
        ("ghcr.io/kubetune/trainer-evil:1", False),
        ("ghcr.io/kubetune/trainer", False),
        ("evil.io/ghcr.io/kubetune/trainer:1", False),
        ("ghcr.io/kubetune/trainer:1/../../evil/img:1", False),
        # '.' is a dot, not any character.
        ("ghcrxio/kubetune/trainer:1", False),
        ("corp.io/mlx/trainer:1", False),
        ("evil/img:1", False),
    ],
)
def test_image_patterns_match_whole_references(image: str, allowed: bool) -> None:
    assert image_allowed(image, POLICY.trainer_images) is allowed


def test_an_empty_list_allows_no_image() -> None:
    assert not image_allowed("ghcr.io/kubetune/trainer:0.1.0", ())


def test_the_default_patterns_are_the_default_images_repositories() -> None:
    assert repository_patterns("ghcr.io/kubetune/trainer:0.1.0") == (
        "ghcr.io/kubetune/trainer:*",
        "ghcr.io/kubetune/trainer@*",
    )
    assert repository_patterns("localhost:5000/trainer@sha256:abc") == (
        "localhost:5000/trainer:*",
        "localhost:5000/trainer@*",
    )
    defaults = Settings().policy
    assert image_allowed("vllm/vllm-openai:v0.11.0", defaults.server_images)
    assert not image_allowed("vllm/vllm-openai-evil:v0.11.0", defaults.server_images)
    assert defaults.server_flags == DEFAULT_SERVER_FLAGS


def md(**runtime: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"baseModel": {"name": "org/m"}, "runtime": runtime})


@pytest.mark.parametrize(
    "args",
    [
        ["--max-num-seqs", "8", "--seed=7", "--enable-prefix-caching"],
        [],
    ],
)
def test_listed_flags_pass_with_their_values(args: list[str]) -> None:
    assert modeldeployment_refusal(md(extraArgs=args), POLICY) is None


ALLOWED = "(allowed: --max-num-seqs, --seed, --enable-prefix-caching)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--seed", "7", "--trust-remote-code"],
            'spec.runtime.extraArgs[2] "--trust-remote-code" is not an allowed server flag: '
            "the operator sets it from baseModel.trustRemoteCode",
        ),
        # vLLM reads '_' as '-'.
        (
            ["--trust_remote_code"],
            'spec.runtime.extraArgs[0] "--trust_remote_code" is not an allowed server flag: '
            "the operator sets it from baseModel.trustRemoteCode",
        ),
        # argparse would expand an abbreviation: only whole listed names pass.
        (
            ["--trust-remote"],
            f'spec.runtime.extraArgs[0] "--trust-remote" is not an allowed server flag {ALLOWED}',
        ),
        (
            ["--allowed-local-media-path", "/"],
            'spec.runtime.extraArgs[0] "--allowed-local-media-path" is not an allowed server '
            f"flag {ALLOWED}",
        ),
        (
            ["--seed=1", "--tool-parser-plugin=/models/plugin.py"],
            'spec.runtime.extraArgs[1] "--tool-parser-plugin=/models/plugin.py" is not an '
            f"allowed server flag {ALLOWED}",
        ),
        (
            ["--max-num-seqs.x=1"],
            f'spec.runtime.extraArgs[0] "--max-num-seqs.x=1" is not an allowed server flag {ALLOWED}',
        ),
        (
            ["-tp", "2"],
            f'spec.runtime.extraArgs[0] "-tp" is not an allowed server flag {ALLOWED}',
        ),
        (
            ["--port", "9000"],
            'spec.runtime.extraArgs[0] "--port" is not an allowed server flag: the operator sets it',
        ),
        (
            ["--config=/models/base/serve.yaml"],
            'spec.runtime.extraArgs[0] "--config=/models/base/serve.yaml" is not an allowed '
            "server flag: it reads more flags from a file",
        ),
    ],
)
def test_a_refused_flag_is_named_with_its_index(args: list[str], message: str) -> None:
    assert modeldeployment_refusal(md(extraArgs=args), POLICY) == message


def test_a_server_image_outside_the_list_is_named() -> None:
    assert modeldeployment_refusal(md(image="evil/vllm:1"), POLICY) == (
        'spec.runtime.image "evil/vllm:1" is not an allowed server image '
        "(allowed: vllm/vllm-openai:*)"
    )
    nothing = Policy(trainer_images=(), server_images=(), server_flags=())
    assert modeldeployment_refusal(md(image="vllm/vllm-openai:v0.11.0"), nothing) == (
        'spec.runtime.image "vllm/vllm-openai:v0.11.0" is not an allowed server image '
        "(allowed: none)"
    )


def ftj(**spec: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "baseModel": {"name": "org/m"},
            "dataset": {"name": "train"},
            "outputModel": {"name": "out", "storage": {"pvc": {"claimName": "models"}}},
            **spec,
        }
    )


def test_a_finetunejob_s_image_then_its_server_are_checked() -> None:
    assert finetunejob_refusal(ftj(), POLICY) is None
    assert finetunejob_refusal(ftj(image="corp.io/ml/trainer:2"), POLICY) is None
    assert finetunejob_refusal(ftj(image="evil/img:1"), POLICY) == (
        'spec.image "evil/img:1" is not an allowed trainer image (allowed: '
        "ghcr.io/kubetune/trainer:*, ghcr.io/kubetune/trainer@*, corp.io/ml/**)"
    )
    deploy = {"enabled": True, "runtime": {"extraArgs": ["--trust-remote-code"]}}
    assert finetunejob_refusal(ftj(image="evil/img:1", deploy=deploy), POLICY) == (
        finetunejob_refusal(ftj(image="evil/img:1"), POLICY)
    )
    assert finetunejob_refusal(ftj(deploy=deploy), POLICY) == (
        'spec.deploy.runtime.extraArgs[0] "--trust-remote-code" is not an allowed server '
        "flag: the operator sets it from baseModel.trustRemoteCode"
    )
    evil_server = {"enabled": True, "runtime": {"image": "evil/vllm:1"}}
    assert finetunejob_refusal(ftj(deploy=evil_server), POLICY) == (
        'spec.deploy.runtime.image "evil/vllm:1" is not an allowed server image '
        "(allowed: vllm/vllm-openai:*)"
    )


def test_a_runtime_without_an_image_passes_whatever_the_list() -> None:
    """It runs the platform's own default (defaults.serverImage), as a FineTuneJob
    without spec.image runs its trainer image."""
    nothing = Policy(trainer_images=(), server_images=(), server_flags=())
    assert modeldeployment_refusal(md(), nothing) is None
    assert modeldeployment_refusal(md(maxModelLen=4096), nothing) is None
    assert finetunejob_refusal(ftj(deploy={"enabled": True, "runtime": {}}), nothing) is None


def test_every_flag_the_operator_sets_is_reserved() -> None:
    """A flag the server builder sets that extraArgs could repeat would be overridden
    (extraArgs come last)."""
    spec = ModelDeploymentSpec.model_validate(
        {
            "baseModel": {"name": "org/m", "trustRemoteCode": True},
            "runtime": {"maxModelLen": 4096, "limitMmPerPrompt": {"image": 2}, "maxPixels": 1024},
            "resources": {"gpus": 2},
        }
    )
    body = {"metadata": {"name": "m", "namespace": "team", "uid": "u"}}
    args = server.plan(body, spec, [], "trainer:1", "vllm:1").args
    flags = {a for a in args if a.startswith("-")}
    assert "--trust-remote-code" in flags and "--tensor-parallel-size" in flags
    assert flags <= RESERVED_FLAGS.keys()


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        (
            {"server_flags": ("--seed", "--trust-remote-code")},
            "server flag '--trust-remote-code' cannot be allowed: the operator sets it from "
            "baseModel.trustRemoteCode",
        ),
        ({"server_flags": ("--Seed",)}, "server flag '--Seed': list flags as --lower-case-words"),
        (
            {"server_flags": ("--trust_remote_code",)},
            "server flag '--trust_remote_code': list flags as --lower-case-words",
        ),
        (
            {"trainer_images": ("evil img",)},
            "image pattern 'evil img': only letters, digits and ._/:@-* may appear",
        ),
    ],
)
def test_a_policy_that_cannot_be_enforced_as_written_is_refused(
    policy: dict[str, Any], error: str
) -> None:
    fields: dict[str, Any] = {"trainer_images": (), "server_images": (), **policy}
    with pytest.raises(ValueError) as refused:
        Policy(**fields)
    assert str(refused.value) == error


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_policy_comes_from_flags_or_the_chart_s_variables() -> None:
    env = {
        "KUBETUNE_ALLOWED_TRAINER_IMAGES": "corp.io/trainer:*, corp.io/trainer@*",
        "KUBETUNE_ALLOWED_SERVER_IMAGES": "corp.io/vllm:*",
        # Set but empty: no flag at all, not the default list.
        "KUBETUNE_ALLOWED_SERVER_FLAGS": "",
        "KUBETUNE_TRAINER_IMAGE": "corp.io/trainer:1",
    }
    settings = from_arguments(parsed(), env)
    assert settings.trainer_image == "corp.io/trainer:1"
    assert settings.policy == Policy(
        trainer_images=("corp.io/trainer:*", "corp.io/trainer@*"),
        server_images=("corp.io/vllm:*",),
        server_flags=(),
    )
    given = from_arguments(parsed("--allowed-server-flags=--seed,--dtype"), env)
    assert given.policy.server_flags == ("--seed", "--dtype")
    assert from_arguments(parsed(), {}).policy == Settings().policy


def test_the_operator_does_not_start_with_a_policy_it_cannot_enforce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBETUNE_ADMIN_KEY", "k")
    monkeypatch.setenv("KUBETUNE_ALLOWED_SERVER_FLAGS", "--seed,--middleware")
    with pytest.raises(SystemExit) as exited:
        main(["--metrics-port", "0"])
    assert str(exited.value) == (
        "kubetune-operator: server flag '--middleware' cannot be allowed: the operator sets "
        "it (its adapter and API-key guard)"
    )
