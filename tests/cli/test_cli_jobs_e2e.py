"""End to end with the operator (under the chart's RBAC), the local kubelet and a tiny
VLM trained for real on the CPU; S3 played by moto: `dataset create --to s3://...
--wait` uploads a file and the images beside it and waits for the operator to validate
it Ready; `job create --follow` follows a run to Succeeded (exit 0); `job follow`
follows one that fails to its reason (exit 1)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import RESTRICTED, restricted_operator
from kube import Kubectl
from operator_harness import Operator
from tiny_models import write_shapes_dataset

from kubetune_cli import main as cli

pytestmark = [pytest.mark.apiserver, pytest.mark.training]

BUCKET = "cli-e2e"
# Small and quick: one epoch of LoRA at the tiny model's smallest image size, no
# pre-flight or scoring pod.
RUN = (
    "--base-model",
    "pvc://models/tiny-vlm",
    "--dataset",
    "shapes",
    "--validation-split",
    "0.25",
    "--epochs",
    "2",
    "--batch-size",
    "2",
    "--learning-rate",
    "0.002",
    "--logging-steps",
    "1",
    "--max-pixels",
    "3136",
    "--gpus",
    "0",
    "--no-preflight",
    "--no-evaluation",
)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3 server; this process's boto3 (the laptop) finds its keys in the
    environment, the pods in the Secret the Dataset names."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl, kubelet: Any, tiny_qwen2_5_vl: Path) -> str:
    name = kubectl.new_namespace("cli-e2e", RESTRICTED)
    shutil.copytree(tiny_qwen2_5_vl, kubelet.provide_claim(name, "models") / "tiny-vlm")
    kubectl.apply_secret(
        name,
        "s3-creds",
        {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"},
    )
    return name


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, ns: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    settings = {"KUBETUNE_DEFAULT_MODEL_STORE": "pvc://models/tuned"}
    with restricted_operator(kubectl, ns, tmp_path_factory.mktemp("operator"), settings) as op:
        yield op


def kubetune(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, ns: str, *argv: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["--kubeconfig", str(kubeconfig), "-n", ns, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_dataset_goes_to_s3_and_the_operator_validates_it_ready(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    s3: str,
    operator: Operator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_shapes_dataset(tmp_path / "laptop", 2, seed=3, name="shapes.jsonl")
    code, out, err = kubetune(
        capsys,
        kubeconfig,
        ns,
        "dataset",
        "create",
        "shapes",
        "-f",
        str(data),
        "--to",
        f"s3://{BUCKET}/data",
        "--s3-endpoint",
        s3,
        "--s3-secret",
        "s3-creds",
        "--wait",
    )
    assert code == 0, f"{out}\n{err}\n{operator.tail()}"
    assert "uploaded 13 files" in out  # 12 images and the file
    assert "Phase:" in out and "Ready" in out and "Examples:" in out
    assert "dataset shapes: " in err  # the phases on the way
    status = kubectl.get("kds", "shapes", "-n", ns)["status"]
    assert (status["phase"], status["examples"], status["images"]) == ("Ready", 12, 12)
    # What the pod validated is what the laptop had.
    assert (
        status["sha256"]
        == kubectl.get("kds", "shapes", "-n", ns)["metadata"]["annotations"]["kubetune.io/sha256"]
    )


def test_wait_exits_1_with_the_reason_when_the_pods_cannot_read_the_data(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    s3: str,
    operator: Operator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --s3-secret the pods read S3 with their own identity, which the test
    cluster gives them none of: validation fails and says why."""
    data = write_shapes_dataset(tmp_path, 1, seed=9, name="keyless.jsonl")
    code, out, err = kubetune(
        capsys,
        kubeconfig,
        ns,
        "dataset",
        "create",
        "keyless",
        "-f",
        str(data),
        "--to",
        f"s3://{BUCKET}/data",
        "--s3-endpoint",
        s3,
        "--wait",
        "--timeout",
        "180",
    )
    assert code == 1, f"{out}\n{err}\n{operator.tail()}"
    assert "Phase:" in out and "Failed" in out
    assert "error: Dataset 'keyless' is Failed" in err


def test_job_create_follow_exits_0_when_the_run_succeeds(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    operator: Operator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = kubetune(capsys, kubeconfig, ns, "job", "create", "ok", *RUN, "--follow")
    assert code == 0, f"{out}\n{err}\n{operator.tail()}"
    lines = out.splitlines()
    assert lines[0] == "finetunejob.kubetune.io/ok created"
    assert any(line.startswith("Running") for line in lines), out
    assert any("event: " in line and "finetunejob/ok" in line for line in lines), out
    assert any(line.startswith("Succeeded | 100% (step ") for line in lines), out
    assert any(line.startswith("Phase:") and "Succeeded" in line for line in lines), out
    assert any(line.startswith("Output:") and "pvc://models/tuned/" in line for line in lines), out

    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "get", "ok")
    assert code == 0
    assert f"pvc://models/tuned/{ns}/ok" in out
    assert "Events:" in out and "job/ok-train" in out


def test_job_follow_exits_1_with_the_reason_when_the_run_fails(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    operator: Operator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No example fits 16 tokens: the trainer says so and exits 3, and the run fails
    without a retry."""
    code, _, err = kubetune(
        capsys, kubeconfig, ns, "job", "create", "too-long", *RUN, "--max-context-length", "16"
    )
    assert code == 0, err
    code, out, err = kubetune(
        capsys, kubeconfig, ns, "job", "follow", "too-long", "--timeout", "600"
    )
    assert code == 1, f"{out}\n{err}\n{operator.tail()}"
    assert "error: FineTuneJob 'too-long' Failed: " in err
    assert "maxContextLength=16" in err
    assert any(line.startswith("Failed") for line in out.splitlines()), out
    assert "Output:" not in out  # a failed run wrote nothing worth pointing at
