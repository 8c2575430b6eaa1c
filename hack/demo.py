"""`make demo`: a tiny VLM tuned end to end by kubetune on this machine's CPU.

Builds a tiny random-weight Qwen2.5-VL-style model and a synthetic colours x shapes
image dataset into the volumes the local kubelet maps, brings the stack up
(`hack/dev.sh up`), applies examples/demo/, prints the `kubectl get` table as it
changes, then the final status and where the tuned model is. Exits 0 when the
FineTuneJob Succeeded. `make dev-down` stops the stack afterwards.
"""

from __future__ import annotations

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

from local_kubelet import volume_claim  # noqa: E402
from tiny_models import tiny_model, write_shapes_dataset  # noqa: E402

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
    print("building the tiny VLM and the synthetic dataset ...", flush=True)
    model = tiny_model("qwen2_5_vl")
    target = volumes / "models" / "tiny-qwen2.5-vl"
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(target)], check=True)
    subprocess.run(["cp", "-r", str(model), str(target)], check=True)
    write_shapes_dataset(volumes / "datasets" / "shapes", 16, seed=1, name="train.jsonl")
    held_out = write_shapes_dataset(
        volumes / "datasets" / "shapes", 6, seed=2, name="held_out.jsonl"
    )

    print("starting the control plane, the local kubelet and the operator ...", flush=True)
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
    claims = [
        obj for c in ("models", "datasets") for obj in volume_claim(NAMESPACE, c, volumes / c)
    ]
    apply = ["kubectl", "--kubeconfig", kubeconfig, "apply", "-f", "-"]
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": claims})
    print(
        subprocess.run(apply, input=listing, capture_output=True, text=True, check=True).stdout,
        end="",
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
        table = k("get", "kds,ftj", "-n", NAMESPACE)
        # The AGE column changes every second; print only when something else does.
        shown = "\n".join(line.rsplit(None, 1)[0] for line in table.splitlines() if line.strip())
        if shown != last:
            print(f"\n[{time.strftime('%H:%M:%S')}]\n{table}", end="", flush=True)
            last = shown
        phase = (
            json.loads(k("get", "ftj", "shapes-demo", "-n", NAMESPACE, "-o", "json"))
            .get("status", {})
            .get("phase", "")
        )
        if phase in ("Succeeded", "Failed"):
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
    if phase == "Succeeded":
        print(f"\nthe tuned model is {status['outputModel']['uri']}, on this machine in {out}")
        report = out / "report.json"
        if report.is_file():
            print(f"its report: {report}")
        print("\nexact match on held-out images (`kubetune evaluate`), tuned and base model:")
        for model in (out, target):
            result = subprocess.run(
                [
                    str(Path(sys.executable).with_name("kubetune")),
                    "evaluate",
                    "--model",
                    str(model),
                    "--data",
                    str(held_out),
                    "--max-pixels",
                    "3136",
                    "--json",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            figures = json.loads(result.stdout) if result.returncode == 0 else {}
            accuracy = figures.get("accuracy")
            shown = (
                f"{accuracy:.0%}"
                if isinstance(accuracy, float)
                else f"unavailable ({result.stderr.strip()[-200:]})"
            )
            print(
                f"  {'tuned' if model == out else 'base '}: {shown} of {figures.get('examples', '?')} examples"
            )
        served = _served(k)
        if served:
            print(
                f"\nserved by ModelDeployment shapes-demo: {served.get('phase')}, "
                f"endpoint {served.get('endpoint')}, models {served.get('servedModels')}; "
                "no GPU or vLLM image here, so its pod is created but never runs"
            )
        print(
            f"stop the stack with `make dev-down`; meanwhile `export KUBECONFIG={kubeconfig}` and use kubectl"
        )
        return 0
    print(
        f"\nthe FineTuneJob did not succeed (phase {phase or 'unknown'}); logs: {STATE / 'logs'}",
        file=sys.stderr,
    )
    return 1


def _served(k: Callable[..., str]) -> dict[str, Any]:
    """The ModelDeployment's status once the operator has written it (a few seconds)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = json.loads(k("get", "mdep", "-n", NAMESPACE, "-o", "json"))["items"]
        status: dict[str, Any] = (found[0].get("status") or {}) if found else {}
        if status.get("phase"):
            return status
        time.sleep(1)
    return {}


if __name__ == "__main__":
    sys.exit(main())
