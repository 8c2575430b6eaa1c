"""kubetune's Argo CD health checks, in Argo CD's own layout
(charts/kubetune/files/argocd/resource_customizations/kubetune.io/<Kind>/: health.lua,
health_test.yaml, testdata/), run as Argo CD runs one installed through argocd-cm: in
gopher-lua, the Lua VM it embeds (hack/argocd-health). Every case of every
health_test.yaml is checked, and the argocd-cm patch made from the scripts is current
and installs them."""

from __future__ import annotations

import json
import subprocess
from enum import StrEnum
from pathlib import Path
from typing import Any

import argocd_cm
import pytest
import yaml
from kstatus import require_go_tool
from kube import Kubectl

from kubetune_operator.api.crds import ALL

KINDS = {info.kind: info for info in ALL}
CHECKS = argocd_cm.CUSTOMIZATIONS / "kubetune.io"


@pytest.fixture(scope="session")
def runner() -> Path:
    return require_go_tool("argocd-health")


def run(runner: Path, script: Path, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(runner), str(script)],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def health(runner: Path, script: Path, obj: dict[str, Any]) -> dict[str, str]:
    proc = run(runner, script, obj)
    assert proc.returncode == 0, proc.stderr
    verdict: dict[str, str] = json.loads(proc.stdout)
    return verdict


def cases() -> list[Any]:
    return [
        pytest.param(folder.name, case, id=f"{folder.name}/{case['inputPath']}")
        for folder in sorted(CHECKS.iterdir())
        for case in yaml.safe_load((folder / "health_test.yaml").read_text())["tests"]
    ]


def case_object(kind: str, case: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((CHECKS / kind / case["inputPath"]).read_text())
    return obj


@pytest.mark.parametrize(("kind", "case"), cases())
def test_each_case_gets_its_health(runner: Path, kind: str, case: dict[str, Any]) -> None:
    # Argo CD's own test compares whole HealthStatus structs: an absent message is "".
    expected = {"message": "", **case["healthStatus"]}
    assert health(runner, CHECKS / kind / "health.lua", case_object(kind, case)) == expected


def test_every_kind_has_a_health_check_and_every_testdata_file_is_a_case() -> None:
    assert {folder.name for folder in CHECKS.iterdir()} == set(KINDS)
    for kind in KINDS:
        folder = CHECKS / kind
        assert (folder / "health.lua").is_file()
        listed = [
            c["inputPath"]
            for c in yaml.safe_load((folder / "health_test.yaml").read_text())["tests"]
        ]
        assert len(listed) == len(set(listed)), f"{kind}: a case is listed twice"
        files = {f"testdata/{p.name}" for p in (folder / "testdata").iterdir()}
        assert set(listed) == files, f"{kind}: testdata and health_test.yaml differ"


def phases(kind: str) -> set[str]:
    enum = KINDS[kind].status.model_fields["phase"].annotation
    assert isinstance(enum, type) and issubclass(enum, StrEnum)
    return {str(phase) for phase in enum}


@pytest.mark.parametrize(("kind", "case"), cases())
def test_testdata_are_objects_the_api_accepts(kind: str, case: dict[str, Any]) -> None:
    """The cases are the objects the operator writes, as its models define them; only
    a case that expects Unknown holds a phase the API does not (a newer operator's)."""
    obj = case_object(kind, case)
    assert (obj["apiVersion"], obj["kind"]) == ("kubetune.io/v1alpha1", kind)
    KINDS[kind].spec.model_validate(obj["spec"])
    if case["healthStatus"]["status"] == "Unknown":
        assert obj["status"]["phase"] not in phases(kind)
    elif "status" in obj:
        KINDS[kind].status.model_validate(obj["status"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_phase_of_every_kind_has_a_case(kind: str) -> None:
    covered = set()
    for param in cases():
        case_kind, case = param.values
        obj = case_object(case_kind, case)
        status = obj.get("status") or {}
        if case_kind == kind and status.get("observedGeneration") == obj["metadata"]["generation"]:
            covered.add(status["phase"])
    assert phases(kind) <= covered


def test_the_runner_keeps_argo_cd_s_contract(runner: Path, tmp_path: Path) -> None:
    """What makes a passing case mean the script works in Argo CD: no string library
    (argocd-cm runs scripts without the standard libraries), Argo CD's checks on what
    the script returns, and its one second."""
    obj = case_object("FineTuneJob", {"inputPath": "testdata/running.yaml"})
    script = tmp_path / "health.lua"
    script.write_text('return {status = "Fine", message = obj.status.phase}')
    assert health(runner, script, obj) == {
        "status": "Unknown",
        "message": "Lua returned an invalid health status",
    }
    script.write_text('return {status = "Healthy", message = string.lower(obj.status.phase)}')
    proc = run(runner, script, obj)
    assert proc.returncode == 1 and "object(nil) with key 'lower'" in proc.stderr, proc.stderr
    script.write_text("return obj.metadata.generation + 1")
    proc = run(runner, script, obj)
    assert proc.returncode == 1 and "expect table output" in proc.stderr, proc.stderr
    script.write_text("while true do end")
    proc = run(runner, script, obj)
    assert proc.returncode == 1 and "context deadline exceeded" in proc.stderr, proc.stderr


def test_the_argocd_cm_patch_is_current() -> None:
    assert argocd_cm.PATCH.read_text() == argocd_cm.render(), (
        f"{argocd_cm.PATCH} is stale: run .venv/bin/python hack/argocd_cm.py"
    )


@pytest.mark.apiserver
def test_the_patch_installs_the_checks_beside_argo_cd_s_own_settings(kubectl: Kubectl) -> None:
    ns = kubectl.new_namespace("argocd")
    settings = {"url": "https://argocd.example.com", "timeout.reconciliation": "180s"}
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm"},
            "data": settings,
        },
        "-n",
        ns,
    )
    kubectl.run("-n", ns, "patch", "configmap", "argocd-cm", "--patch-file", str(argocd_cm.PATCH))
    data = kubectl.get("configmap", "argocd-cm", "-n", ns)["data"]
    assert data == {**settings, **argocd_cm.health_checks()}
    assert set(argocd_cm.health_checks()) == {
        f"resource.customizations.health.kubetune.io_{kind}" for kind in KINDS
    }
