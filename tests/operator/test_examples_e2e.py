"""End to end: every file in examples/ works as it stands. The test gives its namespace
what `make dev-up` gives `default` (hack/example_storage.py: the tiny base model on
the `models` claim, the images and preference pairs on the `datasets` claim), applies
the folder with kubectl and waits for each object to reach Ready, Succeeded or
Available.

It starts a vLLM server of its own (examples/modeldeployment.yaml), apart from the
serving tests' shared one, because the example's server is the thing under test; it is
deleted when the module ends."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import example_storage
import pytest
from e2e_support import RESTRICTED, chat, pod_ready, post, restricted_operator, status, wait_phase
from kube import ROOT, Kubectl
from operator_harness import Operator, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.training]

EXAMPLES = ROOT / "examples"
# What a platform team sets through the chart (`make dev-up` sets the same store), and a
# pull secret that every pod the operator makes must name.
PLATFORM_DEFAULTS = {
    "KUBETUNE_DEFAULT_MODEL_STORE": "pvc://models/tuned",
    "KUBETUNE_POD_DEFAULTS": '{"imagePullSecrets": [{"name": "registry"}]}',
}


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("examples", RESTRICTED)


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, kubelet: Any, ns: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    example_storage.provide(
        kubelet.provide_claim(ns, "models"), kubelet.provide_claim(ns, "datasets")
    )
    with restricted_operator(
        kubectl, ns, tmp_path_factory.mktemp("operator"), PLATFORM_DEFAULTS
    ) as op:
        yield op


@pytest.fixture(scope="module")
def applied(kubectl: Kubectl, ns: str, operator: Operator) -> Iterator[None]:
    kubectl.run("apply", "-n", ns, "-f", str(EXAMPLES))
    yield
    kubectl.run("delete", "-n", ns, "-f", str(EXAMPLES), "--wait=false")


def test_every_dataset_in_examples_becomes_ready(
    kubectl: Kubectl, ns: str, operator: Operator, applied: None
) -> None:
    for name, examples_in_file in (
        ("shapes", 18),
        ("caption-preferences", 24),
        ("caption-preferences-val", 6),
    ):
        st = wait_phase(
            operator, kubectl, "kds", ns, name, ("Ready", "Invalid", "Failed"), 180, name
        )
        assert st["phase"] == "Ready", st
        assert st["examples"] == examples_in_file


def test_every_finetunejob_in_examples_succeeds(
    kubectl: Kubectl, ns: str, operator: Operator, applied: None, kubelet: Any
) -> None:
    # The minimal run names no output: it goes to the platform's store.
    for name, folder in (
        ("shapes-qwen", "shapes-qwen"),
        ("captions-dpo", "captions-dpo"),
        ("shapes-quick", f"tuned/{ns}/shapes-quick"),
    ):
        st = wait_phase(
            operator, kubectl, "ftj", ns, name, ("Succeeded", "Failed"), 600, f"{name} to train"
        )
        assert st["phase"] == "Succeeded", st
        # The DPO run is shorter than loggingSteps: its last step is logged all the same.
        assert st["metrics"]["trainLoss"] > 0, st
        assert st["outputModel"]["uri"] == f"pvc://models/{folder}"
        assert (kubelet.pvc_dir(ns, "models") / folder / "report.json").is_file()
    assert status(kubectl, "ftj", ns, "shapes-qwen")["deployment"] == {"name": "qwen-vl"}
    selector = "app.kubernetes.io/component in (training,preflight,dataset-validation)"
    pods = kubectl.get("pods", "-n", ns, "-l", selector)["items"]
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods} == {
        "training",
        "preflight",
        "dataset-validation",
    }
    for pod in pods:
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}], pod["metadata"]["name"]


def test_the_example_server_serves_the_attached_adapter_behind_its_key(
    kubectl: Kubectl, ns: str, operator: Operator, applied: None
) -> None:
    md = wait_phase(
        operator, kubectl, "mdep", ns, "qwen-vl", ("Available", "Failed"), 600, "the server"
    )
    assert md["phase"] == "Available", md
    wait_for(
        lambda: (
            {"name": "shapes-qwen", "loaded": 1, "replicas": 1}
            in (status(kubectl, "mdep", ns, "qwen-vl").get("adapters") or [])
        ),
        180,
        "the example run's adapter on the example server",
        on_timeout=operator.tail,
    )
    pods = kubectl.get("pods", "-n", ns, "-l", "kubetune.io/modeldeployment=qwen-vl")["items"]
    (pod,) = [p for p in pods if pod_ready(p)]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["spec"]["serviceAccountName"] == "kubetune-trainer"
    secret = kubectl.get("secret", "qwen-vl-api-key", "-n", ns)
    key = base64.b64decode(secret["data"]["apiKey"]).decode()
    base = f"http://{pod['status']['podIP']}:8000/v1"
    body = {"model": "shapes-qwen", "messages": [{"role": "user", "content": "?"}]}
    assert post(f"{base}/chat/completions", body)[0] == 401
    an_image = (EXAMPLES / "dataset.yaml").read_text().split('"url":"', 1)[1].split('"', 1)[0]
    answer = chat(base, "shapes-qwen", an_image, token=key)
    assert answer["model"] == "shapes-qwen"
