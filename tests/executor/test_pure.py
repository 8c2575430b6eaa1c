"""The executor's pure parts, without a cluster: the Pod built from a Job, the Job
controller's status computation, the kubelet's status, env and volume mapping."""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from local_executor import (
    METRICS_PORT_ENV,
    NODE_NAME,
    TRACKING_FINALIZER,
    Backoff,
    JobPlan,
    Mount,
    PodSetupError,
    Report,
    StartError,
    WorkQueue,
    build_pod,
    container_env,
    container_mounts,
    deleted_report,
    exit_reason,
    expand,
    format_indexes,
    hosts_file_text,
    job_status_canonical,
    kubelet_report,
    match_pod_failure_policy,
    materialize_volumes,
    parse_indexes,
    paths_to_keep,
    plan_job,
    pod_status,
    rfc3339,
    running_state,
    terminated_state,
    termination_message,
    waiting_state,
)

Obj = dict[str, Any]
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def make_job(status: Obj | None = None, **spec: Any) -> Obj:
    return {
        "metadata": {"name": "train", "namespace": "ns", "uid": "job-uid"},
        "spec": {
            "backoffLimit": 6,
            "parallelism": 1,
            "completions": 1,
            "template": {
                "metadata": {"labels": {"app": "trainer"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "trainer",
                            "command": ["kubetune", "train"],
                            "ports": [{"name": "metrics", "containerPort": 9090}],
                            "env": [{"name": "A", "value": "1"}],
                        }
                    ],
                },
            },
            **spec,
        },
        "status": status or {},
    }


def make_pod(
    name: str,
    phase: str = "Running",
    *,
    ready: bool = True,
    tracked: bool = True,
    deleting: bool = False,
    finished_at: datetime = NOW,
) -> Obj:
    status: Obj = {"phase": phase}
    if phase == "Running":
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    if phase in ("Succeeded", "Failed"):
        state = {
            "terminated": {
                "exitCode": 0 if phase == "Succeeded" else 1,
                "finishedAt": rfc3339(finished_at),
            }
        }
        status["containerStatuses"] = [{"name": "main", "state": state}]
    meta: Obj = {
        "name": name,
        "uid": f"{name}-uid",
        "finalizers": [TRACKING_FINALIZER] if tracked else [],
    }
    if deleting:
        meta["deletionTimestamp"] = rfc3339(NOW)
    return {"metadata": meta, "status": status}


def condition_types(plan: JobPlan) -> list[str]:
    return [c["type"] for c in plan.status.get("conditions", [])]


def advance(job: Obj, plan: JobPlan) -> Obj:
    """The Job as the API server returns it after the plan's status was written."""
    return {**job, "status": copy.deepcopy(plan.status)}


def assert_idempotent(job: Obj, pods: list[Obj], plan: JobPlan, now: datetime = NOW) -> None:
    again = plan_job(advance(job, plan), pods, now, plan.backoff)
    assert job_status_canonical(again.status) == job_status_canonical(plan.status)
    assert again.create == 0 and not again.delete and not again.untrack_and_delete


# ------------------------------------------------------------------ build_pod ---


def test_pod_from_template_is_owned_labelled_tracked_and_bound_to_the_local_node() -> None:
    job = make_job()
    original = copy.deepcopy(job)
    pod = build_pod(job, free_port=lambda: 41234)
    meta = pod["metadata"]
    assert meta["generateName"] == "train-"
    assert meta["labels"] == {
        "app": "trainer",
        "batch.kubernetes.io/job-name": "train",
        "job-name": "train",
        "batch.kubernetes.io/controller-uid": "job-uid",
        "controller-uid": "job-uid",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "train",
            "uid": "job-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["finalizers"] == [TRACKING_FINALIZER]
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert job == original, "the Job must not be modified"


def test_metrics_port_gets_a_free_local_port_and_the_env_var_names_it() -> None:
    job = make_job()
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": METRICS_PORT_ENV, "value": "stale"})
    container["ports"].append({"name": "http", "containerPort": 8080})
    built = build_pod(job, free_port=lambda: 41234)["spec"]["containers"][0]
    assert built["ports"] == [
        {"name": "metrics", "containerPort": 41234},
        {"name": "http", "containerPort": 8080},
    ]
    assert built["env"] == [
        {"name": "A", "value": "1"},
        {"name": METRICS_PORT_ENV, "value": "41234"},
    ]


def test_an_indexed_pod_gets_its_index_hostname_and_env_var() -> None:
    job = make_job(completionMode="Indexed", completions=3, parallelism=3)
    template = job["spec"]["template"]["spec"]
    template["subdomain"] = "train"
    template["initContainers"] = [{"name": "prep", "image": "trainer"}]
    original = copy.deepcopy(job)
    pod = build_pod(job, free_port=lambda: 41234, index=2)
    meta = pod["metadata"]
    assert meta["generateName"] == "train-2-"
    assert meta["annotations"] == {"batch.kubernetes.io/job-completion-index": "2"}
    assert meta["labels"]["batch.kubernetes.io/job-completion-index"] == "2"
    assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == ("train-2", "train")
    index_env = {
        "name": "JOB_COMPLETION_INDEX",
        "valueFrom": {
            "fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            }
        },
    }
    main, prep = pod["spec"]["containers"][0], pod["spec"]["initContainers"][0]
    assert main["env"] == [
        {"name": "A", "value": "1"},
        {"name": METRICS_PORT_ENV, "value": "41234"},
        index_env,
    ]
    assert prep["env"] == [index_env]
    # The kubelet side resolves it, and $(JOB_COMPLETION_INDEX) in args expands.
    pod["metadata"].update(name="train-2-abcde", namespace="ns")
    env = container_env(pod, main, FakeSource())
    assert env["JOB_COMPLETION_INDEX"] == "2"
    assert expand("--node_rank=$(JOB_COMPLETION_INDEX)", env) == "--node_rank=2"
    assert job == original, "the Job must not be modified"
    assert "hostname" not in build_pod(job)["spec"], "NonIndexed Pods keep the template's"


@pytest.mark.parametrize(
    ("indexes", "text"),
    [
        ([], ""),
        ([0], "0"),
        ([0, 1], "0-1"),
        ([4, 0, 2, 1], "0-2,4"),
        ([1, 3, 5, 6, 7, 9], "1,3,5-7,9"),
    ],
)
def test_completed_indexes_are_compressed_into_ranges(indexes: list[int], text: str) -> None:
    assert format_indexes(indexes) == text
    assert parse_indexes(text, 100) == set(indexes)


def test_parsing_completed_indexes_drops_those_beyond_completions() -> None:
    assert parse_indexes("0-2,4,7-9", 5) == {0, 1, 2, 4}


def test_hosts_file_adds_every_pod_name_of_the_subdomain() -> None:
    text = hosts_file_text("127.0.0.1 localhost\n", ["j-0", "j-1"], "j", "ns")
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1 localhost"
    assert "127.0.0.1\tj-1.j.ns.svc.cluster.local j-1.j.ns.svc j-1.j j-1" in lines
    assert "127.0.0.1\tj-0.j.ns.svc.cluster.local j-0.j.ns.svc j-0.j j-0" in lines


# ------------------------------------------------------------------- plan_job ---


def test_a_successful_pod_completes_the_job_in_the_real_controllers_steps() -> None:
    job = make_job()
    first = plan_job(job, [], NOW)
    assert first.create == 1
    assert first.status["startTime"] == rfc3339(NOW)
    assert job_status_canonical(first.status) == {
        "startTime": rfc3339(NOW),
        "ready": 0,
        "terminating": 0,
    }

    job = advance(job, first)
    running = [make_pod("p1")]
    second = plan_job(job, running, NOW)
    assert (second.create, second.status["active"], second.status["ready"]) == (0, 1, 1)
    assert_idempotent(job, running, second)

    job = advance(job, second)
    done = [make_pod("p1", "Succeeded")]
    third = plan_job(job, done, NOW)
    assert condition_types(third) == ["SuccessCriteriaMet"]
    assert third.status["uncountedTerminatedPods"] == {"succeeded": ["p1-uid"]}
    assert third.release == (("p1", "p1-uid"),)
    assert third.finished is None and "completionTime" not in third.status

    job = advance(job, third)
    released = [make_pod("p1", "Succeeded", tracked=False)]
    later = NOW + timedelta(seconds=3)
    fourth = plan_job(job, released, later)
    assert condition_types(fourth) == ["SuccessCriteriaMet", "Complete"]
    assert fourth.status["succeeded"] == 1 and fourth.status["uncountedTerminatedPods"] == {}
    assert fourth.status["completionTime"] == rfc3339(later)
    assert fourth.finished is not None and fourth.finished["reason"] == "CompletionsReached"

    finished = plan_job(advance(job, fourth), released, later + timedelta(hours=1))
    assert finished.status == fourth.status and finished.create == 0


def test_failures_beyond_the_backoff_limit_fail_the_job() -> None:
    job = make_job(backoffLimit=1, status={"startTime": rfc3339(NOW), "failed": 1})
    failed = [make_pod("p2", "Failed")]
    plan = plan_job(job, failed, NOW)
    assert condition_types(plan) == ["FailureTarget"]
    assert plan.status["conditions"][0]["reason"] == "BackoffLimitExceeded"
    assert plan.status["uncountedTerminatedPods"] == {"failed": ["p2-uid"]}
    assert plan.create == 0

    final = plan_job(advance(job, plan), [make_pod("p2", "Failed", tracked=False)], NOW)
    assert condition_types(final) == ["FailureTarget", "Failed"]
    assert final.status["failed"] == 2
    assert final.finished is not None and final.finished["reason"] == "BackoffLimitExceeded"
    assert "completionTime" not in final.status


def test_a_failed_pod_is_replaced_after_an_exponential_backoff() -> None:
    job = make_job(status={"startTime": rfc3339(NOW)})
    failed = [make_pod("p1", "Failed")]
    plan = plan_job(job, failed, NOW, pod_failure_backoff=2.0)
    assert plan.create == 0 and plan.requeue_after == pytest.approx(2.0)
    assert plan.backoff == Backoff(1, NOW)

    job = advance(job, plan)
    counted = [make_pod("p1", "Failed", tracked=False)]
    assert (
        plan_job(
            job, counted, NOW + timedelta(seconds=1), plan.backoff, pod_failure_backoff=2.0
        ).create
        == 0
    )
    assert (
        plan_job(
            job, counted, NOW + timedelta(seconds=2), plan.backoff, pod_failure_backoff=2.0
        ).create
        == 1
    )
    assert Backoff(3, NOW).remaining(NOW, 2.0) == pytest.approx(8.0)


def test_suspending_deletes_running_pods_without_counting_them() -> None:
    job = make_job(suspend=True, status={"startTime": rfc3339(NOW), "active": 1, "ready": 1})
    plan = plan_job(job, [make_pod("p1")], NOW)
    assert plan.untrack_and_delete == (("p1", "p1-uid"),) and not plan.delete
    assert plan.status["conditions"][0] | {"lastProbeTime": None, "lastTransitionTime": None} == {
        "type": "Suspended",
        "status": "True",
        "reason": "JobSuspended",
        "message": "Job suspended",
        "lastProbeTime": None,
        "lastTransitionTime": None,
    }
    assert (plan.status["active"], plan.status["ready"], plan.status["terminating"]) == (0, 0, 1)
    assert plan.status.get("failed", 0) == 0 and plan.create == 0


def test_resuming_starts_a_pod_and_restarts_the_deadline_clock() -> None:
    suspended = make_job(suspend=True)
    plan = plan_job(suspended, [], NOW)
    assert "startTime" not in plan.status and condition_types(plan) == ["Suspended"]

    later = NOW + timedelta(minutes=5)
    resumed = advance(suspended, plan)
    resumed["spec"] = {**resumed["spec"], "suspend": False}
    plan = plan_job(resumed, [], later)
    suspended_condition = plan.status["conditions"][0]
    assert (suspended_condition["status"], suspended_condition["reason"]) == ("False", "JobResumed")
    assert plan.status["startTime"] == rfc3339(later)
    assert plan.create == 1


def test_active_deadline_deletes_the_pod_then_fails_the_job() -> None:
    started = rfc3339(NOW - timedelta(seconds=10))
    job = make_job(activeDeadlineSeconds=30, status={"startTime": started, "active": 1})
    early = plan_job(job, [make_pod("p1")], NOW)
    assert early.requeue_after == pytest.approx(20.0) and not early.delete

    job["spec"]["activeDeadlineSeconds"] = 5
    plan = plan_job(job, [make_pod("p1")], NOW)
    assert plan.delete == (("p1", "p1-uid"),)
    assert condition_types(plan) == ["FailureTarget"]
    assert plan.status["conditions"][0]["reason"] == "DeadlineExceeded"
    assert plan.status["terminating"] == 1 and plan.finished is None

    # The kubelet killed it; the tracking finalizer was removed: Failed, counted.
    gone = plan_job(
        advance(job, plan), [make_pod("p1", "Failed", tracked=False, deleting=True)], NOW
    )
    assert condition_types(gone) == ["FailureTarget", "Failed"]
    assert gone.status["failed"] == 1


def test_a_pod_rejected_at_creation_fails_the_job_with_the_api_message() -> None:
    job = make_job(status={"startTime": rfc3339(NOW)})
    message = 'pods "train-x" is forbidden: violates PodSecurity "restricted:latest"'
    plan = plan_job(job, [], NOW, create_error=message)
    assert plan.create == 0
    assert [(c["type"], c["reason"], c["message"]) for c in plan.status["conditions"]] == [
        ("FailureTarget", "PodCreateFailed", message),
        ("Failed", "PodCreateFailed", message),
    ]
    assert plan.finished is not None


def test_a_deleted_running_pod_counts_as_failed_and_terminating() -> None:
    job = make_job(status={"startTime": rfc3339(NOW), "active": 1})
    deleted = [make_pod("p1", deleting=True)]
    plan = plan_job(job, deleted, NOW, pod_failure_backoff=0)
    assert plan.status["uncountedTerminatedPods"] == {"failed": ["p1-uid"]}
    assert (plan.status["active"], plan.status["terminating"]) == (0, 1)
    assert plan.create == 1, "the default podReplacementPolicy replaces terminating pods"

    job["spec"]["podReplacementPolicy"] = "Failed"
    assert plan_job(job, deleted, NOW, pod_failure_backoff=0).create == 0


def test_a_deleted_job_lets_its_pods_go() -> None:
    job = make_job(status={"startTime": rfc3339(NOW), "active": 1})
    job["metadata"]["deletionTimestamp"] = rfc3339(NOW)
    plan = plan_job(job, [make_pod("p1")], NOW)
    assert plan.release == (("p1", "p1-uid"),) and plan.create == 0


# ---------------------------------------------------------------- pod status ---


def test_running_then_succeeded_pod_status_like_a_kubelet() -> None:
    pod: Obj = {
        "metadata": {"uid": "u1"},
        "spec": {"containers": [{"name": "main", "image": "img"}]},
        "status": {"phase": "Pending"},
    }
    running = pod_status(pod, Report.running(rfc3339(NOW)), NOW)
    assert running["phase"] == "Running" and running["podIP"] == "127.0.0.1"
    assert {c["type"]: c["status"] for c in running["conditions"]} == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    assert running["containerStatuses"][0]["ready"] is True
    # Unchanged conditions keep their transition time, so re-reporting is a no-op.
    again = pod_status(
        {**pod, "status": running}, Report.running(rfc3339(NOW)), NOW + timedelta(seconds=9)
    )
    assert again == running

    done = Report.terminated(0, "Completed", '{"ok": true}', rfc3339(NOW), rfc3339(NOW))
    succeeded = pod_status({**pod, "status": running}, done, NOW + timedelta(seconds=9))
    assert succeeded["phase"] == "Succeeded"
    ready = next(c for c in succeeded["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodCompleted")
    assert succeeded["containerStatuses"][0]["state"]["terminated"]["message"] == '{"ok": true}'
    assert succeeded["startTime"] == running["startTime"]
    assert pod_status(pod, Report.terminated(2, "Error", "", "t", "t"), NOW)["phase"] == "Failed"


def init_pod() -> Obj:
    return {
        "metadata": {"uid": "u1"},
        "spec": {
            "initContainers": [
                {"name": "fetch", "image": "img"},
                {"name": "sidecar", "image": "img", "restartPolicy": "Always"},
                {"name": "unpack", "image": "img"},
            ],
            "containers": [{"name": "main", "image": "img"}],
        },
        "status": {"phase": "Pending"},
    }


def statuses(status: Obj, which: str) -> list[tuple[str, Obj]]:
    return [(s["name"], s["state"]) for s in status[which]]


def test_pod_status_while_init_containers_run_then_once_they_are_done() -> None:
    pod, stamp = init_pod(), rfc3339(NOW)
    done = terminated_state(0, "Completed", "", stamp, stamp)
    report = kubelet_report(2, [running_state(stamp)])
    initializing = pod_status(pod, report, NOW)
    assert initializing["phase"] == "Pending"
    # The sidecar never runs locally, so it is not listed.
    assert statuses(initializing, "initContainerStatuses") == [
        ("fetch", {"running": {"startedAt": stamp}}),
        ("unpack", {"waiting": {"reason": "PodInitializing"}}),
    ]
    assert statuses(initializing, "containerStatuses") == [
        ("main", {"waiting": {"reason": "PodInitializing"}})
    ]
    conditions = {c["type"]: c for c in initializing["conditions"]}
    assert (conditions["Initialized"]["status"], conditions["Initialized"]["reason"]) == (
        "False",
        "ContainersNotInitialized",
    )
    assert (
        conditions["Initialized"]["message"] == "containers with incomplete status: [fetch unpack]"
    )
    assert conditions["Ready"]["status"] == "False"
    fetch = initializing["initContainerStatuses"][0]
    assert (fetch["started"], fetch["ready"], fetch["containerID"]) == (
        True,
        False,
        "local://u1/fetch",
    )
    assert "containerID" not in initializing["initContainerStatuses"][1]

    second = pod_status(pod, kubelet_report(2, [done, running_state(stamp)]), NOW)
    assert [c["ready"] for c in second["initContainerStatuses"]] == [True, False]
    initialized = next(c for c in second["conditions"] if c["type"] == "Initialized")
    assert initialized["message"] == "containers with incomplete status: [unpack]"

    running = pod_status(pod, kubelet_report(2, [done, done, running_state(stamp)]), NOW)
    assert running["phase"] == "Running"
    assert {c["type"]: c["status"] for c in running["conditions"]} == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    assert [c["ready"] for c in running["initContainerStatuses"]] == [True, True]
    finished = kubelet_report(2, [done, done, done])
    assert pod_status(pod, finished, NOW)["phase"] == "Succeeded"


def test_a_failed_init_container_fails_the_pod_and_the_main_container_waits() -> None:
    pod, stamp = init_pod(), rfc3339(NOW)
    failed = terminated_state(1, "Error", "cannot download", stamp, stamp)
    report = kubelet_report(2, [failed])
    assert report.phase == "Failed"
    status = pod_status(pod, report, NOW)
    assert status["phase"] == "Failed"
    assert statuses(status, "initContainerStatuses") == [
        ("fetch", failed),
        ("unpack", {"waiting": {"reason": "PodInitializing"}}),
    ]
    assert statuses(status, "containerStatuses") == [
        ("main", {"waiting": {"reason": "PodInitializing"}})
    ]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert (
        conditions["Initialized"] == "False" and conditions["PodReadyToStartContainers"] == "False"
    )
    # An init container that exited 0 with nothing after it: the Pod was stopped.
    done = terminated_state(0, "Completed", "", stamp, stamp)
    assert kubelet_report(2, [done]).phase == "Failed"
    # A container that cannot start yet: the Pod waits, and so do those after it.
    waiting = kubelet_report(2, [waiting_state("PodInitializing"), waiting_state("Oops", "m")])
    assert (waiting.phase, waiting.state) == (
        "Pending",
        {"waiting": {"reason": "PodInitializing", "message": ""}},
    )
    on_main = kubelet_report(0, [waiting_state("CreateContainerConfigError", "no secret")])
    assert on_main == Report.waiting("CreateContainerConfigError", "no secret")


@pytest.mark.parametrize(
    ("returncode", "killed", "expected"),
    [
        (0, False, (0, "Completed")),
        (3, False, (3, "Error")),
        (-15, False, (143, "Error")),
        (-9, True, (137, "Error")),
        (-9, False, (137, "OOMKilled")),
    ],
)
def test_exit_reason(returncode: int, killed: bool, expected: tuple[int, str]) -> None:
    assert exit_reason(returncode, killed) == expected


def test_termination_message_rules() -> None:
    assert termination_message(b"x" * 5000, b"", "File", 0) == "x" * 4096
    log = b"".join(b"line %d\n" % i for i in range(200))
    fallback = termination_message(b"", log, "FallbackToLogsOnError", 1)
    assert fallback.startswith("line 120\n") and fallback.endswith("line 199\n")
    assert (
        termination_message(b"", b"a" * 3000 + b"\n", "FallbackToLogsOnError", 1)
        == "a" * 2047 + "\n"
    )
    assert termination_message(b"", log, "FallbackToLogsOnError", 0) == ""
    assert termination_message(b"", log, "File", 1) == ""


# -------------------------------------------------------- env and volumes ---


@dataclass
class FakeSource:
    config_maps: dict[str, Obj] = field(default_factory=dict)
    secrets: dict[str, Obj] = field(default_factory=dict)

    def config_map(self, namespace: str, name: str) -> Obj | None:
        return self.config_maps.get(name)

    def secret(self, namespace: str, name: str) -> Obj | None:
        return self.secrets.get(name)

    def service_account_token(self, pod: Obj, audience: str | None, expiration: int) -> str:
        return f"token-for-{pod['metadata']['name']}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


SOURCE = FakeSource(
    config_maps={"cfg": {"data": {"job.json": '{"a": 1}', "mode": "fast"}}},
    secrets={"creds": {"data": {"token": b64("s3cr3t")}}},
)
POD: Obj = {
    "metadata": {"name": "train-abcde", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"nodeName": NODE_NAME, "containers": [{"name": "main"}]},
}


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)-$$", env) == "1-two-$(C)-$(A)-$"


def test_container_env_resolves_values_refs_and_env_from() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "LITERAL", "value": "v"},
            {"name": "EXPANDED", "value": "$(LITERAL)-$(CFG_mode)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {
                "name": "MAYBE",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    assert container_env(POD, container, SOURCE) == {
        "CFG_job.json": '{"a": 1}',
        "CFG_mode": "fast",
        "LITERAL": "v",
        "EXPANDED": "v-fast",
        "TOKEN": "s3cr3t",
        "MODE": "fast",
        "POD": "train-abcde",
        "IP": "127.0.0.1",
        "APP": "x",
    }


def test_a_missing_secret_is_a_container_config_error() -> None:
    container = {
        "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]
    }
    with pytest.raises(PodSetupError) as caught:
        container_env(POD, container, SOURCE)
    assert (caught.value.reason, caught.value.message) == (
        "CreateContainerConfigError",
        'secret "nope" not found',
    )


def test_volumes_map_to_folders_and_mounts_honour_subpath_and_read_only(tmp_path: Path) -> None:
    pod = copy.deepcopy(POD)
    pod["spec"]["volumes"] = [
        {
            "name": "cfg",
            "configMap": {
                "name": "cfg",
                "items": [{"key": "job.json", "path": "conf/job.json", "mode": 0o600}],
            },
        },
        {"name": "creds", "secret": {"secretName": "creds"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
        {
            "name": "info",
            "downwardAPI": {
                "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
            },
        },
        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
    ]
    volumes = materialize_volumes(pod, tmp_path / "pod", tmp_path / "pvc", SOURCE)
    assert (volumes["cfg"].path / "conf/job.json").read_text() == '{"a": 1}'
    assert (volumes["cfg"].path / "conf/job.json").stat().st_mode & 0o777 == 0o600
    assert (volumes["creds"].path / "token").read_text() == "s3cr3t"
    assert (volumes["info"].path / "labels").read_text() == 'app="x"'
    assert (volumes["token"].path / "token").read_text() == "token-for-train-abcde"
    assert volumes["models"].path == tmp_path / "pvc" / "ns" / "models"
    assert volumes["cfg"].read_only and not volumes["scratch"].read_only

    container = {
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/kubetune"},
            {"name": "models", "mountPath": "/data", "subPath": "ds/$(RUN)", "readOnly": True},
            {"name": "models", "mountPath": "/output", "subPathExpr": "out/$(RUN)"},
        ]
    }
    mounts = container_mounts(container, volumes, {"RUN": "r1"})
    models = tmp_path / "pvc" / "ns" / "models"
    assert [(m.source, m.target, m.read_only) for m in mounts] == [
        (str(volumes["cfg"].path), "/etc/kubetune", True),
        (str(models / "ds/$(RUN)"), "/data", True),
        (str(models / "out/r1"), "/output", False),
    ]
    assert (models / "out/r1").is_dir(), "missing subPath folders are created"


def test_unsupported_volume_types_keep_the_pod_pending(tmp_path: Path) -> None:
    pod = copy.deepcopy(POD)
    pod["spec"]["volumes"] = [{"name": "x", "nfs": {"server": "s", "path": "/"}}]
    with pytest.raises(PodSetupError) as caught:
        materialize_volumes(pod, tmp_path, tmp_path, SOURCE)
    assert caught.value.reason == "ContainerCreating" and "nfs" in caught.value.message


def test_mounts_over_the_local_python_keep_it_visible_or_are_refused() -> None:
    needed = ["/work/main/.venv", "/usr/local"]
    mounts = [Mount("/s", "/data", False), Mount("/s", "/work", False), Mount("/s", "/usr", False)]
    assert paths_to_keep(mounts, needed) == ["/work/main/.venv", "/usr/local"]
    assert paths_to_keep([Mount("/s", "/data", False)], needed) == []
    for target in ("/work/main/.venv/", "/work/main/.venv/lib", "/"):
        with pytest.raises(StartError, match=f"mountPath {target} would hide"):
            paths_to_keep([Mount("/s", target, False)], needed)


# ------------------------------------------------------------------ WorkQueue ---


def test_work_queue_deduplicates_delays_and_closes() -> None:
    queue = WorkQueue()
    queue.add(("ns", "later"), delay=0.05)
    queue.add(("ns", "a"))
    queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert [queue.get(), queue.get(), queue.get()] == [("ns", "a"), ("ns", "b"), ("ns", "later")]
    queue.close()
    assert queue.get() is None


# ------------------------------------------------------------- Indexed plan_job ---


def indexed_job(status: Obj | None = None, **spec: Any) -> Obj:
    fields = {"completionMode": "Indexed", "completions": 3, "parallelism": 2, **spec}
    return make_job(status, **fields)


def indexed_pod(name: str, index: int, phase: str = "Running", **kwargs: Any) -> Obj:
    pod = make_pod(name, phase, **kwargs)
    pod["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return pod


def test_an_indexed_job_creates_the_lowest_pending_indexes_up_to_parallelism() -> None:
    job = indexed_job()
    first = plan_job(job, [], NOW)
    assert (first.create, first.create_indexes) == (2, (0, 1))

    job = advance(job, first)
    pods = [indexed_pod("a", 0), indexed_pod("b", 1, "Succeeded")]
    second = plan_job(job, pods, NOW)
    assert (second.create, second.create_indexes) == (1, (2,))
    assert second.status["completedIndexes"] == "1" and second.status["succeeded"] == 1
    assert "uncountedTerminatedPods" not in job_status_canonical(second.status), (
        "succeeded Pods of an Indexed Job are counted by index, not by UID"
    )
    assert second.release == (("b", "b-uid"),)
    assert (second.status["active"], second.status["ready"]) == (1, 1)


def test_an_indexed_job_completes_once_every_index_succeeded() -> None:
    job = indexed_job(status={"startTime": rfc3339(NOW), "completedIndexes": "2", "succeeded": 1})
    pods = [indexed_pod("a", 0, "Succeeded"), indexed_pod("b", 1)]
    partial = plan_job(job, pods, NOW)
    assert partial.status["completedIndexes"] == "0,2" and partial.status["succeeded"] == 2
    assert partial.create == 0 and condition_types(partial) == []
    assert_idempotent(job, pods, partial)

    job = advance(job, partial)
    pods = [indexed_pod("a", 0, "Succeeded", tracked=False), indexed_pod("b", 1, "Succeeded")]
    done = plan_job(job, pods, NOW)
    assert done.status["completedIndexes"] == "0-2" and done.status["succeeded"] == 3
    assert condition_types(done) == ["SuccessCriteriaMet", "Complete"]
    assert done.finished is not None and done.finished["reason"] == "CompletionsReached"
    assert done.status["completionTime"] == rfc3339(NOW)
    assert done.release == (("b", "b-uid"),)


def test_a_failed_index_is_replaced_after_the_backoff() -> None:
    job = indexed_job(completions=2, status={"startTime": rfc3339(NOW)})
    pods = [indexed_pod("a", 0), indexed_pod("b", 1, "Failed")]
    plan = plan_job(job, pods, NOW, pod_failure_backoff=2.0)
    assert plan.create == 0 and plan.requeue_after == pytest.approx(2.0)
    assert plan.status["uncountedTerminatedPods"] == {"failed": ["b-uid"]}

    job = advance(job, plan)
    pods = [indexed_pod("a", 0), indexed_pod("b", 1, "Failed", tracked=False)]
    later = plan_job(job, pods, NOW + timedelta(seconds=2), plan.backoff, pod_failure_backoff=2.0)
    assert (later.create, later.create_indexes) == (1, (1,))
    assert later.status["failed"] == 1 and condition_types(later) == []


def test_an_indexed_job_beyond_its_backoff_limit_deletes_the_other_pods_and_fails() -> None:
    job = indexed_job(completions=2, backoffLimit=0, status={"startTime": rfc3339(NOW)})
    pods = [indexed_pod("a", 0), indexed_pod("b", 1, "Failed")]
    plan = plan_job(job, pods, NOW)
    assert condition_types(plan) == ["FailureTarget"]
    assert plan.status["conditions"][0]["reason"] == "BackoffLimitExceeded"
    assert plan.delete == (("a", "a-uid"),) and plan.create == 0
    assert plan.finished is None

    job = advance(job, plan)
    gone = [indexed_pod("b", 1, "Failed", tracked=False)]
    final = plan_job(job, gone, NOW)
    assert condition_types(final) == ["FailureTarget", "Failed"]
    assert final.finished is not None and final.finished["reason"] == "BackoffLimitExceeded"
    assert final.status.get("completedIndexes", "") == ""


def test_a_suspended_indexed_job_deletes_its_pods_and_resumes_the_pending_indexes() -> None:
    job = indexed_job(suspend=True, status={"startTime": rfc3339(NOW), "completedIndexes": "1"})
    plan = plan_job(job, [indexed_pod("a", 0)], NOW)
    assert plan.untrack_and_delete == (("a", "a-uid"),) and plan.create == 0
    assert condition_types(plan) == ["Suspended"]

    job = advance(job, plan)
    job["spec"]["suspend"] = False
    resumed = plan_job(job, [], NOW)
    assert resumed.create_indexes == (0, 2)


# ------------------------------------------------------------ podFailurePolicy ---


def exited_pod(
    name: str,
    *codes: tuple[str, int],
    init: tuple[tuple[str, int], ...] = (),
    conditions: tuple[tuple[str, str], ...] = (),
    **kwargs: Any,
) -> Obj:
    """A Failed Pod of namespace ``ns`` whose containers (and init containers) ``codes``
    terminated with those exit codes, carrying ``conditions`` (type, status)."""
    pod = make_pod(name, "Failed", **kwargs)
    pod["metadata"]["namespace"] = "ns"

    def statuses(pairs: tuple[tuple[str, int], ...]) -> list[Obj]:
        return [
            {"name": c, "state": {"terminated": {"exitCode": code, "finishedAt": rfc3339(NOW)}}}
            for c, code in pairs
        ]

    pod["status"]["containerStatuses"] = statuses(codes)
    if init:
        pod["status"]["initContainerStatuses"] = statuses(init)
    pod["status"]["conditions"] = [{"type": t, "status": v} for t, v in conditions]
    return pod


def exit_rule(action: str, operator: str, *values: int, container: str | None = None) -> Obj:
    on_exit: Obj = {"operator": operator, "values": list(values)}
    if container is not None:
        on_exit["containerName"] = container
    return {"action": action, "onExitCodes": on_exit}


def policy(*rules: Obj) -> Obj:
    return {"rules": list(rules)}


def test_the_first_matching_rule_decides_with_upstreams_fail_job_message() -> None:
    pod = exited_pod("p1", ("main", 3))
    rules = policy(exit_rule("Ignore", "In", 1, 2), exit_rule("FailJob", "In", 3))
    match = match_pod_failure_policy(rules, pod)
    assert match.action == "FailJob" and match.count_failed
    assert match.fail_job_message == (
        "Container main for pod ns/p1 failed with exit code 3 matching FailJob rule at index 1"
    )
    rules = policy(exit_rule("Count", "In", 3), exit_rule("FailJob", "In", 3))
    assert match_pod_failure_policy(rules, pod) == (None, True, "Count")
    assert match_pod_failure_policy(policy(exit_rule("Ignore", "In", 3)), pod) == (
        None,
        False,
        "Ignore",
    )
    assert match_pod_failure_policy(policy(exit_rule("Ignore", "In", 4)), pod) == (
        None,
        True,
        None,
    ), "no rule matched: the failure counts as without a policy"
    assert match_pod_failure_policy(None, pod) == (None, True, None)


def test_not_in_never_matches_exit_code_zero_and_container_name_narrows_the_match() -> None:
    not_in = policy(exit_rule("FailJob", "NotIn", 1))
    assert match_pod_failure_policy(not_in, exited_pod("p1", ("main", 0))).action is None
    assert match_pod_failure_policy(not_in, exited_pod("p1", ("main", 1))).action is None
    assert match_pod_failure_policy(not_in, exited_pod("p1", ("main", 2))).action == "FailJob"

    pod = exited_pod("p1", ("main", 0), init=(("setup", 5),))
    named = policy(exit_rule("FailJob", "In", 5, container="main"))
    assert match_pod_failure_policy(named, pod).action is None
    named = policy(exit_rule("FailJob", "In", 5, container="setup"))
    message = match_pod_failure_policy(named, pod).fail_job_message
    assert message is not None and message.startswith("Container setup for pod ns/p1 ")
    # Init containers count too, after the regular ones.
    assert match_pod_failure_policy(policy(exit_rule("Ignore", "In", 5)), pod).action == "Ignore"


def test_on_pod_conditions_status_defaults_to_true() -> None:
    disrupted = exited_pod("p1", ("main", 143), conditions=(("DisruptionTarget", "True"),))
    ignore = policy({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
    assert match_pod_failure_policy(ignore, disrupted) == (None, False, "Ignore")
    assert match_pod_failure_policy(ignore, exited_pod("p2", ("main", 143))).action is None
    falsy = exited_pod("p3", ("main", 143), conditions=(("DisruptionTarget", "False"),))
    assert match_pod_failure_policy(ignore, falsy).action is None
    fail = policy(
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "False"}]}
    )
    assert match_pod_failure_policy(fail, falsy).fail_job_message == (
        "Pod ns/p3 has condition DisruptionTarget matching FailJob rule at index 0"
    )


def test_unknown_actions_are_skipped_and_fail_index_counts() -> None:
    pod = exited_pod("p1", ("main", 3))
    rules = policy(exit_rule("Explode", "In", 3), exit_rule("FailIndex", "In", 3))
    assert match_pod_failure_policy(rules, pod) == (None, True, "FailIndex")


def test_a_fail_job_rule_fails_the_job_at_once_and_deletes_the_other_pods() -> None:
    rules = policy(exit_rule("FailJob", "In", 3, container="main"))
    job = make_job(
        backoffLimit=3,
        parallelism=2,
        completions=2,
        podFailurePolicy=rules,
        status={"startTime": rfc3339(NOW), "active": 2},
    )
    pods = [exited_pod("p1", ("main", 3)), make_pod("p2")]
    plan = plan_job(job, pods, NOW)
    assert [(c["type"], c["reason"]) for c in plan.status["conditions"]] == [
        ("FailureTarget", "PodFailurePolicy")
    ]
    assert plan.status["conditions"][0]["message"] == (
        "Container main for pod ns/p1 failed with exit code 3 matching FailJob rule at index 0"
    )
    assert plan.delete == (("p2", "p2-uid"),) and plan.create == 0
    assert plan.status["uncountedTerminatedPods"] == {"failed": ["p1-uid", "p2-uid"]}
    assert plan.status["terminating"] == 1 and plan.finished is None

    job = advance(job, plan)
    gone = [exited_pod("p1", ("main", 3), tracked=False)]
    final = plan_job(job, gone, NOW)
    assert [(c["type"], c["reason"]) for c in final.status["conditions"]] == [
        ("FailureTarget", "PodFailurePolicy"),
        ("Failed", "PodFailurePolicy"),
    ]
    assert final.status["conditions"][1]["message"] == plan.status["conditions"][0]["message"]
    assert final.status["failed"] == 2 and final.finished is not None


def test_an_ignored_failure_is_not_counted_but_replaced_after_the_backoff() -> None:
    rules = policy({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
    job = make_job(backoffLimit=0, podFailurePolicy=rules, status={"startTime": rfc3339(NOW)})
    evicted = [exited_pod("p1", ("main", 143), conditions=(("DisruptionTarget", "True"),))]
    plan = plan_job(job, evicted, NOW, pod_failure_backoff=2.0)
    assert plan.release == (("p1", "p1-uid"),)
    assert "uncountedTerminatedPods" not in job_status_canonical(plan.status)
    assert "failed" not in job_status_canonical(plan.status) and condition_types(plan) == []
    assert plan.create == 0 and plan.requeue_after == pytest.approx(2.0)

    job = advance(job, plan)
    released = [
        exited_pod("p1", ("main", 143), conditions=(("DisruptionTarget", "True"),), tracked=False)
    ]
    later = plan_job(
        job, released, NOW + timedelta(seconds=2), plan.backoff, pod_failure_backoff=2.0
    )
    assert later.create == 1 and later.status.get("failed", 0) == 0
    assert condition_types(later) == []


def test_a_count_rule_or_no_match_counts_towards_the_backoff_limit() -> None:
    rules = policy(exit_rule("Count", "In", 1), exit_rule("Ignore", "In", 2))
    job = make_job(backoffLimit=1, podFailurePolicy=rules, status={"startTime": rfc3339(NOW)})
    pods = [
        exited_pod("p1", ("main", 1)),
        exited_pod("p2", ("main", 7)),
        exited_pod("p3", ("main", 2)),
    ]
    plan = plan_job(job, pods, NOW)
    assert plan.status["uncountedTerminatedPods"] == {"failed": ["p1-uid", "p2-uid"]}
    assert [(c["type"], c["reason"]) for c in plan.status["conditions"]] == [
        ("FailureTarget", "BackoffLimitExceeded")
    ]


def test_with_a_policy_a_deleted_pod_counts_only_once_failed() -> None:
    rules = policy({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
    job = make_job(podFailurePolicy=rules, status={"startTime": rfc3339(NOW), "active": 1})
    evicting = make_pod("p1", deleting=True)
    evicting["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True"})
    plan = plan_job(job, [evicting], NOW, pod_failure_backoff=0)
    assert plan.create == 0 and not plan.release, "podReplacementPolicy Failed is implied"
    assert (plan.status["active"], plan.status["terminating"]) == (0, 1)
    assert "uncountedTerminatedPods" not in job_status_canonical(plan.status)


def test_the_kubelet_keeps_the_disruption_target_condition_when_the_pod_fails() -> None:
    pod: Obj = {
        "metadata": {"uid": "u1"},
        "spec": {"containers": [{"name": "main", "image": "img"}]},
        "status": {"phase": "Pending"},
    }
    running = pod_status(pod, Report.running(rfc3339(NOW)), NOW)
    disruption = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
        "lastTransitionTime": rfc3339(NOW),
    }
    evicted = {**pod, "status": {**running, "conditions": [*running["conditions"], disruption]}}
    killed = Report.terminated(143, "Error", "", rfc3339(NOW), rfc3339(NOW))
    failed = pod_status(evicted, killed, NOW + timedelta(seconds=1))
    assert failed["phase"] == "Failed"
    assert failed["conditions"][-1] == disruption
    assert [c["type"] for c in failed["conditions"]].count("DisruptionTarget") == 1


def test_a_deleted_pod_that_never_ran_here_is_reported_failed() -> None:
    pod: Obj = {
        "metadata": {"uid": "u1", "deletionTimestamp": rfc3339(NOW)},
        "spec": {"containers": [{"name": "main", "image": "img"}]},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "main", "state": waiting_state("CreateContainerConfigError", "x")}
            ],
        },
    }
    report = deleted_report(pod, NOW)
    assert report.phase == "Failed" and report.state == waiting_state(
        "CreateContainerConfigError", "x"
    )
    # A container an earlier executor ran (and killed on stopping) is unknown.
    pod["status"] = {
        "phase": "Running",
        "containerStatuses": [{"name": "main", "state": running_state(rfc3339(NOW))}],
    }
    report = deleted_report(pod, NOW)
    assert report.phase == "Failed"
    assert report.state["terminated"]["reason"] == "ContainerStatusUnknown"
