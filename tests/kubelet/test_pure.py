"""The local kubelet's pure parts, without a cluster: the Pod status it writes, restarts
and back-off, pod addresses and names, env and volume mapping."""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from local_kubelet import (
    NODE_NAME,
    Mount,
    PodSetupError,
    Report,
    StartError,
    WorkQueue,
    abandoned_report,
    back_off,
    container_env,
    container_mounts,
    deleted_report,
    exit_reason,
    expand,
    fixed_pod_ip,
    hosts_file_text,
    kubelet_report,
    materialize_volumes,
    paths_to_keep,
    pod_status,
    restarts,
    rfc3339,
    running_state,
    terminated_state,
    termination_message,
    waiting_state,
)

Obj = dict[str, Any]
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
STAMP = rfc3339(NOW)
IP = "127.1.0.7"


def simple_pod(**spec: Any) -> Obj:
    return {
        "metadata": {"uid": "u1"},
        "spec": {"containers": [{"name": "main", "image": "img"}], **spec},
        "status": {"phase": "Pending"},
    }


def running(**rest: Any) -> Report:
    return kubelet_report(0, [running_state(STAMP)], **rest)


def test_running_then_succeeded_pod_status_like_a_kubelet() -> None:
    pod = simple_pod()
    status = pod_status(pod, running(), IP, NOW)
    assert status["phase"] == "Running"
    assert (status["podIP"], status["hostIP"], status["podIPs"]) == (IP, "127.0.0.1", [{"ip": IP}])
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    assert status["containerStatuses"][0]["ready"] is True
    # Unchanged conditions keep their transition time, so re-reporting is a no-op.
    again = pod_status({**pod, "status": status}, running(), IP, NOW + timedelta(seconds=9))
    assert again == status

    done = kubelet_report(0, [terminated_state(0, "Completed", '{"ok": true}', STAMP, STAMP)])
    succeeded = pod_status({**pod, "status": status}, done, IP, NOW + timedelta(seconds=9))
    assert succeeded["phase"] == "Succeeded"
    ready = next(c for c in succeeded["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodCompleted")
    assert succeeded["containerStatuses"][0]["state"]["terminated"]["message"] == '{"ok": true}'
    assert succeeded["startTime"] == status["startTime"]
    failed = kubelet_report(0, [terminated_state(2, "Error", "", STAMP, STAMP)])
    assert pod_status(pod, failed, IP, NOW)["phase"] == "Failed"


def test_a_container_is_ready_once_its_probes_say_so() -> None:
    pod = simple_pod()
    starting = pod_status(pod, running(started=False, ready=False), IP, NOW)
    (container,) = starting["containerStatuses"]
    assert (container["started"], container["ready"]) == (False, False)
    conditions = {c["type"]: c for c in starting["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "ContainersNotReady"
    serving = pod_status(pod, running(started=True, ready=True), IP, NOW)
    assert serving["containerStatuses"][0]["ready"] is True


def test_a_pod_is_ready_only_once_its_readiness_gates_are_true() -> None:
    gate = "example.com/loaded"
    pod = simple_pod(readinessGates=[{"conditionType": gate}])
    closed = pod_status(pod, running(), IP, NOW)
    conditions = {c["type"]: c for c in closed["conditions"]}
    assert conditions["ContainersReady"]["status"] == "True"
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (
        "False",
        "ReadinessGatesNotReady",
    )
    opened = {"type": gate, "status": "True", "lastTransitionTime": STAMP}
    pod["status"] = {**closed, "conditions": [*closed["conditions"], opened]}
    ready = {c["type"]: c for c in pod_status(pod, running(), IP, NOW)["conditions"]}
    assert ready["Ready"]["status"] == "True"
    assert ready[gate] == opened  # someone else's condition, kept as it is


def test_a_restarting_container_waits_in_crash_loop_back_off_with_its_last_exit() -> None:
    last = terminated_state(3, "Error", "boom", STAMP, STAMP)
    waiting = waiting_state("CrashLoopBackOff", "back-off restarting failed container main")
    report = kubelet_report(0, [waiting], restart_count=2, last_state=last)
    assert report.phase == "Running"
    (container,) = pod_status(simple_pod(), report, IP, NOW)["containerStatuses"]
    assert (container["restartCount"], container["ready"]) == (2, False)
    assert container["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert container["lastState"]["terminated"]["exitCode"] == 3


@pytest.mark.parametrize(
    ("policy", "code", "again"),
    [
        ("Always", 0, True),
        ("Always", 1, True),
        ("OnFailure", 0, False),
        ("OnFailure", 1, True),
        ("Never", 1, False),
    ],
)
def test_which_exits_restart(policy: str, code: int, again: bool) -> None:
    assert restarts(simple_pod(restartPolicy=policy), code) is again


def test_back_off_doubles_from_ten_seconds_to_five_minutes() -> None:
    assert [back_off(n) for n in (1, 2, 3, 4, 5, 6, 9)] == [10, 20, 40, 80, 160, 300, 300]


def test_pods_named_by_hostname_and_subdomain_have_fixed_distinct_addresses() -> None:
    one = fixed_pod_ip("ns", "job", "job-0")
    assert one == fixed_pod_ip("ns", "job", "job-0")
    others = {fixed_pod_ip("ns", "job", f"job-{i}") for i in range(1, 50)}
    assert one not in others and len(others) == 49
    assert fixed_pod_ip("other", "job", "job-0") != one
    first, second, *_, last = (int(part) for part in one.split("."))
    assert first == 127 and 64 <= second < 128 and last != 0


def test_hosts_file_adds_every_name_of_the_subdomain_at_its_address() -> None:
    text = hosts_file_text(
        "127.0.0.1\tlocalhost\n", {"job-0": "127.64.1.2", "job-1": "127.65.3.4"}, "job", "ns"
    )
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1\tlocalhost"
    assert "127.65.3.4\tjob-1.job.ns.svc.cluster.local job-1.job.ns.svc job-1.job job-1" in lines
    assert lines[-2].startswith("127.64.1.2\tjob-0.job.ns.svc.cluster.local")


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
    pod = init_pod()
    done = terminated_state(0, "Completed", "", STAMP, STAMP)
    initializing = pod_status(pod, kubelet_report(2, [running_state(STAMP)]), IP, NOW)
    assert initializing["phase"] == "Pending"
    # The sidecar never runs locally, so it is not listed.
    assert statuses(initializing, "initContainerStatuses") == [
        ("fetch", {"running": {"startedAt": STAMP}}),
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
    fetch = initializing["initContainerStatuses"][0]
    assert (fetch["started"], fetch["ready"], fetch["containerID"]) == (
        True,
        False,
        "local://u1/fetch",
    )
    assert "containerID" not in initializing["initContainerStatuses"][1]

    second = pod_status(pod, kubelet_report(2, [done, running_state(STAMP)]), IP, NOW)
    assert [c["ready"] for c in second["initContainerStatuses"]] == [True, False]
    initialized = next(c for c in second["conditions"] if c["type"] == "Initialized")
    assert initialized["message"] == "containers with incomplete status: [unpack]"

    after = pod_status(pod, kubelet_report(2, [done, done, running_state(STAMP)]), IP, NOW)
    assert after["phase"] == "Running"
    assert {c["type"]: c["status"] for c in after["conditions"]}["Initialized"] == "True"
    assert pod_status(pod, kubelet_report(2, [done, done, done]), IP, NOW)["phase"] == "Succeeded"


def test_a_failed_init_container_fails_the_pod_and_the_main_container_waits() -> None:
    pod = init_pod()
    failed = terminated_state(1, "Error", "cannot download", STAMP, STAMP)
    report = kubelet_report(2, [failed])
    status = pod_status(pod, report, IP, NOW)
    assert report.phase == status["phase"] == "Failed"
    assert statuses(status, "initContainerStatuses") == [
        ("fetch", failed),
        ("unpack", {"waiting": {"reason": "PodInitializing"}}),
    ]
    assert statuses(status, "containerStatuses") == [
        ("main", {"waiting": {"reason": "PodInitializing"}})
    ]
    # An init container that exited 0 with nothing after it: the Pod was stopped.
    done = terminated_state(0, "Completed", "", STAMP, STAMP)
    assert kubelet_report(2, [done]).phase == "Failed"
    # A container that cannot start yet: the Pod waits, and so do those after it.
    waiting = kubelet_report(2, [waiting_state("PodInitializing"), waiting_state("Oops", "m")])
    assert (waiting.phase, waiting.state) == ("Pending", waiting_state("PodInitializing"))
    on_main = kubelet_report(0, [waiting_state("CreateContainerConfigError", "no secret")])
    assert (on_main.phase, on_main.state["waiting"]["reason"]) == (
        "Pending",
        "CreateContainerConfigError",
    )


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


def test_the_kubelet_keeps_the_disruption_target_condition_when_the_pod_fails() -> None:
    pod = simple_pod()
    status = pod_status(pod, running(), IP, NOW)
    disruption = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
        "lastTransitionTime": STAMP,
    }
    evicted = {**pod, "status": {**status, "conditions": [*status["conditions"], disruption]}}
    killed = kubelet_report(0, [terminated_state(143, "Error", "", STAMP, STAMP)])
    failed = pod_status(evicted, killed, IP, NOW + timedelta(seconds=1))
    assert failed["phase"] == "Failed"
    assert failed["conditions"][-1] == disruption
    assert [c["type"] for c in failed["conditions"]].count("DisruptionTarget") == 1


def test_a_pod_whose_process_an_earlier_kubelet_ran_ends_failed() -> None:
    pod = simple_pod()
    pod["status"] = {
        "phase": "Pending",
        "containerStatuses": [
            {"name": "main", "state": waiting_state("CreateContainerConfigError", "x")}
        ],
    }
    assert abandoned_report(pod, NOW) is None
    report = deleted_report({**pod, "metadata": {"uid": "u1", "deletionTimestamp": STAMP}}, NOW)
    assert (report.phase, report.state) == (
        "Failed",
        waiting_state("CreateContainerConfigError", "x"),
    )
    pod["status"] = {
        "phase": "Running",
        "containerStatuses": [{"name": "main", "state": running_state(STAMP)}],
    }
    for report in (abandoned_report(pod, NOW), deleted_report(pod, NOW)):
        assert report is not None and report.phase == "Failed"
        assert report.state["terminated"]["reason"] == "ContainerStatusUnknown"


# -------------------------------------------------------- env and volumes ---


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class FakeSource:
    """What the kubelet reads through the API, from a dict."""

    objects: dict[tuple[str, str], Obj] = field(default_factory=dict)

    def object(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get((kind, name))

    def token(self, pod: Obj, audience: str | None, expiration: int) -> str:
        return f"token-for-{pod['metadata']['name']}"


SOURCE: Any = FakeSource(
    {
        ("ConfigMap", "cfg"): {"data": {"job.json": '{"a": 1}', "mode": "fast"}},
        ("Secret", "creds"): {"data": {"token": b64("s3cr3t")}},
    }
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
    assert container_env(POD, container, SOURCE, IP) == {
        "CFG_job.json": '{"a": 1}',
        "CFG_mode": "fast",
        "LITERAL": "v",
        "EXPANDED": "v-fast",
        "TOKEN": "s3cr3t",
        "MODE": "fast",
        "POD": "train-abcde",
        "IP": IP,
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
        {
            "name": "token",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token"}},
                    {"configMap": {"name": "cfg", "items": [{"key": "mode", "path": "mode"}]}},
                ]
            },
        },
    ]
    volumes = materialize_volumes(pod, tmp_path / "pod", tmp_path / "pvc", SOURCE)
    assert (volumes["cfg"].path / "conf/job.json").read_text() == '{"a": 1}'
    assert (volumes["cfg"].path / "conf/job.json").stat().st_mode & 0o777 == 0o600
    assert (volumes["creds"].path / "token").read_text() == "s3cr3t"
    assert (volumes["info"].path / "labels").read_text() == 'app="x"'
    assert (volumes["token"].path / "token").read_text() == "token-for-train-abcde"
    assert (volumes["token"].path / "mode").read_text() == "fast"
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


def test_work_queue_deduplicates_delays_and_closes() -> None:
    queue = WorkQueue()
    queue.add(("ns", "later"), delay=0.05)
    queue.add(("ns", "a"))
    queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert [queue.get(), queue.get(), queue.get()] == [("ns", "a"), ("ns", "b"), ("ns", "later")]
    queue.close()
    assert queue.get() is None
