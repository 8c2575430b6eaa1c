"""The platform's defaults as the operator reads them: the model store, the pod
defaults and the identity annotations, from flags or the chart's environment."""

from __future__ import annotations

import argparse
import re

import pytest

from kubetune_operator.resources.platform import ModelStore, PodDefaults
from kubetune_operator.settings import DEFAULT_VLLM_IMAGE, Settings, add_arguments, from_arguments


def settings_from(env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args([]), env)


def test_a_pvc_store_puts_each_run_under_its_namespace_and_name() -> None:
    store = ModelStore.parse("pvc://models/tuned/")
    storage = store.storage_for("team-a", "run-1")
    assert storage.pvc is not None and storage.s3 is None
    assert (storage.pvc.claim_name, storage.pvc.path) == ("models", "tuned/team-a/run-1")
    root = ModelStore.parse("pvc://models").storage_for("team-a", "run-1")
    assert root.pvc is not None and root.pvc.path == "team-a/run-1"


def test_an_s3_store_is_reached_with_the_pods_own_identity() -> None:
    store = ModelStore.parse("s3://bucket/tuned", "https://minio.example:9000")
    storage = store.storage_for("team-a", "run-1")
    assert storage.s3 is not None
    assert storage.s3.uri == "s3://bucket/tuned/team-a/run-1"
    assert str(storage.s3.endpoint) == "https://minio.example:9000"
    assert storage.s3.secret_ref is None


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("models/tuned", "model store 'models/tuned': expected pvc://claim/folder or s3://"),
        ("gs://bucket/x", "model store 'gs://bucket/x': the scheme must be pvc or s3"),
        ("pvc://Not_A_Name/x", "model store 'pvc://Not_A_Name/x': "),
        ("pvc://models/../x", "model store 'pvc://models/../x': "),
    ],
)
def test_a_store_that_does_not_parse_is_refused_naming_it(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(problem)):
        ModelStore.parse(uri)


def test_pod_defaults_merge_with_what_a_spec_sets() -> None:
    defaults = PodDefaults.from_json(
        '{"imagePullSecrets": [{"name": "registry"}, "mirror"], "nodeSelector": {"pool": "ml",'
        ' "zone": "a"}, "tolerations": [{"key": "ml", "operator": "Exists"}],'
        ' "priorityClassName": "batch"}'
    )
    job = {
        "spec": {
            "template": {
                "spec": {
                    "imagePullSecrets": [{"name": "mirror"}],
                    "nodeSelector": {"pool": "h100"},
                    "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "priorityClassName": "urgent",
                }
            }
        }
    }
    pod = defaults.apply(job)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "mirror"}, {"name": "registry"}]
    assert pod["nodeSelector"] == {"pool": "h100", "zone": "a"}
    assert pod["tolerations"] == [
        {"key": "gpu", "operator": "Exists"},
        {"key": "ml", "operator": "Exists"},
    ]
    assert pod["priorityClassName"] == "urgent"
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "mirror"}]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "pod defaults are not JSON"),
        ("[]", "pod defaults must be a JSON object"),
        ('{"imagePullSecret": []}', "pod defaults: unknown keys \\['imagePullSecret'\\]"),
        ('{"nodeSelector": {"a": 1}}', "pod defaults: nodeSelector must map labels to strings"),
        ('{"tolerations": [{"operator": "Sometimes"}]}', "pod defaults: tolerations: "),
    ],
)
def test_pod_defaults_that_do_not_parse_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="^" + problem):
        PodDefaults.from_json(text)


def test_the_chart_s_environment_sets_the_platform_defaults() -> None:
    settings = settings_from(
        {
            "KUBETUNE_DEFAULT_MODEL_STORE": "s3://bucket/tuned",
            "KUBETUNE_DEFAULT_MODEL_STORE_ENDPOINT": "http://minio:9000",
            "KUBETUNE_POD_DEFAULTS": '{"imagePullSecrets": [{"name": "registry"}]}',
            "KUBETUNE_IDENTITY_ANNOTATIONS": '{"iam.gke.io/gcp-service-account": "t@p.iam"}',
        }
    )
    assert settings.model_store == ModelStore.parse("s3://bucket/tuned", "http://minio:9000")
    assert settings.pod_defaults.image_pull_secrets == ("registry",)
    assert settings.identity_annotations == {"iam.gke.io/gcp-service-account": "t@p.iam"}
    plain = settings_from({})
    assert plain.model_store is None and plain.pod_defaults == PodDefaults()
    with pytest.raises(ValueError, match="identity annotations must be a JSON object of strings"):
        settings_from({"KUBETUNE_IDENTITY_ANNOTATIONS": '{"a": 1}'})


def test_the_default_server_image_comes_from_a_flag_or_the_chart_s_environment() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"KUBETUNE_SERVER_IMAGE": "mirror.corp/vllm/vllm-openai:v0.11.0"}
    assert settings_from(env).server_image == "mirror.corp/vllm/vllm-openai:v0.11.0"
    flagged = from_arguments(parser.parse_args(["--server-image", "mirror.corp/vllm:2"]), env)
    assert flagged.server_image == "mirror.corp/vllm:2"
    assert settings_from({}).server_image == DEFAULT_VLLM_IMAGE
