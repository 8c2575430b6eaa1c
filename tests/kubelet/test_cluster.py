"""The local kubelet against the real test API server, with Kubernetes' own Job,
Deployment and ReplicaSet controllers and scheduler: pods in a namespace enforcing the
restricted Pod Security level run as local processes, with the status, restarts,
probes, addresses and names a kubelet gives them."""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kube import ROOT, Kubectl
from local_kubelet import NODE_NAME, POD_NETWORK, LocalKubelet, fixed_pod_ip

pytestmark = pytest.mark.apiserver

Obj = dict[str, Any]
T = TypeVar("T")

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def job_manifest(
    name: str, script: str, *, container: Obj | None = None, pod: Obj | None = None, **spec: Any
) -> Obj:
    """A Job whose single container runs ``python3 -c script``, valid under `restricted`."""
    main = {
        "name": "main",
        "image": "ghcr.io/kubetune/trainer:never-pulled",
        "command": ["python3", "-c", textwrap.dedent(script)],
        "securityContext": RESTRICTED_CONTAINER,
        **(container or {}),
    }
    pod_spec = {
        "restartPolicy": "Never",
        "securityContext": RESTRICTED_POD,
        "containers": [main],
        **(pod or {}),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, **spec, "template": {"spec": pod_spec}},
    }


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while (value := probe()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return value


def get_job(kubectl: Kubectl, ns: str, name: str) -> Obj:
    job: Obj = kubectl.get("job", name, "-n", ns)
    return job


def pods_of(kubectl: Kubectl, ns: str, job: str) -> list[Obj]:
    pods: list[Obj] = kubectl.get("pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job}")[
        "items"
    ]
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def condition(obj: Obj, ctype: str) -> Obj | None:
    return next(
        (c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None
    )


def wait_condition(kubectl: Kubectl, ns: str, name: str, ctype: str, status: str = "True") -> Obj:
    def probe() -> Obj | None:
        job = get_job(kubectl, ns, name)
        found = condition(job, ctype)
        return job if found is not None and found["status"] == status else None

    return wait_for(f"job {name} condition {ctype}={status}", probe)


def wait_running_pid(
    kubectl: Kubectl, ns: str, job: str, pid_dir: Path, exclude: Collection[str] = ()
) -> tuple[str, int]:
    """The running Pod of ``job`` (other than ``exclude``) and the pid its process wrote."""

    def probe() -> tuple[str, int] | None:
        for pod in pods_of(kubectl, ns, job):
            name = pod["metadata"]["name"]
            pid_file = pid_dir / f"{name}.pid"
            if (
                name not in exclude
                and pod["status"].get("phase") == "Running"
                and pid_file.exists()
            ):
                return name, int(pid_file.read_text())
        return None

    return wait_for(f"a running pod of {job}", probe)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# A process that records its pid on the `work` PVC, then waits to be killed.
SLEEPER = """
    import os, time
    open(f"/data/{os.environ['POD']}.pid", "w").write(str(os.getpid()))
    time.sleep(120)
"""
SLEEPER_CONTAINER = {
    "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    "volumeMounts": [{"name": "work", "mountPath": "/data"}],
}
SLEEPER_POD = {"volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": "work"}}]}


def test_job_runs_with_env_mounts_and_termination_message(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "job-config"},
            "data": {"job.json": '{"epochs": 2}'},
        },
        "-n",
        namespace,
    )
    kubectl.apply_secret(namespace, "creds", {"token": "s3cr3t"})
    script = """
        import json, os
        config = json.load(open("/etc/kubetune/job.json"))
        try:
            open("/etc/kubetune/new", "w")
            config_writable = True
        except OSError:
            config_writable = False
        names = ("GREETING", "TOKEN", "POD_NAME", "POD_NAMESPACE", "POD_IP", "HOSTNAME")
        report = {"config": config, "config_writable": config_writable, "cwd": os.getcwd(),
                  "env": {n: os.environ.get(n) for n in names}}
        json.dump(report, open("/output/report.json", "w"))
        print("training done")
        open("/dev/termination-log", "w").write(json.dumps({"trainLoss": 0.5}))
    """
    container = {
        "workingDir": "/output",
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "value": "hello $(POD_NAME)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        ],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/kubetune"},
            {"name": "output", "mountPath": "/output", "subPath": "run-1"},
        ],
    }
    pod = {
        "volumes": [
            {"name": "config", "configMap": {"name": "job-config"}},
            {"name": "output", "persistentVolumeClaim": {"claimName": "models"}},
        ]
    }
    kubectl.apply(job_manifest("hello", script, container=container, pod=pod), "-n", namespace)

    job = wait_condition(kubectl, namespace, "hello", "Complete")
    status = job["status"]
    assert [c["type"] for c in status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    assert (
        status["succeeded"] == 1 and status.get("failed", 0) == 0 and status.get("active", 0) == 0
    )
    assert status["completionTime"] >= status["startTime"]

    (pod_obj,) = pods_of(kubectl, namespace, "hello")
    name = pod_obj["metadata"]["name"]
    assert name.startswith("hello-") and len(name) == len("hello-") + 5
    assert pod_obj["spec"]["nodeName"] == NODE_NAME
    (owner,) = pod_obj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Job", "hello", True)
    assert "finalizers" not in pod_obj["metadata"], "the tracking finalizer is removed once counted"
    pod_ip = pod_obj["status"]["podIP"]
    # Not loopback, which Endpoints may not hold (so the service proxy could not reach it).
    assert pod_obj["status"]["phase"] == "Succeeded"
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(POD_NETWORK)
    terminated = pod_obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert json.loads(terminated["message"]) == {"trainLoss": 0.5}

    report = json.loads(
        (kubelet.pvc_dir(namespace, "models") / "run-1" / "report.json").read_text()
    )
    assert report == {
        "config": {"epochs": 2},
        "config_writable": False,
        "cwd": "/output",
        "env": {
            "GREETING": f"hello {name}",
            "TOKEN": "s3cr3t",
            "POD_NAME": name,
            "POD_NAMESPACE": namespace,
            "POD_IP": pod_ip,
            "HOSTNAME": name,
        },
    }
    assert "training done" in kubelet.log_path(namespace, name).read_text()


def test_deleting_the_job_kills_its_process(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    pid_dir = kubelet.pvc_dir(namespace, "work")
    kubectl.apply(
        job_manifest("doomed", SLEEPER, container=SLEEPER_CONTAINER, pod=SLEEPER_POD),
        "-n",
        namespace,
    )
    _, pid = wait_running_pid(kubectl, namespace, "doomed", pid_dir)

    # Background propagation: the Job goes at once, the garbage collector deletes the Pod.
    kubectl.run("delete", "job", "doomed", "-n", namespace, "--cascade=background", "--wait=false")
    wait_for("the process to be killed", lambda: not alive(pid))
    wait_for("the pod to be gone", lambda: not pods_of(kubectl, namespace, "doomed"))


def test_a_missing_secret_keeps_the_pod_pending_until_it_exists(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    container = {
        "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late", "key": "key"}}}]
    }
    script = "import os; open('/dev/termination-log', 'w').write(os.environ['KEY'])"
    kubectl.apply(job_manifest("patient", script, container=container), "-n", namespace)

    def waiting_reason() -> str | None:
        pods = pods_of(kubectl, namespace, "patient")
        statuses = pods[0]["status"].get("containerStatuses", []) if pods else []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    assert (
        wait_for("the pod to wait for its secret", waiting_reason) == "CreateContainerConfigError"
    )
    kubectl.apply_secret(namespace, "late", {"key": "finally"})
    wait_condition(kubectl, namespace, "patient", "Complete")
    (pod,) = pods_of(kubectl, namespace, "patient")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "finally"


def test_a_process_killed_by_sigkill_reports_oomkilled(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    kubectl.apply(job_manifest("oom", script), "-n", namespace)

    job = wait_condition(kubectl, namespace, "oom", "Failed")
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]
    (pod,) = pods_of(kubectl, namespace, "oom")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "OOMKilled")


def test_the_command_line_kubelet_stops_on_sigterm_and_kills_its_processes(
    kubectl: Kubectl, kubeconfig: Path, tmp_path: Path, kubelet: LocalKubelet
) -> None:
    own = kubectl.new_namespace("kubelet-cli", RESTRICTED)
    node, state, log = "cli-node", tmp_path / "state", tmp_path / "kubelet.log"
    command = [sys.executable, str(ROOT / "hack" / "local_kubelet.py"), "--node", node]
    command += ["--kubeconfig", str(kubeconfig), "--state-dir", str(state)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("the kubelet to be ready", lambda: "local kubelet ready" in log.read_text())
        kubelet.provide_claim(own, "work")
        pinned = {**SLEEPER_POD, "nodeSelector": {"kubernetes.io/hostname": node}}
        kubectl.apply(
            job_manifest("sleeper", SLEEPER, container=SLEEPER_CONTAINER, pod=pinned), "-n", own
        )
        _, pid = wait_running_pid(kubectl, own, "sleeper", state / "pvc" / own / "work")

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert not alive(pid)
        assert "local kubelet stopped" in log.read_text()
    finally:
        process.kill()
        process.wait()
        kubectl.run("delete", "node", node, "--wait=false")


# ------------------------------------------------------------- init containers ---


def init_container(name: str, script: str, **fields: Any) -> Obj:
    """An init container running ``python3 -c script``, valid under `restricted`."""
    return {
        "name": name,
        "image": "ghcr.io/kubetune/trainer:never-pulled",
        "command": ["python3", "-c", textwrap.dedent(script)],
        "securityContext": RESTRICTED_CONTAINER,
        **fields,
    }


def container_state(pod: Obj, which: str, position: int = 0) -> Obj:
    """The state in ``status.<which>`` (containerStatuses or initContainerStatuses)."""
    state: Obj = pod["status"][which][position]["state"]
    return state


def test_init_containers_run_in_order_and_fill_the_emptydir_the_main_container_reads(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    gate = kubelet.pvc_dir(namespace, "gates") / "fill.go"
    # The first init container waits for the test to open the gate, so that the status
    # of a Pod initializing can be looked at.
    first = """
        import os, time
        for _ in range(600):
            if os.path.exists("/gates/fill.go"):
                break
            time.sleep(0.1)
        else:
            raise SystemExit(7)
        open("/shared/greeting.txt", "w").write("hello from first")
        print("first done")
    """
    second = """
        text = open("greeting.txt").read()  # relative: workingDir is the emptyDir
        open("greeting.txt", "w").write(text + " and second")
        print("second done")
    """
    main = """
        text = open("/input/greeting.txt").read()
        try:
            open("/input/other.txt", "w")
            writable = "writable"
        except OSError:
            writable = "read-only"
        open("/dev/termination-log", "w").write(f"{text} ({writable})")
    """
    shared = {"name": "shared", "mountPath": "/shared"}
    pod = {
        "initContainers": [
            init_container(
                "first",
                first,
                volumeMounts=[shared, {"name": "gates", "mountPath": "/gates", "readOnly": True}],
            ),
            init_container("second", second, workingDir="/shared", volumeMounts=[shared]),
        ],
        "volumes": [
            {"name": "shared", "emptyDir": {}},
            {"name": "gates", "persistentVolumeClaim": {"claimName": "gates"}},
        ],
    }
    container = {
        "volumeMounts": [{"name": "shared", "mountPath": "/input", "readOnly": True}],
    }
    kubectl.apply(job_manifest("fill", main, container=container, pod=pod), "-n", namespace)

    def initializing() -> Obj | None:
        pods = pods_of(kubectl, namespace, "fill")
        inits = pods[0].get("status", {}).get("initContainerStatuses") if pods else None
        return pods[0] if inits and "running" in inits[0]["state"] else None

    pod_obj = wait_for("the first init container to run", initializing)
    assert pod_obj["status"]["phase"] == "Pending"
    assert container_state(pod_obj, "initContainerStatuses", 1)["waiting"]["reason"] == (
        "PodInitializing"
    )
    assert container_state(pod_obj, "containerStatuses")["waiting"]["reason"] == "PodInitializing"
    initialized = condition(pod_obj, "Initialized")
    assert initialized is not None
    assert (initialized["status"], initialized["reason"]) == ("False", "ContainersNotInitialized")
    assert initialized["message"] == "containers with incomplete status: [first second]"
    assert condition(pod_obj, "Ready")["status"] == "False"  # type: ignore[index]

    gate.write_text("")
    wait_condition(kubectl, namespace, "fill", "Complete")
    (pod_obj,) = pods_of(kubectl, namespace, "fill")
    assert pod_obj["status"]["phase"] == "Succeeded"
    terminated = container_state(pod_obj, "containerStatuses")["terminated"]
    assert (terminated["exitCode"], terminated["message"]) == (
        0,
        "hello from first and second (read-only)",
    )
    for position, name in enumerate(("first", "second")):
        status = pod_obj["status"]["initContainerStatuses"][position]
        assert (status["name"], status["ready"]) == (name, True)
        assert (
            status["state"]["terminated"]["exitCode"],
            status["state"]["terminated"]["reason"],
        ) == (
            0,
            "Completed",
        )
    # The second init container started once the first had finished.
    inits = [s["state"]["terminated"] for s in pod_obj["status"]["initContainerStatuses"]]
    assert inits[0]["finishedAt"] <= inits[1]["startedAt"] <= terminated["startedAt"]
    assert condition(pod_obj, "Initialized")["status"] == "True"  # type: ignore[index]
    pod_name = pod_obj["metadata"]["name"]
    assert "first done" in kubelet.log_path(namespace, pod_name, "first").read_text()
    assert "second done" in kubelet.log_path(namespace, pod_name, "second").read_text()
    assert "done" not in kubelet.log_path(namespace, pod_name).read_text()


def test_a_process_a_container_spawns_runs_under_a_mount_that_hides_the_state_dir(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    """vLLM's engine runs in a process it spawns, which enters its working folder and
    loads the bind shim again by path: an emptyDir over the state dir's top folder (/tmp, as
    vLLM's pods mount) must not hide them."""
    top = "/" + kubelet.state_dir.resolve().parts[1]
    main = """
        import os, subprocess, sys
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getcwd())"],
            cwd=os.getcwd(),
            capture_output=True,
            text=True,
        )
        same = child.stdout.strip() == os.getcwd()
        preloaded = "cannot be preloaded" not in child.stderr
        open("/dev/termination-log", "w").write(f"{child.returncode} {same} {preloaded}")
    """
    container = {"volumeMounts": [{"name": "scratch", "mountPath": top}]}
    pod = {"volumes": [{"name": "scratch", "emptyDir": {}}]}
    kubectl.apply(job_manifest("spawner", main, container=container, pod=pod), "-n", namespace)
    wait_condition(kubectl, namespace, "spawner", "Complete")
    (pod_obj,) = pods_of(kubectl, namespace, "spawner")
    assert container_state(pod_obj, "containerStatuses")["terminated"]["message"] == "0 True True"


def test_a_failing_init_container_fails_the_pod_before_the_main_container_runs(
    kubectl: Kubectl,
    namespace: str,
    kubelet: LocalKubelet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    marks = kubelet.pvc_dir(namespace, "marks")
    mark = """
        import os
        open(f"/marks/{os.environ['WHO']}", "w").write("ran")
    """
    fail = """
        import sys
        print("no such object: s3://bucket/train.jsonl", file=sys.stderr)
        sys.exit(4)
    """

    def marking(who: str) -> Obj:
        return {
            "env": [{"name": "WHO", "value": who}],
            "volumeMounts": [{"name": "marks", "mountPath": "/marks"}],
        }

    pod = {
        "initContainers": [
            init_container("before", mark, **marking("before")),
            init_container("fetch", fail, terminationMessagePolicy="FallbackToLogsOnError"),
            init_container("after", mark, **marking("after")),
        ],
        "volumes": [{"name": "marks", "persistentVolumeClaim": {"claimName": "marks"}}],
    }
    manifest = job_manifest("init-fails", mark, container=marking("main"), pod=pod)
    kubectl.apply(manifest, "-n", namespace)

    job = wait_condition(kubectl, namespace, "init-fails", "Failed")
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]
    assert job["status"]["failed"] == 1
    (pod_obj,) = pods_of(kubectl, namespace, "init-fails")
    assert pod_obj["status"]["phase"] == "Failed"
    before, fetch, after = (container_state(pod_obj, "initContainerStatuses", i) for i in range(3))
    assert before["terminated"]["exitCode"] == 0
    assert (fetch["terminated"]["exitCode"], fetch["terminated"]["reason"]) == (4, "Error")
    assert fetch["terminated"]["message"] == "no such object: s3://bucket/train.jsonl\n"
    assert after["waiting"]["reason"] == "PodInitializing"
    assert container_state(pod_obj, "containerStatuses") == {
        "waiting": {"reason": "PodInitializing"}
    }
    assert condition(pod_obj, "Initialized")["status"] == "False"  # type: ignore[index]
    assert sorted(p.name for p in marks.iterdir()) == ["before"]
    pod_name = pod_obj["metadata"]["name"]
    assert not kubelet.log_path(namespace, pod_name).exists()
    # Its status message is empty with the default policy: the kubelet's log has the end
    # of the container's log.
    assert f"{pod_name}: init container fetch failed" in caplog.text
    assert "no such object: s3://bucket/train.jsonl" in caplog.text


def test_an_init_container_gets_its_own_env_from_a_secret_once_the_secret_exists(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    report = """
        import json, os, sys
        names = ("AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL")
        report = {"env": {n: os.environ.get(n) for n in names}, "args": sys.argv[1:]}
        open("/dev/termination-log", "w").write(json.dumps(report))
    """
    fetch = init_container(
        "fetch",
        report,
        args=["--key", "$(AWS_ACCESS_KEY_ID)"],
        env=[
            {
                "name": "AWS_ACCESS_KEY_ID",
                "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}},
            },
            {"name": "AWS_ENDPOINT_URL", "value": "http://127.0.0.1:9000"},
        ],
    )
    manifest = job_manifest("init-env", report, pod={"initContainers": [fetch]})
    kubectl.apply(manifest, "-n", namespace)

    def waiting_init() -> Obj | None:
        pods = pods_of(kubectl, namespace, "init-env")
        inits = pods[0].get("status", {}).get("initContainerStatuses") if pods else None
        return pods[0] if inits and "waiting" in inits[0]["state"] else None

    pod_obj = wait_for("the init container to wait for its Secret", waiting_init)
    waiting = container_state(pod_obj, "initContainerStatuses")["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"
    assert "s3-creds" in waiting["message"]
    assert container_state(pod_obj, "containerStatuses")["waiting"]["reason"] == "PodInitializing"

    kubectl.apply_secret(namespace, "s3-creds", {"AWS_ACCESS_KEY_ID": "AKIDLOCAL"})
    wait_condition(kubectl, namespace, "init-env", "Complete")
    (pod_obj,) = pods_of(kubectl, namespace, "init-env")
    init_report = json.loads(
        container_state(pod_obj, "initContainerStatuses")["terminated"]["message"]
    )
    assert init_report == {
        "env": {"AWS_ACCESS_KEY_ID": "AKIDLOCAL", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
        "args": ["--key", "AKIDLOCAL"],
    }
    # The main container has its own environment, without the init container's.
    main_report = json.loads(container_state(pod_obj, "containerStatuses")["terminated"]["message"])
    assert main_report["env"] == {"AWS_ACCESS_KEY_ID": None, "AWS_ENDPOINT_URL": None}


# --------------------------------------------------------------- Indexed Jobs ---

INDEX_KEY = "batch.kubernetes.io/job-completion-index"


def indexed_job(name: str, script: str, **fields: Any) -> Obj:
    """An Indexed Job of ``completions`` Pods in subdomain ``name``, all at once, each
    running ``python3 -c script $(JOB_COMPLETION_INDEX)``."""
    container = {"args": ["$(JOB_COMPLETION_INDEX)"], **fields.pop("container", {})}
    completions = fields.pop("completions", 2)
    return job_manifest(
        name,
        script,
        container=container,
        pod={"subdomain": name, **fields.pop("pod", {})},
        completionMode="Indexed",
        completions=completions,
        parallelism=completions,
        **fields,
    )


def headless_service(kubectl: Kubectl, ns: str, name: str) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": name}},
    }
    kubectl.apply(service, "-n", ns)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Index 0 listens on 0.0.0.0; index 1 connects to <job>-0.<job> by name. Each resolves
# the names of the other index and writes what it saw into its termination message.
RENDEZVOUS = """
    import json, os, socket, sys, time
    index = int(os.environ["JOB_COMPLETION_INDEX"])
    assert sys.argv[1] == str(index), sys.argv
    job, ns, port = os.environ["JOB"], os.environ["NS"], int(os.environ["PORT"])
    other = f"{job}-{1 - index}"
    names = [f"{other}.{job}", f"{other}.{job}.{ns}.svc", f"{other}.{job}.{ns}.svc.cluster.local"]
    resolved = {n: socket.gethostbyname(n) for n in names}
    if index == 0:
        server = socket.create_server(("0.0.0.0", port))
        server.settimeout(60)
        conn, _ = server.accept()
        got = conn.recv(100).decode()
        conn.sendall(b"hello from 0")
    else:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection((f"{job}-0.{job}", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        conn.sendall(b"hello from 1")
        got = conn.recv(100).decode()
    conn.close()
    report = {"index": index, "got": got, "resolved": resolved,
              "hostname": os.environ["HOSTNAME"]}
    open("/dev/termination-log", "w").write(json.dumps(report))
"""


def test_indexed_job_pods_run_together_and_reach_each_other_by_name(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    name, port = "rdzv", free_port()
    headless_service(kubectl, namespace, name)
    env = [
        {"name": "JOB", "value": name},
        {"name": "NS", "value": namespace},
        {"name": "PORT", "value": str(port)},
    ]
    manifest = indexed_job(name, RENDEZVOUS, container={"env": env})
    kubectl.apply(manifest, "-n", namespace)

    job = wait_condition(kubectl, namespace, name, "Complete")
    status = job["status"]
    assert [c["type"] for c in status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    # The real controller writes two consecutive indexes as a list, not a range (the
    # executor that stood in for it wrote "0-1").
    assert status["completedIndexes"] == "0,1"
    assert status["succeeded"] == 2 and status.get("failed", 0) == 0
    assert status.get("active", 0) == 0

    pods = pods_of(kubectl, namespace, name)
    assert len(pods) == 2
    by_index = {int(p["metadata"]["annotations"][INDEX_KEY]): p for p in pods}
    assert sorted(by_index) == [0, 1]
    for index, pod in by_index.items():
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"][INDEX_KEY] == str(index)
        assert meta["name"].startswith(f"{name}-{index}-")
        assert (spec["hostname"], spec["subdomain"]) == (f"{name}-{index}", name)
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0, kubelet.log_path(namespace, meta["name"]).read_text()
        report = json.loads(terminated["message"])
        # The exchanged messages prove both processes ran at the same time.
        assert report["index"] == index and report["got"] == f"hello from {1 - index}"
        assert report["hostname"] == f"{name}-{index}"
        # Each resolves the other's names to the other's own address.
        other = by_index[1 - index]["status"]["podIP"]
        assert set(report["resolved"].values()) == {other} and other != pod["status"]["podIP"]
        assert len(report["resolved"]) == 3


def test_indexed_pod_resolves_every_index_name_of_its_job(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    script = """
        import os, socket
        job = os.environ["JOB"]
        names = [f"{job}-{i}.{job}" for i in range(3)]
        print(" ".join(socket.gethostbyname(n) for n in names), end="",
              file=open("/dev/termination-log", "w"))
    """
    env = [{"name": "JOB", "value": "names"}]
    kubectl.apply(
        indexed_job("names", script, completions=3, container={"env": env}), "-n", namespace
    )
    wait_condition(kubectl, namespace, "names", "Complete")
    for pod in pods_of(kubectl, namespace, "names"):
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        names = (fixed_pod_ip(namespace, "names", f"names-{i}") for i in range(3))
        assert terminated["message"] == " ".join(names)


def test_an_evicted_pod_ignored_by_the_policy_is_replaced_without_counting(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    script = """
        import os, sys, time
        if os.path.exists("/data/evicted-started"):
            sys.exit(0)
        open("/data/evicted-started", "w").close()
        open(f"/data/{os.environ['POD']}.pid", "w").write(str(os.getpid()))
        time.sleep(120)
    """
    ignore = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    manifest = job_manifest(
        "evicted",
        script,
        container=SLEEPER_CONTAINER,
        pod=SLEEPER_POD,
        podFailurePolicy={"rules": [ignore]},
    )
    # A finalizer of the test's own keeps the evicted Pod around to be looked at.
    manifest["spec"]["template"]["metadata"] = {"finalizers": ["kubetune.test/keep"]}
    kubectl.apply(manifest, "-n", namespace)
    pid_dir = kubelet.pvc_dir(namespace, "work")
    first, pid = wait_running_pid(kubectl, namespace, "evicted", pid_dir)

    kubectl.evict(namespace, first)
    job = wait_condition(kubectl, namespace, "evicted", "Complete")
    assert not alive(pid)
    assert job["status"]["succeeded"] == 1 and job["status"].get("failed", 0) == 0

    pods = {p["metadata"]["name"]: p for p in pods_of(kubectl, namespace, "evicted")}
    assert len(pods) == 2 and pods.pop(first)["status"]["phase"] == "Failed"
    (replacement,) = pods.values()
    assert replacement["status"]["phase"] == "Succeeded"
    evicted = kubectl.get("pod", first, "-n", namespace)
    disruption = next(c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "EvictionByEvictionAPI")
    terminated = evicted["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 128 + signal.SIGTERM
    assert evicted["metadata"]["finalizers"] == ["kubetune.test/keep"], "released by the Job"
    for name in (first, replacement["metadata"]["name"]):
        kubectl.run(
            "patch",
            "pod",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"metadata": {"finalizers": null}}',
        )


# ------------------------------------------------- long-running pods (Deployments) ---


def deployment(name: str, script: str, replicas: int = 1, **container: Any) -> Obj:
    """A Deployment whose pods run ``python3 -c script``, valid under `restricted`."""
    main = {
        "name": "main",
        "image": "ghcr.io/kubetune/server:never-pulled",
        "command": ["python3", "-c", textwrap.dedent(script)],
        "securityContext": RESTRICTED_CONTAINER,
        **container,
    }
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"securityContext": RESTRICTED_POD, "containers": [main]},
            },
        },
    }


def pods_labelled(kubectl: Kubectl, ns: str, app: str) -> list[Obj]:
    pods: list[Obj] = kubectl.get("pods", "-n", ns, "-l", f"app={app}")["items"]
    return pods


# Answers on :8000 of every interface, and /health only after a few seconds (as a
# model server does once its model has loaded).
SERVER = """
    import http.server, time
    started = time.monotonic()
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path != "/health" or time.monotonic() - started > 3
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(self.server.server_address[0].encode())
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""


def test_servers_on_one_port_each_get_their_pod_address_and_ready_follows_the_probe(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1}
    manifest = deployment(
        "web",
        SERVER,
        replicas=2,
        ports=[{"name": "http", "containerPort": 8000}],
        readinessProbe=probe,
    )
    kubectl.apply(manifest, "-n", namespace)

    def running_unready() -> list[Obj] | None:
        pods = pods_labelled(kubectl, namespace, "web")
        states = [p["status"].get("containerStatuses", [{}])[0] for p in pods]
        if len(pods) == 2 and all("running" in s.get("state", {}) for s in states):
            return pods if not any(s.get("ready") for s in states) else None
        return None

    wait_for("both servers to run, not ready yet", running_unready)

    def available() -> Obj | None:
        found: Obj = kubectl.get("deployment", "web", "-n", namespace)
        return found if found["status"].get("availableReplicas") == 2 else None

    wait_for("the Deployment to be available once the probes pass", available)
    addresses = set()
    for pod in pods_labelled(kubectl, namespace, "web"):
        ip = pod["status"]["podIP"]
        assert condition(pod, "Ready")["status"] == "True"  # type: ignore[index]
        # Both bound 0.0.0.0:8000; each answers on its own pod's address.
        with urllib.request.urlopen(f"http://{ip}:8000/", timeout=5) as answer:
            assert answer.read().decode() == ip
        addresses.add(ip)
    assert len(addresses) == 2
    kubectl.run("delete", "deployment", "web", "-n", namespace)


def test_a_container_that_exits_is_restarted_after_a_back_off(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    script = """
        import sys
        print("no model here", file=sys.stderr)
        sys.exit(3)
    """
    kubectl.apply(deployment("crash", script), "-n", namespace)

    def restarted() -> Obj | None:
        pods = pods_labelled(kubectl, namespace, "crash")
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return statuses[0] if statuses and statuses[0].get("restartCount", 0) >= 2 else None

    status = wait_for("two restarts", restarted, timeout=60)
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert status["lastState"]["terminated"]["exitCode"] == 3
    (pod,) = pods_labelled(kubectl, namespace, "crash")
    assert pod["status"]["phase"] == "Running", "a restarting pod is not failed"
    events = kubectl.get(
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={pod['metadata']['name']},reason=BackOff",
    )
    assert events["items"], "the kubelet says it backs off"
    kubectl.run("delete", "deployment", "crash", "-n", namespace)


def test_the_node_offers_its_gpus_and_a_pod_asking_for_more_is_unschedulable(
    kubectl: Kubectl, namespace: str, kubelet: LocalKubelet
) -> None:
    node = kubectl.get("node", NODE_NAME)
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    greedy = job_manifest(
        "greedy",
        "print('never runs')",
        container={"resources": {"limits": {"nvidia.com/gpu": "100"}}},
    )
    kubectl.apply(greedy, "-n", namespace)

    def unschedulable() -> Obj | None:
        pods = pods_of(kubectl, namespace, "greedy")
        return condition(pods[0], "PodScheduled") if pods else None

    scheduled = wait_for("the scheduler's verdict", unschedulable)
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]
    kubectl.run("delete", "job", "greedy", "-n", namespace)
