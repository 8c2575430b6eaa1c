"""The Grafana dashboard against a real Prometheus that scraped real runs: every panel's
query, with its variables set to a run, returns data, and `promtool check metrics`
finds nothing wrong in what the trainer and the operator serve.

The Prometheus Operator does not run here, so this test plays the chart's PodMonitors:
it lists the pods they select and writes them into file-based discovery with the
labels their relabelings give (tests/api/test_chart.py checks that the PodMonitors
select these pods and give these labels)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus
import pytest
from e2e_support import (
    RESTRICTED,
    dataset,
    finetunejob,
    provide_storage,
    restricted_operator,
    wait_phase,
)
from kube import Kubectl
from monitoring.dashboard_queries import RATE_INTERVAL, panel_queries, panels_by_row
from operator_harness import Operator, wait_for

from kubetune_operator.resources.common import LABEL_FINETUNEJOB
from kubetune_trainer.contract.metrics import METRICS_PORT

pytestmark = [pytest.mark.apiserver, pytest.mark.training]

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/kubetune/files/grafana-dashboard.json"
# The chart's trainers PodMonitor selects these labels (test_chart.py holds it to them).
TRAINER_SELECTOR = "app.kubernetes.io/name=kubetune,app.kubernetes.io/component=training"
# Every target gets it, as a Prometheus with a `cluster` external label would.
CLUSTER = "test"


@dataclass
class TrainerDiscovery:
    """Lists the training pods every half second and hands them to Prometheus, as the
    trainers' PodMonitor does; keeps one /metrics body of a live trainer for the
    exposition check."""

    kubectl: Kubectl
    ns: str
    prom: prometheus.Prometheus
    exposition: str = ""
    stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            pods = self.kubectl.get("pods", "-n", self.ns, "-l", TRAINER_SELECTOR)["items"]
            targets = [
                (
                    f"{pod['status']['podIP']}:{METRICS_PORT}",
                    {
                        "cluster": CLUSTER,
                        "namespace": self.ns,
                        "pod": pod["metadata"]["name"],
                        "finetunejob": pod["metadata"]["labels"][LABEL_FINETUNEJOB],
                    },
                )
                for pod in pods
                if pod["status"].get("phase") == "Running" and pod["status"].get("podIP")
            ]
            self.prom.scrape("trainers", targets)
            if targets and "kubetune_train_loss " in self.exposition.replace("{", " "):
                continue
            for address, _ in targets:
                try:
                    with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as resp:
                        self.exposition = resp.read().decode()
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


@dataclass(frozen=True)
class Window:
    """The time a run was scraped in, as the range a Grafana panel asks for."""

    start: float
    end: float


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("metrics", RESTRICTED)


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[prometheus.Prometheus]:
    with prometheus.start(
        tmp_path_factory.mktemp("prometheus"), {"operator": True, "trainers": False}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl,
    ns: str,
    kubelet: Any,
    tiny_qwen2_5_vl: Path,
    prom: prometheus.Prometheus,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    provide_storage(kubelet, ns, tiny_qwen2_5_vl)
    with restricted_operator(kubectl, ns, tmp_path_factory.mktemp("operator")) as op:
        # honor_labels, as the chart's operator PodMonitor: its per-object series keep
        # the object's namespace.
        prom.scrape(
            "operator",
            [(f"127.0.0.1:{op.metrics_port}", {"cluster": CLUSTER, "namespace": "kubetune"})],
        )
        yield op


@pytest.fixture(scope="module")
def runs(
    kubectl: Kubectl, ns: str, operator: Operator, prom: prometheus.Prometheus
) -> Iterator[tuple[Window, TrainerDiscovery]]:
    """An SFT run that preserves general skills and a DPO run, side by side, then a
    Dataset whose validation Job a ResourceQuota refuses (an API error the operator
    counts); the window spans all three."""
    discovery = TrainerDiscovery(kubectl, ns, prom)
    start = time.time()
    prefs = dataset("prefs", "shapes/preferences.jsonl")
    prefs["spec"]["task"] = "dpo"
    kubectl.apply(dataset("shapes", "shapes/train.jsonl"), "-n", ns)
    kubectl.apply(prefs, "-n", ns)
    # Enough steps that each trainer is scraped for many seconds, and evaluated often.
    steps = {"batchSize": 2, "learningRate": 0.002, "loggingSteps": 2, "maxPixels": 3136}
    kubectl.apply(
        finetunejob(
            "sft",
            "shapes",
            tuning="lora",
            hyperparameters={"epochs": 8, **steps},
            preserveGeneralSkills={"enabled": True},
        ),
        "-n",
        ns,
    )
    kubectl.apply(
        finetunejob(
            "dpo", "prefs", method="dpo", tuning="lora", hyperparameters={"epochs": 6, **steps}
        ),
        "-n",
        ns,
    )
    for name in ("sft", "dpo"):
        final = wait_phase(
            operator, kubectl, "ftj", ns, name, ("Succeeded", "Failed"), 900, f"{name} to finish"
        )
        assert final["phase"] == "Succeeded", (name, final)
    discovery.stop()
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-more-jobs"},
            "spec": {"hard": {"count/jobs.batch": "0"}},
        },
        "-n",
        ns,
    )
    # The quota controller first counts the Jobs there are; until then admission
    # lets every Job through.
    wait_for(
        lambda: (kubectl.get("resourcequota", "no-more-jobs", "-n", ns).get("status") or {}).get(
            "used"
        ),
        60,
        "the ResourceQuota's usage",
    )
    kubectl.apply(dataset("refused", "shapes/train.jsonl"), "-n", ns)
    wait_for(
        lambda: prom.query(
            'count_over_time(kubetune_operator_api_errors_total{status="403"}[1m]) >= 6'
        ),
        60,
        "a few scrapes of the operator's count of the refused Job (rate() needs two)",
        on_timeout=operator.tail,
    )
    yield Window(start, time.time()), discovery


# Which run each row's panels are asked about: a panel that only makes sense for some
# runs is checked on a run of that kind.
ROW_RUNS = {
    "Training": ("sft", "dpo"),
    "Operator": ("sft",),
}
METHOD_PANEL_RUNS = {"DPO": "dpo", "KL": "sft"}


def test_every_training_and_operator_panel_is_answered_by_prometheus(
    prom: prometheus.Prometheus, runs: tuple[Window, TrainerDiscovery], ns: str
) -> None:
    window, _ = runs
    dashboard = json.loads(DASHBOARD.read_text())
    grouped = panels_by_row(dashboard)
    asked = []
    for row, panels in grouped.items():
        for panel in panels:
            title = panel["title"]
            if row.startswith("Serving"):
                continue
            if row.startswith("Method"):
                names = [run for key, run in METHOD_PANEL_RUNS.items() if key in title]
                assert names, f"no run of the kind panel {title!r} needs"
            else:
                names = list(ROW_RUNS.get(row, ("sft",)))
            for name in names:
                variables = {"cluster": CLUSTER, "namespace": ns, "finetunejob": name}
                for _, expr in panel_queries(
                    {**dashboard, "panels": [panel]}, variables, RATE_INTERVAL
                ):
                    series = prom.query_range(expr, window.start, window.end)
                    assert prometheus.answered(series), (
                        f"panel {title!r} of run {name}: {expr} -> {series}"
                    )
                    asked.append(title)
    assert len(set(asked)) >= 10, asked


def test_the_variables_list_the_runs(
    prom: prometheus.Prometheus, runs: tuple[Window, TrainerDiscovery], ns: str
) -> None:
    """The namespace and finetunejob drop-downs offer what was scraped."""
    window, _ = runs
    params = {"start": f"{window.start:.3f}", "end": f"{window.end:.3f}"}
    assert CLUSTER in prom.api("label/cluster/values", **params)
    assert ns in prom.api("label/namespace/values", **params, **{"match[]": "kubetune_train_step"})
    offered = prom.api(
        "label/finetunejob/values",
        **params,
        **{"match[]": f'kubetune_train_step{{namespace="{ns}"}}'},
    )
    assert {"sft", "dpo"} <= set(offered), offered


def test_promtool_finds_nothing_wrong_in_what_the_trainer_and_operator_serve(
    runs: tuple[Window, TrainerDiscovery], operator: Operator, tmp_path: Path
) -> None:
    _, discovery = runs
    assert "kubetune_train_loss" in discovery.exposition, discovery.exposition[:2000]
    for name, text in (("trainer", discovery.exposition), ("operator", operator.metrics())):
        proc = subprocess.run(
            [str(prometheus.promtool()), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
            f"promtool check metrics on the {name}'s /metrics:\n{proc.stdout}{proc.stderr}"
        )
