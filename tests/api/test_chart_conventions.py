"""The Helm chart follows the conventions platform teams expect of a chart: the standard
labels on every object, names derived from the release (two releases installed side
by side on the test API server), the operator pod's scheduling and security values,
a ServiceAccount and RBAC of the installer's own, roles that extend Kubernetes' `edit`
and `view`, the platform's defaults readable by every user, CRDs that upgrade with the
release and stay the generated ones, and a README whose table of values is current."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import chart_readme
import pytest
import yaml
from kube import Kubectl

from kubetune_operator.api.crds import ALL, filename

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
META = yaml.safe_load((CHART / "Chart.yaml").read_text())
KUBE_VERSION = re.search(
    r"^K8S_VERSION=(\S+)$", (REPO / "hack" / "versions.env").read_text(), re.MULTILINE
)[1]
STANDARD_LABELS = {
    "app.kubernetes.io/name": "kubetune",
    "app.kubernetes.io/version": META["appVersion"],
    "app.kubernetes.io/managed-by": "Helm",
    "helm.sh/chart": f"kubetune-{META['version']}",
}
# Every switch that adds objects, so that the label and name checks see them all.
EVERYTHING = (
    *("--set", "monitoring.podMonitor.enabled=true"),
    *("--set", "monitoring.grafanaDashboard.enabled=true"),
    *("--set", "monitoring.prometheusRule.enabled=true"),
)
PLURALS = sorted(info.plural for info in ALL)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(REPO / "hack" / "helm.sh"), *args],
        capture_output=True,
        text=True,
        timeout=1200,  # the first use builds helm
    )
    assert not check or proc.returncode == 0, proc.stderr[-4000:]
    return proc


def render(release: str, namespace: str, *values: str) -> list[dict[str, Any]]:
    # `helm template` renders for Kubernetes 1.20 unless told, which kubeVersion refuses.
    args = ("template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION)
    return [doc for doc in yaml.safe_load_all(helm(*args, *values).stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deploy,) = by_kind(docs, "Deployment")
    pod: dict[str, Any] = deploy["spec"]["template"]
    return pod


def identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def component(docs: list[dict[str, Any]], name: str, *kinds: str) -> list[dict[str, Any]]:
    """The objects of those kinds that are the given part of the chart (its
    app.kubernetes.io/component label)."""
    return [
        d
        for d in docs
        if d["kind"] in kinds and d["metadata"]["labels"]["app.kubernetes.io/component"] == name
    ]


# Labels and names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [EVERYTHING, (*EVERYTHING, "--set", "watchNamespaces={team-a,team-b}")],
    ids=["cluster-wide", "namespaced"],
)
def test_every_object_carries_the_standard_labels(values: tuple[str, ...]) -> None:
    docs = render("ml", "platform", *values)
    assert len({d["kind"] for d in docs}) >= 10
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        expected = {**STANDARD_LABELS, "app.kubernetes.io/instance": "ml"}
        assert expected.items() <= labels.items(), identity(doc)
        assert labels["app.kubernetes.io/component"], identity(doc)
    assert STANDARD_LABELS.items() <= operator_pod(docs)["metadata"]["labels"].items()


def test_names_come_from_the_release() -> None:
    """Release `kubetune` keeps the names the operator's docs use; another release
    prefixes its own name, and nameOverride and fullnameOverride replace the parts."""
    names = {identity(d) for d in render("kubetune", "kt", *EVERYTHING)}
    assert {
        ("Deployment", "kt", "kubetune-operator"),
        ("ConfigMap", "kt", "kubetune-policy"),
        ("Secret", "kt", "kubetune-admin-key"),
        ("ClusterRole", "", "kubetune-operator-kt"),
        ("ValidatingAdmissionPolicy", "", "kubetune-finetunejobs-kt"),
    } <= names
    assert ("Deployment", "kt", "ml-kubetune-operator") in {identity(d) for d in render("ml", "kt")}
    renamed = render("ml", "kt", "--set", "nameOverride=tune")
    assert ("Deployment", "kt", "ml-tune-operator") in {identity(d) for d in renamed}
    assert operator_pod(renamed)["metadata"]["labels"]["app.kubernetes.io/name"] == "tune"
    (deploy,) = by_kind(renamed, "Deployment")
    assert deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "tune"
    overridden = render("ml", "kt", "--set", "fullnameOverride=ft")
    assert ("ConfigMap", "kt", "ft-policy") in {identity(d) for d in overridden}
    assert ("ClusterRole", "", "ft-edit-kt") in {identity(d) for d in overridden}


def test_what_the_operator_is_handed_is_the_release_s_own() -> None:
    """The ConfigMap and Secret the operator's environment names, and the admission
    policies' params and names, are the ones this release renders."""
    docs = render("ml", "kt")
    rendered = {identity(d) for d in docs}
    env = operator_pod(docs)["spec"]["containers"][0]["env"]
    refs = [v["valueFrom"] for v in env if "valueFrom" in v]
    assert refs
    for ref in refs:
        ((kind, key_ref),) = ref.items()
        kind = {"configMapKeyRef": "ConfigMap", "secretKeyRef": "Secret"}[kind]
        assert (kind, "kt", key_ref["name"]) in rendered
    policies = {d["metadata"]["name"] for d in by_kind(docs, "ValidatingAdmissionPolicy")}
    bindings = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert {b["spec"]["policyName"] for b in bindings} == policies
    for binding in bindings:
        param = binding["spec"]["paramRef"]
        assert ("ConfigMap", param["namespace"], param["name"]) in rendered


def test_two_releases_of_one_name_render_no_common_object() -> None:
    """Release names are unique per namespace only: release `kubetune` in two
    namespaces, each with every object (CRDs aside, which one release owns)."""
    first = {identity(d) for d in render("kubetune", "team-a", *EVERYTHING)}
    second = render("kubetune", "team-b", *EVERYTHING, "--set", "crds.enabled=false")
    assert not first & {identity(d) for d in second}
    # A Role lives in the watched namespace, where another release may watch too.
    watched = "--set", "watchNamespaces={shared}"
    roles = [
        {identity(d) for d in component(render("kubetune", ns, *watched), "operator", "Role")}
        for ns in ("team-a", "team-b")
    ]
    assert roles[0] and not roles[0] & roles[1]


# The operator's pod ----------------------------------------------------------------------

# The restricted Pod Security Standard's demands, the operator's defaults.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_VALUES: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}
                ]
            }
        }
    },
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"example.com/team": "platform"},
    # An attempt to move the pod out of its Deployment's selector, which must not win.
    "podLabels": {"example.com/cost-centre": "ml", "app.kubernetes.io/instance": "other"},
    "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 4242, "fsGroup": 4242},
    "securityContext": {"readOnlyRootFilesystem": True, "privileged": False},
}


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_the_pod_values_reach_the_operator_pod(tmp_path: Path) -> None:
    docs = render("kubetune", "kt", "-f", values_file(tmp_path, POD_VALUES))
    pod = operator_pod(docs)
    spec = pod["spec"]
    for key in ("imagePullSecrets", "nodeSelector", "tolerations", "affinity"):
        assert spec[key] == POD_VALUES[key], key
    assert spec["priorityClassName"] == POD_VALUES["priorityClassName"]
    # Helm merges a map of values into the default's: what is not overridden stays.
    assert spec["securityContext"] == {**POD_SECURITY, **POD_VALUES["podSecurityContext"]}
    assert spec["containers"][0]["securityContext"] == {
        **CONTAINER_SECURITY,
        **POD_VALUES["securityContext"],
    }
    assert pod["metadata"]["annotations"]["example.com/team"] == "platform"
    # The chart's own annotation is still there: a new policy still restarts the pod.
    assert "kubetune.io/policy-checksum" in pod["metadata"]["annotations"]
    labels = pod["metadata"]["labels"]
    assert labels["example.com/cost-centre"] == "ml"
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_defaults_keep_the_operator_pod_locked_down() -> None:
    spec = operator_pod(render("kubetune", "kt"))["spec"]
    assert spec["securityContext"] == POD_SECURITY
    assert spec["containers"][0]["securityContext"] == CONTAINER_SECURITY
    assert not {"imagePullSecrets", "nodeSelector", "tolerations", "affinity"} & spec.keys()
    assert "priorityClassName" not in spec


# ServiceAccount and RBAC ----------------------------------------------------------------


def test_the_operator_can_run_as_a_service_account_of_the_installer_s() -> None:
    values = ("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops-sa")
    for namespaced in ((), ("--set", "watchNamespaces={team-a}")):
        docs = render("kubetune", "kt", *values, *namespaced)
        assert not by_kind(docs, "ServiceAccount")
        assert operator_pod(docs)["spec"]["serviceAccountName"] == "ops-sa"
        bindings = component(docs, "operator", "ClusterRoleBinding", "RoleBinding")
        assert bindings
        for binding in bindings:
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": "ops-sa", "namespace": "kt"}
            ]
    # Without a name the pod would run as `default`, and its RBAC would go to every pod
    # in the namespace that names no account.
    args = ("template", "kubetune", str(CHART), "--kube-version", KUBE_VERSION)
    proc = helm(*args, "--set", "serviceAccount.create=false", check=False)
    assert proc.returncode != 0
    assert "serviceAccount.name: name the operator's ServiceAccount" in proc.stderr


def test_the_service_account_carries_its_annotations() -> None:
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/kubetune"}
    values = ("--set-json", f"serviceAccount.annotations={json.dumps(role)}")
    (account,) = by_kind(render("kubetune", "kt", *values), "ServiceAccount")
    assert account["metadata"]["annotations"] == role
    assert account["metadata"]["name"] == "kubetune-operator"


@pytest.mark.parametrize("namespaced", [(), ("--set", "watchNamespaces={team-a}")])
def test_rbac_create_false_makes_no_role_and_no_binding(namespaced: tuple[str, ...]) -> None:
    docs = render("kubetune", "kt", "--set", "rbac.create=false", *namespaced)
    rbac = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    assert not rbac & {d["kind"] for d in docs}
    assert operator_pod(docs)["spec"]["serviceAccountName"] == "kubetune-operator"
    with_rbac = render("kubetune", "kt", *namespaced)
    assert rbac & {d["kind"] for d in with_rbac}


def _user_roles(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The aggregated ClusterRoles, by the built-in role each one extends."""
    found = {}
    for role in by_kind(docs, "ClusterRole"):
        for label in role["metadata"]["labels"]:
            if label.startswith("rbac.authorization.k8s.io/aggregate-to-"):
                found[label.rsplit("-", 1)[1]] = role
    return found


def test_the_user_roles_extend_edit_admin_and_view(kubectl: Kubectl, tmp_path: Path) -> None:
    """The roles carry the labels the API server's own `edit`, `admin` and `view`
    aggregate, and a user bound to `edit` (or `view`) in a namespace may then do what
    an ML engineer does there (or read it), and never write status."""
    release = kubectl.new_namespace("roles")
    docs = render("kubetune", release)
    roles = _user_roles(docs)
    assert set(roles) == {"edit", "admin", "view"}
    assert roles["edit"] is roles["admin"]
    (edit_rule,) = roles["edit"]["rules"]
    assert sorted(edit_rule["resources"]) == PLURALS
    (view_rule,) = roles["view"]["rules"]
    assert sorted(view_rule["resources"]) == sorted([*PLURALS, *(f"{p}/status" for p in PLURALS)])
    assert set(view_rule["verbs"]) == {"get", "list", "watch"}
    for builtin in ("edit", "admin", "view"):
        selectors = kubectl.get("clusterrole", builtin)["aggregationRule"]["clusterRoleSelectors"]
        labels = roles[builtin]["metadata"]["labels"]
        assert any(s["matchLabels"].items() <= labels.items() for s in selectors), builtin
    assert not _user_roles(
        render("kubetune", release, "--set", "rbac.createAggregateClusterRoles=false")
    )

    path = tmp_path / "roles.yaml"
    path.write_text(yaml.safe_dump_all([roles["edit"], roles["view"]]))
    team = kubectl.new_namespace("team")
    kubectl.run(
        "create", "rolebinding", "engineers", "-n", team, "--clusterrole=edit", "--user=eve"
    )
    kubectl.run("create", "rolebinding", "readers", "-n", team, "--clusterrole=view", "--user=vic")
    kubectl.run("apply", "-f", str(path))
    try:

        def can(user: str, verb: str, plural: str, subresource: str = "") -> bool:
            proc = kubectl.run(
                *("auth", "can-i", verb, f"{plural}.kubetune.io", "-n", team, "--as", user),
                *(("--subresource", subresource) if subresource else ()),
                check=False,
            )
            return proc.stdout.strip() == "yes"

        # The aggregation controller copies the rules into the built-in roles shortly.
        deadline = time.monotonic() + 30
        while not (can("eve", "create", "finetunejobs") and can("vic", "list", "datasets")):
            assert time.monotonic() < deadline, "the built-in roles never took the rules"
            time.sleep(0.5)
        for plural in PLURALS:
            for verb in ("create", "update", "delete"):
                assert can("eve", verb, plural), (verb, plural)
            assert not can("eve", "patch", plural, "status"), plural
            assert can("vic", "list", plural) and can("vic", "get", plural, "status")
            assert not can("vic", "create", plural), plural
    finally:
        kubectl.run("delete", "--ignore-not-found", "-f", str(path))


def test_every_authenticated_user_may_read_the_defaults_and_no_other_config_map(
    kubectl: Kubectl, tmp_path: Path
) -> None:
    """`kubectl kubetune` on a laptop, with no rights in the release namespace, finds the
    platform's stores in `<fullname>-defaults` there, as clients find kube-public's
    cluster-info; every other ConfigMap there stays closed to it."""
    release = kubectl.new_namespace("platform")
    stores = {
        "defaults.modelStore": "s3://models/tuned",
        "defaults.modelStoreEndpoint": "http://minio.storage:9000",
        "defaults.datasetStore": "pvc://datasets/uploads",
    }
    values = [arg for key, value in stores.items() for arg in ("--set", f"{key}={value}")]
    docs = render("kubetune", release, *values)
    published = component(docs, "defaults", "ConfigMap", "Role", "RoleBinding")
    assert {identity(d) for d in published} == {
        ("ConfigMap", release, "kubetune-defaults"),
        ("Role", release, "kubetune-defaults-reader"),
        ("RoleBinding", release, "kubetune-defaults-reader"),
    }
    (policy,) = [
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "kubetune-policy"
    ]
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump_all([*published, policy]))
    kubectl.run("apply", "-f", str(path))
    engineer = ("--as", "eve", "--as-group", "system:authenticated")
    anonymous = ("--as", "system:anonymous", "--as-group", "system:unauthenticated")

    def can(who: tuple[str, ...], verb: str, what: str, namespace: str = release) -> bool:
        proc = kubectl.run("auth", "can-i", verb, what, "-n", namespace, *who, check=False)
        return proc.stdout.strip() == "yes"

    assert can(engineer, "get", "configmaps/kubetune-defaults")
    read = kubectl.run(
        "get", "configmap", "kubetune-defaults", "-n", release, "-o", "json", *engineer
    )
    assert json.loads(read.stdout)["data"] == {
        "modelStore": stores["defaults.modelStore"],
        "modelStoreEndpoint": stores["defaults.modelStoreEndpoint"],
        "datasetStore": stores["defaults.datasetStore"],
    }
    assert not can(engineer, "get", "configmaps/kubetune-policy")
    assert not can(engineer, "list", "configmaps")
    assert not can(engineer, "watch", "configmaps/kubetune-defaults")
    assert not can(engineer, "update", "configmaps/kubetune-defaults")
    assert not can(engineer, "get", "configmaps/kubetune-defaults", kubectl.new_namespace("other"))
    assert not can(anonymous, "get", "configmaps/kubetune-defaults")

    # Without rbac.create the ConfigMap is still there for a binding of the platform's own.
    unbound = render("kubetune", release, "--set", "rbac.create=false")
    assert {
        identity(d) for d in component(unbound, "defaults", "ConfigMap", "Role", "RoleBinding")
    } == {("ConfigMap", release, "kubetune-defaults")}


# CRDs ------------------------------------------------------------------------------------


def test_the_chart_s_crds_are_the_generated_ones_with_its_labels() -> None:
    crds = {
        d["metadata"]["name"]: d
        for d in by_kind(render("kubetune", "kt"), "CustomResourceDefinition")
    }
    assert sorted(crds) == sorted(f"{p}.kubetune.io" for p in PLURALS)
    for info in ALL:
        generated = yaml.safe_load((CHART / "files" / "crds" / filename(info)).read_text())
        rendered = crds[generated["metadata"]["name"]]
        metadata = rendered.pop("metadata")
        generated_metadata = generated.pop("metadata")
        # The same schemas, rules and names (a YAML round trip through the template).
        assert rendered == generated
        assert generated_metadata["labels"].items() <= metadata["labels"].items()
        assert metadata["annotations"] == {"helm.sh/resource-policy": "keep"}
    unkept = by_kind(
        render("kubetune", "kt", "--set", "crds.keep=false"), "CustomResourceDefinition"
    )
    assert unkept and all("annotations" not in d["metadata"] for d in unkept)


def test_crds_enabled_false_renders_no_crd() -> None:
    docs = render("kubetune", "kt", "--set", "crds.enabled=false")
    assert not by_kind(docs, "CustomResourceDefinition")
    # Nothing Helm would install the old way either.
    assert not (CHART / "crds").exists()


def test_the_chart_admits_the_kubernetes_versions_it_needs() -> None:
    args = ("template", "kubetune", str(CHART), "--kube-version")
    refused = helm(*args, "v1.29.15", check=False)
    assert refused.returncode != 0
    assert f"chart requires kubeVersion: {META['kubeVersion']}" in refused.stderr
    # Managed clusters report pre-release versions.
    helm(*args, "v1.30.4-eks-a737599")


# The README ------------------------------------------------------------------------------


def test_the_chart_readme_is_current() -> None:
    readme = (CHART / "README.md").read_text()
    assert readme == chart_readme.render(readme), (
        "charts/kubetune/README.md is stale: run `.venv/bin/python hack/chart_readme.py`"
    )
    for key in ("crds.enabled", "serviceAccount.name", "rbac.createAggregateClusterRoles"):
        assert f"\n| {key} |" in readme


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a:\n  # -- A.\n  b: 1\n  c: 2\n", "a.c has no `# --` comment"),
        ("# -- A,\n# --and more.\na: 1\n", "starts with `--`"),
        ("# -- A.\n\na: 1\n", "must stand right above a key"),
        ("# -- A.\na:\n  # -- B.\n  b: 1\n", "documented inside a documented value"),
    ],
    ids=["undocumented", "dashes", "astray", "nested"],
)
def test_the_readme_writer_refuses_what_helm_docs_would_read_otherwise(
    tmp_path: Path, text: str, error: str
) -> None:
    (tmp_path / "Chart.yaml").write_text(yaml.safe_dump(META))
    (tmp_path / "values.yaml").write_text(text)
    with pytest.raises(chart_readme.ValuesError, match=re.escape(error)):
        chart_readme.generated(tmp_path)


def test_the_readme_writer_documents_paths_types_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "Chart.yaml").write_text(yaml.safe_dump(META))
    (tmp_path / "values.yaml").write_text(
        "image:\n  # -- The tag;\n  # empty: appVersion.\n  tag: ''\n"
        "# -- Labels.\nlabels: {b: '1', a: 2}\n# -- On.\nflag: true\n"
    )
    rows = chart_readme.generated(tmp_path).splitlines()[4:]
    assert rows == [
        "| flag | bool | `true` | On. |",
        '| image.tag | string | `""` | The tag; empty: appVersion. |',
        '| labels | object | `{"a":2,"b":"1"}` | Labels. |',
    ]


# Two releases on the test API server -----------------------------------------------------

CLUSTER_KINDS = (
    "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings"
)


def test_two_releases_install_side_by_side(kubectl: Kubectl) -> None:
    """Release `kubetune` twice, in two namespaces: one cluster-wide that takes over
    the CRDs (as an upgrade from a chart that kept them in crds/ does), one that
    watches a namespace of its own and leaves the CRDs to the first. Helm refuses an
    object that another release owns, so both installs succeed only if no name is
    shared; then each release's objects are its own. No kubelet runs here, so the
    operators never start: the objects are what is checked. Uninstalling keeps the
    CRDs and what users made with them."""
    kubeconfig = ("--kubeconfig", str(kubectl.kubeconfig))
    first, second = kubectl.new_namespace("kubetune"), kubectl.new_namespace("kubetune")
    team = kubectl.new_namespace("team")
    installs = {
        first: ("--take-ownership",),
        second: ("--set", f"watchNamespaces={{{team}}}", "--set", "crds.enabled=false"),
    }
    try:
        notes = {}
        for ns, values in installs.items():
            proc = helm("install", "kubetune", str(CHART), "-n", ns, *kubeconfig, *values)
            notes[ns] = proc.stdout
        manifests = {
            ns: [
                d
                for d in yaml.safe_load_all(
                    helm("get", "manifest", "kubetune", "-n", ns, *kubeconfig).stdout
                )
                if d
            ]
            for ns in installs
        }
        objects = {ns: {identity(d) for d in docs} for ns, docs in manifests.items()}
        assert not objects[first] & objects[second]
        cluster_scoped = {o for o in objects[first] | objects[second] if not o[1]}
        assert {kind for kind, _, _ in cluster_scoped} >= {
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        }
        for ns, docs in manifests.items():
            for doc in docs:
                kind, where, name = identity(doc)
                live = kubectl.get(kind, name, *(("-n", where) if where else ()))
                annotations = live["metadata"]["annotations"]
                assert annotations["meta.helm.sh/release-namespace"] == ns, identity(doc)
                assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == "kubetune"
            account = operator_pod(docs)["spec"]["serviceAccountName"]
            bindings = component(docs, "operator", "ClusterRoleBinding", "RoleBinding")
            assert bindings
            for binding in bindings:
                assert binding["subjects"] == [
                    {"kind": "ServiceAccount", "name": account, "namespace": ns}
                ]
            assert f"kubectl -n {ns} logs deploy/kubetune-operator -f" in notes[ns]
        (role,) = component(manifests[second], "operator", "Role")
        assert role["metadata"]["namespace"] == team

        dataset = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "kept", "namespace": team},
            "spec": {"source": {"configMap": {"name": "data", "key": "train.jsonl"}}},
        }
        kubectl.apply(dataset)
    finally:
        for ns in installs:
            helm("uninstall", "kubetune", "-n", ns, *kubeconfig, "--wait", check=False)
    for ns in installs:
        assert not [
            line
            for line in kubectl.run("get", CLUSTER_KINDS, "-o", "name").stdout.splitlines()
            if line.endswith(f"-{ns}")
        ]
    for info in ALL:
        crd = kubectl.get("crd", f"{info.plural}.kubetune.io")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert kubectl.get("dataset", "kept", "-n", team)["metadata"]["name"] == "kept"
