"""`make demo`: a tiny VLM tuned end to end by kubetune on this machine's CPU.

Brings the stack up (`hack/dev.sh up`, which builds a tiny random-weight
Qwen2.5-VL-style model and a synthetic colours x shapes image dataset into the volumes
the local kubelet maps: hack/example_storage.py), applies examples/demo/, prints the
`kubectl get` table as it changes, then the final status and where the tuned adapter is, its exact match on
held-out images beside the base model's (status.evaluation: the evaluation Job the
operator ran when the run succeeded, `kubetune evaluate`), and then the same through
the vLLM server the run deployed (base and adapter on one server, through the OpenAI
API) with one sample chat. Exits 0 when the FineTuneJob Succeeded and its server
answered. `make dev-down` stops the stack afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e_support import chat  # noqa: E402
from example_storage import BASE_MODEL  # noqa: E402

STATE = ROOT / ".cache" / "dev" / "state"
NAMESPACE = "default"
TIMEOUT = 900


def kubectl(*args: str, kubeconfig: str) -> str:
    proc = subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    volumes = STATE / "pvc" / NAMESPACE
    held_out = volumes / "datasets" / "shapes" / "held_out.jsonl"
    print(
        "starting the control plane, the local kubelet and the operator, and building the "
        "tiny VLM and the synthetic datasets (hack/example_storage.py) ...",
        flush=True,
    )
    up = subprocess.run(
        [str(ROOT / "hack" / "dev.sh"), "up"], capture_output=True, text=True, check=False
    )
    if up.returncode != 0:
        print(up.stderr, file=sys.stderr)
        return 1
    kubeconfig = up.stdout.strip().splitlines()[-1].removeprefix("export KUBECONFIG=")
    k = lambda *a: kubectl(*a, kubeconfig=kubeconfig)  # noqa: E731
    subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            kubeconfig,
            "delete",
            "-n",
            NAMESPACE,
            "-f",
            str(ROOT / "examples" / "demo"),
            "--ignore-not-found",
            "--wait=true",
        ],
        capture_output=True,
        check=False,
    )
    print(k("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "demo")), end="")

    last = ""
    deadline = time.monotonic() + TIMEOUT
    phase = ""
    operator_pid = int((STATE.parent / "operator.pid").read_text())
    while time.monotonic() < deadline:
        try:
            os.kill(operator_pid, 0)
        except OSError:
            print(f"the operator stopped; see {STATE.parent / 'operator.log'}", file=sys.stderr)
            return 1
        # Read before the table, so that the table printed last shows the end.
        current = json.loads(k("get", "ftj", "shapes-demo", "-n", NAMESPACE, "-o", "json"))
        table = k("get", "kds,ftj", "-n", NAMESPACE)
        # The AGE column changes every second; print only when something else does.
        shown = "\n".join(line.rsplit(None, 1)[0] for line in table.splitlines() if line.strip())
        if shown != last:
            print(f"\n[{time.strftime('%H:%M:%S')}]\n{table}", end="", flush=True)
            last = shown
        phase = current.get("status", {}).get("phase", "")
        scoring = (current.get("status", {}).get("evaluation") or {}).get("phase")
        if phase == "Failed" or (phase == "Succeeded" and scoring != "Running"):
            break
        time.sleep(2)
    status = json.loads(k("get", "ftj", "shapes-demo", "-n", NAMESPACE, "-o", "json"))["status"]
    print("\nfinal status:")
    print(
        json.dumps(
            {
                key: status.get(key)
                for key in ("phase", "message", "metrics", "progress", "outputModel", "deployment")
            },
            indent=2,
        )
    )
    out = volumes / "models" / "shapes-demo"
    if phase != "Succeeded":
        print(
            f"\nthe FineTuneJob did not succeed (phase {phase or 'unknown'}); logs: {STATE / 'logs'}",
            file=sys.stderr,
        )
        return 1
    print(f"\nthe tuned adapter is {status['outputModel']['uri']}, on this machine in {out}")
    report = out / "report.json"
    if report.is_file():
        print(f"its report: {report}")
    evaluation = status.get("evaluation") or {}
    print(
        "\nexact match on held-out images, scored by the operator's evaluation Job "
        f"(`kubetune evaluate`, {evaluation.get('jobName')}), tuned and base model:"
    )
    if evaluation.get("phase") != "Succeeded":
        print(f"  unavailable: {evaluation}")
    for who in ("tuned", "base"):
        figures = evaluation.get(who) or {}
        if figures:
            print(
                f"  {who:5}: {figures['accuracy']:.0%} of {figures['examples']} examples, "
                f"loss {figures['loss']:.3f}"
            )

    print("\nwaiting for vLLM to serve the base model and the adapter (1 to 3 minutes) ...")
    served = _served(k)
    if served.get("phase") != "Available":
        print(f"the ModelDeployment is not available: {served}", file=sys.stderr)
        return 1
    url = subprocess.run(
        [str(ROOT / "hack" / "dev.sh"), "endpoint", "shapes-demo", "-n", NAMESPACE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(
        f"served by ModelDeployment shapes-demo at {served['endpoint']} (from this machine: "
        f"{url}), models {served['servedModels']}"
    )
    examples = [json.loads(line) for line in held_out.read_text().splitlines() if line.strip()]
    print("exact match on the same held-out images, through vLLM's OpenAI API:")
    for who, model in (("tuned", "shapes-demo"), ("base", BASE_MODEL)):
        answers = [answer(url, model, held_out.parent, e) for e in examples]
        right = sum(a.strip() == reply(e).strip() for a, e in zip(answers, examples, strict=True))
        print(f"  {who:5}: {right / len(examples):.0%} of {len(examples)} examples")
    sample = examples[0]
    print(
        f"\na chat: the image {held_out.parent / sample['images'][0]}, the question "
        f"{question(sample)!r}, the expected answer {reply(sample)!r}"
    )
    for who, model in (("base", BASE_MODEL), ("tuned", "shapes-demo")):
        print(f"  {who:5} model answers: {answer(url, model, held_out.parent, sample)!r}")
    print(
        f"\nstop the stack with `make dev-down`; meanwhile `export KUBECONFIG={kubeconfig}` and "
        f"use kubectl, or any OpenAI client at {url}"
    )
    return 0


def question(example: dict[str, Any]) -> str:
    return str(example["messages"][0]["content"]).replace("<image>", "")


def reply(example: dict[str, Any]) -> str:
    return str(example["messages"][-1]["content"])


def answer(url: str, model: str, folder: Path, example: dict[str, Any]) -> str:
    """The greedy answer to the example's question about its image, as an OpenAI client
    asks (the image embedded as a data: URI)."""
    image = base64.b64encode((folder / example["images"][0]).read_bytes()).decode()
    response = chat(
        url, model, f"data:image/png;base64,{image}", text=question(example), max_tokens=16
    )
    return str(response["choices"][0]["message"]["content"])


def _served(k: Callable[..., str]) -> dict[str, Any]:
    """The ModelDeployment's status once it is Available or Failed, or as it is when
    vLLM has had 10 minutes to start."""
    deadline = time.monotonic() + 600
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        # By name: the examples' server may share the namespace.
        found = json.loads(
            k(
                "get",
                "mdep",
                "-n",
                NAMESPACE,
                "--field-selector",
                "metadata.name=shapes-demo",
                "-o",
                "json",
            )
        )["items"]
        status = (found[0].get("status") or {}) if found else {}
        if status.get("phase") in ("Available", "Failed"):
            break
        time.sleep(2)
    return status


if __name__ == "__main__":
    sys.exit(main())
