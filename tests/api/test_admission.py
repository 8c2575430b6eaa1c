"""The CRDs on a real kube-apiserver: established, examples accepted, bad specs
rejected at admission with a message that names the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import ROOT, Kubectl

pytestmark = pytest.mark.apiserver

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("admission")


def _ftj(name: str = "run", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "baseModel": {"name": "org/model"},
        "dataset": {"name": "train"},
        "outputModel": {"name": "out", "storage": {"pvc": {"claimName": "models", "path": "out"}}},
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


def _kds(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "data"},
        "spec": {"source": {"configMap": {"name": "cm", "key": "train.jsonl"}}, **spec},
    }


def _mdep(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "serve"},
        "spec": {"baseModel": {"name": "org/model"}, **spec},
    }


def test_crds_are_established(kubectl: Kubectl) -> None:
    for plural in ("datasets", "finetunejobs", "modeldeployments"):
        crd = kubectl.get("crd", f"{plural}.kubetune.io")
        established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
        assert established and established[0]["status"] == "True"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted_with_strict_field_validation(
    kubectl: Kubectl, ns: str, path: Path
) -> None:
    kubectl.run("apply", "-n", ns, "--validate=strict", "--server-side", "-f", str(path))


def test_unknown_fields_are_rejected_by_strict_validation(kubectl: Kubectl, ns: str) -> None:
    doc = _ftj("typo", hyperparameter={"epochs": 2})
    proc = kubectl.apply(doc, "-n", ns, "--validate=strict", check=False)
    assert proc.returncode != 0
    assert "hyperparameter" in proc.stderr


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("lora-with-full", _ftj(tuning="full", hyperparameters={"loraRank": 8}), "loraRank"),
    ("alpha-with-full", _ftj(tuning="full", hyperparameters={"loraAlpha": 16}), "loraAlpha"),
    (
        "targets-with-full",
        _ftj(tuning="full", hyperparameters={"targetModules": ["q_proj"]}),
        "targetModules",
    ),
    ("beta-with-sft", _ftj(hyperparameters={"beta": 0.1}), "beta"),
    (
        "preserve-with-dpo",
        _ftj(method="dpo", preserveGeneralSkills={"enabled": True}),
        "preserveGeneralSkills",
    ),
    ("split-and-dataset", _ftj(validation={"split": 0.1, "dataset": {"name": "v"}}), "validation"),
    ("split-one", _ftj(validation={"split": 1}), "split"),
    ("split-zero", _ftj(validation={"split": 0}), "split"),
    ("epochs-zero", _ftj(hyperparameters={"epochs": 0}), "epochs"),
    ("batch-zero", _ftj(hyperparameters={"batchSize": 0}), "batchSize"),
    ("lr-zero", _ftj(hyperparameters={"learningRate": 0}), "learningRate"),
    ("warmup-above-one", _ftj(hyperparameters={"warmupRatio": 1.5}), "warmupRatio"),
    ("max-pixels-small", _ftj(hyperparameters={"maxPixels": 100}), "maxPixels"),
    ("patience-zero", _ftj(validation={"split": 0.1}, earlyStopping={"patience": 0}), "patience"),
    ("early-stop-no-validation", _ftj(earlyStopping={"patience": 2}), "earlyStopping"),
    (
        "temperature-zero",
        _ftj(preserveGeneralSkills={"enabled": True, "temperature": 0}),
        "temperature",
    ),
    ("lambda-negative", _ftj(preserveGeneralSkills={"enabled": True, "lambda": -1}), "lambda"),
    ("gpus-negative", _ftj(resources={"gpus": -1}), "gpus"),
    ("too-many-nodes", _ftj(resources={"nodes": 65}), "nodes"),
    ("bad-method", _ftj(method="ppo"), "method"),
    (
        "s3-uri",
        _ftj(
            outputModel={
                "name": "o",
                "storage": {"s3": {"uri": "http://bucket/x", "secretRef": {"name": "s"}}},
            }
        ),
        "uri",
    ),
    (
        "two-output-storages",
        _ftj(
            outputModel={
                "name": "o",
                "storage": {
                    "pvc": {"claimName": "m"},
                    "s3": {"uri": "s3://bucket/x", "secretRef": {"name": "s"}},
                },
            }
        ),
        "storage",
    ),
    (
        "path-escapes",
        _ftj(outputModel={"name": "o", "storage": {"pvc": {"claimName": "m", "path": "../x"}}}),
        "path",
    ),
    (
        "no-dataset",
        {**_ftj(), "spec": {k: v for k, v in _ftj()["spec"].items() if k != "dataset"}},
        "dataset",
    ),
    (
        "two-sources",
        _kds(
            source={"configMap": {"name": "cm", "key": "k"}, "http": {"url": "https://x/y.jsonl"}}
        ),
        "source",
    ),
    ("no-source", _kds(source={}), "source"),
    ("bad-task", _kds(task="rlhf"), "task"),
    ("bad-format", _kds(format="sharegpt"), "format"),
    ("image-root-absolute", _kds(imageRoot="/etc"), "imageRoot"),
    ("min-examples-zero", _kds(limits={"minExamples": 0}), "minExamples"),
    ("gpu-util-zero", _mdep(runtime={"gpuMemoryUtilization": 0}), "gpuMemoryUtilization"),
    ("gpu-util-above-one", _mdep(runtime={"gpuMemoryUtilization": 1.2}), "gpuMemoryUtilization"),
    ("replicas-negative", _mdep(replicas=-1), "replicas"),
    (
        "adapter-two-sources",
        _mdep(adapters=[{"name": "a", "fineTuneJob": "j", "source": {"pvc": {"claimName": "m"}}}]),
        "adapter",
    ),
    (
        "adapter-names-twice",
        _mdep(adapters=[{"name": "a", "fineTuneJob": "j"}, {"name": "a", "fineTuneJob": "k"}]),
        "adapter names must be unique",
    ),
    (
        "adapter-named-as-base",
        _mdep(
            adapters=[{"name": "org-model", "fineTuneJob": "j"}], baseModel={"name": "org-model"}
        ),
        "base model's name",
    ),
    ("lora-rank-not-vllms", _mdep(runtime={"maxLoraRank": 48}), "maxLoraRank"),
    (
        "shared-server-with-runtime",
        _ftj(deploy={"enabled": True, "modelDeployment": "team", "runtime": {}}),
        "shared ModelDeployment",
    ),
]


@pytest.mark.parametrize(("case", "doc", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_are_rejected_naming_the_field(
    kubectl: Kubectl, ns: str, case: str, doc: dict[str, Any], field: str
) -> None:
    proc = kubectl.apply(doc, "-n", ns, check=False)
    assert proc.returncode != 0, f"{case} was accepted"
    assert (
        "is invalid" in proc.stderr
        or "Invalid value" in proc.stderr
        or "Required value" in proc.stderr
    )
    assert field in proc.stderr, proc.stderr


def test_at_least_twenty_invalid_cases() -> None:
    assert len(INVALID) >= 20


def test_run_defining_fields_are_immutable_and_others_editable(kubectl: Kubectl, ns: str) -> None:
    doc = _ftj("immutable", validation={"split": 0.1})
    kubectl.apply(doc, "-n", ns)
    for field, value in [
        ("hyperparameters", {"epochs": 5}),
        ("baseModel", {"name": "org/other"}),
        ("method", "dpo"),
        ("validation", {"split": 0.2}),
        ("earlyStopping", {"patience": 3}),
        ("outputModel", {"name": "x", "storage": {"pvc": {"claimName": "m"}}}),
    ]:
        changed = copy.deepcopy(doc)
        changed["spec"][field] = value
        proc = kubectl.apply(changed, "-n", ns, check=False)
        assert proc.returncode != 0, f"{field} could be changed"
        assert f"{field} is immutable" in proc.stderr, proc.stderr
    editable = copy.deepcopy(doc)
    editable["spec"].update(suspend=True, displayName="renamed", deploy={"enabled": True})
    kubectl.apply(editable, "-n", ns)
    spec = kubectl.get("ftj", "immutable", "-n", ns)["spec"]
    assert (spec["suspend"], spec["displayName"], spec["deploy"]["enabled"]) == (
        True,
        "renamed",
        True,
    )


def test_defaults_are_applied_by_the_server(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(_ftj("defaults"), "-n", ns)
    spec = kubectl.get("ftj", "defaults", "-n", ns)["spec"]
    assert (spec["method"], spec["tuning"], spec["suspend"]) == ("sft", "lora", False)
    assert spec["hyperparameters"]["epochs"] == 3
    assert spec["resources"]["gpuResource"] == "nvidia.com/gpu"
    assert "loraRank" not in spec["hyperparameters"]


def test_a_server_without_adapters_passes_the_adapter_rules(kubectl: Kubectl, ns: str) -> None:
    """The rules on adapter names hold for a spec that has no adapters field at all."""
    kubectl.apply(_mdep(), "-n", ns)
    spec = kubectl.get("mdep", "serve", "-n", ns)["spec"]
    assert spec["runtime"]["maxLoraRank"] == 64 and "adapters" not in spec


def test_status_is_written_only_through_the_status_subresource(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(_ftj("status"), "-n", ns)
    patch = json.dumps({"status": {"phase": "Running", "progress": {"percent": 40}}})
    kubectl.run("patch", "ftj", "status", "-n", ns, "--type=merge", "-p", patch)
    assert "status" not in kubectl.get("ftj", "status", "-n", ns)
    kubectl.run(
        "patch", "ftj", "status", "-n", ns, "--type=merge", "-p", patch, "--subresource=status"
    )
    obj = kubectl.get("ftj", "status", "-n", ns)
    assert obj["status"]["phase"] == "Running"
    # A spec write through the status subresource is ignored, as in a real cluster.
    kubectl.run(
        "patch",
        "ftj",
        "status",
        "-n",
        ns,
        "--type=merge",
        "--subresource=status",
        "-p",
        json.dumps({"spec": {"displayName": "sneaky"}}),
    )
    assert "displayName" not in kubectl.get("ftj", "status", "-n", ns)["spec"]


def test_printer_columns_show_in_kubectl_get(kubectl: Kubectl, ns: str) -> None:
    kubectl.apply(_ftj("columns"), "-n", ns)
    status = {
        "phase": "Running",
        "progress": {"percent": 42},
        "metrics": {"trainLoss": 1.25, "evalLoss": 1.5},
        "preflight": {"phase": "Succeeded", "trainingTokens": 3600},
        "evaluation": {"phase": "Succeeded", "tuned": {"accuracy": 0.75}},
    }
    kubectl.run(
        "patch",
        "ftj",
        "columns",
        "-n",
        ns,
        "--type=merge",
        "--subresource=status",
        "-p",
        json.dumps({"status": status}),
    )
    out = kubectl.run("get", "ftj", "columns", "-n", ns).stdout.splitlines()
    assert out[0].split() == [
        "NAME",
        "PHASE",
        "PROGRESS",
        "TRAIN",
        "LOSS",
        "EVAL",
        "LOSS",
        "TOKENS",
        "SCORE",
        "AGE",
    ]
    assert out[1].split()[:7] == ["columns", "Running", "42", "1.25", "1.5", "3600", "0.75"]
    kds = kubectl.run("get", "kds", "-n", ns).stdout
    assert kds.startswith("NAME") or "No resources" in kds


def test_kubectl_explain_shows_the_field_descriptions(kubectl: Kubectl) -> None:
    out = kubectl.run("explain", "ftj.spec.hyperparameters.loraRank").stdout
    assert "LoRA rank r. Only with tuning: lora. Default 8." in out
    out = kubectl.run("explain", "kds.spec.source").stdout
    assert "exactly one source" in out.lower()
    out = kubectl.run("explain", "mdep.spec.runtime.gpuMemoryUtilization").stdout
    assert "fraction of GPU memory" in out


def test_examples_parse_as_yaml() -> None:
    for path in EXAMPLES:
        versions = {d["apiVersion"] for d in yaml.safe_load_all(path.read_text()) if d}
        assert "kubetune.io/v1alpha1" in versions


def test_a_finetunejob_of_base_model_dataset_and_method_alone_is_accepted(
    kubectl: Kubectl, ns: str
) -> None:
    """Where the output goes is the platform's default model store's to say."""
    doc = _ftj("bare", method="sft")
    del doc["spec"]["outputModel"]
    assert set(doc["spec"]) == {"baseModel", "dataset", "method"}
    kubectl.apply(doc, "-n", ns, "--validate=strict")
    assert kubectl.get("ftj", "bare", "-n", ns)["spec"]["outputModel"] == {}
    named = copy.deepcopy(doc)
    named["spec"]["outputModel"] = {"name": "later"}
    proc = kubectl.apply(named, "-n", ns, check=False)
    assert proc.returncode != 0 and "outputModel is immutable" in proc.stderr, proc.stderr
