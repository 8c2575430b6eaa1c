"""What the end-to-end tests share: the manifests they apply, the storage they mount
and the waits on what the operator writes."""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kube import Kubectl
from operator_harness import Operator, restricted_kubeconfig, wait_for
from tiny_models import COLOURS, SHAPES, write_shapes_dataset
from training.support import with_rejected

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@contextmanager
def restricted_operator(
    kubectl: Kubectl, ns: str, folder: Path, env: dict[str, str] | None = None
) -> Iterator[Operator]:
    """The operator watching ``ns`` under the chart's RBAC, for as long as the block
    runs; ``env`` adds to its settings (the chart's platform defaults)."""
    config = restricted_kubeconfig(kubectl, ns, folder / "kubeconfig")
    op = Operator(config, [ns], folder / "operator.log", env=env or {}).start()
    try:
        yield op
    finally:
        op.stop()


def provide_storage(kubelet: Any, ns: str, model: Path) -> None:
    """The claims the manifests name: ``models`` with the tiny VLM at tiny-vlm, and
    ``datasets`` with a shapes dataset at shapes/train.jsonl, the same as preference
    pairs at shapes/preferences.jsonl, and a broken one at bad/train.jsonl."""
    models = kubelet.provide_claim(ns, "models")
    shutil.copytree(model, models / "tiny-vlm", dirs_exist_ok=True)
    data = kubelet.provide_claim(ns, "datasets")
    shapes = write_shapes_dataset(data / "shapes", 6, seed=3, name="train.jsonl")
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    with_rejected(shapes, data / "shapes" / "preferences.jsonl", classes, seed=3)
    bad = data / "bad"
    bad.mkdir(exist_ok=True)
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    (bad / "train.jsonl").write_text(
        "\n".join(
            [good, good, '{"messages": [{"role": "user", "content": "hi"}]}', "{not json", good]
        )
        + "\n"
    )


def dataset(name: str, path: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name},
        "spec": {
            "source": {"pvc": {"claimName": "datasets", "path": path}},
            "limits": {"minExamples": 3},
        },
    }


def finetunejob(name: str, data: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {
                "name": "tiny-vlm",
                "source": {"pvc": {"claimName": "models", "path": "tiny-vlm"}},
            },
            "tuning": "full",
            "dataset": {"name": data},
            "validation": {"split": 0.25},
            "hyperparameters": {
                "epochs": 4,
                "batchSize": 2,
                "learningRate": 0.002,
                "loggingSteps": 2,
                "maxPixels": 3136,
            },
            "outputModel": {
                "name": name,
                "storage": {"pvc": {"claimName": "models", "path": f"out/{name}"}},
            },
            "resources": {"gpus": 0},
            # Pre-flight and scoring take a pod per run each: the tests of them turn
            # them on.
            "preflight": {"enabled": False},
            "evaluation": {"enabled": False},
            **spec,
        },
    }


def modeldeployment(name: str, **spec: Any) -> dict[str, Any]:
    """A ModelDeployment of the tiny VLM on the `models` claim, on no GPU unless
    ``spec`` says otherwise."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {
                "name": "tiny-vlm",
                "source": {"pvc": {"claimName": "models", "path": "tiny-vlm"}},
            },
            "resources": {"gpus": 0},
            **spec,
        },
    }


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def status(kubectl: Kubectl, kind: str, ns: str, name: str) -> dict[str, Any]:
    st: dict[str, Any] = kubectl.get(kind, name, "-n", ns).get("status") or {}
    return st


def wait_phase(
    operator: Operator,
    kubectl: Kubectl,
    kind: str,
    ns: str,
    name: str,
    phases: tuple[str, ...],
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """The object's status once its phase is one of `phases`; the operator's log on a
    timeout."""
    st: dict[str, Any] = wait_for(
        lambda: phase_in(kubectl, kind, ns, name, phases), timeout, what, on_timeout=operator.tail
    )
    return st


def wait_gone(
    kubectl: Kubectl, what: str, *get_args: str, timeout: float = 60, on_timeout: Any = None
) -> None:
    """Wait until `kubectl get GET_ARGS` lists nothing."""
    wait_for(lambda: not kubectl.get(*get_args)["items"], timeout, what, on_timeout=on_timeout)


def wait_ready_reason(
    operator: Operator, kubectl: Kubectl, kind: str, ns: str, name: str, reason: str, what: str
) -> dict[str, Any]:
    """The object's status once its Ready condition's reason is `reason`."""

    def has_reason() -> dict[str, Any] | None:
        st = status(kubectl, kind, ns, name)
        return st if reason in {c.get("reason") for c in st.get("conditions") or []} else None

    st: dict[str, Any] = wait_for(has_reason, 60, what, on_timeout=operator.tail)
    return st


def phase_in(
    kubectl: Kubectl, kind: str, ns: str, name: str, phases: tuple[str, ...]
) -> dict[str, Any] | None:
    st = status(kubectl, kind, ns, name)
    return st if st.get("phase") in phases else None


def shape_image() -> str:
    """A red square as a data: URI, as the shapes dataset draws them."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (220, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(
    base_url: str, model: str, image: str, token: str = "", text: str = "?", max_tokens: int = 8
) -> dict[str, Any]:
    """One greedy chat completion with an image, through the OpenAI API."""
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    code, answer = post(f"{base_url}/chat/completions", body, token)
    assert code == 200, answer
    return answer


def post(url: str, body: dict[str, Any], token: str = "") -> tuple[int, dict[str, Any]]:
    """POST JSON: the status and the JSON answer, error or not."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
