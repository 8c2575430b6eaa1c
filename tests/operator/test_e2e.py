"""End to end: the real operator (under the chart's RBAC) and the real trainer against
the test API server, with Kubernetes' own controllers and scheduler, and the local
kubelet running the pods."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    RESTRICTED,
    chat,
    dataset,
    finetunejob,
    modeldeployment,
    provide_storage,
    restricted_operator,
    shape_image,
    status,
    wait_gone,
    wait_phase,
    wait_ready_reason,
)
from kstatus import kstatus
from kube import Kubectl
from operator_harness import Operator, wait_for
from tiny_models import COLOURS, SHAPES

from kubetune_trainer.contract.metrics import METRICS_PORT

pytestmark = [pytest.mark.apiserver, pytest.mark.training]


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("e2e", RESTRICTED)


@pytest.fixture(scope="module")
def state_dir(kubelet: Any) -> Path:
    state: Path = kubelet.state_dir
    return state


def pvc_dir(state_dir: Path, ns: str, claim: str) -> Path:
    return state_dir / "pvc" / ns / claim


@pytest.fixture(scope="module")
def storage(kubelet: Any, state_dir: Path, ns: str, tiny_qwen2_5_vl: Path) -> Path:
    """The PVCs the manifests name: a tiny VLM on `models`, a shapes dataset and a
    broken one on `datasets`."""
    provide_storage(kubelet, ns, tiny_qwen2_5_vl)
    return state_dir


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, ns: str, tmp_path_factory: pytest.TempPathFactory, storage: Path
) -> Iterator[Operator]:
    with restricted_operator(kubectl, ns, tmp_path_factory.mktemp("operator")) as op:
        yield op


# A run's phases in the order they move; a run never goes back (design.md's status
# contract, which kubectl wait, kstatus and Argo CD's health read by).
PHASE_ORDER = {"Pending": 0, "WaitingForDataset": 0, "Queued": 0, "Running": 1}


class StatusWatch:
    """Every status a FineTuneJob takes from now until stop(), from a watch: the window
    in which a run could go back (its pod ended, its Job not yet finished) lasts a
    moment, which polling misses."""

    def __init__(self, kubectl: Kubectl, ns: str, name: str) -> None:
        watch = ["get", "ftj", "-n", ns, "--field-selector", f"metadata.name={name}"]
        self.proc = subprocess.Popen(
            ["kubectl", "--kubeconfig", str(kubectl.kubeconfig), *watch, "--watch", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        # Read as it comes: kubectl blocks, mid-object, once the pipe's buffer is full.
        self.chunks: list[str] = []
        stdout = self.proc.stdout
        assert stdout is not None
        self.reader = threading.Thread(
            target=lambda: self.chunks.extend(iter(lambda: stdout.read(4096), "")), daemon=True
        )
        self.reader.start()

    def stop(self) -> list[dict[str, Any]]:
        time.sleep(1)  # the last write's event
        self.close()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        decoder, text, seen = json.JSONDecoder(), "".join(self.chunks).strip(), []
        while text:
            obj, end = decoder.raw_decode(text)
            seen.append(obj.get("status") or {})
            text = text[end:].strip()
        return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()


@pytest.fixture
def watch_status(kubectl: Kubectl, ns: str) -> Iterator[Callable[[str], StatusWatch]]:
    """Starts a StatusWatch of a FineTuneJob; each ends with the test, failed or not."""
    started: list[StatusWatch] = []

    def start(name: str) -> StatusWatch:
        started.append(StatusWatch(kubectl, ns, name))
        return started[-1]

    yield start
    for watch in started:
        watch.close()
        watch.proc.wait(timeout=10)


def assert_moved_forward(seen: list[dict[str, Any]], ending: str) -> None:
    """The phases only moved forward to ``ending``, and progress once counted was never
    reset."""
    phases = [st["phase"] for st in seen if st.get("phase")]
    assert phases and phases[-1] == ending, phases
    ranks = [PHASE_ORDER.get(phase, 2) for phase in phases]
    assert ranks == sorted(ranks), phases
    counted = [i for i, st in enumerate(seen) if (st.get("progress") or {}).get("totalSteps")]
    for st in seen[counted[0] :] if counted else []:
        assert (st.get("progress") or {}).get("totalSteps"), (phases, st.get("progress"))


def test_dataset_and_finetunejob_train_a_tiny_vlm(
    kubectl: Kubectl,
    ns: str,
    operator: Operator,
    state_dir: Path,
    watch_status: Callable[[str], StatusWatch],
) -> None:
    kubectl.apply(dataset("shapes", "shapes/train.jsonl"), "-n", ns)
    # Enough steps that the trainer runs for several scrape intervals.
    hyperparameters = {
        "epochs": 24,
        "batchSize": 2,
        "learningRate": 0.002,
        "loggingSteps": 4,
        "maxPixels": 3136,
    }
    run = finetunejob(
        "shapes",
        "shapes",
        tuning="lora",
        hyperparameters=hyperparameters,
        preflight={},
        evaluation={},
    )
    watch = watch_status("shapes")
    kubectl.apply(run, "-n", ns)
    ds = wait_phase(
        operator, kubectl, "kds", ns, "shapes", ("Ready", "Invalid", "Failed"), 120, "the Dataset"
    )
    assert ds["phase"] == "Ready", ds
    assert (ds["examples"], ds["images"]) == (36, 36) and len(ds["sha256"]) == 64
    assert kstatus(kubectl.get("kds", "shapes", "-n", ns))["status"] == "Current"
    seen_running: list[dict[str, Any]] = []
    running: list[dict[str, Any]] = []  # the whole objects, for kstatus

    def finished() -> dict[str, Any] | None:
        obj = kubectl.get("ftj", "shapes", "-n", ns)
        st: dict[str, Any] = obj.get("status") or {}
        if st.get("phase") == "Running" and (st.get("progress") or {}).get("step"):
            seen_running.append(st)
            running.append(obj)
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    final = wait_for(
        finished, 900, "the FineTuneJob to finish", interval=0.5, on_timeout=operator.tail
    )
    assert final["phase"] == "Succeeded", final
    assert_moved_forward(watch.stop(), "Succeeded")
    assert seen_running, "no progress was seen while the trainer ran"
    assert kstatus(running[0])["status"] == "InProgress"
    assert 0 < seen_running[0]["progress"]["percent"] <= 100
    assert "trainLoss" in seen_running[-1]["metrics"]
    assert final["metrics"]["trainLoss"] > 0 and final["metrics"]["evalLoss"] > 0
    assert final["outputModel"]["uri"] == "pvc://models/out/shapes"
    assert final["observedGeneration"] == 1
    ready = next(c for c in final["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert {c["type"] for c in final["conditions"]} == {"Ready"}  # kstatus: Current
    assert kstatus(kubectl.get("ftj", "shapes", "-n", ns))["status"] == "Current"
    kubectl.run("wait", "--for=condition=Ready", "ftj/shapes", "-n", ns, "--timeout=10s")
    out = pvc_dir(state_dir, ns, "models") / "out" / "shapes"
    assert (out / "report.json").is_file()
    # Counted before the GPU Job, on a CPU, as the trainer then trained: the 27
    # examples the split left, their steps and their learned tokens.
    preflight, report = final["preflight"], json.loads((out / "report.json").read_text())
    assert preflight["phase"] == "Succeeded", preflight
    assert preflight["examples"] == report["trainExamples"] == 27
    assert preflight["steps"] == report["totalSteps"]
    assert preflight["trainingTokens"] == report["trainedTokens"] > 0
    assert 1 <= preflight["longestExample"]["line"] <= 36
    checked = kubectl.get("job", preflight["jobName"], "-n", ns)
    trained = kubectl.get("job", final["jobName"], "-n", ns)
    assert checked["spec"]["template"]["spec"]["containers"][0]["args"][0] == "preflight"
    assert checked["status"]["completionTime"] <= trained["metadata"]["creationTimestamp"]
    # A PEFT adapter, as vLLM's --lora-modules loads it.
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    table = kubectl.run("get", "ftj", "shapes", "-n", ns).stdout.splitlines()[1].split()
    assert table[1:3] == ["Succeeded", "100"]
    assert str(preflight["trainingTokens"]) in table
    metrics = operator.metrics()
    assert 'kubetune_operator_objects{kind="FineTuneJob",phase="Succeeded"}' in metrics
    assert "kubetune_operator_reconcile_duration_seconds_count" in metrics
    # What the user applied is all that metadata holds: no kopf bookkeeping for Argo CD
    # to show as drift.
    for kind, name in (("ftj", "shapes"), ("kds", "shapes")):
        obj = kubectl.get(kind, name, "-n", ns)
        annotations = set(obj["metadata"].get("annotations") or {})
        assert annotations <= {"kubectl.kubernetes.io/last-applied-configuration"}, annotations
        assert not obj["metadata"].get("finalizers")

    # Scored against its base, by default, on the 9 examples the split held out.
    evaluation = wait_evaluated(operator, kubectl, ns, "shapes")
    assert evaluation["phase"] == "Succeeded", evaluation
    tuned, base = evaluation["tuned"], evaluation["base"]
    assert tuned["examples"] == base["examples"] == 9
    assert tuned["loss"] < base["loss"] and evaluation["klToBase"] > 0
    assert tuned["accuracy"] > base["accuracy"]
    sample = evaluation["samples"][0]
    assert sample["expected"] in {f"{c} {s}" for c in COLOURS for s in SHAPES}
    assert {"prompt", "base", "tuned"} <= set(sample)
    assert json.loads((out / "evaluation.json").read_text())["tuned"] == tuned
    table = kubectl.run("get", "ftj", "shapes", "-n", ns, "-o", "wide").stdout.splitlines()
    header, values = (re.split(r"\s{2,}", line.strip()) for line in table[:2])
    shown = dict(zip(header, values, strict=True))
    assert float(shown["SCORE"]) == pytest.approx(tuned["accuracy"])
    assert float(shown["BASE SCORE"]) == pytest.approx(base["accuracy"])
    scorer = kubectl.get("job", evaluation["jobName"], "-n", ns)
    assert scorer["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"


def wait_evaluated(operator: Operator, kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    def evaluated() -> dict[str, Any] | None:
        evaluation: dict[str, Any] = status(kubectl, "ftj", ns, name).get("evaluation") or {}
        return evaluation if evaluation.get("phase") in ("Succeeded", "Failed") else None

    found: dict[str, Any] = wait_for(
        evaluated, 300, f"{name}'s evaluation", interval=1, on_timeout=operator.tail
    )
    return found


def test_a_dpo_run_is_scored_by_preference_accuracy_against_its_base(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    prefs = dataset("prefs", "shapes/preferences.jsonl")
    prefs["spec"]["task"] = "dpo"
    kubectl.apply(prefs, "-n", ns)
    hyperparameters = {"epochs": 6, "batchSize": 8, "learningRate": 0.005, "maxPixels": 3136}
    run = finetunejob(
        "prefs",
        "prefs",
        method="dpo",
        tuning="lora",
        hyperparameters=hyperparameters,
        evaluation={"maxExamples": 6},
    )
    kubectl.apply(run, "-n", ns)
    final = wait_phase(
        operator, kubectl, "ftj", ns, "prefs", ("Succeeded", "Failed"), 600, "the DPO run"
    )
    assert final["phase"] == "Succeeded", final
    evaluation = wait_evaluated(operator, kubectl, ns, "prefs")
    assert evaluation["phase"] == "Succeeded", evaluation
    for model in ("tuned", "base"):
        figures = evaluation[model]
        assert figures["examples"] == 6
        assert 0 <= figures["preferenceAccuracy"] <= 1 and "rewardMargin" in figures
    assert evaluation["tuned"]["rewardMargin"] > evaluation["base"]["rewardMargin"]


class MetricsPod:
    """A trainer's /metrics on ``ip``:9090 (the port the training pod declares), played
    by the test: ``trickle`` sends headers and then a byte every 50 ms for ever."""

    def __init__(self, ip: str, trickle: bool = False) -> None:
        self.step = 3
        pod = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if trickle:
                    self.send_response(200)
                    self.send_header("Content-Length", "100000000")
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        while True:
                            self.wfile.write(b"#")
                            self.wfile.flush()
                            time.sleep(0.05)
                    return  # the reader gave up
                body = f"kubetune_train_step {pod.step}\nkubetune_train_total_steps 10\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((ip, METRICS_PORT), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_trainer_whose_metrics_trickle_holds_up_no_other_run(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    """Two runs whose training pods the test plays (they fit no node; their status is
    written as a kubelet would): one trainer's /metrics trickles for ever, the other's
    answers. The other run shows its progress within seconds, and each change of it at
    the resync period (2 s here), while the operator keeps reading the trickling one."""
    pods = {"trickle": MetricsPod("127.3.0.1", trickle=True), "honest": MetricsPod("127.3.0.2")}
    nowhere = {"gpus": 0, "nodeSelector": {"kubetune.io/test": "nowhere"}}
    try:
        for name in pods:
            kubectl.apply(finetunejob(name, "shapes", tuning="lora", resources=nowhere), "-n", ns)
        for name, metrics in pods.items():
            selector = f"batch.kubernetes.io/job-name={name}-train"
            (pod,) = wait_for(
                lambda selector=selector: (
                    kubectl.get("pods", "-n", ns, "-l", selector)["items"] or None
                ),
                60,
                f"{name}'s training pod",
                on_timeout=operator.tail,
            )
            running = {"phase": "Running", "podIP": metrics.server.server_address[0]}
            kubectl.run(
                *("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status"),
                *("--type=merge", "-p", json.dumps({"status": running})),
            )
        for step in (3, 6, 9):
            pods["honest"].step = step
            wait_for(
                lambda step=step: (
                    (status(kubectl, "ftj", ns, "honest").get("progress") or {}).get("step") == step
                    or None
                ),
                10,
                f"the honest run's progress to show step {step}",
                interval=0.2,
                on_timeout=operator.tail,
            )
        assert status(kubectl, "ftj", ns, "trickle")["phase"] == "Running"
        assert "progress" not in status(kubectl, "ftj", ns, "trickle")
    finally:
        kubectl.run("delete", "ftj", *pods, "-n", ns, "--wait=false")
        for metrics in pods.values():
            metrics.close()


def test_a_dataset_names_its_missing_configmap_at_once_and_goes_on_when_it_appears(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    late = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "late"},
        "spec": {
            "source": {"configMap": {"name": "late-data", "key": "train.jsonl"}},
            "limits": {"minExamples": 3},
        },
    }
    kubectl.apply(late, "-n", ns)
    waiting = wait_ready_reason(
        operator, kubectl, "kds", ns, "late", "ConfigMapNotFound", "the missing ConfigMap named"
    )
    assert waiting["phase"] == "Pending"
    assert (
        "ConfigMap 'late-data' (spec.source.configMap.name) does not exist" in (waiting["message"])
    )
    assert not kubectl.get("jobs", "-n", ns, "-l", "kubetune.io/dataset=late")["items"]
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"say {word}"},
                    {"role": "assistant", "content": word},
                ]
            }
        )
        for word in ("red", "green", "blue")
    ]
    data = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "late-data"},
        "data": {"train.jsonl": "".join(f"{line}\n" for line in lines)},
    }
    kubectl.apply(data, "-n", ns)
    ready = wait_phase(
        operator, kubectl, "kds", ns, "late", ("Ready", "Invalid", "Failed"), 120, "validation"
    )
    assert (ready["phase"], ready["examples"]) == ("Ready", 3), ready


def test_a_dataset_validated_with_raised_limits_trains_under_them(
    kubectl: Kubectl, ns: str, operator: Operator, state_dir: Path
) -> None:
    """70 images an example, under the Dataset's maxImagesPerExample of 100: the
    trainer read it with the default 64 before the limits travelled in job.json."""
    folder = pvc_dir(state_dir, ns, "datasets") / "many"
    folder.mkdir()
    (folder / "red.png").write_bytes(base64.b64decode(shape_image().split(",", 1)[1]))
    chat_line = {
        "messages": [
            {"role": "user", "content": "<image>" * 70 + "what colour?"},
            {"role": "assistant", "content": "red"},
        ],
        "images": ["red.png"] * 70,
    }
    (folder / "train.jsonl").write_text((json.dumps(chat_line) + "\n") * 4)
    many = dataset("many", "many/train.jsonl")
    many["spec"]["limits"]["maxImagesPerExample"] = 100
    kubectl.apply(many, "-n", ns)
    hyperparameters = {"epochs": 1, "batchSize": 2, "maxPixels": 3136}
    kubectl.apply(finetunejob("many", "many", hyperparameters=hyperparameters), "-n", ns)
    done = wait_phase(
        operator, kubectl, "ftj", ns, "many", ("Succeeded", "Failed"), 300, "70 images to train"
    )
    assert done["phase"] == "Succeeded", done


def test_a_dpo_run_on_a_dataset_validated_for_sft_fails_at_once(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    kubectl.apply(dataset("sft-only", "shapes/train.jsonl"), "-n", ns)
    kubectl.apply(finetunejob("mismatch", "sft-only", method="dpo"), "-n", ns)
    failed = wait_ready_reason(
        operator, kubectl, "ftj", ns, "mismatch", "DatasetTaskMismatch", "the mismatch"
    )
    assert failed["phase"] == "Failed"
    assert "training Dataset 'sft-only' is validated for task sft" in failed["message"]
    assert not kubectl.get("jobs", "-n", ns, "-l", "kubetune.io/finetunejob=mismatch")["items"]


def test_a_truncated_png_passes_a_header_check_and_fails_a_deep_one_on_its_line(
    kubectl: Kubectl, ns: str, operator: Operator, state_dir: Path
) -> None:
    folder = pvc_dir(state_dir, ns, "datasets") / "cut"
    folder.mkdir()
    whole = base64.b64decode(shape_image().split(",", 1)[1])
    (folder / "whole.png").write_bytes(whole)
    (folder / "cut.png").write_bytes(whole[: len(whole) * 2 // 3])
    lines = [
        {
            "messages": [
                {"role": "user", "content": "<image>what colour?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": [image],
        }
        for image in ("whole.png", "whole.png", "cut.png", "whole.png")
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name, deep in (("headers", False), ("deep", True)):
        checked = dataset(name, "cut/train.jsonl")
        checked["spec"]["deep"] = deep
        kubectl.apply(checked, "-n", ns)
    phases = ("Ready", "Invalid", "Failed")
    headers = wait_phase(operator, kubectl, "kds", ns, "headers", phases, 120, "headers")
    assert headers["phase"] == "Ready", headers
    deep = wait_phase(operator, kubectl, "kds", ns, "deep", phases, 120, "a deep validation")
    assert deep["phase"] == "Invalid", deep
    assert [e["line"] for e in deep["errors"]] == [3], deep["errors"]
    assert "cut.png" in deep["errors"][0]["message"]


def test_pods_are_created_by_the_job_controller_and_placed_by_the_scheduler(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    """The Job semantics the runs rely on are Kubernetes' own, not a stand-in's: the
    job controller made the training pod, and default-scheduler bound it to the node."""
    events = kubectl.get("events", "-n", ns)["items"]

    def by(reason: str, kind: str) -> set[str]:
        return {
            e.get("reportingComponent") or (e.get("source") or {}).get("component", "")
            for e in events
            if e["reason"] == reason and e["involvedObject"]["kind"] == kind
        }

    assert "job-controller" in by("SuccessfulCreate", "Job")
    assert "default-scheduler" in by("Scheduled", "Pod")
    assert "kubelet" in by("Started", "Pod")


def test_an_invalid_dataset_fails_the_job_with_line_numbers(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    kubectl.apply(dataset("bad", "bad/train.jsonl"), "-n", ns)
    kubectl.apply(finetunejob("bad", "bad"), "-n", ns)
    ds = wait_phase(
        operator, kubectl, "kds", ns, "bad", ("Ready", "Invalid", "Failed"), 120, "the Dataset"
    )
    assert ds["phase"] == "Invalid", ds
    lines = [e["line"] for e in ds["errors"]]
    assert lines == [3, 4], ds["errors"]
    assert ds["errorCount"] == 2
    ftj = wait_phase(
        operator, kubectl, "ftj", ns, "bad", ("Failed",), 60, "the FineTuneJob to fail"
    )
    ready = next(c for c in ftj["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "DatasetInvalid" and "line 3" in ftj["message"]
    # kstatus (Flux, `kubectl wait`) reads a failure, not work in progress.
    kubectl.run("wait", "--for=condition=Stalled", "ftj/bad", "kds/bad", "-n", ns, "--timeout=10s")
    for kind in ("kds", "ftj"):
        assert kstatus(kubectl.get(kind, "bad", "-n", ns))["status"] == "Failed"
    assert "Reconciling" not in {c["type"] for c in ftj["conditions"]}
    assert kubectl.get("jobs", "-n", ns, "-l", "kubetune.io/finetunejob=bad")["items"] == []
    events = kubectl.get("events", "-n", ns, "--field-selector", "involvedObject.name=bad")["items"]
    assert {e["reason"] for e in events} >= {"Invalid", "DatasetInvalid"}


def test_operator_restart_mid_training_makes_no_second_job(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    kubectl.apply(finetunejob("restart", "shapes"), "-n", ns)
    wait_phase(operator, kubectl, "ftj", ns, "restart", ("Running",), 120, "training to start")
    operator.kill()
    operator.start()
    final = wait_phase(
        operator, kubectl, "ftj", ns, "restart", ("Succeeded", "Failed"), 900, "the job to finish"
    )
    assert final["phase"] == "Succeeded", final
    jobs = kubectl.get("jobs", "-n", ns, "-l", "kubetune.io/finetunejob=restart")["items"]
    assert len(jobs) == 1


def test_queue_and_suspend_drive_the_job(kubectl: Kubectl, ns: str, operator: Operator) -> None:
    kubectl.apply(finetunejob("queued", "shapes", queueName="gpu-queue"), "-n", ns)
    queued = wait_phase(operator, kubectl, "ftj", ns, "queued", ("Queued",), 60, "Queued")
    assert "gpu-queue" in queued["message"]
    job = kubectl.get("job", "queued-train", "-n", ns)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    kubectl.run(
        "patch", "ftj", "queued", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": true}}'
    )
    wait_phase(operator, kubectl, "ftj", ns, "queued", ("Suspended",), 60, "Suspended")
    kubectl.run(
        "patch", "ftj", "queued", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": false}}'
    )
    wait_phase(operator, kubectl, "ftj", ns, "queued", ("Queued",), 60, "Queued again")
    # Kueue manages a queued Job and admits it by unsuspending it: whatever it writes
    # there, the operator never writes back (it would fight Kueue; test_kueue_e2e.py
    # runs the real Kueue). Three resync periods pass.
    kubectl.run(
        "patch",
        "job",
        "queued-train",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": false}}',
    )
    time.sleep(6)
    assert kubectl.get("job", "queued-train", "-n", ns)["spec"]["suspend"] is False
    kubectl.run("delete", "ftj", "queued", "-n", ns)


def test_deleting_a_finetunejob_removes_what_it_owned(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    kubectl.apply(finetunejob("doomed", "shapes", suspend=True), "-n", ns)
    wait_phase(operator, kubectl, "ftj", ns, "doomed", ("Suspended",), 60, "Suspended")
    assert kubectl.get("job", "doomed-train", "-n", ns)
    assert kubectl.get("configmap", "doomed-job", "-n", ns)
    kubectl.run("delete", "ftj", "doomed", "-n", ns, "--timeout=30s")
    wait_gone(
        kubectl,
        "garbage collection of the Job and ConfigMap",
        *("jobs,configmaps", "-n", ns, "-l", "kubetune.io/finetunejob=doomed"),
    )


def leftovers(kubectl: Kubectl, ns: str, owner: str, *children: dict[str, Any]) -> None:
    """Children as a deleted namesake leaves them until the garbage collector gets to
    them: here owned by a ConfigMap `owner`, which keeps them until the test deletes it."""
    kubectl.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": owner}}, "-n", ns)
    uid = kubectl.get("configmap", owner, "-n", ns)["metadata"]["uid"]
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": uid}
    for child in children:
        child["metadata"]["ownerReferences"] = [ref]
        kubectl.apply(child, "-n", ns)


def old_job(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "old", "image": "old", "command": ["true"]}],
                }
            },
        },
    }


def test_a_finetunejob_never_takes_over_a_deleted_namesakes_children(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    """A FineTuneJob deleted and applied again can find its predecessor's Job and
    ConfigMap still there: using them would train with the old settings."""
    labels = {"kubetune.io/finetunejob": "again"}
    leftovers(
        kubectl,
        ns,
        "old-ftj",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "again-job", "labels": labels},
            "data": {"job.json": "{}"},
        },
        old_job("again-train", labels),
    )
    kubectl.apply(finetunejob("again", "shapes", suspend=True), "-n", ns)
    waiting = wait_for(
        lambda: (st := status(kubectl, "ftj", ns, "again")).get("message") and st,
        60,
        "the FineTuneJob to report what it waits for",
        on_timeout=operator.tail,
    )
    assert waiting["phase"] == "Pending", waiting
    assert "ConfigMap again-job" in waiting["message"], waiting
    assert "jobName" not in waiting

    kubectl.run("delete", "configmap", "old-ftj", "-n", ns)
    wait_phase(
        operator,
        kubectl,
        "ftj",
        ns,
        "again",
        ("Suspended",),
        60,
        "the FineTuneJob to get its own Job once the old ones are gone",
    )
    uid = kubectl.get("ftj", "again", "-n", ns)["metadata"]["uid"]
    for kind, name in (("job", "again-train"), ("configmap", "again-job")):
        refs = kubectl.get(kind, name, "-n", ns)["metadata"]["ownerReferences"]
        assert [r["uid"] for r in refs] == [uid], (kind, refs)


def test_a_dataset_never_takes_a_deleted_namesakes_validation_result(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    leftovers(
        kubectl, ns, "old-ds", old_job("reborn-validate-1", {"kubetune.io/dataset": "reborn"})
    )
    kubectl.apply(dataset("reborn", "shapes/train.jsonl"), "-n", ns)
    time.sleep(3)  # more than a resync interval of the test operator
    assert not status(kubectl, "kds", ns, "reborn"), "status taken from the old Job"

    kubectl.run("delete", "configmap", "old-ds", "-n", ns)
    ready = wait_phase(
        operator,
        kubectl,
        "kds",
        ns,
        "reborn",
        ("Ready", "Invalid", "Failed"),
        120,
        "the Dataset validated by its own Job",
    )
    assert (ready["phase"], ready["examples"]) == ("Ready", 36), ready


def test_a_finetunejob_with_deploy_gets_a_vllm_server(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    hyperparameters = {"epochs": 2, "batchSize": 4, "learningRate": 0.002, "maxPixels": 3136}
    kubectl.apply(
        finetunejob(
            "served",
            "shapes",
            tuning="lora",
            hyperparameters=hyperparameters,
            deploy={"enabled": True},
        ),
        "-n",
        ns,
    )
    final = wait_phase(
        operator,
        kubectl,
        "ftj",
        ns,
        "served",
        ("Succeeded", "Failed"),
        300,
        "the FineTuneJob to finish",
    )
    assert final["phase"] == "Succeeded", final
    assert final["deployment"] == {"name": "served"}
    # The server pod runs vLLM's CPU build (the local kubelet's stand-in for its image)
    # and passed the namespace's restricted Pod Security.
    md = wait_phase(
        operator, kubectl, "mdep", ns, "served", ("Available", "Failed"), 600, "the server"
    )
    assert md["phase"] == "Available", md
    assert kstatus(kubectl.get("mdep", "served", "-n", ns))["status"] == "Current"
    assert md["endpoint"] == f"http://served.{ns}.svc:8000/v1"
    assert md["servedModels"] == ["tiny-vlm", "served"]
    deploy = kubectl.get("deployment", "served", "-n", ns)
    assert md["adapters"] == [{"name": "served", "loaded": 1, "replicas": 1}]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--lora-modules" not in args  # loaded by the operator, once the server runs
    (pod,) = kubectl.get("pods", "-n", ns, "-l", "kubetune.io/modeldeployment=served")["items"]
    assert pod["spec"]["containers"][0]["command"] == ["vllm", "serve"]
    assert kubectl.get("service", "served", "-n", ns)["spec"]["ports"][0]["port"] == 8000
    # The adapter answers a chat that carries an image, through the OpenAI API.
    answer = chat(f"http://{pod['status']['podIP']}:8000/v1", "served", shape_image())
    assert answer["model"] == "served" and answer["choices"][0]["message"]["content"]

    kubectl.run(
        "patch", "ftj", "served", "-n", ns, "--type=merge", "-p", '{"spec": {"deploy": null}}'
    )
    wait_gone(
        kubectl,
        "the ModelDeployment to go with deploy",
        *("mdep", "-n", ns, "--field-selector", "metadata.name=served"),
        on_timeout=operator.tail,
    )
    assert "deployment" not in status(kubectl, "ftj", ns, "served")

    # With its Job gone (a cleanup policy, a user), a finished run never trains again:
    # turning deploy back on only brings the server back.
    kubectl.run("delete", "job", "served-train", "-n", ns, "--cascade=background")
    wait_gone(
        kubectl,
        "the training Job to be deleted",
        *("jobs", "-n", ns, "--field-selector", "metadata.name=served-train"),
    )
    kubectl.run(
        "patch",
        "ftj",
        "served",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec": {"deploy": {"enabled": true}}}',
    )
    again = wait_for(
        lambda: (st := status(kubectl, "ftj", ns, "served")).get("deployment") and st,
        60,
        "the ModelDeployment to come back",
        on_timeout=operator.tail,
    )
    assert again["phase"] == "Succeeded" and again["observedGeneration"] == 3, again
    assert kubectl.get("mdep", "served", "-n", ns)
    assert not kubectl.get("jobs", "-n", ns, "-l", "kubetune.io/finetunejob=served")["items"]
    # A vLLM server left running would take the CPU the next tests train on.
    kubectl.run("delete", "ftj", "served", "-n", ns)
    wait_gone(
        kubectl,
        "the server pods to go with their FineTuneJob",
        *("pods", "-n", ns, "-l", "kubetune.io/modeldeployment=served"),
        on_timeout=operator.tail,
    )


def test_a_server_no_node_can_fit_says_why(kubectl: Kubectl, ns: str, operator: Operator) -> None:
    """More GPUs than any node has: the scheduler's verdict is the status message."""
    greedy = modeldeployment("greedy", resources={"gpus": 64})
    kubectl.apply(greedy, "-n", ns)
    st = wait_ready_reason(
        operator, kubectl, "mdep", ns, "greedy", "Unschedulable", "the scheduler's verdict"
    )
    assert st["phase"] == "Progressing"
    assert "Insufficient nvidia.com/gpu" in st["message"], st["message"]
    kubectl.run("delete", "mdep", "greedy", "-n", ns)


def put_chat_jsonl(s3_endpoint: str, bucket: str, key: str) -> None:
    """Four valid text-only chats at s3://BUCKET/KEY on the test's S3 server."""
    import boto3

    examples = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(4)
    ]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    body = "".join(json.dumps(e) + "\n" for e in examples).encode()
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def s3_dataset(name: str, uri: str, endpoint: str, secret: str) -> dict[str, Any]:
    manifest = dataset(name, "unused")
    manifest["spec"]["source"] = {
        "s3": {"uri": uri, "endpoint": endpoint, "secretRef": {"name": secret}}
    }
    return manifest


def test_a_dataset_on_s3_is_fetched_by_an_init_container_with_the_secrets_credentials(
    kubectl: Kubectl, ns: str, operator: Operator, s3_endpoint: str
) -> None:
    """The validation pod's init container runs `kubetune fetch` against the moto S3
    server. The local kubelet passes no AWS_* variable from the host (and HOME is an
    emptyDir), so the only credentials the fetch has are the Secret's."""
    put_chat_jsonl(s3_endpoint, "kubetune-data", "chat/train.jsonl")
    kubectl.apply_secret(
        ns,
        "s3-creds",
        {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        },
    )
    kubectl.apply(
        s3_dataset("s3-chat", "s3://kubetune-data/chat/train.jsonl", s3_endpoint, "s3-creds"),
        "-n",
        ns,
    )

    ds = wait_phase(
        operator,
        kubectl,
        "kds",
        ns,
        "s3-chat",
        ("Ready", "Invalid", "Failed"),
        120,
        "the Dataset on S3",
    )
    assert ds["phase"] == "Ready", ds
    assert (ds["examples"], ds["images"]) == (4, 0), ds
    (pod,) = kubectl.get("pods", "-n", ns, "-l", "kubetune.io/dataset=s3-chat")["items"]
    fetch, images = pod["status"]["initContainerStatuses"]
    assert (fetch["name"], images["name"]) == ("fetch-dataset", "images-dataset")
    assert fetch["state"]["terminated"]["exitCode"] == 0, fetch
    assert images["state"]["terminated"]["exitCode"] == 0, images
    env = {e["name"]: e for e in pod["spec"]["initContainers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"


def test_a_dataset_whose_fetch_fails_says_why(
    kubectl: Kubectl, ns: str, operator: Operator, s3_endpoint: str
) -> None:
    """A wrong key fails the fetch, and its error is the Dataset's message."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="kubetune-empty")
    kubectl.apply_secret(
        ns, "empty-creds", {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    )
    uri = "s3://kubetune-empty/nothing.jsonl"
    kubectl.apply(s3_dataset("no-such-key", uri, s3_endpoint, "empty-creds"), "-n", ns)
    missing_key = wait_phase(
        operator,
        kubectl,
        "kds",
        ns,
        "no-such-key",
        ("Ready", "Invalid", "Failed"),
        120,
        "the Dataset with a wrong key",
    )
    assert missing_key["phase"] == "Failed", missing_key
    assert "fetch-dataset exited with code" in missing_key["message"], missing_key
    assert uri in missing_key["message"], missing_key


def test_a_dataset_waits_for_a_secret_applied_after_it_and_fails_without_one(
    kubectl: Kubectl, ns: str, operator: Operator, s3_endpoint: str
) -> None:
    """Argo CD, or an external-secrets controller, may create a Secret after the
    Dataset that names it. Validation says at once what it waits for and starts once
    the Secret exists; a Secret that never comes fails the Dataset after the start
    grace (20 s for the test operator) and its validation Job is deleted."""
    put_chat_jsonl(s3_endpoint, "kubetune-late", "train.jsonl")
    uri = "s3://kubetune-late/train.jsonl"
    for name in ("late", "never"):
        kubectl.apply(s3_dataset(name, uri, s3_endpoint, f"{name}-creds"), "-n", ns)

    waiting = wait_ready_reason(
        operator, kubectl, "kds", ns, "late", "CreateContainerConfigError", "it says it waits"
    )
    assert waiting["phase"] == "Validating", waiting
    assert "late-creds" in waiting["message"], waiting
    kubectl.apply_secret(
        ns,
        "late-creds",
        {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"},
    )
    late = wait_phase(
        operator, kubectl, "kds", ns, "late", ("Ready", "Invalid", "Failed"), 120, "late"
    )
    assert late["phase"] == "Ready" and late["examples"] == 4, late

    never = wait_phase(
        operator, kubectl, "kds", ns, "never", ("Ready", "Invalid", "Failed"), 90, "never"
    )
    assert never["phase"] == "Failed", never
    assert "could not start" in never["message"] and "never-creds" in never["message"], never
    wait_gone(
        kubectl, "the stuck validation Job", "jobs", "-n", ns, "-l", "kubetune.io/dataset=never"
    )


def model_without_its_secret(name: str, secret: str) -> dict[str, Any]:
    """A FineTuneJob whose base model comes from S3 with a Secret that does not exist:
    its pod's fetch container never starts."""
    manifest = finetunejob(name, "shapes")
    manifest["spec"]["baseModel"]["source"] = {
        "s3": {"uri": "s3://models/tiny-vlm/", "secretRef": {"name": secret}}
    }
    return manifest


def test_a_run_whose_pod_cannot_start_fails_after_the_grace_and_frees_its_node(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    """A training pod that waits for a Secret that never comes holds its node's GPUs:
    the run says what it waits for, fails after the start grace (20 s here) with the
    kubelet's reason, and its Job and pod are deleted."""
    kubectl.apply(model_without_its_secret("no-creds", "absent-creds"), "-n", ns)
    pending = wait_ready_reason(
        operator, kubectl, "ftj", ns, "no-creds", "CreateContainerConfigError", "it says it waits"
    )
    assert pending["phase"] == "Pending" and "absent-creds" in pending["message"], pending
    failed = wait_phase(operator, kubectl, "ftj", ns, "no-creds", ("Failed",), 90, "Failed")
    assert "could not start" in failed["message"] and "absent-creds" in failed["message"], failed
    # Posted by whichever thread saw the grace run out: often the periodic resync,
    # outside kopf's handlers.
    events = kubectl.get("events", "-n", ns, "--field-selector", "involvedObject.name=no-creds")
    assert "CreateContainerConfigError" in {e["reason"] for e in events["items"]}, events
    wait_gone(
        kubectl,
        "the Job and pod of the run that could not start",
        *("jobs,pods", "-n", ns, "-l", "kubetune.io/finetunejob=no-creds"),
        on_timeout=operator.tail,
    )


def test_a_failed_runs_lingering_job_is_deleted_when_the_operator_starts(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    """The operator stopped between writing Failed for a run whose pod never started
    and deleting its Job: at its next start, the Job's event removes it."""
    kubectl.apply(model_without_its_secret("lingering", "absent-too"), "-n", ns)
    wait_phase(operator, kubectl, "ftj", ns, "lingering", ("Pending",), 60, "Pending")
    assert kubectl.get("job", "lingering-train", "-n", ns)
    operator.kill()
    failed = {"phase": "Failed", "observedGeneration": 1, "message": "the pod could not start"}
    kubectl.run(
        *("patch", "ftj", "lingering", "-n", ns, "--subresource=status", "--type=merge"),
        *("-p", json.dumps({"status": failed})),
    )
    operator.start()
    wait_gone(
        kubectl,
        "the lingering Job",
        *("jobs", "-n", ns, "-l", "kubetune.io/finetunejob=lingering"),
        on_timeout=operator.tail,
    )
    assert status(kubectl, "ftj", ns, "lingering")["phase"] == "Failed"


def test_a_run_that_cannot_succeed_as_written_is_not_retried(
    kubectl: Kubectl, ns: str, operator: Operator, watch_status: Callable[[str], StatusWatch]
) -> None:
    """No example of the dataset fits maxContextLength: the trainer exits 3, and the
    Job's podFailurePolicy fails it after that one pod instead of booking a GPU for
    three more tries."""
    hyperparameters = {"epochs": 1, "batchSize": 2, "maxContextLength": 16, "maxPixels": 3136}
    watch = watch_status("too-long")
    kubectl.apply(finetunejob("too-long", "shapes", hyperparameters=hyperparameters), "-n", ns)
    failed = wait_phase(operator, kubectl, "ftj", ns, "too-long", ("Failed",), 180, "Failed")
    assert_moved_forward(watch.stop(), "Failed")
    assert "maxContextLength=16" in failed["message"], failed
    job = kubectl.get("job", "too-long-train", "-n", ns)
    assert job["status"].get("failed") == 1, job["status"]
    reasons = {c.get("reason") for c in job["status"]["conditions"]}
    assert "PodFailurePolicy" in reasons, job["status"]


def test_a_preempted_training_pod_is_replaced_without_a_retry_and_resumes(
    kubectl: Kubectl,
    ns: str,
    operator: Operator,
    state_dir: Path,
    watch_status: Callable[[str], StatusWatch],
) -> None:
    """An eviction (a drain, a preemption) mid-training: the replacement pod resumes
    from the last epoch's checkpoint, and the Job does not count the evicted pod
    against its retries."""
    hyperparameters = {
        "epochs": 16,
        "batchSize": 2,
        "learningRate": 0.002,
        "loggingSteps": 4,
        "maxPixels": 3136,
    }
    watch = watch_status("evicted")
    kubectl.apply(finetunejob("evicted", "shapes", hyperparameters=hyperparameters), "-n", ns)

    def past_first_checkpoint() -> bool:
        progress = status(kubectl, "ftj", ns, "evicted").get("progress") or {}
        return float(progress.get("epoch") or 0) >= 2

    wait_for(past_first_checkpoint, 300, "two epochs", interval=0.2, on_timeout=operator.tail)
    (pod,) = kubectl.get("pods", "-n", ns, "-l", "kubetune.io/finetunejob=evicted")["items"]
    kubectl.evict(ns, pod["metadata"]["name"])
    final = wait_phase(
        operator, kubectl, "ftj", ns, "evicted", ("Succeeded", "Failed"), 600, "the run"
    )
    assert final["phase"] == "Succeeded", final
    # Waiting for its replacement pod, it stayed Running and kept its progress.
    assert_moved_forward(watch.stop(), "Succeeded")
    job = kubectl.get("job", "evicted-train", "-n", ns)
    assert not job["status"].get("failed"), job["status"]
    report = json.loads((pvc_dir(state_dir, ns, "models") / "out/evicted/report.json").read_text())
    assert report["resumedFrom"], report


def test_a_two_node_run_trains_data_parallel_across_its_pods(
    kubectl: Kubectl, ns: str, operator: Operator, state_dir: Path
) -> None:
    """nodes: 2 is an Indexed Job of two pods that torchrun joins into one
    data-parallel run (gloo on the CPU here), meeting at the first pod's DNS name."""
    hyperparameters = {"epochs": 2, "batchSize": 2, "learningRate": 0.002, "maxPixels": 3136}
    kubectl.apply(
        finetunejob(
            "pair", "shapes", hyperparameters=hyperparameters, resources={"gpus": 0, "nodes": 2}
        ),
        "-n",
        ns,
    )
    final = wait_phase(
        operator, kubectl, "ftj", ns, "pair", ("Succeeded", "Failed"), 300, "the two-node run"
    )
    assert final["phase"] == "Succeeded", final
    pods = kubectl.get("pods", "-n", ns, "-l", "batch.kubernetes.io/job-name=pair-train")["items"]
    indexes = sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    assert kubectl.get("service", "pair-train", "-n", ns)["spec"]["clusterIP"] == "None"
    report = json.loads(
        (pvc_dir(state_dir, ns, "models") / "out" / "pair" / "report.json").read_text()
    )
    # Each step took a batch on each of the two nodes.
    per_epoch = math.ceil(report["trainExamples"] / (2 * 2))
    assert report["steps"] == per_epoch * 2, report
