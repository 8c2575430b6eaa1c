"""`kubectl kubetune deploy` against the real API server (CRDs applied, admission and
CEL rules as on a cluster; no operator: what is tested is what the command writes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import Kubectl

from kubetune_cli import serving
from kubetune_cli.context import Context, global_options

pytestmark = pytest.mark.apiserver

BASE = {"name": "tiny-vlm", "source": {"pvc": {"claimName": "models", "path": "tiny-vlm"}}}


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("cli-deploy")


def kubetune(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, *argv: str
) -> tuple[int, str, str]:
    """The command as kubectl hands it to the plugin, with kubectl's global options,
    run in this process: (exit code, stdout, stderr)."""
    root = argparse.ArgumentParser(parents=[global_options(defaults=True)])
    serving.register(root.add_subparsers(required=True))
    args = root.parse_args(["--kubeconfig", str(kubeconfig), *argv])
    capsys.readouterr()
    code = args.run(args, Context.from_args(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_of(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": BASE, "dataset": {"name": "shapes"}, **spec},
    }


def mdep(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.get("mdep", name, "-n", ns)
    return found


def test_deploy_serves_a_runs_adapter_on_the_base_model_the_run_trained(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kubectl.apply(run_of("alpha", outputModel={"name": "alpha-v1"}), "-n", ns)
    code, out, err = kubetune(
        capsys, kubeconfig, "deploy", "shapes", "--adapter", "alpha", "--gpus", "0", "-n", ns
    )
    assert (code, out, err) == (0, "modeldeployment.kubetune.io/shapes created\n", "")
    spec = mdep(kubectl, ns, "shapes")["spec"]
    assert spec["baseModel"] == {**BASE, "trustRemoteCode": False}
    assert spec["adapters"] == [{"name": "alpha-v1", "fineTuneJob": "alpha"}]
    assert spec["resources"]["gpus"] == 0


def test_deploy_attaches_another_run_to_a_server_that_exists(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kubectl.apply(run_of("beta"), "-n", ns)
    kubectl.run("label", "mdep", "shapes", "team=vision", "-n", ns)
    before = mdep(kubectl, ns, "shapes")
    argv = ("deploy", "shapes", "--adapter", "beta", "--max-loras", "2", "-n", ns)
    code, out, _ = kubetune(capsys, kubeconfig, *argv)
    assert (code, out) == (0, "modeldeployment.kubetune.io/shapes configured\n")
    after = mdep(kubectl, ns, "shapes")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["labels"] == {"team": "vision"}
    assert [a["name"] for a in after["spec"]["adapters"]] == ["alpha-v1", "beta"]
    assert after["spec"]["runtime"]["maxLoras"] == 2
    assert after["spec"]["resources"]["gpus"] == 0  # set before, kept
    # The same again: nothing to write.
    code, out, _ = kubetune(capsys, kubeconfig, *argv)
    assert (code, out) == (0, "modeldeployment.kubetune.io/shapes unchanged\n")
    assert (
        mdep(kubectl, ns, "shapes")["metadata"]["resourceVersion"]
        == (after["metadata"]["resourceVersion"])
    )


def test_dry_run_prints_a_manifest_that_kubectl_applies_strictly_and_writes_nothing(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = kubetune(
        capsys,
        kubeconfig,
        "deploy",
        "gitops",
        "--base-model",
        "pvc://models/tiny-vlm",
        "--adapter",
        "alpha",
        "--adapter",
        "wide=s3://team-models/adapters/wide",
        "--limit-mm-per-prompt",
        "image=2",
        "--api-key-secret",
        "team-key",
        "--dry-run=client",
        "-o",
        "yaml",
        "-n",
        ns,
    )
    assert code == 0, err
    assert not kubectl.get("mdep", "-n", ns, "--field-selector", "metadata.name=gitops")["items"]
    manifest = yaml.safe_load(out)
    applied = kubectl.run("apply", "--validate=strict", "-f", "-", input=out)
    assert applied.stdout.strip() == "modeldeployment.kubetune.io/gitops created"
    assert applied.stderr == ""  # no warning: every field is known
    assert mdep(kubectl, ns, "gitops")["spec"] == {
        **manifest["spec"],
        "baseModel": {**BASE, "trustRemoteCode": False},
        "replicas": 1,
        "resources": mdep(kubectl, ns, "gitops")["spec"]["resources"],  # the schema's defaults
        "runtime": {
            "gpuMemoryUtilization": 0.9,
            "limitMmPerPrompt": {"image": 2},
            "maxLoraRank": 64,
            "maxLoras": 4,
        },
    }


def test_dry_run_of_an_attach_shows_the_whole_result_and_changes_nothing(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kubectl.apply(run_of("gamma"), "-n", ns)
    before = mdep(kubectl, ns, "shapes")
    argv = ("deploy", "shapes", "--adapter", "gamma", "--dry-run=client", "-o", "json", "-n", ns)
    code, out, _ = kubetune(capsys, kubeconfig, *argv)
    assert code == 0
    printed = json.loads(out)
    assert [a["name"] for a in printed["spec"]["adapters"]] == ["alpha-v1", "beta", "gamma"]
    assert set(printed["metadata"]) == {"name", "namespace", "labels"}
    assert mdep(kubectl, ns, "shapes") == before
    # The server's own dry run admits it (schema, CEL) and keeps nothing either.
    code, out, err = kubetune(capsys, kubeconfig, *argv[:-5], "--dry-run=server", "-n", ns)
    assert (code, out, err) == (
        0,
        "modeldeployment.kubetune.io/shapes configured (server dry run)\n",
        "",
    )
    assert mdep(kubectl, ns, "shapes") == before


def test_what_cannot_be_served_is_refused_and_nothing_is_written(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kubectl.apply(run_of("full", tuning="full"), "-n", ns)
    for argv, message in (
        (("--adapter", "missing"), "FineTuneJob 'missing' not found"),
        (("--adapter", "full"), "tuned all parameters"),
        (("--base-model", "Qwen/Qwen2-VL-2B", "--adapter", "alpha"), "trained base model"),
    ):
        code, out, err = kubetune(capsys, kubeconfig, "deploy", "refused", *argv, "-n", ns)
        assert (code, out) == (1, ""), err
        assert message in err and f"(namespace {ns!r})" in err
    code, _, err = kubetune(
        capsys, kubeconfig, "deploy", "refused", "--base-model", "m", "--replicas", "-2", "-n", ns
    )
    assert code == 2 and "replicas: Input should be greater than or equal to 0" in err
    assert not kubectl.get("mdep", "-n", ns, "--field-selector", "metadata.name=refused")["items"]
