"""The chart's alert rules (monitoring.prometheusRule): rendered by Helm, checked by
promtool, and unit-tested with `promtool test rules` on the cases in alerts/*.yaml,
which name the rendered rules file kubetune-rules.yaml. Each alert has a case where it
fires and one where it does not; its thresholds come from values.yaml; and the rules
read only metrics that the trainer and the operator export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus import promtool
from prometheus_client.core import REGISTRY

import kubetune_operator.observability  # noqa: F401  (registers the operator's metrics)
from kubetune_trainer.contract.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
ALERTS = Path(__file__).resolve().parent / "alerts"
RULES_FILE = "kubetune-rules.yaml"  # as the cases' rule_files name it
ENABLED = ("--set", "monitoring.prometheusRule.enabled=true")
# `helm template` renders for Kubernetes 1.20 unless told, which kubeVersion refuses.
KUBE_VERSION = re.search(
    r"^K8S_VERSION=(\S+)$", (REPO / "hack" / "versions.env").read_text(), re.MULTILINE
)[1]


def render(*values: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [
            str(REPO / "hack" / "helm.sh"),
            *("template", "kubetune", str(CHART), "-n", "kubetune-system"),
            *("--kube-version", KUBE_VERSION, *values),
        ],
        capture_output=True,
        text=True,
        timeout=1200,  # the first use builds helm
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def rule_spec(*values: str) -> dict[str, Any]:
    """The spec (groups of rules) of the PrometheusRule the chart renders."""
    (rule,) = [doc for doc in render(*ENABLED, *values) if doc["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}


def run(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [str(promtool()), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def default_spec() -> dict[str, Any]:
    return rule_spec()


def test_the_rule_is_off_by_default() -> None:
    assert all(doc["kind"] != "PrometheusRule" for doc in render())


def test_the_rules_pass_their_unit_tests(default_spec: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump(default_spec))
    assert "SUCCESS: 5 rules found" in run("check", "rules", RULES_FILE, cwd=tmp_path)
    cases = sorted(ALERTS.glob("*.yaml"))
    for case in cases:
        shutil.copy(case, tmp_path / case.name)
    run("test", "rules", *(case.name for case in cases), cwd=tmp_path)


def test_every_alert_has_a_case_that_fires_and_one_that_does_not(
    default_spec: dict[str, Any],
) -> None:
    fires, stays_quiet = set(), set()
    for case in ALERTS.glob("*.yaml"):
        content = yaml.safe_load(case.read_text())
        assert content["rule_files"] == [RULES_FILE]
        for test in content["tests"]:
            for expected in test["alert_rule_test"]:
                (fires if expected["exp_alerts"] else stays_quiet).add(expected["alertname"])
    names = set(alerts(default_spec))
    assert names == fires == stays_quiet


def test_every_alert_names_its_object_and_what_to_look_at(
    default_spec: dict[str, Any],
) -> None:
    for name, rule in alerts(default_spec).items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert rule["annotations"].keys() == {"summary", "description"}, name
        assert "kubectl" in rule["annotations"]["description"], name
        if "finetunejob" in rule["expr"] or "modeldeployment" in rule["expr"]:
            assert "{{ $labels.namespace }}/{{ $labels." in rule["annotations"]["summary"]


@pytest.mark.parametrize(
    ("key", "value", "alert", "rendered"),
    [
        ("noProgressFor", "40m", "KubetuneFineTuneJobNoProgress", ("offset 40m", "[40m]")),
        ("evalLossRises", "5", "KubetuneEvalLossRising", (">= 5",)),
        ("modelDeploymentUnavailableFor", "25m", "KubetuneModelDeploymentUnavailable", ()),
        ("reconcileErrorsPerMinute", "4.5", "KubetuneOperatorReconcileErrors", ("* 60 > 4.5",)),
    ],
)
def test_the_thresholds_come_from_the_values(
    default_spec: dict[str, Any], key: str, value: str, alert: str, rendered: tuple[str, ...]
) -> None:
    spec = rule_spec("--set", f"monitoring.prometheusRule.{key}={value}")
    before, after = alerts(default_spec)[alert], alerts(spec)[alert]
    assert after != before
    for text in rendered:
        assert text in after["expr"] and text not in before["expr"]
    if key.endswith("For"):
        assert value in after["annotations"]["summary"]
    if key == "modelDeploymentUnavailableFor":
        assert after["for"] == value


def test_the_rules_read_only_metrics_that_exist(default_spec: dict[str, Any]) -> None:
    operator = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in REGISTRY.collect()
        if family.name.startswith("kubetune_operator_")
    }
    used = {
        name
        for rule in alerts(default_spec).values()
        for name in re.findall(r"\bkubetune_\w+", rule["expr"])
    }
    assert used and used <= set(METRICS) | operator, used - set(METRICS) - operator
