"""The Helm chart (charts/kubetune): it lints, it renders, and the API server accepts
what it renders, with RBAC that is exactly the rules the operator is tested under.
helm is built from Go modules by hack/helm.sh on first use."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import Kubectl

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
RULES = yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
CLUSTER_RULES = yaml.safe_load((CHART / "files" / "operator-cluster-rules.yaml").read_text())


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
