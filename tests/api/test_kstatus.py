"""kstatus (sigs.k8s.io/cli-utils, as Flux and `kubectl wait`-style tools compute it)
of each kind's status as the operator's own decisions write it: Current once Ready,
Succeeded or Available, InProgress while work is under way or a spec change is not
yet acted on, and Failed for a failure rather than in progress for ever."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kstatus import kstatus, require_go_tool

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.actions import Decision
from kubetune_operator.resources.conditions import status_patch
from kubetune_operator.resources.dataset import decide as dataset
from kubetune_operator.resources.finetunejob import decide as finetunejob
from kubetune_operator.resources.modeldeployment import decide as modeldeployment
from kubetune_operator.resources.modeldeployment.server import deployment, plan
from kubetune_operator.settings import Settings

SETTINGS = Settings(trainer_image="registry.local/trainer:1", admin_key="operator-key")
NOW = "2026-11-30T09:20:00Z"
STARTED = "2026-11-30T09:10:00Z"


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    require_go_tool("kstatus")


def written(obj: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The object once the decision's status write has reached the API server (a merge
    patch: null removes)."""
    assert decision.status is not None
    patch = status_patch(obj, decision.status, NOW)
    assert patch is not None
    out = copy.deepcopy(obj)
    status = out.setdefault("status", {})
    for key, value in patch.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    # As JSON, as the API server returns it (the phases are StrEnums here).
    result: dict[str, Any] = json.loads(json.dumps(out))
    return result


def meta(kind: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "team", "uid": f"{name}-uid", "generation": 1},
    }


def job(owner: dict[str, Any], name: str, *conditions: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": "team",
            "ownerReferences": [{"uid": owner["metadata"]["uid"], "name": "x", "kind": "Owner"}],
        },
        "spec": {"suspend": False},
        "status": {"conditions": list(conditions), "startTime": STARTED, "active": 1},
    }


def pod(phase: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "creationTimestamp": STARTED},
        "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": 9090}]}]},
        "status": {"phase": phase, "podIP": "10.0.0.9", "containerStatuses": [{"state": state}]},
    }


def ended(summary: dict[str, Any], code: int = 0) -> dict[str, Any]:
    """A pod whose container ended leaving ``summary`` as its termination message."""
    state = {"terminated": {"exitCode": code, "message": json.dumps(summary)}}
    return pod("Succeeded" if code == 0 else "Failed", state)


COMPLETE = {"type": "Complete", "status": "True"}
FAILED = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}

DATASET = {
    **meta("Dataset", "shapes"),
    "spec": {"source": {"configMap": {"name": "shapes-data", "key": "train.jsonl"}}},
}


def dataset_after(**seen: Any) -> dict[str, Any]:
    spec = DatasetSpec.model_validate(DATASET["spec"])
    return written(DATASET, dataset.decide(dataset.Observed(DATASET, spec, NOW, **seen), SETTINGS))


def validated(summary: dict[str, Any]) -> dict[str, Any]:
    done = job(DATASET, "shapes-validate-1", COMPLETE)
    return dataset_after(job=done, pods=[ended(summary)])


VALID = {"valid": True, "examples": 36, "images": 36, "sha256": "a" * 64}
BAD_LINES = {
    "valid": False,
    "examples": 4,
    "errorCount": 1,
    "errors": [{"line": 3, "message": "the last message must be from the assistant"}],
}

FINETUNEJOB = {
    **meta("FineTuneJob", "shapes"),
    "spec": {
        "baseModel": {"name": "org/model"},
        "dataset": {"name": "shapes"},
        "outputModel": {"name": "out", "storage": {"pvc": {"claimName": "models", "path": "o"}}},
    },
}


def run_after(training: dict[str, Any], trainer: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob as its training Job and that Job's pod show it."""
    ftj = {**FINETUNEJOB, "status": {"phase": "Pending", "observedGeneration": 1}}
    spec = FineTuneJobSpec.model_validate(ftj["spec"])
    seen = finetunejob.Observed(ftj, spec, NOW, job=training, pods=[trainer])
    return written(ftj, finetunejob.decide(seen, SETTINGS))


TRAINED = {"ok": True, "phase": "Succeeded", "steps": 40, "totalSteps": 40, "trainLoss": 0.5}
OOM = {"ok": False, "phase": "Failed", "message": "CUDA out of memory"}

MODELDEPLOYMENT = {**meta("ModelDeployment", "serve"), "spec": {"baseModel": {"name": "org/m"}}}


def server_after(**status: Any) -> dict[str, Any]:
    """The ModelDeployment as its Deployment, with ``status``, shows it."""
    spec = ModelDeploymentSpec.model_validate(MODELDEPLOYMENT["spec"])
    current = deployment(
        plan(MODELDEPLOYMENT, spec, [], SETTINGS.trainer_image, SETTINGS.server_image)
    )
    current["status"] = status
    seen = modeldeployment.Observed(MODELDEPLOYMENT, spec, deployment=current)
    return written(MODELDEPLOYMENT, modeldeployment.decide(seen, SETTINGS))


def condition(type_: str, status: str, **rest: str) -> dict[str, str]:
    return {"type": type_, "status": status, **rest}


CASES = {
    "Dataset Validating": (lambda: dataset_after(), "InProgress"),
    "Dataset Ready": (lambda: validated(VALID), "Current"),
    "Dataset Invalid": (lambda: validated(BAD_LINES), "Failed"),
    "FineTuneJob Running": (
        lambda: run_after(job(FINETUNEJOB, "shapes-train"), pod("Running", {"running": {}})),
        "InProgress",
    ),
    "FineTuneJob Succeeded": (
        lambda: run_after(job(FINETUNEJOB, "shapes-train", COMPLETE), ended(TRAINED)),
        "Current",
    ),
    "FineTuneJob Failed": (
        lambda: run_after(job(FINETUNEJOB, "shapes-train", FAILED), ended(OOM, 1)),
        "Failed",
    ),
    "ModelDeployment Progressing": (
        lambda: server_after(readyReplicas=0, conditions=[condition("Progressing", "True")]),
        "InProgress",
    ),
    "ModelDeployment Available": (
        lambda: server_after(
            readyReplicas=1, updatedReplicas=1, conditions=[condition("Available", "True")]
        ),
        "Current",
    ),
    "ModelDeployment Failed": (
        lambda: server_after(
            conditions=[
                condition(
                    "Progressing",
                    "False",
                    reason="ProgressDeadlineExceeded",
                    message='ReplicaSet "serve-5d8f" has timed out progressing.',
                )
            ]
        ),
        "Failed",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kstatus_of_each_phase(case: str) -> None:
    build, expected = CASES[case]
    obj = build()
    assert case.endswith(obj["status"]["phase"]), obj["status"]
    result = kstatus(obj)
    assert result["status"] == expected, result
    if expected != "Current":
        # Flux shows kstatus's message: it is the operator's.
        assert result["message"] == obj["status"]["message"]


def test_a_spec_change_not_yet_acted_on_is_in_progress() -> None:
    edited = validated(VALID)
    edited["metadata"]["generation"] = 2
    assert kstatus(edited) == {
        "status": "InProgress",
        "message": "Dataset generation is 2, but latest observed generation is 1",
    }
