"""The Helm chart (charts/kubetune): it lints, it renders, and the API server accepts
what it renders, with RBAC that is exactly the rules the operator is tested under, and
the platform policy that reaches the operator and, at admission, refuses what the
operator refuses with the same message. helm is built from Go modules by hack/helm.sh
on first use."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import Kubectl

from kubetune_operator.__main__ import parse_args
from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec
from kubetune_operator.resources.common import LABEL_FINETUNEJOB, LABEL_MODELDEPLOYMENT
from kubetune_operator.resources.finetunejob import training_job as tj
from kubetune_operator.resources.modeldeployment import server
from kubetune_operator.resources.platform import ModelStore, PodDefaults
from kubetune_operator.resources.policy import (
    RESERVED_FLAGS,
    Policy,
    finetunejob_refusal,
    modeldeployment_refusal,
)
from kubetune_operator.settings import Settings, from_arguments

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


# `helm template` renders for Kubernetes 1.20 unless told, which the chart's kubeVersion
# refuses: render for the test API server's.
KUBE_VERSION = re.search(
    r"^K8S_VERSION=(\S+)$", (REPO / "hack" / "versions.env").read_text(), re.MULTILINE
)[1]


def render(namespace: str, *values: str) -> list[dict[str, Any]]:
    args = ("template", "kubetune", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION)
    text = helm(*args, *values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def operator_roles(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The operator's (Cluster)Roles or their bindings, not the ones the chart adds to
    `edit` and `view` or the reader of the defaults ConfigMap."""
    return [
        d
        for d in by_kind(docs, kind)
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]


def test_the_chart_lints() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART))


def test_cluster_wide_install_is_accepted_with_the_tested_rules(
    kubectl: Kubectl, tmp_path: Path
) -> None:
    ns = kubectl.new_namespace("chart")
    docs = render(ns)
    (role,) = operator_roles(docs, "ClusterRole")
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
    assert not operator_roles(docs, "ClusterRole")
    roles = operator_roles(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    assert all(r["rules"] == RULES for r in roles)
    bindings = operator_roles(docs, "RoleBinding")
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
    # The generated dashboard, whole (tests/monitoring/test_dashboard.py checks its queries).
    dashboard = json.loads(dashboard_map["data"]["kubetune.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
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
    served = server.plan(md, spec, [], "trainer:test", "vllm:test")
    pod = server.deployment(served)["spec"]["template"]
    assert servers["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = servers["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] in OPEN_PATHS
    source = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", LABEL_MODELDEPLOYMENT)
    assert {"sourceLabels": [source], "targetLabel": "modeldeployment"} in endpoint["relabelings"]


# The platform policy --------------------------------------------------------------------

POLICY_VALUES = {
    "policy": {
        "trainerImages": ["ghcr.io/kubetune/trainer:*", "corp.io/ml/**"],
        # A platform on a mirror, which does not list vllm/vllm-openai (the chart's
        # default server image): a runtime that names no image still passes admission.
        "serverImages": ["corp.io/mirror/vllm-openai:*", "corp.io/vllm@*"],
        "serverFlags": ["--max-num-seqs", "--seed", "--enable-prefix-caching", "--dtype"],
    }
}


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def operator_settings(docs: list[dict[str, Any]]) -> Settings:
    """The settings the operator of a rendered chart starts with: its args, and its
    environment with each ConfigMap reference read from the rendered ConfigMap."""
    maps = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "ConfigMap")}
    (deploy,) = by_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for variable in container["env"]:
        ref = variable.get("valueFrom", {}).get("configMapKeyRef")
        if ref is not None:
            env[variable["name"]] = maps[ref["name"]][ref["key"]]
        elif "value" in variable:
            env[variable["name"]] = variable["value"]
    return from_arguments(parse_args(container["args"]), env)


def test_the_policy_values_reach_the_operator(tmp_path: Path) -> None:
    policy = POLICY_VALUES["policy"]
    docs = render("kubetune-system", "-f", values_file(tmp_path, POLICY_VALUES))
    assert operator_settings(docs).policy == Policy(
        trainer_images=tuple(policy["trainerImages"]),
        server_images=tuple(policy["serverImages"]),
        server_flags=tuple(policy["serverFlags"]),
    )
    # The chart's defaults are the operator's own.
    defaults = render("kubetune-system")
    assert operator_settings(defaults).policy == Settings().policy
    # The operator reads the policy when it starts: a new one rolls its pod.
    checksum = "kubetune.io/policy-checksum"
    (new,), (old,) = by_kind(docs, "Deployment"), by_kind(defaults, "Deployment")
    annotations = [d["spec"]["template"]["metadata"]["annotations"] for d in (new, old)]
    assert annotations[0][checksum] != annotations[1][checksum]


def test_the_chart_knows_the_flags_no_policy_may_allow(tmp_path: Path) -> None:
    reserved = yaml.safe_load((CHART / "files" / "reserved-server-flags.yaml").read_text())
    assert reserved == dict(RESERVED_FLAGS)
    values = values_file(tmp_path, {"policy": {"serverFlags": ["--seed", "--trust-remote-code"]}})
    proc = subprocess.run(
        [
            str(REPO / "hack" / "helm.sh"),
            *("template", "kubetune", str(CHART), "--kube-version", KUBE_VERSION, "-f", values),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode != 0
    assert (
        "policy.serverFlags: --trust-remote-code cannot be allowed: "
        f"{RESERVED_FLAGS['--trust-remote-code']}" in proc.stderr
    )


def test_the_admission_objects_are_optional() -> None:
    kinds = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert kinds <= {d["kind"] for d in render("kubetune-system")}
    off = render("kubetune-system", "--set", "policy.admission.enabled=false")
    assert not kinds & {d["kind"] for d in off}
    # The operator still gets the policy.
    assert operator_settings(off).policy == Settings().policy


def _ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {**FTJ, "metadata": {"name": name}, "spec": {**FTJ["spec"], **spec}}


def _mdep(name: str, **runtime: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"baseModel": {"name": "org/model"}, "runtime": runtime},
    }


def _refusal(doc: dict[str, Any], policy: Policy) -> str | None:
    if doc["kind"] == "FineTuneJob":
        return finetunejob_refusal(FineTuneJobSpec.model_validate(doc["spec"]), policy)
    return modeldeployment_refusal(ModelDeploymentSpec.model_validate(doc["spec"]), policy)


TRUSTING = {"enabled": True, "runtime": {"extraArgs": ["--seed", "1", "--trust-remote-code"]}}
# Each spec and whether the policy (POLICY_VALUES) refuses it.
ADMISSION_CASES: list[tuple[dict[str, Any], bool]] = [
    (_ftj("default-image"), False),
    (_ftj("tagged", image="ghcr.io/kubetune/trainer:0.2.0"), False),
    (_ftj("nested", image="corp.io/ml/team/trainer:1"), False),
    (_ftj("evil", image="evil/img:1"), True),
    (_ftj("neighbour", image="ghcr.io/kubetune/trainer-evil:1"), True),
    (_ftj("path-after-tag", image="ghcr.io/kubetune/trainer:1/../../evil/img:1"), True),
    (_ftj("server-image", deploy={"enabled": True, "runtime": {"image": "evil/vllm:1"}}), True),
    (_ftj("trusting", deploy=TRUSTING), True),
    (_ftj("deployed", deploy={"enabled": True, "runtime": {"extraArgs": ["--seed=3"]}}), False),
    (_ftj("deployed-sized", deploy={"enabled": True, "runtime": {"maxModelLen": 4096}}), False),
    (_mdep("defaults"), False),
    (_mdep("sized", maxModelLen=4096), False),
    (_mdep("null-image", image=None), False),
    (_mdep("upstream", image="vllm/vllm-openai:v0.11.0"), True),
    (
        _mdep(
            "tuned", extraArgs=["--max-num-seqs", "8", "--enable-prefix-caching", "--dtype=half"]
        ),
        False,
    ),
    (_mdep("digest", image="corp.io/vllm@sha256:" + "a" * 64), False),
    (_mdep("trust", extraArgs=["--max-num-seqs", "8", "--trust-remote-code"]), True),
    (_mdep("underscore", extraArgs=["--trust_remote_code"]), True),
    (_mdep("media", extraArgs=["--allowed-local-media-path", "/"]), True),
    (_mdep("plugin", extraArgs=["--tool-parser-plugin=/models/base/p.py"]), True),
    (_mdep("port", extraArgs=["--port=9000"]), True),
    (_mdep("image", image="evil/vllm:1"), True),
]


@pytest.fixture(scope="module")
def policed(
    kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Policy]]:
    """A namespace under the chart's admission policies (bound to it alone, so that the
    rest of the session's tests are not), and the policy its operator would enforce. A
    ModelDeployment named `legacy` was made in it before the policy."""
    release = kubectl.new_namespace("kubetune")
    team = kubectl.new_namespace("policed")
    kubectl.apply(_mdep("legacy", extraArgs=["--trust-remote-code"]), "-n", team)
    tmp = tmp_path_factory.mktemp("policy")
    docs = render(release, "-f", values_file(tmp, {**POLICY_VALUES, "watchNamespaces": [team]}))
    policy = operator_settings(docs).policy
    admission = [
        d
        for d in docs
        if d["kind"].startswith("ValidatingAdmissionPolicy")
        or d["metadata"]["name"] == "kubetune-policy"
    ]
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump_all(admission))
    kubectl.run("apply", "-f", str(path))
    try:
        # The API server takes in new admission policies within a second or two.
        probe = yaml.safe_dump(_mdep("probe", extraArgs=["--trust-remote-code"]))
        deadline = time.monotonic() + 30
        while kubectl.apply(probe, "-n", team, "--dry-run=server", check=False).returncode == 0:
            assert time.monotonic() < deadline, "the admission policies were never enforced"
            time.sleep(0.5)
        yield team, policy
    finally:
        kubectl.run("delete", "--ignore-not-found", "-f", str(path))


@pytest.mark.parametrize(
    ("doc", "refused"),
    ADMISSION_CASES,
    ids=[f"{d['kind']}-{d['metadata']['name']}" for d, _ in ADMISSION_CASES],
)
def test_admission_refuses_what_the_operator_refuses_with_its_message(
    kubectl: Kubectl, policed: tuple[str, Policy], doc: dict[str, Any], refused: bool
) -> None:
    team, policy = policed
    message = _refusal(doc, policy)
    assert (message is not None) is refused
    proc = kubectl.apply(doc, "-n", team, check=False)
    if message is None:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0
        assert f"denied request: {message}" in proc.stderr, proc.stderr


def test_only_a_new_or_changed_spec_is_checked(
    kubectl: Kubectl, policed: tuple[str, Policy]
) -> None:
    """An object from before the policy keeps its metadata editable; a change of its
    spec, or of an allowed object's into a refused one, is refused."""
    team, policy = policed
    kubectl.run("label", "-n", team, "modeldeployment/legacy", "owner=team-a")
    legacy = _mdep("legacy", extraArgs=["--trust-remote-code"])
    legacy["spec"]["replicas"] = 2
    proc = kubectl.apply(legacy, "-n", team, check=False)
    assert proc.returncode != 0
    assert f"denied request: {_refusal(legacy, policy)}" in proc.stderr

    kubectl.apply(_mdep("edited", extraArgs=["--seed", "1"]), "-n", team)
    edited = _mdep("edited", extraArgs=["--seed", "1", "--enforce-eager"])
    proc = kubectl.apply(edited, "-n", team, check=False)
    assert proc.returncode != 0
    assert '"--enforce-eager" is not an allowed server flag' in proc.stderr


def test_namespaces_the_operator_does_not_watch_are_not_policed(
    kubectl: Kubectl, policed: tuple[str, Policy]
) -> None:
    other = kubectl.new_namespace("unwatched")
    kubectl.apply(_ftj("evil", image="evil/img:1"), "-n", other)


def test_the_platform_defaults_reach_the_operator_and_every_pod_it_makes(tmp_path: Path) -> None:
    toleration = {"key": "ml", "operator": "Exists", "effect": "NoSchedule"}
    mirror = "mirror.corp/vllm/vllm-openai:v0.11.0"
    values = {
        "imagePullSecrets": [{"name": "regcred"}],
        "defaults": {
            "serverImage": mirror,
            "modelStore": "s3://models/tuned",
            "modelStoreEndpoint": "http://minio.storage:9000",
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"},
            "trustedHosts": ["images.internal:443"],
            "pods": {"tolerations": [toleration], "priorityClassName": "batch"},
        },
    }
    docs = render("kubetune-system", "-f", values_file(tmp_path, values))
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    settings = operator_settings(docs)
    assert settings.server_image == mirror
    # The policy lists no mirror, and a spec that names no image runs it all the same.
    md = {"baseModel": {"name": "org/model"}}
    assert modeldeployment_refusal(ModelDeploymentSpec.model_validate(md), settings.policy) is None
    named = ModelDeploymentSpec.model_validate({**md, "runtime": {"image": mirror}})
    assert modeldeployment_refusal(named, settings.policy) is not None
    assert settings.model_store == ModelStore.parse(
        "s3://models/tuned", "http://minio.storage:9000"
    )
    assert settings.identity_annotations == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/t"}
    assert settings.pod_defaults == PodDefaults(
        image_pull_secrets=("regcred",),
        tolerations=(toleration,),
        priority_class_name="batch",
        trusted_hosts=("images.internal:443",),
    )
    # The pods' own pull secrets may differ from the operator's.
    values["defaults"]["pods"]["imagePullSecrets"] = [{"name": "team-registry"}]  # type: ignore[index]
    own = operator_settings(render("kubetune-system", "-f", values_file(tmp_path, values)))
    assert own.pod_defaults.image_pull_secrets == ("team-registry",)
    plain = operator_settings(render("kubetune-system"))
    assert plain.model_store is None and plain.pod_defaults == PodDefaults()
    assert plain.server_image == Settings().server_image
