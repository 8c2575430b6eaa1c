"""The objects the operator builds and the status it derives, without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.resources.common import child_name, event
from kubetune_operator.resources.conditions import (
    StatusUpdate,
    phase_patch,
    set_condition,
    status_patch,
    unobserved,
)
from kubetune_operator.resources.dataset import status as dataset
from kubetune_operator.resources.dataset.status import dataset_result
from kubetune_operator.resources.dataset.validation_job import validation_job as build_validation
from kubetune_operator.resources.finetunejob import status as run
from kubetune_operator.resources.finetunejob import training_job as tj
from kubetune_operator.resources.finetunejob.progress import (
    metrics_from_samples,
    parse_samples,
    progress_from_samples,
)
from kubetune_operator.resources.finetunejob.status import dataset_gate
from kubetune_operator.resources.workloads import JobState, job_finished, job_state
from kubetune_trainer.contract.job import (
    EXIT_CANNOT_SUCCEED,
    EXIT_FAILED,
    EXIT_INVALID_JOB,
    DatasetLimits,
    TrainingConfig,
)

IMAGE = "registry.local/kubetune/trainer:test"


def _ftj(**spec: Any) -> dict[str, Any]:
    base = {
        "baseModel": {"name": "org/model"},
        "dataset": {"name": "train"},
        "outputModel": {
            "name": "out",
            "storage": {"pvc": {"claimName": "models", "path": "runs/out"}},
        },
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "run", "namespace": "team", "uid": "u-1", "generation": 1},
        "spec": {**base, **spec},
    }


PVC_DATA = DatasetSpec.model_validate(
    {
        "source": {"pvc": {"claimName": "datasets", "path": "shapes/train.jsonl"}},
        "imageRoot": "shapes",
    }
)
SHA = "a" * 64


def _inputs(ftj: dict[str, Any], data: DatasetSpec) -> tj.Inputs:
    spec = FineTuneJobSpec.model_validate(ftj["spec"])
    return tj.Inputs(finetunejob=ftj, spec=spec, dataset=data, dataset_sha256=SHA)


def _plan(**spec: Any) -> tj.Plan:
    return tj.plan(_inputs(_ftj(**spec), PVC_DATA), IMAGE)


def validation_job(ds: dict[str, Any], image: str) -> dict[str, Any]:
    return build_validation(ds, DatasetSpec.model_validate(ds["spec"]), image)


def status_from_job(ftj: dict[str, Any], state: JobState, uri: str, now: str) -> dict[str, Any]:
    return run.status_from_job(FineTuneJobSpec.model_validate(ftj["spec"]), state, uri, now)


def dataset_status(
    ds: dict[str, Any], state: JobState | None, job_name: str, now: str
) -> dict[str, Any] | None:
    """The status patch a Dataset reconcile writes for its validation Job's state."""
    fields, reason = dataset.dataset_status(state, job_name)
    generation = ds["metadata"]["generation"]
    update = StatusUpdate(fields, reason, dataset.ready(fields["phase"]), generation)
    return status_patch(ds, update, now)


def test_spec_maps_to_the_trainer_config() -> None:
    plan = _plan(validation={"split": 0.2}, hyperparameters={"epochs": 2, "loraRank": 16})
    cfg = plan.config
    assert cfg.base_model == "org/model"
    assert cfg.dataset == "/data/train/shapes/train.jsonl"
    assert cfg.image_root == "/data/train/shapes"
    assert cfg.dataset_sha256 == SHA
    assert cfg.validation is not None and cfg.validation.split == 0.2
    assert cfg.hyperparameters.epochs == 2 and cfg.hyperparameters.lora_rank == 16
    assert cfg.output_dir == "/output/runs/out"
    assert cfg.effective_checkpoint_dir == "/output/runs/out/checkpoints"
    assert plan.output_uri == "pvc://models/runs/out"
    assert cfg.trust_remote_code is False


def test_each_datasets_limits_and_image_root_travel_to_the_trainer() -> None:
    train = PVC_DATA.model_copy(update={"limits": DatasetLimits(maxImagesPerExample=100)})
    held = DatasetSpec.model_validate(
        {
            "source": {"pvc": {"claimName": "held-out", "path": "val/pairs.jsonl"}},
            "imageRoot": "val/images",
            "limits": {"maxImageBytes": 2048},
        }
    )
    ftj = _ftj(validation={"dataset": {"name": "held"}})
    inputs = tj.Inputs(
        finetunejob=ftj,
        spec=FineTuneJobSpec.model_validate(ftj["spec"]),
        dataset=train,
        dataset_sha256=SHA,
        validation_dataset=held,
    )
    cfg = tj.plan(inputs, IMAGE).config
    assert cfg.dataset_limits.max_images_per_example == 100
    assert cfg.validation is not None
    assert cfg.validation.dataset == "/data/validation/val/pairs.jsonl"
    assert cfg.validation.image_root == "/data/validation/val/images"
    assert cfg.validation.limits.max_image_bytes == 2048
    assert cfg.validation.limits.max_images_per_example == 64


def test_config_map_holds_a_loadable_job_json() -> None:
    cm = tj.config_map(_plan())
    cfg = TrainingConfig.model_validate_json(cm["data"]["job.json"])
    assert cfg.dataset == "/data/train/shapes/train.jsonl"
    assert json.loads(cm["data"]["job.json"])["baseModel"] == "org/model"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_training_job_is_restricted_and_owned() -> None:
    job = tj.training_job(_plan(resources={"gpus": 2, "memory": "64Gi", "cpu": "8"}))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "64Gi"}
    # Two GPUs: one process each, data-parallel.
    assert container["command"] == ["torchrun"]
    assert container["args"][:3] == ["--standalone", "--nproc_per_node=2", "--no-python"]
    assert container["args"][3:] == ["kubetune", "train", "--config", "/etc/kubetune/job.json"]
    assert container["resources"]["requests"]["cpu"] == "8"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (
        pod["serviceAccountName"] == "kubetune-trainer"
        and pod["automountServiceAccountToken"] is False
    )
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data/train"]["readOnly"] is True
    assert not mounts["/output"].get("readOnly")
    assert job["metadata"]["labels"]["kubetune.io/finetunejob"] == "run"
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "run",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["spec"]["suspend"] is False
    assert job["spec"]["backoffLimit"] >= 1
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]


def test_final_trainer_exits_fail_the_job_and_disruptions_use_no_retry() -> None:
    job = tj.training_job(_plan())
    fail_job, ignore = job["spec"]["podFailurePolicy"]["rules"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # the API requires it
    assert fail_job["action"] == "FailJob"
    assert fail_job["onExitCodes"]["containerName"] == "trainer"
    assert set(fail_job["onExitCodes"]["values"]) == {EXIT_INVALID_JOB, EXIT_CANNOT_SUCCEED}
    assert EXIT_FAILED not in fail_job["onExitCodes"]["values"]
    assert ignore == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }


def test_scheduling_fields_and_queue() -> None:
    job = tj.training_job(
        _plan(
            queueName="gpu-queue",
            image="my/trainer:1",
            resources={
                "gpuResource": "amd.com/gpu",
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "training",
            },
        )
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["kubetune"]
    assert pod["containers"][0]["args"] == ["train", "--config", "/etc/kubetune/job.json"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    assert pod["containers"][0]["image"] == "my/trainer:1"
    assert pod["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"


def test_credentials_come_only_from_secret_references() -> None:
    plan = _plan(
        baseModel={
            "name": "org/private",
            "source": {"huggingFace": {"tokenSecretRef": {"name": "hf"}}},
        },
        outputModel={
            "name": "o",
            "storage": {"s3": {"uri": "s3://bucket/run", "secretRef": {"name": "s3"}}},
        },
    )
    env = tj.training_job(plan)["spec"]["template"]["spec"]["containers"][0]["env"]
    secret_vars = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e
    }
    assert secret_vars == {
        "HF_TOKEN": "hf",
        "AWS_ACCESS_KEY_ID": "s3",
        "AWS_SECRET_ACCESS_KEY": "s3",
        "AWS_REGION": "s3",
    }
    assert all("value" not in e for e in env if e["name"] in secret_vars)
    assert plan.config.output_uri == "s3://bucket/run" == plan.output_uri
    # Checkpoints on the pod's emptyDir are copied next to the output, for a replacement
    # pod to resume from.
    assert plan.config.checkpoint_uri == "s3://bucket/run/checkpoints"
    assert _plan().config.checkpoint_uri is None  # a PVC keeps them itself


def test_remote_datasets_are_fetched_by_an_init_container_and_their_images_beside_them() -> None:
    http = DatasetSpec.model_validate(
        {"source": {"http": {"url": "https://example.com/sets/train.jsonl"}}, "imageRoot": "img"}
    )
    plan = tj.plan(_inputs(_ftj(), http), IMAGE)
    init = tj.training_job(plan)["spec"]["template"]["spec"]["initContainers"]
    assert [c["command"][:2] for c in init] == [["kubetune", "fetch"], ["kubetune", "fetch-images"]]
    assert plan.config.dataset == "/data/train/data.jsonl"
    # The images land beside the fetched file, which makes them its image root.
    assert plan.config.image_root == "/data/train/images"
    images = init[1]["command"]
    assert images[images.index("--images-out") + 1] == "/data/train/images"
    assert images[images.index("--image-root") + 1] == "img"
    assert json.loads(images[images.index("--source") + 1]) == {
        "http": {"url": "https://example.com/sets/train.jsonl"}
    }
    assert init[1]["volumeMounts"][0] == {"name": "train-data", "mountPath": "/data/train"}
    assert "--remote-out" not in images


def test_validation_job_runs_kubetune_validate_on_the_source() -> None:
    ds = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "shapes", "namespace": "team", "uid": "d-1", "generation": 3},
        "spec": {
            "source": {"configMap": {"name": "cm", "key": "train.jsonl"}},
            "task": "dpo",
            "limits": {"maxImagesPerExample": 2},
        },
    }
    job = validation_job(ds, IMAGE)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"] == "shapes-validate-3"
    assert container["args"][:5] == ["validate", "/data/train.jsonl", "--task", "dpo", "--json"]
    assert container["args"][container["args"].index("--max-images-per-example") + 1] == "2"
    assert "--deep" not in container["args"]
    deep = {**ds, "spec": {**ds["spec"], "deep": True}}
    assert (
        "--deep" in validation_job(deep, IMAGE)["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert job["spec"]["backoffLimit"] == 0
    # A drained node's pod is replaced, not taken for the data's failure.
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and rule["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["metadata"]["labels"]["kubetune.io/dataset"] == "shapes"


def test_child_names_stay_short_and_distinct() -> None:
    a, b = child_name("x" * 80, "train"), child_name("x" * 79 + "y", "train")
    assert len(a) <= 63 and len(b) <= 63 and a != b and a.endswith("-train")
    assert child_name("run", "train") == "run-train"


METRICS = """\
# HELP kubetune_train_loss Training loss.
# TYPE kubetune_train_loss gauge
kubetune_train_loss 1.25
kubetune_eval_loss 1.5
kubetune_train_step 30
kubetune_train_total_steps 120
kubetune_epoch 0.75
kubetune_eta_seconds 90
kubetune_best_eval_loss 1.4
kubetune_best_step 20
kubetune_train_reward_margin 0.123456789
kubetune_eval_preference_accuracy 0.75
python_gc_objects_collected_total{generation="0"} 10
"""


def test_metrics_text_becomes_progress_and_losses() -> None:
    samples = parse_samples(METRICS)
    progress = progress_from_samples(samples)
    metrics = metrics_from_samples(samples)
    assert progress is not None and metrics is not None
    assert (progress.step, progress.total_steps, progress.percent, progress.eta_seconds) == (
        30,
        120,
        25,
        90,
    )
    assert (metrics.train_loss, metrics.eval_loss, metrics.best_eval_loss, metrics.best_step) == (
        1.25,
        1.5,
        1.4,
        20,
    )
    # DPO's figures come through as they are named in status (five significant digits).
    assert (metrics.train_reward_margin, metrics.eval_preference_accuracy) == (0.12346, 0.75)
    assert metrics.train_kl is None
    assert parse_samples("not prometheus {{{") == {}
    assert progress_from_samples({}) is None


NOW = "2026-01-01T00:10:00Z"
EARLIER = {"a minute": "2026-01-01T00:09:00Z", "ten minutes": "2026-01-01T00:00:00Z"}


def _job(conditions: list[dict[str, str]] | None = None, suspend: bool = False) -> dict[str, Any]:
    return {
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or [], "startTime": "t0"},
    }


def _pod(phase: str, state: dict[str, Any], created: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"name": f"p{created}", "creationTimestamp": created},
        "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": 9999}]}]},
        "status": {"phase": phase, "podIP": "10.0.0.7", "containerStatuses": [{"state": state}]},
    }


@pytest.mark.parametrize(
    ("job", "pods", "phase", "reason"),
    [
        (_job(), [], "Pending", "PodPending"),
        (_job(), [_pod("Running", {"running": {}})], "Running", "Training"),
        (_job(suspend=True), [], "Suspended", "JobSuspended"),
        (
            _job([{"type": "Complete", "status": "True"}]),
            [_pod("Succeeded", {"terminated": {"exitCode": 0, "message": '{"trainLoss": 0.5}'}})],
            "Succeeded",
            "Completed",
        ),
        (
            _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
            [_pod("Failed", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}})],
            "Failed",
            "OOMKilled",
        ),
        (
            _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
            [
                _pod(
                    "Failed",
                    {"terminated": {"exitCode": 1, "message": "Traceback\nValueError: boom"}},
                )
            ],
            "Failed",
            "BackoffLimitExceeded",
        ),
        (
            _job([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]),
            [],
            "Failed",
            "DeadlineExceeded",
        ),
        (
            _job(),
            [
                _pod(
                    "Pending",
                    {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
                    EARLIER["ten minutes"],
                )
            ],
            "Failed",
            "ImagePullBackOff",
        ),
        (
            _job(),
            [
                _pod(
                    "Pending",
                    {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
                    EARLIER["a minute"],
                )
            ],
            "Pending",
            "ImagePullBackOff",
        ),
    ],
)
def test_job_state(
    job: dict[str, Any], pods: list[dict[str, Any]], phase: str, reason: str
) -> None:
    state = job_state(job, pods, NOW)
    assert (state.phase, state.reason) == (phase, reason)
    if phase == "Running":
        assert (state.pod_ip, state.metrics_port) == ("10.0.0.7", 9999)
    if reason == "BackoffLimitExceeded":
        assert "exited with code 1" in state.message and "ValueError: boom" in state.message
    if phase == "Succeeded":
        assert state.summary == {"trainLoss": 0.5}


def _initializing(init_state: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
    pod = _pod(phase, {"waiting": {"reason": "PodInitializing"}})
    pod["status"]["initContainerStatuses"] = [{"name": "fetch-train-data", "state": init_state}]
    return pod


def test_a_failed_fetch_names_the_init_container_and_its_error() -> None:
    failed = _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    log = "fetching s3://data/train.jsonl\nkubetune fetch: NoSuchKey: s3://data/train.jsonl"
    pod = _initializing({"terminated": {"exitCode": 1, "message": log}}, "Failed")
    state = job_state(failed, [pod], NOW)
    assert (state.phase, state.reason) == ("Failed", "InitContainerFailed")
    assert "fetch-train-data exited with code 1" in state.message
    assert "NoSuchKey" in state.message


def test_a_pod_missing_its_secret_waits_for_it_then_fails_and_stops_its_job() -> None:
    """The kubelet retries a missing Secret (Argo CD may apply it after the Dataset):
    the run says what it waits for, and fails only once the grace period is over."""

    def missing_secret(created: str) -> dict[str, Any]:
        waiting = {
            "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}
        }
        pod = _initializing(waiting)
        pod["metadata"]["creationTimestamp"] = created
        return pod

    young = job_state(_job(), [missing_secret(EARLIER["a minute"])], NOW, start_grace=300)
    assert (young.phase, young.reason, young.stop_job) == (
        "Pending",
        "CreateContainerConfigError",
        False,
    )
    assert 'secret "s3" not found' in young.message and "300 s" in young.message
    old = job_state(_job(), [missing_secret(EARLIER["ten minutes"])], NOW, start_grace=300)
    assert (old.phase, old.reason, old.stop_job) == ("Failed", "CreateContainerConfigError", True)
    assert old.message == 'the pod could not start in 600 s: secret "s3" not found'
    assert old.completion_time == NOW


def test_a_job_is_finished_once_complete_or_failed() -> None:
    assert not job_finished(_job())
    assert job_finished(_job([{"type": "Complete", "status": "True"}]))
    assert job_finished(_job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]))
    assert not job_finished(_job([{"type": "FailureTarget", "status": "True"}]))


def test_an_image_that_can_never_be_pulled_fails_at_once() -> None:
    pod = _pod("Pending", {"waiting": {"reason": "InvalidImageName", "message": "bad"}}, NOW)
    state = job_state(_job(), [pod], NOW)
    assert (state.phase, state.reason, state.stop_job) == ("Failed", "InvalidImageName", True)


def test_a_trainer_failure_reports_the_trainer_s_message() -> None:
    failed = _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    summary = '{"ok": false, "phase": "Failed", "message": "the dataset changed: sha256 differs"}'
    state = job_state(
        failed, [_pod("Failed", {"terminated": {"exitCode": 1, "message": summary}})], NOW
    )
    assert (state.phase, state.reason) == ("Failed", "BackoffLimitExceeded")
    assert state.message == "the dataset changed: sha256 differs"


def test_dataset_result_keeps_twenty_errors_with_lines() -> None:
    summary = {
        "valid": False,
        "examples": 50,
        "errorCount": 30,
        "errors": [{"line": i, "message": f"bad {i}"} for i in range(1, 31)],
        "sha256": SHA,
    }
    status = dataset_result(summary)
    assert status["phase"] == "Invalid" and status["errorCount"] == 30
    assert len(status["errors"]) == 20 and status["errors"][0] == {"line": 1, "message": "bad 1"}
    assert "line 1: bad 1" in status["message"]
    assert dataset_result({"valid": True, "examples": 5, "images": 4})["phase"] == "Ready"


def test_dataset_result_shows_the_first_twenty_warnings_with_lines() -> None:
    summary = {
        "valid": True,
        "examples": 50,
        "warningCount": 25,
        "warnings": [{"line": i, "message": f"'tools' is ignored {i}"} for i in range(1, 26)],
    }
    status = dataset_result(summary)
    assert status["phase"] == "Ready" and status["warningCount"] == 25
    assert len(status["warnings"]) == 20
    assert status["warnings"][0] == {"line": 1, "message": "'tools' is ignored 1"}


def test_kstatus_reads_stalled_on_failure_and_reconciling_while_working() -> None:
    def conditions(current: dict[str, Any], phase: str, ready: bool | None) -> dict[str, Any]:
        patch = phase_patch(
            current, {"phase": phase, "message": f"now {phase}"}, phase, ready, 1, "t"
        )
        assert patch is not None
        return {c["type"]: c for c in patch["conditions"]}

    working = conditions({}, "Validating", None)
    assert set(working) == {"Ready", "Reconciling"}
    assert (working["Reconciling"]["status"], working["Reconciling"]["message"]) == (
        "True",
        "now Validating",
    )
    failed = conditions({"conditions": list(working.values())}, "Invalid", False)
    assert set(failed) == {"Ready", "Stalled"}
    assert (failed["Stalled"]["status"], failed["Stalled"]["reason"]) == ("True", "Invalid")
    assert set(conditions({"conditions": list(working.values())}, "Ready", True)) == {"Ready"}
    # A server still starting is not ready yet, and not failed either.
    assert set(conditions({}, "Progressing", False)) == {"Ready", "Reconciling"}
    assert set(conditions({}, "Suspended", None)) == {"Ready"}


def test_condition_transition_time_moves_only_on_change() -> None:
    first = set_condition([], "Ready", False, "Waiting", "w", 1, "t1")
    same = set_condition(first, "Ready", False, "Still", "w", 2, "t2")
    flipped = set_condition(same, "Ready", True, "Done", "d", 2, "t3")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["status"] == "True"


def _ds(phase: str, generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {"phase": phase, "observedGeneration": observed, "message": "line 3: bad"},
    }


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, True),  # new: never reconciled
        ({"phase": "Pending"}, True),  # a status without observedGeneration
        ({"phase": "Running", "observedGeneration": 1}, True),  # spec changed since
        ({"phase": "Running", "observedGeneration": 2}, False),  # the echo of a status write
    ],
)
def test_unobserved(status: dict[str, Any] | None, expected: bool) -> None:
    obj: dict[str, Any] = {"metadata": {"generation": 2}}
    if status is not None:
        obj["status"] = status
    assert unobserved(obj) is expected


def test_dataset_gate() -> None:
    assert dataset_gate(_ds("Ready"), "training", "d") is None
    assert dataset_gate(None, "training", "d")[:2] == ("WaitingForDataset", "DatasetNotFound")
    assert dataset_gate(_ds("Validating"), "training", "d")[1] == "DatasetNotReady"
    assert dataset_gate(_ds("Ready", generation=2), "training", "d")[1] == "DatasetNotReady"
    phase, reason, message = dataset_gate(_ds("Invalid"), "validation", "v")
    assert (phase, reason) == ("Failed", "DatasetInvalid") and "line 3: bad" in message


def test_status_from_job() -> None:
    queued = status_from_job(_ftj(queueName="q"), job_state(_job(suspend=True), [], NOW), "", "now")
    assert queued["phase"] == "Queued" and "'q'" in queued["message"]
    assert (
        status_from_job(
            _ftj(queueName="q", suspend=True), job_state(_job(suspend=True), [], NOW), "", "now"
        )["phase"]
        == "Suspended"
    )
    summary = '{"ok": true, "trainLoss": 0.123456789, "evalLoss": 0.2, "bestStep": 40, "evalKl": 0.01, "steps": 40, "totalSteps": 40, "epoch": 3.0, "outputDir": "/out"}'
    done = job_state(
        _job([{"type": "Complete", "status": "True"}]),
        [_pod("Succeeded", {"terminated": {"exitCode": 0, "message": summary}})],
        NOW,
    )
    status = status_from_job(_ftj(), done, "pvc://models/out", "now")
    assert status["phase"] == "Succeeded" and status["completionTime"] == "now"
    assert status["metrics"] == {
        "trainLoss": 0.12346,
        "evalLoss": 0.2,
        "bestStep": 40,
        "evalKl": 0.01,
    }
    assert status["progress"] == {
        "step": 40,
        "totalSteps": 40,
        "percent": 100,
        "etaSeconds": 0,
        "epoch": 3.0,
    }
    assert status["outputModel"] == {"uri": "pvc://models/out"}


def test_dataset_status_follows_the_validation_job() -> None:
    ds = {"metadata": {"generation": 2}, "status": {}}
    pending = dataset_status(ds, None, "d-validate-2", "t")
    assert pending["phase"] == "Pending" and pending["conditions"][0]["status"] == "Unknown"
    summary = json.dumps(
        {"valid": True, "examples": 5, "images": 3, "textOnlyExamples": 2, "sha256": SHA}
    )
    job = {"metadata": {"name": "d-validate-2"}, **_job([{"type": "Complete", "status": "True"}])}
    done = [_pod("Succeeded", {"terminated": {"exitCode": 0, "message": summary}})]
    ready = dataset_status(ds, job_state(job, done, NOW), "d-validate-2", "t")
    assert (ready["phase"], ready["examples"], ready["sha256"], ready["observedGeneration"]) == (
        "Ready",
        5,
        SHA,
        2,
    )
    assert ready["conditions"][0]["status"] == "True" and ready["validationJob"] == "d-validate-2"
    crashed = {
        "metadata": {"name": "d-validate-2"},
        **_job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
    }
    failed = dataset_status(
        ds,
        job_state(
            crashed,
            [_pod("Failed", {"terminated": {"exitCode": 1, "message": "cannot download"}})],
            NOW,
        ),
        "d-validate-2",
        "t",
    )
    assert failed["phase"] == "Failed" and "cannot download" in failed["message"]
    waiting = {
        "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}
    }
    stuck = job_state(_job(), [_pod("Pending", waiting, EARLIER["a minute"])], NOW)
    validating = dataset_status(ds, stuck, "d-validate-2", "t")
    assert validating["phase"] == "Validating" and 'secret "s" not found' in validating["message"]
    assert validating["conditions"][0]["reason"] == "CreateContainerConfigError"


def test_phase_patch_writes_only_what_changed() -> None:
    patch = phase_patch({}, {"phase": "Running", "message": "training"}, "Running", None, 3, "t1")
    assert patch is not None
    assert (patch["phase"], patch["observedGeneration"]) == ("Running", 3)
    ready = [c for c in patch["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "Unknown" and ready[0]["reason"] == "Running"
    # The same again is no write; a new reason, phase or generation is.
    assert (
        phase_patch(patch, {"phase": "Running", "message": "training"}, "Running", None, 3, "t2")
        is None
    )
    assert phase_patch(patch, {"phase": "Running", "message": "training"}, "Resumed", None, 3, "t2")
    assert phase_patch(patch, {"phase": "Succeeded"}, "Succeeded", True, 3, "t2")
    assert phase_patch(patch, {"phase": "Running", "message": "training"}, "Running", None, 4, "t2")


def test_several_nodes_train_as_an_indexed_job_that_meets_at_the_first_pod() -> None:
    plan = _plan(resources={"gpus": 4, "nodes": 2})
    job = tj.training_job(plan)
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    assert job["spec"]["parallelism"] == 2  # every node at once: they rendezvous
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "run-train"
    container = pod["containers"][0]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    for arg in (
        "--nnodes=2",
        "--nproc_per_node=4",
        "--node_rank=$(JOB_COMPLETION_INDEX)",
        "--master_addr=run-train-0.run-train",
    ):
        assert arg in args
    assert args[args.index("--no-python") + 1 :] == [
        "kubetune",
        "train",
        "--config",
        "/etc/kubetune/job.json",
    ]
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]
    svc = tj.rendezvous_service(plan)
    assert svc["metadata"]["name"] == pod["subdomain"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "run-train"}
    # One node keeps a plain Job.
    single = tj.training_job(_plan(resources={"gpus": 4}))
    assert "completionMode" not in single["spec"]
    assert "subdomain" not in single["spec"]["template"]["spec"]


def _node_pod(index: int, phase: str, state: dict[str, Any], created: str) -> dict[str, Any]:
    pod = _pod(phase, state, created)
    pod["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return pod


def test_a_multi_node_run_follows_its_first_node_and_blames_the_failed_one() -> None:
    running = [
        _node_pod(0, "Running", {"running": {}}, "1"),
        _node_pod(1, "Pending", {"waiting": {"reason": "ContainerCreating"}}, "2"),
    ]
    state = job_state(_job(), running, NOW)
    assert (state.phase, state.metrics_port) == ("Running", 9999)
    failed = _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    pods = [
        _node_pod(0, "Failed", {"terminated": {"exitCode": 143, "message": "stopped"}}, "1"),
        _node_pod(1, "Failed", {"terminated": {"exitCode": 1, "message": "CUDA error"}}, "2"),
    ]
    state = job_state(failed, pods, NOW)
    assert state.phase == "Failed" and "CUDA error" in state.message


def test_an_event_names_its_object_and_fits_the_api_limits() -> None:
    ev = event(_ftj(), "Warning", "Failed", "x" * 5000, "2026-01-01T00:00:00Z")
    assert ev["metadata"] == {"generateName": "run.", "namespace": "team"}
    assert ev["involvedObject"]["kind"] == "FineTuneJob" and ev["involvedObject"]["uid"] == "u-1"
    assert (ev["type"], ev["reason"], len(ev["message"])) == ("Warning", "Failed", 1024)
