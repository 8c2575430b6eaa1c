"""End to end with Kueue (built from Go modules, hack/kueue.sh) sharing one GPU between
FineTuneJobs: runs wait their turn with Kueue's reason in status, the operator never
fights Kueue over a Job's suspend, and a user's suspend goes through the Workload.

Kueue here manages every Job of the test namespace, queue-name label or not
(manageJobsWithoutQueueName for the namespaces labelled so), as a platform that queues
all batch work does: validation Jobs get the Dataset's queue, or would wait for ever.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import controlplane
import kueue
import pytest
from e2e_support import RESTRICTED, dataset, finetunejob, provide_storage, status, wait_phase
from kube import Kubectl
from operator_harness import Operator, restricted_kubeconfig, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.training]

MANAGED = ("kubetune.io/test-kueue", "all-jobs")
QUEUE = "gpus"


@pytest.fixture(scope="module")
def kueue_manager(
    plane: controlplane.ControlPlane, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[kueue.Kueue]:
    kueue.require_binaries()
    started = kueue.start(
        plane.kubeconfig, tmp_path_factory.mktemp("kueue"), manage_all_in="=".join(MANAGED)
    )
    try:
        # Kueue's CRDs are new to the garbage collector: a restart makes it delete the
        # Workload of a deleted Job at once.
        plane.restart_controllers()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl, kueue_manager: kueue.Kueue) -> Iterator[str]:
    """A namespace whose every Job Kueue manages, with a LocalQueue on a ClusterQueue of
    one GPU; emptied while Kueue still runs (its objects carry Kueue's finalizers)."""
    name = kubectl.new_namespace("queued", {**RESTRICTED, MANAGED[0]: MANAGED[1]})
    flavor = f"gpu-{name}"
    quota = [
        {"name": "cpu", "nominalQuota": "16"},
        {"name": "memory", "nominalQuota": "64Gi"},
        {"name": "nvidia.com/gpu", "nominalQuota": "1"},
    ]
    for obj in (
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": flavor},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [{"name": flavor, "resources": quota}],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE, "namespace": name},
            "spec": {"clusterQueue": name},
        },
    ):
        kubectl.apply(obj)
    yield name
    for kind in ("ftj", "kds", "jobs"):
        kubectl.run("delete", kind, "--all", "-n", name, "--timeout=60s", check=False)
    kubectl.run(
        "wait",
        "--for=delete",
        "workloads.kueue.x-k8s.io",
        "--all",
        "-n",
        name,
        "--timeout=60s",
        check=False,
    )
    kubectl.run("delete", "localqueue", QUEUE, "-n", name, "--timeout=30s", check=False)
    kubectl.run("delete", "clusterqueue", name, "--timeout=30s", check=False)
    kubectl.run("delete", "resourceflavor", flavor, "--timeout=30s", check=False)
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl,
    kubelet: Any,
    ns: str,
    tiny_qwen2_5_vl: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    provide_storage(kubelet, ns, tiny_qwen2_5_vl)
    folder = tmp_path_factory.mktemp("operator")
    config = restricted_kubeconfig(kubectl, ns, folder / "kubeconfig")
    op = Operator(config, [ns], folder / "operator.log").start()
    yield op
    op.stop()


def queued_run(name: str, epochs: int) -> dict[str, Any]:
    run = finetunejob(name, "shapes", queueName=QUEUE, resources={"gpus": 1})
    run["spec"]["hyperparameters"]["epochs"] = epochs
    return run


@pytest.fixture(scope="module")
def shapes(kubectl: Kubectl, ns: str, operator: Operator) -> None:
    """The Dataset, validated by a Job in the queue: unqueued, Kueue would hold it."""
    data = dataset("shapes", "shapes/train.jsonl")
    data["spec"]["queueName"] = QUEUE
    kubectl.apply(data, "-n", ns)
    ready = wait_phase(
        operator, kubectl, "kds", ns, "shapes", ("Ready", "Invalid", "Failed"), 180, "validation"
    )
    assert ready["phase"] == "Ready", ready
    job = kubectl.get("job", ready["validationJob"], "-n", ns)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE


def test_one_gpu_runs_one_finetunejob_at_a_time_and_the_other_says_why_it_waits(
    kubectl: Kubectl, ns: str, operator: Operator, shapes: None
) -> None:
    for name in ("first", "second"):
        kubectl.apply(queued_run(name, epochs=4), "-n", ns)

    def one_runs_one_waits() -> tuple[str, dict[str, Any]] | None:
        phases = {n: status(kubectl, "ftj", ns, n) for n in ("first", "second")}
        running = [n for n, st in phases.items() if st.get("phase") == "Running"]
        queued = [st for st in phases.values() if st.get("phase") == "Queued"]
        waiting = [st for st in queued if "insufficient unused quota" in st.get("message", "")]
        return (running[0], waiting[0]) if running and waiting else None

    running, waiting = wait_for(
        one_runs_one_waits, 240, "one run to train while the other is queued", 0.3, operator.tail
    )
    assert waiting["message"].startswith(f"queued in '{QUEUE}'; "), waiting
    assert "nvidia.com/gpu" in waiting["message"], waiting
    for name in ("first", "second"):
        done = wait_phase(operator, kubectl, "ftj", ns, name, ("Succeeded", "Failed"), 300, name)
        assert done["phase"] == "Succeeded", (name, done)
    assert running in ("first", "second")


def suspend_changes(kubectl: Kubectl, ns: str, job: str, seconds: float) -> list[bool]:
    """Every value the Job's spec.suspend took over ``seconds``, from a watch (which
    sees each write, where polling could miss a write undone at once)."""
    watch = ["get", "job", job, "-n", ns, "--watch", "--output-watch-events", "-o", "json"]
    proc = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(kubectl.kubeconfig), *watch],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(seconds)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    decoder, values, text = json.JSONDecoder(), [], out.strip()
    while text:
        event, end = decoder.raw_decode(text)
        values.append(bool(event["object"]["spec"].get("suspend")))
        text = text[end:].strip()
    return values


def test_an_admitted_run_is_not_fought_over_and_suspends_through_its_workload(
    kubectl: Kubectl, ns: str, operator: Operator, shapes: None
) -> None:
    kubectl.apply(queued_run("long", epochs=500), "-n", ns)
    wait_phase(operator, kubectl, "ftj", ns, "long", ("Running",), 180, "the run to be admitted")
    # Over 30 s the operator's resync reconciles the run several times: a write of the
    # Job's suspend, which Kueue would undo, shows as a change of its value.
    values = suspend_changes(kubectl, ns, "long-train", 30)
    assert values and not any(values), values
    assert status(kubectl, "ftj", ns, "long")["phase"] == "Running"

    kubectl.run(
        "patch", "ftj", "long", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    suspended = wait_phase(operator, kubectl, "ftj", ns, "long", ("Suspended",), 120, "the suspend")
    workloads = kubectl.get("workloads.kueue.x-k8s.io", "-n", ns)["items"]
    mine = [w for w in workloads if w["metadata"]["ownerReferences"][0]["name"] == "long-train"]
    assert mine and mine[0]["spec"]["active"] is False, mine
    assert suspended["message"], suspended
    # Kueue suspended the Job, and it stays so: nothing unsuspends it again.
    held = suspend_changes(kubectl, ns, "long-train", 15)
    assert held and all(held), held

    kubectl.run(
        "patch", "ftj", "long", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    wait_phase(operator, kubectl, "ftj", ns, "long", ("Running",), 180, "the run to resume")
    kubectl.run("delete", "ftj", "long", "-n", ns)
