"""Serving benchmark: seconds from "FineTuneJob Succeeded" to "its adapter answers
through the OpenAI endpoint", for a run that attaches to a running shared server
(deploy.modelDeployment) against a run that starts a server of its own
(deploy.enabled alone), side by side in one run.

Both on a control plane of their own with the local kubelet (vLLM's CPU build serves)
and the operator, on the tiny VLM; the runs train one after the other, so that
neither server start competes with the other's training.

    .venv/bin/python bench/serving.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "hack")]

import controlplane  # noqa: E402
from e2e_support import (  # noqa: E402
    chat,
    dataset,
    finetunejob,
    modeldeployment,
    pod_ready,
    provide_storage,
    restricted_operator,
    shape_image,
    status,
)
from hack_scripts import NoGo  # noqa: E402
from kube import Kubectl  # noqa: E402
from local_kubelet import LocalKubelet  # noqa: E402
from operator_harness import wait_for  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

NS = "bench-serving"
HYPERPARAMETERS = {"epochs": 2, "batchSize": 4, "learningRate": 0.002, "maxPixels": 3136}
SHARED = modeldeployment("shared")


def answering_pod(kubectl: Kubectl, server: str, model: str) -> bool:
    """Whether a ready pod of the server answers a chat naming ``model``."""
    pods = kubectl.get("pods", "-n", NS, "-l", f"kubetune.io/modeldeployment={server}")["items"]
    for pod in filter(pod_ready, pods):
        try:
            chat(f"http://{pod['status']['podIP']}:8000/v1", model, shape_image())
            return True
        except (OSError, AssertionError):
            continue
    return False


def measure(kubectl: Kubectl, name: str, deploy: dict[str, Any], server: str) -> float:
    """Train ``name``; seconds from its completionTime to its adapter's first answer."""
    run = finetunejob(name, "shapes", tuning="lora", hyperparameters=HYPERPARAMETERS)
    run["spec"]["deploy"] = deploy
    kubectl.apply(run, "-n", NS)
    finished_phases = ("Succeeded", "Failed")
    done = wait_for(
        lambda: (st := status(kubectl, "ftj", NS, name)).get("phase") in finished_phases and st,
        900,
        f"{name} to finish",
        interval=0.2,
    )
    if done["phase"] != "Succeeded":
        raise SystemExit(f"{name} failed: {done.get('message')}")
    wait_for(lambda: answering_pod(kubectl, server, name), 900, f"{name} to answer")
    answered = datetime.now(UTC)
    finished = datetime.fromisoformat(done["completionTime"].replace("Z", "+00:00"))
    return (answered - finished).total_seconds()


def main() -> int:
    try:
        controlplane.build_binaries()
    except NoGo as exc:
        print(f"{exc}: run `make controlplane` first (see hack/README.md)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        plane = controlplane.start(work / "plane")
        kubelet = LocalKubelet(plane.kubeconfig, work / "kubelet", gpus=8)
        try:
            kubectl = Kubectl(plane.kubeconfig)
            kubectl.install_crds()
            plane.restart_controllers()
            kubectl.run("create", "namespace", NS)
            kubelet.start()
            provide_storage(kubelet, NS, tiny_model("qwen2_5_vl"))
            with restricted_operator(kubectl, NS, work) as _:
                kubectl.apply(dataset("shapes", "shapes/train.jsonl"), "-n", NS)
                kubectl.apply(SHARED, "-n", NS)
                print("starting the shared server (not timed: the platform runs it) ...")
                wait_for(
                    lambda: status(kubectl, "mdep", NS, "shared").get("phase") == "Available",
                    900,
                    "the shared server",
                )
                attach = measure(
                    kubectl, "attach", {"enabled": True, "modelDeployment": "shared"}, "shared"
                )
                own = measure(kubectl, "own", {"enabled": True}, "own")
        finally:
            kubelet.stop()
            plane.stop()
    print("\nseconds from FineTuneJob Succeeded to its adapter answering (vLLM CPU build)")
    print(f"{'attach to the running shared server':40} {attach:8.1f}")
    print(f"{'start a server of its own':40} {own:8.1f}")
    print(json.dumps({"attach_seconds": round(attach, 1), "own_server_seconds": round(own, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
