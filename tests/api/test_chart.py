"""The Helm chart (charts/kubetune): it lints, it renders, and the API server accepts
what it renders, with RBAC that is exactly the rules the operator is tested under.
helm is built from Go modules by hack/helm.sh on first use."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import Kubectl

from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.common import LABEL_FINETUNEJOB, LABEL_MODELDEPLOYMENT
from kubetune_operator.resources.finetunejob import training_job as tj
from kubetune_operator.resources.modeldeployment import server
from kubetune_trainer.contract.metrics import GAUGES

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
RULES = yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
CLUSTER_RULES = yaml.safe_load((CHART / "files" / "operator-cluster-rules.yaml").read_text())
FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "run", "namespace": "team", "uid": "u-1", "generation": 1},
    "spec": {
        "baseModel": {"name": "org/model"},
        "dataset": {"name": "train"},
        "outputModel": {"name": "out", "storage": {"pvc": {"claimName": "models"}}},
    },
}
DATASET = DatasetSpec.model_validate({"source": {"pvc": {"claimName": "data", "path": "t.jsonl"}}})


def helm(*args: str) -> str:
    proc = subprocess.run(
        [str(REPO / "hack" / "helm.sh"), *args],
        capture_output=True,
        text=True,
        timeout=1200,  # the first use builds helm
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def render(namespace: str, *values: str) -> list[dict[str, Any]]:
    text = helm("template", "kubetune", str(CHART), "--namespace", namespace, *values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_the_chart_lints() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART))


def test_cluster_wide_install_is_accepted_with_the_tested_rules(
    kubectl: Kubectl, tmp_path: Path
) -> None:
    ns = kubectl.new_namespace("chart")
    docs = render(ns)
    (role,) = by_kind(docs, "ClusterRole")
    assert role["rules"] == RULES + CLUSTER_RULES
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": ns}
    ]
    (deploy,) = by_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--all-namespaces" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kubectl.run("apply", "--dry-run=server", "-f", str(path))


def test_namespaced_install_gets_a_role_per_watched_namespace(
    kubectl: Kubectl, tmp_path: Path
) -> None:
    ns = kubectl.new_namespace("chart")
    watched = [kubectl.new_namespace("team"), kubectl.new_namespace("team")]
    docs = render(ns, "--set", f"watchNamespaces={{{','.join(watched)}}}")
    assert not by_kind(docs, "ClusterRole")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    assert all(r["rules"] == RULES for r in roles)
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
    (deploy,) = by_kind(docs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [
        f"--namespace={n}" for n in watched
    ]
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kubectl.run("apply", "--dry-run=server", "-f", str(path))


def test_monitoring_finds_the_trainer_pods_the_operator_builds() -> None:
    """The PodMonitor's selector matches the pods of a real training Job, and turns
    their FineTuneJob label into the `finetunejob` label the dashboard filters on."""
    docs = render(
        "kubetune-system",
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
    )
    monitors = {d["metadata"]["name"]: d for d in by_kind(docs, "PodMonitor")}
    trainers = monitors["kubetune-trainers"]["spec"]
    job = tj.training_job(
        tj.plan(
            tj.Inputs(
                finetunejob=FTJ,
                spec=FineTuneJobSpec.model_validate(FTJ["spec"]),
                dataset=DATASET,
                dataset_sha256="a" * 64,
            ),
            "trainer:test",
        )
    )
    pod = job["spec"]["template"]
    assert trainers["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = trainers["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports[endpoint["port"]])
    source = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", LABEL_FINETUNEJOB)
    assert {"sourceLabels": [source], "targetLabel": "finetunejob"} in endpoint["relabelings"]

    (dashboard_map,) = [
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "kubetune-dashboard"
    ]
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["kubetune.json"])
    assert dashboard["uid"] == "kubetune-finetuning"


def test_monitoring_finds_the_server_pods_the_operator_builds() -> None:
    """The servers' PodMonitor matches a real server pod and scrapes vLLM's /metrics,
    a route the guard leaves open, labelled by ModelDeployment."""
    from kubetune_trainer.serving.guard import OPEN_PATHS

    docs = render("kubetune-system", "--set", "monitoring.podMonitor.enabled=true")
    servers = {d["metadata"]["name"]: d for d in by_kind(docs, "PodMonitor")}["kubetune-servers"]
    md = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "qwen", "namespace": "team", "uid": "u"},
        "spec": {"baseModel": {"name": "org/model"}},
    }
    spec = ModelDeploymentSpec.model_validate(md["spec"])
    pod = server.deployment(server.plan(md, spec, [], "trainer:test"))["spec"]["template"]
    assert servers["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = servers["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] in OPEN_PATHS
    source = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", LABEL_MODELDEPLOYMENT)
    assert {"sourceLabels": [source], "targetLabel": "modeldeployment"} in endpoint["relabelings"]


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {m for e in exprs for m in re.findall(r"\bkubetune_\w+", e)}
    operator = {
        "kubetune_operator_objects",
        "kubetune_operator_api_errors_total",
        *(
            f"kubetune_operator_reconcile_duration_seconds{s}"
            for s in ("_bucket", "_count", "_sum")
        ),
    }
    assert used and used <= set(GAUGES) | operator, used - set(GAUGES) - operator
    # Every trainer gauge a person reads during a run has a panel.
    for gauge in ("kubetune_train_loss", "kubetune_eval_loss", "kubetune_eta_seconds"):
        assert gauge in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
