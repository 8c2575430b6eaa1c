"""Each kind's decide(observed) → actions + status, branch by branch: every phase
transition and every failure reason, without a cluster."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources import references
from kubetune_operator.resources.actions import (
    Activate,
    Apply,
    Create,
    Decision,
    Delete,
    LoadAdapter,
    OpenGate,
    Suspend,
    UnloadAdapter,
)
from kubetune_operator.resources.conditions import status_patch
from kubetune_operator.resources.dataset import decide as dataset
from kubetune_operator.resources.finetunejob import decide as finetunejob
from kubetune_operator.resources.modeldeployment import decide as modeldeployment
from kubetune_operator.resources.modeldeployment.server import SPEC_HASH, deployment, plan
from kubetune_operator.resources.platform import ModelStore, PodDefaults, with_output
from kubetune_operator.resources.workloads import ServerPod
from kubetune_operator.settings import Settings

SETTINGS = Settings(
    trainer_image="registry.local/trainer:test", start_grace=300, admin_key="operator-key"
)
NOW = "2026-01-01T00:10:00Z"
A_MINUTE_AGO = "2026-01-01T00:09:00Z"
TEN_MINUTES_AGO = "2026-01-01T00:00:00Z"
SHA = "b" * 64


def creates(decision: Decision) -> list[str]:
    return [a.body["kind"] for a in decision.actions if isinstance(a, Create)]


def status_of(decision: Decision) -> tuple[str, str, bool | None]:
    assert decision.status is not None
    return decision.status.phase, decision.status.reason, decision.status.ready


def owned(kind: str, name: str, uid: str, **rest: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "team",
            "ownerReferences": [{"uid": uid, "name": "x", "kind": "Owner"}],
        },
        **rest,
    }


def job(uid: str, name: str, conditions: list[dict[str, str]] | None = None, **spec: Any) -> Any:
    return owned(
        "Job",
        name,
        uid,
        spec={"suspend": False, **spec},
        status={"conditions": conditions or [], "startTime": TEN_MINUTES_AGO, "active": 1},
    )


COMPLETE = [{"type": "Complete", "status": "True"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]


def pod(phase: str, state: dict[str, Any], created: str = A_MINUTE_AGO) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "creationTimestamp": created},
        "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": 9090}]}]},
        "status": {"phase": phase, "podIP": "10.0.0.9", "containerStatuses": [{"state": state}]},
    }


def finished_pod(message: str, code: int = 0) -> dict[str, Any]:
    phase = "Succeeded" if code == 0 else "Failed"
    return pod(phase, {"terminated": {"exitCode": code, "message": message}})


def missing_secret(created: str) -> dict[str, Any]:
    return pod(
        "Pending",
        {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}},
        created,
    )


# Dataset ----------------------------------------------------------------------------


def ds_body(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {
            "name": "shapes",
            "namespace": "team",
            "uid": "ds-1",
            "generation": generation,
        },
        "spec": {"source": {"configMap": {"name": "cm", "key": "train.jsonl"}}},
        **({"status": status} if status is not None else {}),
    }


def ds_seen(body: dict[str, Any], **seen: Any) -> dataset.Observed:
    return dataset.Observed(body, DatasetSpec.model_validate(body["spec"]), NOW, **seen)


def test_a_new_dataset_gets_its_validation_job_and_validates() -> None:
    decision = dataset.decide(ds_seen(ds_body()), SETTINGS)
    assert creates(decision) == ["ServiceAccount", "Job"]
    assert decision.actions[1].body["metadata"]["name"] == "shapes-validate-1"  # type: ignore[union-attr]
    assert status_of(decision) == ("Validating", "Validating", None)
    assert decision.status is not None and decision.status.fields["validationJob"] == (
        "shapes-validate-1"
    )


def test_a_dataset_with_a_queue_is_validated_by_a_job_kueue_admits() -> None:
    body = ds_body()
    body["spec"]["queueName"] = "cpu"
    decision = dataset.decide(ds_seen(body), SETTINGS)
    created = decision.actions[1].body  # type: ignore[union-attr]
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "cpu"
    assert created["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in created["spec"]["template"]["metadata"]["labels"]
    held = job("ds-1", "shapes-validate-1", suspend=True)
    queued = dataset.decide(ds_seen(body, job=held), SETTINGS)
    assert status_of(queued) == ("Validating", "Queued", None)
    assert queued.status is not None and "queued in 'cpu'" in queued.status.fields["message"]


def test_a_new_generation_deletes_the_jobs_of_earlier_ones() -> None:
    earlier = [
        owned("Job", "shapes-validate-1", "ds-1"),
        owned("Job", "other-validate-1", "ds-9"),  # labelled alike, another Dataset's
    ]
    earlier[0]["metadata"]["ownerReferences"][0].update(kind="Dataset", name="shapes")
    earlier[1]["metadata"]["ownerReferences"][0].update(kind="Dataset", name="other")
    decision = dataset.decide(ds_seen(ds_body(generation=2), earlier_jobs=earlier), SETTINGS)
    assert creates(decision) == ["ServiceAccount", "Job"]
    assert [a for a in decision.actions if isinstance(a, Delete)] == [
        Delete("Job", "team", "shapes-validate-1")
    ]


def test_a_namesakes_validation_job_is_waited_out() -> None:
    foreign = job("someone-else", "shapes-validate-1")
    decision = dataset.decide(ds_seen(ds_body(), job=foreign), SETTINGS)
    assert decision == Decision(log=decision.log) and "namesake" in decision.log


@pytest.mark.parametrize(
    ("summary", "phase", "reason", "ready", "notice"),
    [
        (
            {"valid": True, "examples": 5, "images": 3, "sha256": SHA},
            "Ready",
            "Validated",
            True,
            "Normal",
        ),
        (
            {"valid": False, "errorCount": 1, "errors": [{"line": 2, "message": "bad"}]},
            "Invalid",
            "InvalidData",
            False,
            "Warning",
        ),
    ],
)
def test_the_validator_s_summary_becomes_the_dataset_s_result(
    summary: dict[str, Any], phase: str, reason: str, ready: bool, notice: str
) -> None:
    done = job("ds-1", "shapes-validate-1", COMPLETE)
    seen = ds_seen(ds_body(), job=done, pods=[finished_pod(json.dumps(summary))])
    decision = dataset.decide(seen, SETTINGS)
    assert decision.actions == () and status_of(decision) == (phase, reason, ready)
    assert decision.status is not None and decision.status.notice is not None
    assert (decision.status.notice.type, decision.status.notice.reason) == (notice, phase)


def test_validation_that_could_not_run_fails_the_dataset() -> None:
    crashed = job("ds-1", "shapes-validate-1", FAILED)
    seen = ds_seen(ds_body(), job=crashed, pods=[finished_pod("cannot download", 1)])
    decision = dataset.decide(seen, SETTINGS)
    assert status_of(decision) == ("Failed", "ValidationFailed", False)
    assert decision.status is not None and "cannot download" in decision.status.fields["message"]
    assert decision.after_status == ()


def test_a_validation_pod_waits_for_its_secret_then_fails_and_its_job_goes() -> None:
    running = job("ds-1", "shapes-validate-1")
    young = dataset.decide(
        ds_seen(ds_body(), job=running, pods=[missing_secret(A_MINUTE_AGO)]), SETTINGS
    )
    assert status_of(young) == ("Validating", "CreateContainerConfigError", None)
    assert young.after_status == ()
    old = dataset.decide(
        ds_seen(ds_body(), job=running, pods=[missing_secret(TEN_MINUTES_AGO)]), SETTINGS
    )
    assert status_of(old) == ("Failed", "ValidationFailed", False)
    assert old.after_status == (Delete("Job", "team", "shapes-validate-1"),)


def test_a_settled_dataset_is_not_written_again() -> None:
    settled = ds_body(status={"phase": "Ready", "observedGeneration": 1})
    done = job("ds-1", "shapes-validate-1", COMPLETE)
    decision = dataset.decide(
        ds_seen(settled, job=done, pods=[finished_pod('{"valid": false}')]), SETTINGS
    )
    assert decision.actions == ()
    assert decision.status is not None and status_patch(settled, decision.status, NOW) is None


# FineTuneJob --------------------------------------------------------------------------


def ftj_body(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> Any:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "run", "namespace": "team", "uid": "ftj-1", "generation": generation},
        "spec": {
            "baseModel": {"name": "org/model"},
            "dataset": {"name": "train"},
            "outputModel": {
                "name": "out",
                "storage": {"pvc": {"claimName": "models", "path": "runs/out"}},
            },
            **spec,
        },
        **({"status": status} if status is not None else {}),
    }


def dataset_in(phase: str, name: str = "train", observed: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": 1},
        "spec": {"source": {"pvc": {"claimName": "datasets", "path": f"{name}.jsonl"}}},
        "status": {"phase": phase, "observedGeneration": observed, "sha256": SHA, "message": "m"},
    }


def ftj_seen(body: dict[str, Any], **seen: Any) -> finetunejob.Observed:
    return finetunejob.Observed(body, FineTuneJobSpec.model_validate(body["spec"]), NOW, **seen)


def ftj_decide(body: dict[str, Any], **seen: Any) -> Decision:
    return finetunejob.decide(ftj_seen(body, **seen), SETTINGS)


@pytest.mark.parametrize(
    ("datasets", "spec", "phase", "reason"),
    [
        ({"train": None}, {}, "WaitingForDataset", "DatasetNotFound"),
        ({"train": dataset_in("Validating")}, {}, "WaitingForDataset", "DatasetNotReady"),
        ({"train": dataset_in("Ready", observed=0)}, {}, "WaitingForDataset", "DatasetNotReady"),
        ({"train": dataset_in("Invalid")}, {}, "Failed", "DatasetInvalid"),
        (
            {"train": dataset_in("Ready"), "held": dataset_in("Failed", "held")},
            {"validation": {"dataset": {"name": "held"}}},
            "Failed",
            "DatasetFailed",
        ),
    ],
)
def test_a_run_waits_for_its_datasets_or_fails_with_them(
    datasets: dict[str, Any], spec: dict[str, Any], phase: str, reason: str
) -> None:
    decision = ftj_decide(ftj_body(**spec), datasets=datasets)
    assert decision.actions == ()
    assert status_of(decision)[:2] == (phase, reason)
    assert decision.dependents_changed is (phase == "Failed")


def dpo_dataset(phase: str, name: str = "train") -> dict[str, Any]:
    ds = dataset_in(phase, name)
    return {**ds, "spec": {**ds["spec"], "task": "dpo"}}


@pytest.mark.parametrize(
    ("datasets", "spec", "named"),
    [
        # Said at once, while the Dataset still validates.
        ({"train": dataset_in("Validating")}, {}, "training Dataset 'train'"),
        (
            {"train": dpo_dataset("Ready"), "held": dataset_in("Ready", "held")},
            {"validation": {"dataset": {"name": "held"}}},
            "validation Dataset 'held'",
        ),
    ],
)
def test_a_dpo_run_on_a_dataset_validated_for_sft_fails_at_once_with_no_job(
    datasets: dict[str, Any], spec: dict[str, Any], named: str
) -> None:
    decision = ftj_decide(ftj_body(method="dpo", **spec), datasets=datasets)
    assert decision.actions == ()
    assert status_of(decision)[:2] == ("Failed", "DatasetTaskMismatch")
    assert decision.status is not None
    message = decision.status.fields["message"]
    assert named in message and "task sft" in message and "spec.task" in message


def test_a_run_on_remote_images_no_digest_was_recorded_for_fails_before_a_gpu_is_booked() -> None:
    remote = dataset_in("Ready", "held")
    remote["status"]["remoteImages"] = 3
    decision = ftj_decide(
        ftj_body(validation={"dataset": {"name": "held"}}),
        datasets={"train": dataset_in("Ready"), "held": remote},
    )
    assert decision.actions == ()
    assert status_of(decision)[:2] == ("Failed", "RemoteImagesNotValidated")
    assert decision.status is not None
    assert (
        "validation Dataset 'held' names 3 images by http(s) URL"
        in (decision.status.fields["message"])
    )


def test_a_run_on_remote_images_fetches_them_once_before_it_starts_and_checks_them() -> None:
    train = dataset_in("Ready")
    train["status"].update(remoteImages=3, remoteImagesSha256="d" * 64)
    body = ftj_body(preflight={"enabled": False}, validation={"split": 0.2})
    decision = ftj_decide(body, datasets={"train": train})
    configmap, created = (a.body for a in decision.actions[1:])  # type: ignore[union-attr]
    assert json.loads(configmap["data"]["job.json"])["remoteImages"] == "/data/remote-images"
    pod = created["spec"]["template"]["spec"]
    (step,) = [c for c in pod["initContainers"] if c["name"] == "images-train-data"]
    args = step["command"]
    assert args[:2] == ["kubetune", "fetch-images"]
    assert args[args.index("--remote-sha256") + 1] == "d" * 64
    assert args[args.index("--remote-out") + 1] == "/data/remote-images"
    (trainer,) = pod["containers"]
    fetched = [m for m in trainer["volumeMounts"] if m["name"] == "remote-images"]
    assert fetched == [
        {"name": "remote-images", "mountPath": "/data/remote-images", "readOnly": True}
    ]


def test_an_sft_run_trains_on_a_dpo_datasets_chosen_replies() -> None:
    decision = ftj_decide(ftj_body(), datasets={"train": dpo_dataset("Ready")})
    assert creates(decision) == ["ServiceAccount", "ConfigMap", "Job"]


# A run whose pre-flight has passed: the next reconcile makes its training Job.
PASSED = {"preflight": {"phase": "Succeeded", "jobName": "run-preflight"}}


def test_a_run_whose_datasets_are_ready_gets_its_job() -> None:
    decision = ftj_decide(ftj_body(PASSED), datasets={"train": dataset_in("Ready")})
    assert creates(decision) == ["ServiceAccount", "ConfigMap", "Job"]
    assert status_of(decision) == ("Pending", "PodPending", None)
    assert decision.status is not None
    fields = decision.status.fields
    assert (fields["jobName"], fields["datasetSha256"]) == ("run-train", SHA)
    assert fields["outputModel"] == {"uri": "pvc://models/runs/out"}


def test_a_run_whose_datasets_are_ready_is_pre_flighted_on_a_cpu_first() -> None:
    ready = {"train": dataset_in("Ready")}
    body = ftj_body(resources={"gpus": 4, "nodes": 2, "nodeSelector": {"gpu": "h100"}})
    decision = ftj_decide(body, datasets=ready)
    assert creates(decision) == ["ServiceAccount", "ConfigMap", "Job"]
    made = decision.actions[-1].body  # type: ignore[union-attr]
    assert made["metadata"]["name"] == "run-preflight"
    pod_spec = made["spec"]["template"]["spec"]
    (trainer,) = pod_spec["containers"]
    assert trainer["command"] == ["kubetune"]
    assert trainer["args"] == [
        "preflight",
        "--config",
        "/etc/kubetune/job.json",
        "--processes",
        "8",
    ]
    assert "nvidia.com/gpu" not in json.dumps(trainer["resources"])
    assert "nodeSelector" not in pod_spec and "subdomain" not in pod_spec
    assert status_of(decision) == ("Pending", "Preflight", None)
    assert decision.status is not None
    assert decision.status.fields["preflight"]["phase"] == "Running"
    assert decision.status.fields["preflight"]["jobName"] == "run-preflight"


PREFLIGHT_SUMMARY = {
    "ok": True,
    "examples": 40,
    "tokens": 12000,
    "trainingTokens": 3600,
    "steps": 30,
    "longestExample": {"line": 7, "tokens": 900},
    "overLength": {"count": 2, "lines": [7, 12], "truncated": 1, "dropped": 1},
}


def test_a_passed_pre_flight_fills_status_and_makes_the_training_job() -> None:
    running = ftj_body({"phase": "Pending", "preflight": {"phase": "Running"}})
    done = job("ftj-1", "run-preflight", COMPLETE)
    decision = ftj_decide(
        running,
        datasets={"train": dataset_in("Ready")},
        preflight_job=done,
        preflight_pods=[finished_pod(json.dumps(PREFLIGHT_SUMMARY))],
    )
    assert creates(decision) == ["ServiceAccount", "ConfigMap", "Job"]
    assert decision.actions[-1].body["metadata"]["name"] == "run-train"  # type: ignore[union-attr]
    assert status_of(decision) == ("Pending", "PodPending", None)
    assert decision.status is not None
    figures = decision.status.fields["preflight"]
    assert figures["phase"] == "Succeeded" and figures["trainingTokens"] == 3600
    assert figures["overLength"] == PREFLIGHT_SUMMARY["overLength"]
    assert figures["longestExample"] == {"line": 7, "tokens": 900}


def test_a_pre_flight_under_way_waits_and_one_that_fails_fails_the_run_with_no_training_job() -> (
    None
):
    running = ftj_body({"phase": "Pending", "preflight": {"phase": "Running"}})
    ready = {"train": dataset_in("Ready")}
    underway = ftj_decide(
        running,
        datasets=ready,
        preflight_job=job("ftj-1", "run-preflight"),
        preflight_pods=[pod("Running", {"running": {}})],
    )
    assert underway.actions == ()
    assert status_of(underway) == ("Pending", "Preflight", None)
    summary = {"ok": False, "message": "no training example fits maxContextLength=16"}
    failed = ftj_decide(
        running,
        datasets=ready,
        preflight_job=job("ftj-1", "run-preflight", FAILED),
        preflight_pods=[finished_pod(json.dumps(summary), 3)],
    )
    assert creates(failed) == []
    assert status_of(failed) == ("Failed", "PreflightFailed", False)
    assert failed.status is not None
    assert failed.status.fields["message"] == (
        "pre-flight: no training example fits maxContextLength=16"
    )
    assert failed.status.fields["preflight"]["phase"] == "Failed"
    gone = ftj_decide(running, datasets=ready)
    assert status_of(gone)[:2] == ("Failed", "PreflightFailed")


def test_without_a_pre_flight_the_training_job_is_made_at_once() -> None:
    decision = ftj_decide(
        ftj_body(preflight={"enabled": False}), datasets={"train": dataset_in("Ready")}
    )
    assert decision.actions[-1].body["metadata"]["name"] == "run-train"  # type: ignore[union-attr]


def test_a_multi_node_run_gets_its_rendezvous_service_and_a_queued_one_waits_for_kueue() -> None:
    ready = {"train": dataset_in("Ready")}
    nodes = ftj_decide(ftj_body(PASSED, resources={"nodes": 2}), datasets=ready)
    assert creates(nodes) == ["ServiceAccount", "ConfigMap", "Service", "Job"]
    queued = ftj_decide(ftj_body(PASSED, queueName="gpus"), datasets=ready)
    assert queued.actions[-1].body["spec"]["suspend"] is True  # type: ignore[union-attr]
    assert status_of(queued) == ("Queued", "JobSuspended", None)


def test_a_namesake_s_child_is_waited_out() -> None:
    foreign = owned("ConfigMap", "run-job", "someone-else")
    decision = ftj_decide(ftj_body(), namesake=foreign)
    assert decision.actions == ()
    assert status_of(decision) == ("Pending", "WaitingForCleanup", None)
    assert decision.status is not None
    assert "ConfigMap run-job exists" in decision.status.fields["message"]


METRICS = {
    "kubetune_train_step": 30.0,
    "kubetune_train_total_steps": 120.0,
    "kubetune_train_loss": 1.25,
}


def test_a_running_run_shows_the_trainer_s_progress_and_losses() -> None:
    running = job("ftj-1", "run-train")
    pods = [pod("Running", {"running": {}})]
    decision = ftj_decide(
        ftj_body({"phase": "Pending", "jobName": "run-train"}),
        job=running,
        pods=pods,
        samples=METRICS,
    )
    assert decision.actions == () and status_of(decision) == ("Running", "Training", None)
    assert decision.status is not None
    fields = decision.status.fields
    assert fields["progress"]["percent"] == 25 and fields["metrics"] == {"trainLoss": 1.25}
    assert decision.status.notice is not None and decision.status.notice.type == "Normal"
    unread = ftj_decide(ftj_body(), job=running, pods=pods, samples=None)
    assert unread.status is not None and "progress" not in unread.status.fields


def test_where_the_trainer_serves_its_gauges() -> None:
    running = job("ftj-1", "run-train")
    assert finetunejob.trainer_endpoint(
        running, [pod("Running", {"running": {}})], NOW, SETTINGS
    ) == (
        "10.0.0.9",
        9090,
    )
    assert (
        finetunejob.trainer_endpoint(running, [pod("Pending", {"waiting": {}})], NOW, SETTINGS)
        is None
    )


@pytest.mark.parametrize(
    ("spec", "job_suspended", "action", "phase"),
    [
        ({"suspend": True}, False, Suspend("team", "run-train", True), "Suspended"),
        ({}, True, Suspend("team", "run-train", False), "Pending"),
        ({"queueName": "gpus"}, True, None, "Queued"),  # Kueue unsuspends, not the operator
        ({"queueName": "gpus", "suspend": True}, True, None, "Suspended"),
    ],
)
def test_spec_suspend_drives_the_job_s_suspend(
    spec: dict[str, Any], job_suspended: bool, action: Suspend | None, phase: str
) -> None:
    current = job("ftj-1", "run-train", suspend=job_suspended)
    decision = ftj_decide(ftj_body(**spec), job=current)
    assert decision.actions == ((action,) if action else ())
    assert status_of(decision)[0] == phase


def workload(active: bool = True, **condition: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "job-run-train-1a2b3", "namespace": "team"},
        "spec": {"active": active},
        "status": {"conditions": [condition] if condition else []},
    }


def test_a_queued_run_is_suspended_through_its_workload_and_its_job_is_never_written() -> None:
    admitted = job("ftj-1", "run-train", suspend=False)
    queued = ftj_body(queueName="gpus", suspend=True)
    # Kueue admitted the Job (unsuspended it): the operator does not write it back.
    decision = ftj_decide(queued, job=admitted, workload=workload())
    assert decision.actions == (Activate("team", "job-run-train-1a2b3", False),)
    assert not any(isinstance(a, Suspend) for a in decision.actions)
    assert ftj_decide(queued, job=admitted, workload=workload(active=False)).actions == ()
    resumed = ftj_decide(ftj_body(queueName="gpus"), job=admitted, workload=workload(False))
    assert resumed.actions == (Activate("team", "job-run-train-1a2b3", True),)
    assert ftj_decide(ftj_body(queueName="gpus"), job=admitted).actions == ()


def test_a_queued_run_says_why_kueue_has_not_admitted_it() -> None:
    waiting = job("ftj-1", "run-train", suspend=True)
    reason = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"
    pending = workload(type="QuotaReserved", status="False", reason="Pending", message=reason)
    decision = ftj_decide(ftj_body(queueName="gpus"), job=waiting, workload=pending)
    assert status_of(decision)[0] == "Queued"
    assert decision.status is not None
    assert decision.status.fields["message"] == f"queued in 'gpus'; {reason}"


SUMMARY = json.dumps(
    {
        "ok": True,
        "phase": "Succeeded",
        "steps": 40,
        "totalSteps": 40,
        "trainLoss": 0.5,
        "outputDir": "/o",
    }
)


def test_a_run_that_trained_succeeds_and_is_served_as_deploy_says() -> None:
    done = job("ftj-1", "run-train", COMPLETE)
    pods = [finished_pod(SUMMARY)]
    body = ftj_body({"phase": "Running"}, deploy={"enabled": True})
    decision = ftj_decide(body, job=done, pods=pods)
    assert status_of(decision) == ("Succeeded", "Completed", True)
    assert decision.dependents_changed
    (apply,) = decision.actions
    assert isinstance(apply, Apply) and apply.body["kind"] == "ModelDeployment"
    assert decision.status is not None
    fields = decision.status.fields
    assert fields["deployment"] == {"name": "run"} and fields["metrics"] == {"trainLoss": 0.5}
    assert fields["progress"]["percent"] == 100

    mine = owned("ModelDeployment", "run", "ftj-1")
    off = ftj_decide(ftj_body({"phase": "Running"}), job=done, pods=pods, deployment=mine)
    assert off.actions == (Delete("ModelDeployment", "team", "run"),)
    assert off.status is not None and off.status.fields["deployment"] is None

    theirs = owned("ModelDeployment", "run", "someone-else")
    taken = ftj_decide(body, job=done, pods=pods, deployment=theirs)
    assert taken.actions == ()
    assert taken.status is not None and "not deployed" in taken.status.fields["message"]


def test_a_run_that_attaches_to_a_shared_server_makes_none_of_its_own() -> None:
    done = job("ftj-1", "run-train", COMPLETE)
    pods = [finished_pod(SUMMARY)]
    shared = {"enabled": True, "modelDeployment": "team-server"}
    decision = ftj_decide(ftj_body({"phase": "Running"}, deploy=shared), job=done, pods=pods)
    assert decision.actions == ()
    assert decision.status is not None
    assert decision.status.fields["deployment"] == {"name": "team-server"}
    # Its own server, from when deploy had no modelDeployment, goes.
    mine = owned("ModelDeployment", "run", "ftj-1")
    moved = ftj_decide(
        ftj_body({"phase": "Running"}, deploy=shared), job=done, pods=pods, deployment=mine
    )
    assert moved.actions == (Delete("ModelDeployment", "team", "run"),)


def test_a_trainer_failure_fails_the_run_with_its_reason() -> None:
    failed = job("ftj-1", "run-train", FAILED)
    summary = '{"ok": false, "phase": "Failed", "message": "the dataset changed"}'
    decision = ftj_decide(
        ftj_body({"phase": "Running"}), job=failed, pods=[finished_pod(summary, 1)]
    )
    assert status_of(decision) == ("Failed", "BackoffLimitExceeded", False)
    assert (
        decision.status is not None and decision.status.fields["message"] == "the dataset changed"
    )
    assert decision.status.notice is not None and decision.status.notice.type == "Warning"
    assert decision.after_status == () and decision.dependents_changed


def test_a_pod_that_never_starts_fails_the_run_and_then_its_job_goes() -> None:
    pending = job("ftj-1", "run-train")
    young = ftj_decide(ftj_body(), job=pending, pods=[missing_secret(A_MINUTE_AGO)])
    assert status_of(young) == ("Pending", "CreateContainerConfigError", None)
    old = ftj_decide(ftj_body(), job=pending, pods=[missing_secret(TEN_MINUTES_AGO)])
    assert status_of(old) == ("Failed", "CreateContainerConfigError", False)
    assert old.after_status == (Delete("Job", "team", "run-train"),)


def test_a_run_failed_before_its_pod_started_loses_a_job_that_still_runs() -> None:
    ready = {"type": "Ready", "status": "False", "reason": "CreateContainerConfigError"}
    failed = {"phase": "Failed", "observedGeneration": 1, "conditions": [ready]}
    leftover = job("ftj-1", "run-train")
    assert ftj_decide(ftj_body(failed), job=leftover) == Decision(
        actions=(Delete("Job", "team", "run-train"),)
    )
    assert ftj_decide(ftj_body(failed), job=job("ftj-1", "run-train", FAILED)) == Decision()
    # A Job failing by itself is the job controller's to finish, even when an event
    # shows it before its Failed condition.
    by_trainer = {**failed, "conditions": [{**ready, "reason": "PodFailurePolicy"}]}
    failing = job("ftj-1", "run-train", [{"type": "FailureTarget", "status": "True"}])
    assert ftj_decide(ftj_body(by_trainer), job=failing) == Decision()
    assert ftj_decide(ftj_body({"phase": "Succeeded", "observedGeneration": 1})) == Decision()


def test_a_finished_run_without_its_job_follows_only_deploy() -> None:
    status = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "message": "training finished",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Completed"}],
    }
    decision = ftj_decide(ftj_body(status, generation=2, deploy={"enabled": True}))
    assert [type(a) for a in decision.actions] == [Apply]
    assert status_of(decision) == ("Succeeded", "Completed", True)
    assert not decision.dependents_changed


def test_which_runs_a_dataset_moves_on() -> None:
    waiting = ftj_body({"phase": "WaitingForDataset"}, validation={"dataset": {"name": "held"}})
    assert finetunejob.uses_dataset(waiting, "held") and finetunejob.uses_dataset(waiting, "train")
    assert not finetunejob.uses_dataset(waiting, "other")
    assert not finetunejob.uses_dataset(ftj_body({"phase": "Running"}), "train")


REFUSED_TRAINER = (
    'spec.image "evil/img:1" is not an allowed trainer image '
    "(allowed: ghcr.io/kubetune/trainer:*, ghcr.io/kubetune/trainer@*)"
)
REFUSED_DEPLOY_FLAG = (
    'spec.deploy.runtime.extraArgs[2] "--trust-remote-code" is not an allowed server flag: '
    "the operator sets it from baseModel.trustRemoteCode"
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"image": "evil/img:1"}, REFUSED_TRAINER),
        (
            {
                "deploy": {
                    "enabled": True,
                    "runtime": {"extraArgs": ["--seed", "1", "--trust-remote-code"]},
                }
            },
            REFUSED_DEPLOY_FLAG,
        ),
    ],
)
def test_a_run_the_policy_refuses_fails_before_anything_is_made(
    spec: dict[str, Any], message: str
) -> None:
    decision = ftj_decide(ftj_body(**spec), datasets={"train": dataset_in("Ready")})
    assert decision.actions == () and decision.after_status == ()
    assert status_of(decision) == ("Failed", "NotAllowed", False)
    assert decision.status is not None and decision.status.fields["message"] == message
    assert decision.status.notice is not None and decision.status.notice.type == "Warning"


def test_a_refused_run_stays_failed_until_its_spec_changes_then_starts_afresh() -> None:
    ready = {"type": "Ready", "status": "False", "reason": "NotAllowed"}
    refused = {"phase": "Failed", "observedGeneration": 1, "message": REFUSED_TRAINER}
    refused["conditions"] = [ready]
    datasets = {"train": dataset_in("Ready")}
    same = ftj_body(refused, image="evil/img:1")
    assert finetunejob.finished(same) and not finetunejob.needs_datasets(same, None)
    assert ftj_decide(same, datasets=datasets) == Decision()

    fixed = ftj_body(refused, generation=2, image="ghcr.io/kubetune/trainer:0.2.0")
    assert finetunejob.needs_datasets(fixed, None)
    started = ftj_decide(fixed, datasets=datasets)
    # Afresh: its pre-flight first, in the image now allowed.
    assert creates(started) == ["ServiceAccount", "ConfigMap", "Job"]
    preflight = started.actions[-1].body  # type: ignore[union-attr]
    assert preflight["metadata"]["name"] == "run-preflight"
    trainer = preflight["spec"]["template"]["spec"]["containers"][0]
    assert trainer["image"] == "ghcr.io/kubetune/trainer:0.2.0"
    assert status_of(started) == ("Pending", "Preflight", None)

    other = ftj_body(refused, generation=2, image="evil/img:2")
    again = ftj_decide(other, datasets=datasets)
    assert again.actions == () and status_of(again) == ("Failed", "NotAllowed", False)
    assert again.status is not None and '"evil/img:2"' in again.status.fields["message"]


def test_a_trained_run_whose_server_is_refused_is_not_deployed() -> None:
    """deploy stays editable after training: a runtime the policy refuses makes no
    server, and the run stays Succeeded."""
    status = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "message": "training finished",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Completed"}],
    }
    deploy = {"enabled": True, "runtime": {"extraArgs": ["--seed", "1", "--trust-remote-code"]}}
    decision = ftj_decide(ftj_body(status, generation=2, deploy=deploy))
    assert decision.actions == ()
    assert status_of(decision) == ("Succeeded", "Completed", True)
    assert decision.status is not None
    assert decision.status.fields["message"] == f"trained, but not deployed: {REFUSED_DEPLOY_FLAG}"


# ModelDeployment ----------------------------------------------------------------------

BASE = {"name": "org/model", "source": {"pvc": {"claimName": "models", "path": "base"}}}


def md_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "serve", "namespace": "team", "uid": "md-1", "generation": 1},
        "spec": {"baseModel": BASE, **spec},
    }


def md_seen(body: dict[str, Any], **seen: Any) -> modeldeployment.Observed:
    return modeldeployment.Observed(body, ModelDeploymentSpec.model_validate(body["spec"]), **seen)


def available(body: dict[str, Any]) -> dict[str, Any]:
    spec = ModelDeploymentSpec.model_validate(body["spec"])
    current = deployment(plan(body, spec, [], SETTINGS.trainer_image, SETTINGS.server_image))
    current["status"] = {
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "conditions": [{"type": "Available", "status": "True"}],
    }
    return current


def server(uid: str, loaded: dict[str, str] | None, gate_open: bool = True) -> ServerPod:
    return ServerPod("team", f"serve-{uid}", uid, f"10.0.0.{len(uid)}", "serve", gate_open, loaded)


ADAPTER_A = {"name": "a", "source": {"pvc": {"claimName": "models", "path": "out/a"}}}
ADAPTER_B = {"name": "b", "source": {"pvc": {"claimName": "models", "path": "out/b"}}}
PATH_A, PATH_B = "/models/claims/models/out/a", "/models/claims/models/out/b"


def adapters_of(decision: Decision) -> list[tuple[str, int, int, str | None]]:
    assert decision.status is not None
    return [
        (a["name"], a["loaded"], a["replicas"], a.get("reason"))
        for a in decision.status.fields["adapters"]
    ]


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        (
            {"extraArgs": ["--max-num-seqs", "8", "--trust-remote-code"]},
            'spec.runtime.extraArgs[2] "--trust-remote-code" is not an allowed server flag: '
            "the operator sets it from baseModel.trustRemoteCode",
        ),
        (
            {"extraArgs": ["--allowed-local-media-path", "/"]},
            'spec.runtime.extraArgs[0] "--allowed-local-media-path" is not an allowed server flag',
        ),
        (
            {"image": "evil/vllm:1"},
            'spec.runtime.image "evil/vllm:1" is not an allowed server image '
            "(allowed: vllm/vllm-openai:*, vllm/vllm-openai@*)",
        ),
    ],
)
def test_a_server_the_policy_refuses_fails_and_nothing_is_made_or_loaded(
    runtime: dict[str, Any], message: str
) -> None:
    body = md_body(runtime=runtime, adapters=[ADAPTER_A])
    decision = modeldeployment.decide(md_seen(body), SETTINGS)
    assert decision.actions == ()
    assert status_of(decision) == ("Failed", "NotAllowed", False)
    assert decision.status is not None and decision.status.fields["message"].startswith(message)
    # A server made for an earlier spec keeps serving it; nothing is loaded into it.
    running = modeldeployment.decide(
        md_seen(body, deployment=available(md_body()), servers=[server("p1", {})]),
        SETTINGS,
    )
    assert running.actions == () and status_of(running)[1] == "NotAllowed"


def test_a_refused_server_waits_for_its_spec_to_change() -> None:
    ready = {"type": "Ready", "status": "False", "reason": "NotAllowed"}
    body = md_body(runtime={"extraArgs": ["--trust-remote-code"]})
    body["status"] = {"phase": "Failed", "observedGeneration": 1, "conditions": [ready]}
    assert not modeldeployment.unsettled(body)
    body["metadata"]["generation"] = 2
    assert modeldeployment.unsettled(body)


def test_a_server_serves_the_base_while_an_adapter_waits_for_or_refuses_its_run() -> None:
    body = md_body(adapters=[{"name": "a", "fineTuneJob": "run"}])
    missing = modeldeployment.decide(md_seen(body, finetunejobs={"run": None}), SETTINGS)
    assert creates(missing) == ["Secret", "ServiceAccount", "Service"]
    assert [type(a) for a in missing.actions] == [Create, Create, Apply, Create]
    assert adapters_of(missing) == [("a", 0, 0, "FineTuneJobNotFound")]
    failed_run = ftj_body({"phase": "Failed"}, baseModel=BASE)
    failed = modeldeployment.decide(
        md_seen(body, finetunejobs={"run": failed_run}, deployment=available(body)), SETTINGS
    )
    assert status_of(failed) == ("Available", "Available", True)
    assert failed.status is not None and failed.status.fields["servedModels"] == ["org/model"]
    assert adapters_of(failed) == [("a", 0, 0, "FineTuneJobFailed")]
    assert "0/1 adapters served, a: FineTuneJobFailed" in failed.status.fields["message"]


def test_a_server_pod_gets_each_adapter_then_its_readiness_gate() -> None:
    body = md_body(adapters=[ADAPTER_A, ADAPTER_B])
    fresh = server("p1", {}, gate_open=False)
    loading = modeldeployment.decide(md_seen(body, servers=[fresh]), SETTINGS)
    assert [a for a in loading.actions if not isinstance(a, Create | Apply)] == [
        LoadAdapter(fresh, "a", PATH_A),
        LoadAdapter(fresh, "b", PATH_B),
    ]
    assert adapters_of(loading) == [("a", 0, 1, "Loading"), ("b", 0, 1, "Loading")]
    loaded = server("p1", {"a": PATH_A, "b": PATH_B}, gate_open=False)
    gate = modeldeployment.decide(
        md_seen(body, deployment=available(body), servers=[loaded]), SETTINGS
    )
    assert gate.actions == (OpenGate(loaded),)
    assert adapters_of(gate) == [("a", 1, 1, None), ("b", 1, 1, None)]
    assert gate.status is not None
    assert gate.status.fields["servedModels"] == ["org/model", "a", "b"]
    settled = server("p1", {"a": PATH_A, "b": PATH_B})
    again = modeldeployment.decide(
        md_seen(body, deployment=available(body), servers=[settled]), SETTINGS
    )
    assert again.actions == ()


def test_a_removed_or_moved_adapter_is_unloaded_from_every_pod_while_others_stay() -> None:
    moved = {"name": "b", "source": {"pvc": {"claimName": "models", "path": "out/b2"}}}
    body = md_body(adapters=[moved])
    pods = [server("p1", {"a": PATH_A, "b": PATH_B}), server("p22", {"b": PATH_B})]
    decision = modeldeployment.decide(
        md_seen(body, deployment=available(body), servers=pods), SETTINGS
    )
    new_b = "/models/claims/models/out/b2"
    assert list(decision.actions) == [
        UnloadAdapter(pods[0], "a"),
        UnloadAdapter(pods[0], "b"),
        LoadAdapter(pods[0], "b", new_b),
        UnloadAdapter(pods[1], "b"),
        LoadAdapter(pods[1], "b", new_b),
    ]


def test_a_load_the_server_refused_is_reported_and_not_retried_on_that_pod() -> None:
    body = md_body(adapters=[ADAPTER_A, ADAPTER_B])
    pod = server("p1", {"b": PATH_B}, gate_open=False)
    failures = {("p1", "a", PATH_A): "400 rank 128 above max_lora_rank 64"}
    decision = modeldeployment.decide(
        md_seen(body, deployment=available(body), servers=[pod], failures=failures), SETTINGS
    )
    # Nothing left to try: the pod takes requests, serving what it could load.
    assert decision.actions == (OpenGate(pod),)
    assert adapters_of(decision) == [("a", 0, 1, "LoadFailed"), ("b", 1, 1, None)]
    assert decision.status is not None
    a_state = decision.status.fields["adapters"][0]
    assert "rank 128" in a_state["message"]
    assert modeldeployment.unsettled(
        {**body, "status": {"observedGeneration": 1, "phase": "Available", "adapters": [a_state]}}
    )


def test_a_pod_whose_server_does_not_answer_is_left_alone() -> None:
    body = md_body(adapters=[ADAPTER_A])
    silent = server("p1", None, gate_open=False)
    decision = modeldeployment.decide(md_seen(body, servers=[silent]), SETTINGS)
    assert not [a for a in decision.actions if not isinstance(a, Create | Apply)]
    assert adapters_of(decision) == [("a", 0, 0, "NoServerPod")]


def test_a_run_that_attaches_joins_the_shared_server_under_its_output_name() -> None:
    body = md_body()
    run = ftj_body(
        {"phase": "Succeeded"},
        baseModel=BASE,
        deploy={"enabled": True, "modelDeployment": "serve"},
    )
    pod = server("p1", {})
    seen = md_seen(
        body,
        attached=[run],
        finetunejobs={"run": run},
        deployment=available(body),
        servers=[pod],
    )
    decision = modeldeployment.decide(seen, SETTINGS)
    out = run["spec"]["outputModel"]
    pvc = out["storage"]["pvc"]
    path = f"/models/claims/{pvc['claimName']}/{pvc['path']}"
    assert decision.actions == (LoadAdapter(pod, out["name"], path),)


def test_a_server_is_made_then_updated_only_when_its_spec_changes() -> None:
    body = md_body()
    new = modeldeployment.decide(md_seen(body), SETTINGS)
    assert [type(a) for a in new.actions] == [Create, Create, Apply, Create]
    assert status_of(new) == ("Progressing", "Progressing", False)
    current = available(body)
    serving = modeldeployment.decide(md_seen(body, deployment=current), SETTINGS)
    assert serving.actions == () and status_of(serving) == ("Available", "Available", True)
    assert serving.status is not None and serving.status.notice is not None
    current["metadata"]["annotations"][SPEC_HASH] = "stale"
    stale = modeldeployment.decide(md_seen(body, deployment=current), SETTINGS)
    assert [type(a) for a in stale.actions] == [Create, Create, Apply, Create]
    # While it is not available, the admin Secret its pods wait for is made again if gone.
    current = available(body)
    current["status"] = {"conditions": [{"type": "Progressing", "status": "True"}]}
    progressing = modeldeployment.decide(md_seen(body, deployment=current), SETTINGS)
    assert creates(progressing) == ["Secret"] and len(progressing.actions) == 1


def test_a_namesake_s_deployment_is_waited_out_and_a_pod_in_trouble_says_why() -> None:
    theirs = owned("Deployment", "serve", "someone-else")
    decision = modeldeployment.decide(md_seen(md_body(), deployment=theirs), SETTINGS)
    assert decision.actions == () and status_of(decision)[:2] == ("Pending", "WaitingForCleanup")
    body = md_body()
    spec = ModelDeploymentSpec.model_validate(body["spec"])
    current = deployment(plan(body, spec, [], SETTINGS.trainer_image, SETTINGS.server_image))
    current["status"] = {"conditions": [{"type": "Progressing", "status": "True"}]}
    unschedulable = {
        "metadata": {"name": "serve-x", "creationTimestamp": NOW},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/1 nodes",
                }
            ]
        },
    }
    stuck = modeldeployment.decide(
        md_seen(body, deployment=current, pods=[unschedulable]), SETTINGS
    )
    assert status_of(stuck) == ("Progressing", "Unschedulable", False)


# FineTuneJob: evaluation -------------------------------------------------------------

SCORED = {
    "ok": True,
    "tuned": {"examples": 9, "accuracy": 1.0, "loss": 0.1},
    "base": {"examples": 9, "accuracy": 0.0, "loss": 4.0},
    "klToBase": 2.5,
    "samples": [
        {"prompt": "Which shape?", "expected": "red circle", "base": "", "tuned": "red circle"}
    ],
}


def trained_job(**spec: Any) -> Any:
    """The training Job a run with ``spec`` got, as the job controller completes it."""
    made = ftj_decide(ftj_body(**spec), datasets={"train": dataset_in("Ready")})
    (body,) = [a.body for a in made.actions if isinstance(a, Create) and a.body["kind"] == "Job"]
    body["metadata"]["ownerReferences"] = [{"uid": "ftj-1", "name": "run", "kind": "FineTuneJob"}]
    # Kueue writes its flavor's placement into the Job it admits.
    body["spec"]["template"]["spec"]["nodeSelector"] = {"flavor": "a100"}
    body["status"] = {"conditions": COMPLETE, "succeeded": 1}
    return body


def test_a_run_that_trained_is_scored_in_an_evaluation_job_on_one_gpu() -> None:
    spec = {"validation": {"split": 0.25}, "resources": {"gpus": 4, "nodes": 2}}
    training = trained_job(**spec)
    decision = ftj_decide(
        ftj_body({"phase": "Running"}, **spec), job=training, pods=[finished_pod(SUMMARY)]
    )
    assert status_of(decision) == ("Succeeded", "Completed", True)
    (created,) = [a.body for a in decision.actions if isinstance(a, Create)]
    assert created["metadata"]["name"] == "run-evaluate"
    assert created["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"
    assert created["metadata"]["ownerReferences"][0]["uid"] == "ftj-1"
    assert "completionMode" not in created["spec"] and not created["spec"]["suspend"]
    pod_spec = created["spec"]["template"]["spec"]
    trained_pod = training["spec"]["template"]["spec"]
    assert pod_spec["volumes"] == trained_pod["volumes"]
    assert "subdomain" not in pod_spec and "nodeSelector" not in pod_spec
    (container,) = pod_spec["containers"]
    assert container["command"] == ["kubetune"]
    assert container["args"] == [
        "evaluate",
        "--config",
        "/etc/kubetune/job.json",
        "--max-examples",
        "200",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "ports" not in container
    assert container["volumeMounts"] == trained_pod["containers"][0]["volumeMounts"]
    assert decision.status is not None
    assert decision.status.fields["evaluation"] == {
        "phase": "Running",
        "message": None,
        "jobName": "run-evaluate",
    }


def test_an_evaluation_job_reports_the_tuned_model_beside_its_base() -> None:
    spec = {"validation": {"split": 0.25}}
    training = trained_job(**spec)
    scoring = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "message": "training finished",
        "evaluation": {"phase": "Running", "jobName": "run-evaluate"},
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Completed",
                "lastTransitionTime": A_MINUTE_AGO,
            }
        ],
    }
    body = ftj_body(scoring, **spec)
    assert not finetunejob.finished(body) and finetunejob.active(body)
    running = job("ftj-1", "run-evaluate")
    under_way = ftj_decide(body, job=training, evaluation_job=running, pods=[finished_pod(SUMMARY)])
    assert under_way.actions == ()
    assert under_way.status is not None
    assert under_way.status.fields["evaluation"] == {
        "phase": "Running",
        "message": "waiting for the evaluation pod to start",
        "jobName": "run-evaluate",
    }
    # Said once: the next reconcile that sees the same writes nothing.
    said = {k: v for k, v in under_way.status.fields.items() if v is not None}
    said["evaluation"] = {k: v for k, v in said["evaluation"].items() if v is not None}
    again = ftj_body({**scoring, **said, "observedGeneration": 1}, **spec)
    assert status_patch(again, under_way.status, NOW) is None

    done = job("ftj-1", "run-evaluate", COMPLETE)
    decision = ftj_decide(
        body,
        job=training,
        pods=[finished_pod(SUMMARY)],
        evaluation_job=done,
        evaluation_pods=[finished_pod(json.dumps(SCORED))],
    )
    assert status_of(decision) == ("Succeeded", "Completed", True)
    assert decision.status is not None
    evaluation = decision.status.fields["evaluation"]
    assert evaluation == {
        "phase": "Succeeded",
        "message": None,  # what it said while running goes
        "jobName": "run-evaluate",
        **{k: v for k, v in SCORED.items() if k != "ok"},
    }
    # The write goes through although the run is Succeeded, and settles it.
    patch = status_patch(body, decision.status, NOW)
    assert patch is not None and patch["evaluation"]["tuned"]["accuracy"] == 1.0
    scored = ftj_body({**scoring, "evaluation": evaluation}, **spec)
    assert finetunejob.finished(scored) and not finetunejob.active(scored)
    assert finetunejob.active(ftj_body({"phase": "Queued"}))
    assert not finetunejob.active(ftj_body({"phase": "Suspended"}))
    # A reconcile that still saw it running writes nothing over the result.
    assert status_patch(scored, under_way.status, NOW) is None


def test_a_failed_evaluation_leaves_the_run_succeeded_and_says_why() -> None:
    spec = {"validation": {"split": 0.25}}
    scoring = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "evaluation": {"phase": "Running", "jobName": "run-evaluate"},
    }
    failed = job("ftj-1", "run-evaluate", FAILED)
    why = '{"ok": false, "message": "the run\'s validation data holds no examples"}'
    decision = ftj_decide(
        ftj_body(scoring, **spec),
        job=trained_job(**spec),
        evaluation_job=failed,
        evaluation_pods=[finished_pod(why, 3)],
    )
    assert status_of(decision) == ("Succeeded", "Completed", True)
    assert decision.status is not None
    assert decision.status.fields["evaluation"] == {
        "phase": "Failed",
        "message": "the run's validation data holds no examples",
        "jobName": "run-evaluate",
    }
    # Deleted while it ran: not made again, the run says so.
    gone = ftj_decide(ftj_body(scoring, **spec), job=trained_job(**spec))
    assert gone.actions == ()
    assert gone.status is not None and gone.status.fields["evaluation"]["phase"] == "Failed"


def test_a_run_without_validation_data_or_with_evaluation_off_is_not_scored() -> None:
    unscored = ftj_decide(
        ftj_body({"phase": "Running"}), job=trained_job(), pods=[finished_pod(SUMMARY)]
    )
    assert unscored.actions == () and unscored.status is not None
    assert unscored.status.fields["evaluation"] == {
        "phase": "Skipped",
        "message": "the run has no validation data to score on",
        "jobName": None,
    }
    spec = {"validation": {"split": 0.25}, "evaluation": {"enabled": False}}
    off = ftj_decide(
        ftj_body({"phase": "Running"}, **spec),
        job=trained_job(**spec),
        pods=[finished_pod(SUMMARY)],
    )
    assert off.actions == () and off.status is not None and "evaluation" not in off.status.fields


def test_a_queued_run_s_evaluation_job_waits_for_kueue_with_the_spec_s_placement() -> None:
    spec = {
        "validation": {"split": 0.25},
        "queueName": "gpus",
        "evaluation": {"maxExamples": 50},
        "resources": {"nodeSelector": {"pool": "gpu"}},
    }
    decision = ftj_decide(
        ftj_body({"phase": "Running"}, **spec),
        job=trained_job(**spec),
        pods=[finished_pod(SUMMARY)],
    )
    (created,) = [a.body for a in decision.actions if isinstance(a, Create)]
    assert created["spec"]["suspend"] is True
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert created["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert created["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "50"
    held = job("ftj-1", "run-evaluate", suspend=True)
    scoring = {"phase": "Succeeded", "observedGeneration": 1, "evaluation": {"phase": "Running"}}
    waiting = ftj_decide(ftj_body(scoring, **spec), job=trained_job(**spec), evaluation_job=held)
    assert waiting.status is not None
    assert waiting.status.fields["evaluation"]["message"] == (
        "waiting for Kueue to admit the evaluation Job"
    )


# Missing references ------------------------------------------------------------------


def test_a_dataset_whose_configmap_is_missing_says_so_and_makes_no_job() -> None:
    spec = {"source": {"configMap": {"name": "shapes-data", "key": "train.jsonl"}}}
    body = {**ds_body(), "spec": spec}
    refs = references.of_dataset(DatasetSpec.model_validate(spec))
    assert refs == (references.Reference("ConfigMap", "shapes-data", "spec.source.configMap.name"),)
    waiting = dataset.decide(ds_seen(body, missing=refs), SETTINGS)
    assert waiting.actions == ()
    assert status_of(waiting) == ("Pending", "ConfigMapNotFound", None)
    assert waiting.status is not None
    assert waiting.status.fields["message"] == (
        "ConfigMap 'shapes-data' (spec.source.configMap.name) does not exist in namespace "
        "'team'; waiting for it to be created"
    )
    # Once it exists, validation starts.
    assert creates(dataset.decide(ds_seen(body), SETTINGS)) == ["ServiceAccount", "Job"]


def test_a_run_whose_claims_are_missing_names_them_and_makes_nothing() -> None:
    body = ftj_body(
        baseModel={"name": "m", "source": {"pvc": {"claimName": "models", "path": "m"}}},
    )
    refs = references.of_finetunejob(FineTuneJobSpec.model_validate(body["spec"]))
    assert [(r.name, r.field) for r in refs] == [
        ("models", "spec.baseModel.source.pvc.claimName"),
        ("models", "spec.outputModel.storage.pvc.claimName"),
    ]
    decision = ftj_decide(body, datasets={"train": dataset_in("Ready")}, missing=refs[1:])
    assert decision.actions == ()
    assert status_of(decision) == ("Pending", "PersistentVolumeClaimNotFound", None)
    assert decision.status is not None
    assert (
        "PersistentVolumeClaim 'models' (spec.outputModel.storage.pvc.claimName)"
        in (decision.status.fields["message"])
    )
    # Datasets are waited for first: they name what is missing more precisely.
    waiting = ftj_decide(body, datasets={"train": None}, missing=refs)
    assert status_of(waiting)[:2] == ("WaitingForDataset", "DatasetNotFound")


def test_out_of_memory_advice_names_only_fields_of_the_kind_that_ran() -> None:
    oom = {
        "metadata": {"name": "p", "creationTimestamp": A_MINUTE_AGO},
        "spec": {"containers": [{}]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
            ],
        },
    }
    crashed = job("ds-1", "shapes-validate-1", FAILED)
    validation = dataset.decide(ds_seen(ds_body(), job=crashed, pods=[oom]), SETTINGS)
    assert status_of(validation)[:2] == ("Failed", "ValidationFailed")
    assert validation.status is not None
    message = validation.status.fields["message"]
    assert "validator ran out of memory" in message
    assert "resources.memory" not in message and "batchSize" not in message
    training = ftj_decide(
        ftj_body({"phase": "Running"}), job=job("ftj-1", "run-train", FAILED), pods=[oom]
    )
    assert training.status is not None
    assert "hyperparameters.batchSize" in training.status.fields["message"]
    spec = {"validation": {"split": 0.25}}
    scoring = {"phase": "Succeeded", "observedGeneration": 1, "evaluation": {"phase": "Running"}}
    evaluation = ftj_decide(
        ftj_body(scoring, **spec),
        job=trained_job(**spec),
        evaluation_job=job("ftj-1", "run-evaluate", FAILED),
        evaluation_pods=[oom],
    )
    assert evaluation.status is not None
    assert "evaluation.maxExamples" in evaluation.status.fields["evaluation"]["message"]


def test_a_run_that_attaches_says_when_its_shared_server_is_missing_or_serves_another_base() -> (
    None
):
    done = job("ftj-1", "run-train", COMPLETE)
    pods = [finished_pod(SUMMARY)]
    body = ftj_body({"phase": "Running"}, deploy={"enabled": True, "modelDeployment": "shared"})

    def message(shared: dict[str, Any] | None) -> str:
        decision = ftj_decide(body, job=done, pods=pods, shared_server=shared)
        assert status_of(decision)[0] == "Succeeded" and decision.status is not None
        assert decision.status.fields["deployment"] == {"name": "shared"}
        return str(decision.status.fields["message"])

    assert message(None) == (
        "trained; ModelDeployment 'shared' (spec.deploy.modelDeployment) did not exist in "
        "namespace 'team' when the run succeeded: the adapter joins it once it is created"
    )
    other = {"metadata": {"name": "shared"}, "spec": {"baseModel": {"name": "org/other"}}}
    assert message(other) == (
        "trained, but not served: ModelDeployment 'shared' (spec.deploy.modelDeployment) "
        "serves base model 'org/other', not this run's 'org/model'"
    )
    same = {"metadata": {"name": "shared"}, "spec": {"baseModel": {"name": "org/model"}}}
    assert message(same) == "training finished"


PLATFORM = replace(
    SETTINGS,
    model_store=ModelStore.parse("pvc://models/tuned"),
    pod_defaults=PodDefaults(
        image_pull_secrets=("registry",),
        node_selector={"pool": "ml"},
        tolerations=({"key": "ml", "operator": "Exists", "effect": "NoSchedule"},),
        priority_class_name="batch",
    ),
    identity_annotations={"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/tune"},
)


def bare_ftj(**spec: Any) -> dict[str, Any]:
    """A FineTuneJob of only the three fields a user must write."""
    body = ftj_body(**spec)
    del body["spec"]["outputModel"]
    return body


def platform_decide(body: dict[str, Any], settings: Settings, **seen: Any) -> Decision:
    """decide as the handler calls it: the spec completed by the platform's defaults."""
    spec = with_output(
        FineTuneJobSpec.model_validate(body["spec"]), body["metadata"], settings.model_store
    )
    return finetunejob.decide(finetunejob.Observed(body, spec, NOW, **seen), settings)


def test_a_run_without_output_storage_fails_naming_the_chart_value_when_there_is_no_store() -> None:
    decision = platform_decide(bare_ftj(), SETTINGS, datasets={"train": dataset_in("Ready")})
    assert decision.actions == ()
    assert status_of(decision) == ("Failed", "NoOutputStorage", False)
    assert (
        decision.status is not None and "defaults.modelStore" in decision.status.fields["message"]
    )


def test_a_run_without_output_writes_to_the_platform_store_under_its_namespace_and_name() -> None:
    body = bare_ftj(preflight={"enabled": False})
    decision = platform_decide(body, PLATFORM, datasets={"train": dataset_in("Ready")})
    assert creates(decision) == ["ServiceAccount", "ConfigMap", "Job"]
    assert decision.status is not None
    assert decision.status.fields["outputModel"] == {"uri": "pvc://models/tuned/team/run"}
    pod = decision.actions[-1].body["spec"]["template"]["spec"]  # type: ignore[union-attr]
    output = next(v for v in pod["volumes"] if v["name"] == "output")
    assert output["persistentVolumeClaim"] == {"claimName": "models"}
    account = decision.actions[0].body  # type: ignore[union-attr]
    assert account["metadata"]["annotations"] == dict(PLATFORM.identity_annotations)


def test_the_platform_s_pod_defaults_reach_every_pod_the_operator_makes() -> None:
    datasets = {"train": dataset_in("Ready")}

    def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
        spec: dict[str, Any] = workload["spec"]["template"]["spec"]
        return spec

    validation = dataset.decide(ds_seen(ds_body()), PLATFORM).actions[1].body  # type: ignore[union-attr]
    preflight = platform_decide(bare_ftj(), PLATFORM, datasets=datasets).actions[-1].body  # type: ignore[union-attr]
    training = (
        platform_decide(
            bare_ftj(preflight={"enabled": False}, resources={"nodeSelector": {"pool": "h100"}}),
            PLATFORM,
            datasets=datasets,
        )
        .actions[-1]
        .body
    )  # type: ignore[union-attr]
    server = modeldeployment.decide(md_seen(md_body()), PLATFORM).actions[2].body  # type: ignore[union-attr]
    for workload in (validation, preflight, training, server):
        pod = pod_of(workload)
        assert pod["imagePullSecrets"] == [{"name": "registry"}], workload["metadata"]["name"]
        assert {"key": "ml", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["priorityClassName"] == "batch"
        assert pod["serviceAccountName"] == "kubetune-trainer"
    # A spec's own node selector wins key by key.
    assert pod_of(training)["nodeSelector"] == {"pool": "h100"}
    assert pod_of(validation)["nodeSelector"] == {"pool": "ml"}


def test_a_server_rolls_when_the_platform_s_pod_defaults_change() -> None:
    spec = ModelDeploymentSpec.model_validate(md_body()["spec"])
    served = plan(md_body(), spec, [], SETTINGS.trainer_image, SETTINGS.server_image)
    plain, defaulted = deployment(served), deployment(served, PLATFORM.pod_defaults)
    assert (
        plain["metadata"]["annotations"][SPEC_HASH]
        != defaulted["metadata"]["annotations"][SPEC_HASH]
    )


def test_a_server_runs_the_platform_s_image_unless_its_spec_names_one() -> None:
    """The platform moved its default to a mirror that its policy does not list: a
    ModelDeployment, or a FineTuneJob's own server, that names no image runs the
    mirror; one that names an image runs that, if the policy allows it."""
    mirror = replace(SETTINGS, server_image="mirror.corp/ml/vllm-openai:v0.11.0")

    def image(decision: Decision) -> str:
        (apply,) = [a for a in decision.actions if isinstance(a, Apply)]
        return str(apply.body["spec"]["template"]["spec"]["containers"][0]["image"])

    assert image(modeldeployment.decide(md_seen(md_body()), mirror)) == mirror.server_image
    own = md_body(runtime={"image": "vllm/vllm-openai:v0.12.0"})
    assert image(modeldeployment.decide(md_seen(own), mirror)) == "vllm/vllm-openai:v0.12.0"
    evil = md_body(runtime={"image": "evil/vllm:1"})
    assert status_of(modeldeployment.decide(md_seen(evil), mirror))[1] == "NotAllowed"

    # A run's own server: deploy names no image, so the ModelDeployment it makes gets
    # the platform's when it is served.
    done = job("ftj-1", "run-train", COMPLETE)
    runtime = {"enabled": True, "runtime": {"maxModelLen": 4096}}
    run = ftj_seen(
        ftj_body({"phase": "Running"}, deploy=runtime), job=done, pods=[finished_pod(SUMMARY)]
    )
    (apply,) = finetunejob.decide(run, mirror).actions
    assert isinstance(apply, Apply)
    made = {**apply.body, "metadata": {**apply.body["metadata"], "uid": "md-2", "generation": 1}}
    assert image(modeldeployment.decide(md_seen(made), mirror)) == mirror.server_image


def test_an_evaluation_job_keeps_the_platform_s_placement_once_kueue_s_is_dropped() -> None:
    spec = {"validation": {"split": 0.25}, "preflight": {"enabled": False}}
    body = ftj_body({"phase": "Running"}, **spec)
    decision = platform_decide(
        body, PLATFORM, job=trained_job(**spec), pods=[finished_pod(SUMMARY)]
    )
    (created,) = [a.body for a in decision.actions if isinstance(a, Create)]
    pod = created["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "ml"} and pod["priorityClassName"] == "batch"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]


# A run between pods: its phase only moves forward ---------------------------------------
#
# The job controller counts a pod's end only after the kubelet reports it, and with
# Kubernetes 1.31+ it adds SuccessCriteriaMet or FailureTarget before Complete or Failed,
# so a reconcile can see the trainer's pod ended, or gone, while its Job is unfinished.

PROGRESS = {"step": 30, "totalSteps": 120, "epoch": 0.75, "percent": 25, "etaSeconds": 90}
LOSSES = {"trainLoss": 1.25, "evalLoss": 1.5, "bestEvalLoss": 1.4, "bestStep": 20}
RUNNING = {
    "phase": "Running",
    "message": "training",
    "jobName": "run-train",
    "startTime": TEN_MINUTES_AGO,
    "progress": PROGRESS,
    "metrics": LOSSES,
    "observedGeneration": 1,
    "conditions": [
        {
            "type": "Ready",
            "status": "Unknown",
            "reason": "Training",
            "lastTransitionTime": TEN_MINUTES_AGO,
        }
    ],
}
# What the trainer serves while it loads the model, before it has counted its steps: its
# step gauges and best step start at 0, the losses are NaN (left out by parse_samples).
LOADING = {"kubetune_train_step": 0.0, "kubetune_train_total_steps": 0.0, "kubetune_best_step": 0.0}


def train_job(active: int, conditions: list[dict[str, str]] | None = None, **status: Any) -> Any:
    body = job("ftj-1", "run-train", conditions)
    body["status"] |= {"active": active, **status}
    return body


def trainer_pod(
    name: str,
    phase: str,
    state: dict[str, Any],
    created: str = A_MINUTE_AGO,
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    body = pod(phase, state, created)
    body["metadata"]["name"] = name
    if conditions:
        body["status"]["conditions"] = conditions
    return body


def exited(code: int, message: str = "") -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "message": message,
        }
    }


EVICTED = [
    {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
    }
]
SUCCESS_MET = [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"}]
FAILURE_TARGET = [
    {
        "type": "FailureTarget",
        "status": "True",
        "reason": "PodFailurePolicy",
        "message": "Container trainer for pod team/p failed with exit code 3 matching FailJob rule",
    }
]


def written(status: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The FineTuneJob's status once the decision's status write lands: a merge patch."""

    def merge(old: Any, new: Any) -> Any:
        if not isinstance(old, dict) or not isinstance(new, dict):
            return new
        out = dict(old)
        for key, value in new.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out.get(key), value)
        return out

    if decision.status is None:
        return status
    body = ftj_body(status)
    patch = status_patch(body, decision.status, NOW)
    return status if patch is None else merge(status, patch)


@pytest.mark.parametrize(
    ("training", "pods", "reason", "says"),
    [
        # The trainer succeeded; the job controller has not looked yet.
        (
            train_job(1),
            [trainer_pod("p", "Succeeded", exited(0, SUMMARY))],
            "TrainerExited",
            "training finished",
        ),
        # It has counted the pod, and the Job meets its success criteria; Complete is next.
        (
            train_job(0, SUCCESS_MET, succeeded=1),
            [trainer_pod("p", "Succeeded", exited(0))],
            "TrainerExited",
            "the trainer exited",
        ),
        # A crash: the Job retries it (a new pod after a back-off) or fails.
        (
            train_job(0, failed=1),
            [trainer_pod("p", "Failed", exited(1, "Traceback ..."))],
            "TrainerExited",
            "exited with code 1",
        ),
        # A final exit code: the pod failure policy fails the Job; Failed is next.
        (
            train_job(0, FAILURE_TARGET, failed=1),
            [trainer_pod("p", "Failed", exited(3))],
            "JobFailing",
            "matching FailJob rule",
        ),
        # Evicted (a drain, a preemption): replaced without using up a retry.
        (
            train_job(1),
            [trainer_pod("p", "Failed", exited(137), conditions=EVICTED)],
            "PodDisrupted",
            "Eviction API",
        ),
        # The evicted pod is gone and its replacement waits for a node.
        (
            train_job(1),
            [trainer_pod("p2", "Pending", {"waiting": {"reason": "ContainerCreating"}}, NOW)],
            "Restarting",
            "start again",
        ),
        # Gone, and nothing in its place yet.
        (train_job(0), [], "Restarting", "start again"),
    ],
)
def test_a_run_that_trained_stays_running_while_its_job_has_no_trainer_and_is_unfinished(
    training: dict[str, Any], pods: list[dict[str, Any]], reason: str, says: str
) -> None:
    decision = ftj_decide(ftj_body(RUNNING), job=training, pods=pods, samples=None)
    assert status_of(decision) == ("Running", reason, None)
    assert decision.actions == () and decision.after_status == ()
    assert decision.status is not None and says in decision.status.fields["message"]
    after = written(RUNNING, decision)
    assert (after["progress"], after["metrics"]) == (PROGRESS, LOSSES)


def test_a_run_that_never_ran_still_waits_for_its_pod_as_pending() -> None:
    fresh = ftj_body({"phase": "Pending", "jobName": "run-train", "observedGeneration": 1})
    decision = ftj_decide(fresh, job=train_job(0), pods=[])
    assert status_of(decision) == ("Pending", "PodPending", None)


def test_the_job_s_own_terminal_condition_settles_a_run_that_stayed_running() -> None:
    pods = [trainer_pod("p", "Succeeded", exited(0, SUMMARY))]
    between = ftj_decide(ftj_body(RUNNING), job=train_job(0, SUCCESS_MET, succeeded=1), pods=pods)
    assert status_of(between)[0] == "Running"
    done = ftj_decide(
        ftj_body(written(RUNNING, between)),
        job=train_job(0, [*SUCCESS_MET, *COMPLETE], succeeded=1),
        pods=pods,
    )
    assert status_of(done) == ("Succeeded", "Completed", True)
    assert done.status is not None and done.status.fields["progress"]["step"] == 40

    summary = '{"ok": false, "phase": "Failed", "message": "the dataset changed"}'
    failed_pod = [trainer_pod("p", "Failed", exited(3, summary))]
    failing = ftj_decide(
        ftj_body(RUNNING), job=train_job(0, FAILURE_TARGET, failed=1), pods=failed_pod
    )
    assert status_of(failing)[0] == "Running"
    failed = train_job(0, [*FAILURE_TARGET, {**FAILED[0], "reason": "PodFailurePolicy"}], failed=1)
    decision = ftj_decide(ftj_body(written(RUNNING, failing)), job=failed, pods=failed_pod)
    assert status_of(decision) == ("Failed", "PodFailurePolicy", False)
    assert decision.status is not None
    assert decision.status.fields["message"] == "the dataset changed"


def test_a_replacement_pod_that_cannot_start_keeps_the_run_running_then_fails_it() -> None:
    young = trainer_pod(
        "p2", "Pending", missing_secret(A_MINUTE_AGO)["status"]["containerStatuses"][0]["state"]
    )
    waiting = ftj_decide(ftj_body(RUNNING), job=train_job(1), pods=[young])
    assert status_of(waiting) == ("Running", "CreateContainerConfigError", None)
    old = missing_secret(TEN_MINUTES_AGO)
    given_up = ftj_decide(ftj_body(RUNNING), job=train_job(1), pods=[old])
    assert status_of(given_up) == ("Failed", "CreateContainerConfigError", False)
    assert given_up.after_status == (Delete("Job", "team", "run-train"),)


def test_a_run_kueue_evicts_after_it_trained_stays_running_and_says_it_is_queued_again() -> None:
    reason = "Preempted to accommodate a higher priority Workload"
    evicted = workload(type="Evicted", status="True", reason="Preempted", message=reason)
    held = job("ftj-1", "run-train", suspend=True)
    decision = ftj_decide(ftj_body(RUNNING, queueName="gpus"), job=held, pods=[], workload=evicted)
    assert status_of(decision) == ("Running", "Requeued", None)
    assert decision.status is not None
    assert decision.status.fields["message"].startswith("queued again in 'gpus'; " + reason)
    # Suspended by its own spec, it says so: a spec change may move a phase back.
    suspended = ftj_decide(
        ftj_body(RUNNING, queueName="gpus", suspend=True), job=held, workload=evicted
    )
    assert status_of(suspended)[0] == "Suspended"


def test_a_trainer_that_has_not_counted_its_steps_leaves_recorded_progress_alone() -> None:
    running = train_job(1)
    pods = [trainer_pod("p2", "Running", {"running": {}})]
    decision = ftj_decide(ftj_body(RUNNING), job=running, pods=pods, samples=LOADING)
    assert status_of(decision) == ("Running", "Training", None)
    assert decision.status is not None
    assert "progress" not in decision.status.fields and "metrics" not in decision.status.fields
    after = written(RUNNING, decision)
    assert (after["progress"], after["metrics"]) == (PROGRESS, LOSSES)
    # Resumed from a checkpoint, it counts again from there: that is its progress.
    resumed = {
        **LOADING,
        "kubetune_train_step": 24.0,
        "kubetune_train_total_steps": 120.0,
        "kubetune_best_eval_loss": 1.4,
        "kubetune_best_step": 20.0,
    }
    decision = ftj_decide(ftj_body(RUNNING), job=running, pods=pods, samples=resumed)
    assert decision.status is not None
    assert decision.status.fields["progress"]["step"] == 24
    assert decision.status.fields["metrics"] == {"bestEvalLoss": 1.4, "bestStep": 20}


# What a single-node training Job and its pods go through under the real job controller
# (backoffLimit 3, the pod failure policy: exit 3 fails the Job, a DisruptionTarget pod is
# replaced without using up a retry) and, for a queued run, Kueue; each item is one state of
# the cluster (the Job's suspend, its status, its pods, the trainer's gauges, the Workload).
World = tuple[bool, dict[str, Any], list[dict[str, Any]], dict[str, float] | None, Any]
OUTCOMES = ("ok", "crash", "final", "evicted", "requeued")


def counting(step: int) -> dict[str, float]:
    return {
        "kubetune_train_step": float(step),
        "kubetune_train_total_steps": 120.0,
        "kubetune_train_loss": 2.0 - step / 100,
        "kubetune_best_step": 0.0,
    }


@st.composite
def histories(draw: st.DrawFn) -> tuple[bool, list[World], str]:
    """A run's history from its Job's creation to its end, and how it ended."""
    queued = draw(st.booleans())
    status: dict[str, Any] = {
        "active": 0,
        "failed": 0,
        "conditions": [],
        "startTime": TEN_MINUTES_AGO,
    }
    worlds: list[World] = []
    pods: list[dict[str, Any]] = []
    waiting = workload(type="QuotaReserved", status="False", reason="Pending", message="no quota")

    def now(
        suspended: bool = False, samples: dict[str, float] | None = None, wl: Any = None
    ) -> None:
        worlds.append((suspended, copy.deepcopy(status), copy.deepcopy(pods), samples, wl))

    def condition(type_: str, reason: str) -> None:
        status["conditions"].append(
            {"type": type_, "status": "True", "reason": reason, "lastTransitionTime": NOW}
        )

    admitted = not queued
    for attempt in range(8):
        if not admitted:
            now(suspended=True, wl=waiting)
            admitted = True
        name = f"p{attempt}"
        created = f"2026-01-01T00:09:{attempt:02d}Z"
        pods.append(
            trainer_pod(name, "Pending", {"waiting": {"reason": "ContainerCreating"}}, created)
        )
        if draw(st.booleans()):
            now()  # the pod exists before the job controller counts it
        status["active"] = 1
        now()
        pods[-1]["status"]["phase"] = "Running"
        pods[-1]["status"]["containerStatuses"] = [{"state": {"running": {}}}]
        now()
        now(samples=LOADING)
        for step in sorted(draw(st.sets(st.integers(1, 119), max_size=3))):
            now(samples=counting(step))
        outcome = draw(st.sampled_from(OUTCOMES if queued else OUTCOMES[:4]))
        if outcome == "requeued":
            # Kueue evicts the Workload and suspends the Job; the job controller deletes
            # its pods.
            pods.clear()
            status["active"] = 0
            evicted = workload(
                type="Evicted", status="True", reason="Preempted", message="preempted"
            )
            now(suspended=True, wl=evicted)
            admitted = False
            continue
        code = {"ok": 0, "crash": 1, "final": 3, "evicted": 137}[outcome]
        message = SUMMARY if outcome == "ok" else ""
        pods[-1] = trainer_pod(
            name,
            "Succeeded" if code == 0 else "Failed",
            exited(code, message),
            created,
            EVICTED if outcome == "evicted" else None,
        )
        now()  # the kubelet has reported the end; the Job says nothing yet
        status["active"] = 0
        if outcome == "ok":
            status["succeeded"] = 1
            condition("SuccessCriteriaMet", "CompletionsReached")
            now()
            condition("Complete", "CompletionsReached")
            now()
            return queued, worlds, "Succeeded"
        if outcome == "evicted":
            if draw(st.booleans()):
                now()
            pods.pop()  # an evicted pod is deleted
            now()
            continue
        status["failed"] += 1
        if outcome == "crash" and status["failed"] <= 3:
            now()  # the back-off before the next pod
            continue
        reason = "PodFailurePolicy" if outcome == "final" else "BackoffLimitExceeded"
        now()
        condition("FailureTarget", reason)
        now()
        condition("Failed", reason)
        now()
        return queued, worlds, "Failed"
    return queued, worlds, "Running"


RANK = {"Pending": 0, "Queued": 0, "Running": 1, "Succeeded": 2, "Failed": 2}


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(histories(), st.data())
def test_a_run_s_phase_never_moves_back_over_what_the_job_controller_can_show(
    history: tuple[bool, list[World], str], data: st.DataObject
) -> None:
    """Reconciles at any of those moments (each sees its pods as they are, and the Job as
    they are or as a stale watch event shows it) move the phase forward only, and keep
    the progress once counted; the last one, seeing it all, says how the run ended."""
    queued, worlds, ending = history
    spec: dict[str, Any] = {"queueName": "gpus"} if queued else {}
    status: dict[str, Any] = {"phase": "Pending", "jobName": "run-train", "observedGeneration": 1}
    phases = [status["phase"]]
    for i, (_, _, pods, samples, wl) in enumerate(worlds):
        last = i == len(worlds) - 1
        if not last and not data.draw(st.booleans(), label=f"reconcile {i}"):
            continue
        lag = 0 if last else data.draw(st.integers(0, min(i, 2)), label=f"lag {i}")
        seen_suspended, seen_status = worlds[i - lag][:2]
        training = job("ftj-1", "run-train", suspend=seen_suspended)
        training["status"] = copy.deepcopy(seen_status)
        decision = ftj_decide(
            ftj_body(status, **spec), job=training, pods=pods, samples=samples, workload=wl
        )
        counted = bool((status.get("progress") or {}).get("totalSteps"))
        status = written(status, decision)
        phases.append(status["phase"])
        assert RANK[phases[-1]] >= RANK[phases[-2]], phases
        if counted:
            assert status["progress"]["totalSteps"] > 0, status["progress"]
    assert status["phase"] == ending, phases
