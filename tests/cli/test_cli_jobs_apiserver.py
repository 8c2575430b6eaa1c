"""`job create | list | get | cancel | resume` against the real API server (CRDs and
their CEL rules installed, no operator: what is tested is what the commands write and
how they read what is there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import Kubectl

from kubetune_cli import main as cli

pytestmark = pytest.mark.apiserver

CREATE = (
    "job",
    "create",
    "--base-model",
    "pvc://models/tiny-vlm",
    "--dataset",
    "shapes",
    "--validation-split",
    "0.25",
    "--epochs",
    "2",
    "--lora-rank",
    "4",
    "--gpus",
    "0",
)


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("cli-jobs")


def kubetune(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, ns: str, *argv: str
) -> tuple[int, str, str]:
    """The plugin as kubectl runs it, in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["--kubeconfig", str(kubeconfig), "-n", ns, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ftj(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.get("ftj", name, "-n", ns)
    return found


def set_status(kubectl: Kubectl, ns: str, name: str, status: dict[str, Any]) -> None:
    """What the operator would write."""
    kubectl.run(
        "patch",
        "ftj",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_create_writes_the_spec_the_flags_say_and_refuses_a_second_of_that_name(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = kubetune(capsys, kubeconfig, ns, *CREATE[:2], "first", *CREATE[2:])
    assert code == 0, err
    assert out == "finetunejob.kubetune.io/first created\n"
    assert "Dataset 'shapes' is not in namespace" in err  # told, not refused: the run waits
    spec = ftj(kubectl, ns, "first")["spec"]
    assert spec["baseModel"] == {
        "name": "tiny-vlm",
        "source": {"pvc": {"claimName": "models", "path": "tiny-vlm"}},
        "trustRemoteCode": False,
    }
    assert spec["validation"] == {"split": 0.25}
    assert spec["hyperparameters"]["epochs"] == 2 and spec["hyperparameters"]["loraRank"] == 4
    assert spec["resources"]["gpus"] == 0
    code, _, err = kubetune(capsys, kubeconfig, ns, *CREATE[:2], "first", *CREATE[2:])
    assert code == 1 and "already exists" in err


def test_server_dry_run_has_the_api_server_admit_it_and_keeps_nothing(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = kubetune(
        capsys, kubeconfig, ns, *CREATE[:2], "ghost", *CREATE[2:], "--dry-run=server", "-o", "json"
    )
    assert code == 0, err
    admitted = json.loads(out)
    assert admitted["metadata"]["uid"]  # the API server's answer, defaults filled in
    assert admitted["spec"]["method"] == "sft"
    assert kubectl.run("get", "ftj", "ghost", "-n", ns, check=False).returncode != 0


def test_list_and_get_show_what_the_operator_wrote_and_the_runs_events(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = kubetune(capsys, kubeconfig, ns, *CREATE[:2], "shown", *CREATE[2:])
    assert code == 0, err
    set_status(
        kubectl,
        ns,
        "shown",
        {
            "phase": "Succeeded",
            "observedGeneration": 1,
            "jobName": "shown-train",
            "progress": {"step": 8, "totalSteps": 8, "percent": 100, "epoch": 2.0},
            "metrics": {"trainLoss": 0.25, "evalLoss": 0.5},
            "outputModel": {"uri": "pvc://models/tuned/x/shown"},
            "evaluation": {
                "phase": "Succeeded",
                "tuned": {"examples": 9, "accuracy": 0.8889},
                "base": {"examples": 9, "accuracy": 0.1111},
            },
        },
    )
    for kind, name, reason in (
        ("FineTuneJob", "shown", "Succeeded"),
        ("Job", "shown-train", "Completed"),
        ("Pod", "shown-train-0-abcde", "Started"),
        ("Pod", "unrelated-abcde", "Started"),
    ):
        kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.{reason.lower()}", "namespace": ns},
                "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                "reason": reason,
                "message": f"{kind} {name} {reason}",
                "type": "Normal",
                "lastTimestamp": "2026-11-30T10:00:00Z",
            }
        )
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "list")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["shown"][1:7] == ["Succeeded", "100%", "0.25", "0.5", "88.9%", "(base"]
    assert rows["first"][1:3] == ["Pending", "<none>"]

    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "get", "shown")
    assert code == 0
    assert "pvc://models/tuned/x/shown" in out
    assert next(line for line in out.splitlines() if "exact match" in line).split()[2:] == [
        "88.9%",
        "11.1%",
    ]
    assert "FineTuneJob shown Succeeded" in out
    assert "Job shown-train Completed" in out and "Pod shown-train-0-abcde Started" in out
    assert "unrelated" not in out
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "get", "shown", "-o", "yaml")
    assert yaml.safe_load(out)["status"]["evaluation"]["tuned"]["accuracy"] == 0.8889
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "list", "-o", "json")
    assert {j["metadata"]["name"] for j in json.loads(out)["items"]} >= {"first", "shown"}
    code, _, err = kubetune(capsys, kubeconfig, ns, "job", "get", "nothing")
    assert code == 1 and "FineTuneJob 'nothing' not found" in err

    # A finished run cannot be suspended.
    code, _, err = kubetune(capsys, kubeconfig, ns, "job", "cancel", "shown")
    assert code == 1 and "already Succeeded" in err


def test_cancel_suspends_resume_resumes_and_delete_deletes(
    kubectl: Kubectl, kubeconfig: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = kubetune(capsys, kubeconfig, ns, *CREATE[:2], "pausing", *CREATE[2:])
    assert code == 0, err
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "cancel", "pausing")
    assert code == 0 and "finetunejob.kubetune.io/pausing suspended" in out
    assert ftj(kubectl, ns, "pausing")["spec"]["suspend"] is True
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "cancel", "pausing")
    assert code == 0 and "already suspended" in out
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "resume", "pausing")
    assert code == 0 and "resumed" in out
    assert ftj(kubectl, ns, "pausing")["spec"]["suspend"] is False
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "resume", "pausing")
    assert code == 0 and "is not suspended" in out
    code, out, _ = kubetune(capsys, kubeconfig, ns, "job", "cancel", "pausing", "--delete")
    assert code == 0 and "deleted" in out
    assert kubectl.run("get", "ftj", "pausing", "-n", ns, check=False).returncode != 0
    code, _, err = kubetune(capsys, kubeconfig, ns, "job", "resume", "pausing")
    assert code == 1 and "not found" in err
