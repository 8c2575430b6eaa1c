"""End to end, serving: one shared vLLM server (vLLM's CPU build, run by the local
kubelet) whose adapters come and go while it serves, loaded by the operator (under
the chart's RBAC) through the guarded admin routes. The tests run in order on the
one server the module starts."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus
import pytest
from e2e_support import (
    RESTRICTED,
    chat,
    dataset,
    finetunejob,
    modeldeployment,
    pod_ready,
    post,
    provide_storage,
    restricted_operator,
    shape_image,
    status,
    wait_phase,
)
from kube import Kubectl
from monitoring.dashboard_queries import RATE_INTERVAL, panel_queries, panels_by_row
from operator_harness import Operator, wait_for

pytestmark = [pytest.mark.apiserver, pytest.mark.training]

SERVER = "shared"
DASHBOARD = Path(__file__).resolve().parents[2] / "charts/kubetune/files/grafana-dashboard.json"
SELECTOR = f"kubetune.io/modeldeployment={SERVER}"
HYPERPARAMETERS = {"epochs": 2, "batchSize": 4, "learningRate": 0.002, "maxPixels": 3136}


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("serve", RESTRICTED)


@pytest.fixture(scope="module")
def models(kubelet: Any, ns: str, tiny_qwen2_5_vl: Path) -> Path:
    provide_storage(kubelet, ns, tiny_qwen2_5_vl)
    folder: Path = kubelet.pvc_dir(ns, "models")
    return folder


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl, ns: str, tmp_path_factory: pytest.TempPathFactory, models: Path
) -> Iterator[Operator]:
    with restricted_operator(kubectl, ns, tmp_path_factory.mktemp("operator")) as op:
        yield op


def shared_server(adapters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The platform's server for the tiny VLM, which runs attach to."""
    return modeldeployment(SERVER, adapters=adapters or [])


def attached_run(name: str) -> dict[str, Any]:
    return finetunejob(
        name,
        "shapes",
        tuning="lora",
        hyperparameters=HYPERPARAMETERS,
        deploy={"enabled": True, "modelDeployment": SERVER},
    )


def server_pods(kubectl: Kubectl, ns: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = kubectl.get("pods", "-n", ns, "-l", SELECTOR)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def replacement(
    kubectl: Kubectl, ns: str, operator: Operator, old: dict[str, Any], what: str
) -> dict[str, Any]:
    """The ready server pod that took the place of ``old``."""
    pod: dict[str, Any] = wait_for(
        lambda: next(
            (
                p
                for p in server_pods(kubectl, ns)
                if p["metadata"]["uid"] != old["metadata"]["uid"] and pod_ready(p)
            ),
            None,
        ),
        600,
        what,
        on_timeout=operator.tail,
    )
    return pod


def url(pod: dict[str, Any]) -> str:
    return f"http://{pod['status']['podIP']}:8000"


def adapter_state(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any] | None:
    adapters = status(kubectl, "mdep", ns, SERVER).get("adapters") or []
    return next((a for a in adapters if a["name"] == name), None)


def wait_adapter(
    operator: Operator, kubectl: Kubectl, ns: str, name: str, want: Any, what: str
) -> dict[str, Any]:
    state: dict[str, Any] = wait_for(
        lambda: (s := adapter_state(kubectl, ns, name)) is not None and want(s) and s,
        120,
        what,
        on_timeout=operator.tail,
    )
    return state


def served_everywhere(state: dict[str, Any]) -> bool:
    return bool(state["replicas"] >= 1 and state["loaded"] == state["replicas"])


def answers(pod: dict[str, Any], model: str) -> None:
    answer = chat(url(pod) + "/v1", model, shape_image())
    assert answer["model"] == model and answer["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def first_pod(kubectl: Kubectl, ns: str, operator: Operator) -> dict[str, Any]:
    """The shared server, Available, with run `alpha`'s adapter attached: the server
    starts while alpha trains."""
    kubectl.apply(dataset("shapes", "shapes/train.jsonl"), "-n", ns)
    kubectl.apply(shared_server(), "-n", ns)
    kubectl.apply(attached_run("alpha"), "-n", ns)
    done = wait_phase(
        operator, kubectl, "ftj", ns, "alpha", ("Succeeded", "Failed"), 400, "alpha to train"
    )
    assert done["phase"] == "Succeeded", done
    assert done["deployment"] == {"name": SERVER}
    md = wait_phase(
        operator, kubectl, "mdep", ns, SERVER, ("Available", "Failed"), 600, "the server"
    )
    assert md["phase"] == "Available", md
    wait_adapter(operator, kubectl, ns, "alpha", served_everywhere, "alpha to be loaded")
    (pod,) = server_pods(kubectl, ns)
    assert pod_ready(pod)
    return pod


def test_a_run_that_attaches_is_served_by_the_shared_server(
    kubectl: Kubectl, ns: str, first_pod: dict[str, Any]
) -> None:
    md = status(kubectl, "mdep", ns, SERVER)
    assert md["servedModels"] == ["tiny-vlm", "alpha"]
    assert md["adapters"] == [{"name": "alpha", "loaded": 1, "replicas": 1}]
    # No server of its own.
    assert not kubectl.get("mdep", "-n", ns, "--field-selector", "metadata.name=alpha")["items"]
    # The pod took requests only once its adapters were in (its readiness gate).
    gate = {c["type"]: c["status"] for c in first_pod["status"]["conditions"]}
    assert gate["kubetune.io/adapters-loaded"] == "True"
    answers(first_pod, "alpha")
    answers(first_pod, "tiny-vlm")


def test_the_dashboards_serving_row_is_answered_by_prometheus_scraping_the_server(
    ns: str, first_pod: dict[str, Any], tmp_path: Path
) -> None:
    """Prometheus scrapes the real server's /metrics (open through the guard) with the
    labels the chart's servers PodMonitor gives, and every query of the dashboard's
    serving row, for this namespace, returns data: requests running and waiting, time
    to first token, KV-cache usage and the adapters in the running batch."""
    dashboard = json.loads(DASHBOARD.read_text())
    (serving,) = [row for title, row in panels_by_row(dashboard).items() if "vLLM" in title]
    labels = {"cluster": "test", "namespace": ns, "modeldeployment": SERVER}
    address = url(first_pod).removeprefix("http://")
    with prometheus.start(tmp_path, {"servers": False}) as prom:
        start = time.time()
        prom.scrape("servers", [(address, {**labels, "pod": first_pod["metadata"]["name"]})])
        wait_for(lambda: prom.query('up{job="servers"} == 1'), 30, "the server's first scrape")
        # Requests between scrapes, so that rate() over the time to first token sees
        # them arrive; one names the adapter, whose name the batch then shows.
        for model in ("alpha", "tiny-vlm", "alpha"):
            answers(first_pod, model)
            time.sleep(1.5)
        wait_for(
            lambda: prom.query("vllm:time_to_first_token_seconds_count > 2"),
            30,
            "Prometheus to scrape the answered requests",
        )
        time.sleep(3)
        variables = {"cluster": "test", "namespace": ns, "finetunejob": ""}
        queries = panel_queries({**dashboard, "panels": serving}, variables, RATE_INTERVAL)
        assert len(queries) >= 4, queries
        for title, expr in queries:
            series = prom.query_range(expr, start, time.time())
            assert prometheus.answered(series), f"panel {title!r}: {expr} -> {series}"


def test_a_second_run_joins_without_a_new_pod_and_both_answer(
    kubectl: Kubectl, ns: str, operator: Operator, first_pod: dict[str, Any]
) -> None:
    kubectl.apply(attached_run("beta"), "-n", ns)
    done = wait_phase(
        operator, kubectl, "ftj", ns, "beta", ("Succeeded", "Failed"), 400, "beta to train"
    )
    assert done["phase"] == "Succeeded", done
    wait_adapter(operator, kubectl, ns, "beta", served_everywhere, "beta to be loaded")
    (pod,) = server_pods(kubectl, ns)
    assert pod["metadata"]["uid"] == first_pod["metadata"]["uid"]
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    answers(pod, "alpha")
    answers(pod, "beta")


def test_nobody_but_the_operator_loads_or_unloads_adapters(
    kubectl: Kubectl, ns: str, models: Path, first_pod: dict[str, Any]
) -> None:
    base = url(first_pod)
    outside = {"lora_name": "evil", "lora_path": "/etc"}
    for token in ("", "guess"):
        assert post(base + "/v1/load_lora_adapter", outside, token)[0] == 403
        assert post(base + "/v1/unload_lora_adapter", {"lora_name": "alpha"}, token)[0] == 403
        assert post(base + "/adapters", {"name": "evil", "src": "/etc"}, token)[0] == 403
    answers(first_pod, "alpha")
    code, listed = _models(base)
    assert code == 200 and "evil" not in {m["id"] for m in listed["data"]}


def _models(base: str) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as response:
        return response.status, json.loads(response.read())


def test_an_adapter_the_server_refuses_is_reported_and_the_others_keep_serving(
    kubectl: Kubectl, ns: str, operator: Operator, models: Path, first_pod: dict[str, Any]
) -> None:
    """An adapter of rank 128, above the server's maxLoraRank (64): vLLM refuses it."""
    wide = models / "adapters" / "wide"
    _lora_adapter(models / "tiny-vlm", models / "out" / "alpha", wide, rank=128)
    source = {"pvc": {"claimName": "models", "path": "adapters/wide"}}
    kubectl.apply(shared_server([{"name": "wide", "source": source}]), "-n", ns)
    state = wait_adapter(
        operator, kubectl, ns, "wide", lambda s: s.get("reason") == "LoadFailed", "wide refused"
    )
    assert "128" in state["message"], state
    md = status(kubectl, "mdep", ns, SERVER)
    assert md["phase"] == "Available" and "wide: LoadFailed" in md["message"], md
    (pod,) = server_pods(kubectl, ns)
    assert pod["metadata"]["uid"] == first_pod["metadata"]["uid"]
    answers(pod, "alpha")
    answers(pod, "beta")


def _lora_adapter(base: Path, like: Path, out: Path, rank: int) -> None:
    """A LoRA adapter of ``rank`` on the layers the trainer's adapter ``like`` targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    targets = json.loads((like / "adapter_config.json").read_text())["target_modules"]
    model = AutoModelForImageTextToText.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)


def test_a_replacement_server_pod_takes_requests_only_with_every_adapter(
    kubectl: Kubectl, ns: str, operator: Operator, first_pod: dict[str, Any]
) -> None:
    kubectl.run("delete", "pod", first_pod["metadata"]["name"], "-n", ns, "--wait=false")
    pod = replacement(kubectl, ns, operator, first_pod, "a replacement server pod to be ready")
    answers(pod, "alpha")
    answers(pod, "beta")
    for name in ("alpha", "beta"):
        wait_adapter(operator, kubectl, ns, name, served_everywhere, f"{name} reloaded")
    wide = wait_adapter(
        operator, kubectl, ns, "wide", lambda s: s.get("reason") == "LoadFailed", "wide refused"
    )
    assert wide["replicas"] == 1


def test_a_run_that_detaches_is_unloaded_and_asking_for_it_is_a_404(
    kubectl: Kubectl, ns: str, operator: Operator, first_pod: dict[str, Any]
) -> None:
    (serving,) = server_pods(kubectl, ns)
    kubectl.run("delete", "ftj", "beta", "-n", ns)
    wait_for(
        lambda: (
            adapter_state(kubectl, ns, "beta") is None
            and "beta" not in status(kubectl, "mdep", ns, SERVER)["servedModels"]
        ),
        60,
        "beta to leave the server",
        on_timeout=operator.tail,
    )
    (pod,) = server_pods(kubectl, ns)
    assert pod["metadata"]["uid"] == serving["metadata"]["uid"]
    body = {"model": "beta", "messages": [{"role": "user", "content": "?"}], "max_tokens": 2}
    code, answer = post(url(pod) + "/v1/chat/completions", body)
    assert code == 404, answer
    answers(pod, "alpha")


def test_with_an_api_key_every_client_route_needs_it_and_the_operator_still_loads(
    kubectl: Kubectl, ns: str, operator: Operator
) -> None:
    """Last: the key changes the pod template, so the server rolls to a new pod."""
    (before,) = server_pods(kubectl, ns)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "team-key"},
        "stringData": {"apiKey": "sk-team"},
    }
    kubectl.apply(secret, "-n", ns)
    auth = {"spec": {"auth": {"apiKeySecretRef": {"name": "team-key"}}}}
    kubectl.run("patch", "mdep", SERVER, "-n", ns, "--type=merge", "-p", json.dumps(auth))
    pod = replacement(
        kubectl, ns, operator, before, "the server to roll to a pod that requires the key"
    )
    wait_adapter(operator, kubectl, ns, "alpha", served_everywhere, "alpha loaded again")
    base = url(pod)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "?"}], "max_tokens": 2}
    assert post(base + "/v1/chat/completions", body)[0] == 401
    assert post(base + "/v1/chat/completions", body, "sk-wrong")[0] == 401
    assert post(base + "/invocations", body)[0] == 401  # vLLM's --api-key leaves it open
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/v1/models", timeout=30)
    assert refused.value.code == 401
    with urllib.request.urlopen(base + "/health", timeout=30) as health:
        assert health.status == 200
    answer = chat(base + "/v1", "alpha", shape_image(), token="sk-team")
    assert answer["model"] == "alpha"
    # The key is a client's, not an admin's.
    outside = {"lora_name": "evil", "lora_path": "/etc"}
    assert post(base + "/v1/load_lora_adapter", outside, "sk-team")[0] == 403
