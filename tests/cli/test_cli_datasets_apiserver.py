"""`dataset create | list | get` against the real API server (CRDs installed, no
operator: what is tested is what the command writes) and S3 played by moto's server:
an invalid file leaves nothing anywhere; a small dataset goes into a ConfigMap the
Dataset owns; a large one, with its images, to the platform's S3 store; the same file
again is a no-op, another one is refused without --replace; and `--dry-run=client -o
yaml` writes nothing and applies with `kubectl apply --validate=strict`."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import Kubectl
from PIL import Image
from tiny_models import write_shapes_dataset

from kubetune_cli import main as cli

pytestmark = pytest.mark.apiserver

BUCKET = "cli-datasets"
PLATFORM = "cli-platform"  # where these tests publish the platform's defaults


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def write_bad(folder: Path) -> Path:
    """A file with an error on lines 2 (no reply) and 4 (not JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.jsonl"
    lines = [json.dumps(GOOD), '{"messages": [{"role": "user", "content": "hi"}]}']
    path.write_text("\n".join([*lines, json.dumps(GOOD), "{not json"]) + "\n")
    return path


def noise_dataset(folder: Path, images: int, side: int) -> Path:
    """Images of random noise, which PNG cannot shrink: ``side``² x 3 bytes each, too
    much for a ConfigMap."""
    rng = random.Random(7)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        pixels = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
        Image.frombytes("RGB", (side, side), pixels).save(folder / "img" / f"{i}.png")
        reply = {"role": "assistant", "content": f"noise {i}"}
        ask = {"role": "user", "content": "<image>What is it?"}
        lines.append({"messages": [ask, reply], "images": [f"img/{i}.png"]})
    path = folder / "noise.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("cli-datasets")


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, Any]]:
    """moto's S3 server on loopback, and a client of it; this machine's boto3 finds it
    and the keys through the environment, as a laptop's would through its profile."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    server.stop()


@pytest.fixture(scope="module")
def platform(kubectl: Kubectl, s3: tuple[str, Any]) -> str:
    """What the chart publishes for clients (templates/defaults.yaml): an S3 dataset
    store, and a second release's PVC store."""
    endpoint, _ = s3
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLATFORM}})
    for name, data in (
        (
            "kubetune-defaults",
            {
                "datasetStore": f"s3://{BUCKET}/uploads",
                "modelStore": "pvc://models/tuned",
                "modelStoreEndpoint": endpoint,
            },
        ),
        ("pvc-defaults", {"datasetStore": "pvc://datasets/uploads", "modelStore": ""}),
    ):
        kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": PLATFORM},
                "data": data,
            }
        )
    return PLATFORM


def kubetune(
    capsys: pytest.CaptureFixture[str], kubeconfig: Path, ns: str | None, *argv: str
) -> tuple[int, str, str]:
    """The plugin as kubectl runs it, in this process, in namespace ``ns`` (None: the
    kubeconfig's): (exit code, stdout, stderr)."""
    capsys.readouterr()
    namespace = ["-n", ns] if ns is not None else []
    code = cli.main(["--kubeconfig", str(kubeconfig), *namespace, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def keys(client: Any, prefix: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def configmaps(kubectl: Kubectl, ns: str) -> dict[str, Any]:
    items = kubectl.get("configmaps", "-n", ns)["items"]
    return {c["metadata"]["name"]: c for c in items if c["metadata"]["name"] != "kube-root-ca.crt"}


def test_an_invalid_file_exits_1_with_its_line_numbers_and_leaves_nothing_anywhere(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    s3: tuple[str, Any],
    platform: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, client = s3
    bad = write_bad(tmp_path)
    for where in ((), ("--to", f"s3://{BUCKET}/mine"), ("--kubetune-namespace", platform)):
        code, out, err = kubetune(
            capsys, kubeconfig, ns, "dataset", "create", "bad", "-f", str(bad), *where
        )
        assert code == 1, err
        assert "line 2: " in err and "line 4: " in err
        assert "INVALID" in err
        assert "nothing was uploaded and no Dataset was created" in err
    assert kubectl.get("kds", "-n", ns)["items"] == []
    assert configmaps(kubectl, ns) == {}
    assert keys(client) == []
    # -o json gives the validator's own report for a program to read.
    code, out, _ = kubetune(
        capsys, kubeconfig, ns, "dataset", "create", "bad", "-f", str(bad), "-o", "json"
    )
    report = json.loads(out)
    assert code == 1 and report["valid"] is False
    assert {e["line"] for e in report["errors"]} >= {2, 4}


def test_a_small_dataset_goes_into_a_configmap_and_the_same_file_again_changes_nothing(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    platform: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_shapes_dataset(tmp_path / "v1", 1, seed=3, name="shapes.jsonl")
    code, out, err = kubetune(capsys, kubeconfig, ns, "dataset", "create", "small", "-f", str(data))
    assert code == 0, err
    assert "dataset.kubetune.io/small created" in out
    dataset = kubectl.get("kds", "small", "-n", ns)
    ref = dataset["spec"]["source"]["configMap"]
    assert ref["key"] == "shapes.jsonl"
    held = configmaps(kubectl, ns)[ref["name"]]
    assert held["immutable"] is True
    assert held["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Dataset",
            "name": "small",
            "uid": dataset["metadata"]["uid"],
        }
    ]
    text = held["data"]["shapes.jsonl"]
    assert len(text.splitlines()) == 6 and text.count("data:image/png;base64,") == 6

    # The same file again: nothing is written.
    version = dataset["metadata"]["resourceVersion"]
    code, out, err = kubetune(capsys, kubeconfig, ns, "dataset", "create", "small", "-f", str(data))
    assert code == 0, err
    assert "dataset.kubetune.io/small unchanged" in out
    assert kubectl.get("kds", "small", "-n", ns)["metadata"]["resourceVersion"] == version

    # Another file under that name is refused, and replaced only when asked.
    other = write_shapes_dataset(tmp_path / "v2", 1, seed=4, name="shapes.jsonl")
    code, _, err = kubetune(capsys, kubeconfig, ns, "dataset", "create", "small", "-f", str(other))
    assert code == 1
    assert "already exists" in err and "it holds other data (shapes.jsonl, sha256 " in err
    assert "--replace" in err
    assert kubectl.get("kds", "small", "-n", ns)["metadata"]["resourceVersion"] == version
    code, out, err = kubetune(
        capsys, kubeconfig, ns, "dataset", "create", "small", "-f", str(other), "--replace"
    )
    assert code == 0, err
    assert "dataset.kubetune.io/small replaced" in out
    replaced = kubectl.get("kds", "small", "-n", ns)
    assert replaced["metadata"]["generation"] == 2  # the operator validates it afresh
    new = replaced["spec"]["source"]["configMap"]["name"]
    assert new != ref["name"]
    assert set(configmaps(kubectl, ns)) == {new}

    # list and get, before any operator has looked at it.
    code, out, _ = kubetune(capsys, kubeconfig, ns, "dataset", "list")
    assert code == 0
    assert out.splitlines()[0].split()[:2] == ["NAME", "PHASE"]
    assert any(line.split()[:2] == ["small", "Pending"] for line in out.splitlines())
    code, out, _ = kubetune(capsys, kubeconfig, ns, "dataset", "get", "small")
    assert code == 0 and f"configmap/{new}:shapes.jsonl" in out
    code, out, _ = kubetune(capsys, kubeconfig, ns, "dataset", "get", "small", "-o", "yaml")
    assert yaml.safe_load(out)["metadata"]["uid"] == replaced["metadata"]["uid"]
    code, _, err = kubetune(capsys, kubeconfig, ns, "dataset", "get", "none")
    assert code == 1 and "Dataset 'none' not found" in err


def test_a_large_dataset_and_its_images_go_to_the_platforms_s3_store(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    s3: tuple[str, Any],
    platform: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint, client = s3
    data = noise_dataset(tmp_path / "laptop", 3, 360)
    args = ("dataset", "create", "noise", "-f", str(data), "--kubetune-namespace", platform)
    code, out, err = kubetune(capsys, kubeconfig, ns, *args, "--s3-secret", "s3-creds")
    assert code == 0, err
    assert "uploaded 4 files" in out
    assert "uploaded " in err and "(100%)" in err  # plain progress lines off a terminal
    source = kubectl.get("kds", "noise", "-n", ns)["spec"]["source"]["s3"]
    folder = source["uri"].removeprefix(f"s3://{BUCKET}/").removesuffix("/noise.jsonl")
    assert folder.startswith(f"uploads/{ns}/noise/") and len(folder.rsplit("/", 1)[1]) == 16
    assert source["endpoint"] == endpoint
    assert source["secretRef"] == {"name": "s3-creds"}
    assert keys(client, folder) == [
        f"{folder}/{p}" for p in ("img/0.png", "img/1.png", "img/2.png", "noise.jsonl")
    ]
    for key in keys(client, folder):
        sent = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert sent == (data.parent / key.removeprefix(folder + "/")).read_bytes()
    made = configmaps(kubectl, ns).values()
    assert not [
        c for c in made if (c["metadata"].get("labels") or {}).get("kubetune.io/dataset") == "noise"
    ]

    # Again: nothing is uploaded (an object taken away stays away) or written.
    client.delete_object(Bucket=BUCKET, Key=f"{folder}/img/0.png")
    code, out, err = kubetune(capsys, kubeconfig, ns, *args, "--s3-secret", "s3-creds")
    assert code == 0 and "unchanged" in out, err
    assert f"{folder}/img/0.png" not in keys(client, folder)

    # A PVC store cannot be written from here: the refusal says what to do.
    code, _, err = kubetune(
        capsys,
        kubeconfig,
        ns,
        "dataset",
        "create",
        "noise-pvc",
        "-f",
        str(data),
        "--kubetune-namespace",
        platform,
        "--kubetune-defaults",
        "pvc-defaults",
    )
    assert code == 1
    assert "pvc://datasets/uploads (the platform's dataset store" in err
    assert "--to s3://BUCKET/PREFIX" in err
    assert kubectl.run("get", "kds", "noise-pvc", "-n", ns, check=False).returncode != 0


def test_to_names_an_s3_folder_of_ones_own(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    s3: tuple[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint, client = s3
    data = write_shapes_dataset(tmp_path, 1, seed=5, name="mine.jsonl")
    code, out, err = kubetune(
        capsys,
        kubeconfig,
        ns,
        "dataset",
        "create",
        "mine",
        "-f",
        str(data),
        "--to",
        f"s3://{BUCKET}/team",
        "--s3-endpoint",
        endpoint,
        "--task",
        "sft",
        "-o",
        "json",
    )
    assert code == 0, err
    written = json.loads(out)
    assert written["kind"] == "Dataset" and written["spec"]["task"] == "sft"
    uri = written["spec"]["source"]["s3"]["uri"]
    assert uri.startswith(f"s3://{BUCKET}/team/{ns}/mine/") and uri.endswith("/mine.jsonl")
    assert len(keys(client, f"team/{ns}/mine/")) == 7  # six images and the file


def test_dry_run_client_writes_nothing_and_its_output_applies_strictly(
    kubectl: Kubectl,
    kubeconfig: Path,
    ns: str,
    s3: tuple[str, Any],
    platform: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, client = s3
    before = keys(client)
    small = write_shapes_dataset(tmp_path / "small", 1, seed=6, name="shapes.jsonl")
    large = noise_dataset(tmp_path / "large", 3, 360)
    git = kubectl.new_namespace("cli-git")
    outputs = []
    for name, path in (("dry-small", small), ("dry-large", large)):
        code, out, err = kubetune(
            capsys,
            kubeconfig,
            None,
            "dataset",
            "create",
            name,
            "-f",
            str(path),
            "--kubetune-namespace",
            platform,
            "--dry-run=client",
            "-o",
            "yaml",
        )
        assert code == 0, err
        outputs.append(out)
    code, job, err = kubetune(
        capsys,
        kubeconfig,
        None,
        "job",
        "create",
        "dry-run",
        "--base-model",
        "pvc://models/tiny-vlm",
        "--dataset",
        "dry-small",
        "--validation-split",
        "0.2",
        "--epochs",
        "2",
        "--deploy",
        "--dry-run=client",
        "-o",
        "yaml",
    )
    assert code == 0, err
    outputs.append(job)
    names = [d["metadata"]["name"] for d in kubectl.get("kds", "-n", ns)["items"]]
    assert not [n for n in names if n.startswith("dry-")]
    assert not [c for c in configmaps(kubectl, ns) if c.startswith("dry-")]
    assert keys(client) == before
    docs = [d for text in outputs for d in yaml.safe_load_all(text)]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Dataset", "Dataset", "FineTuneJob"]
    assert all("namespace" not in d["metadata"] for d in docs)  # placed by the applier
    for text in outputs:
        kubectl.run("apply", "--validate=strict", "-n", git, "-f", "-", input=text)
    assert {d["metadata"]["name"] for d in kubectl.get("kds", "-n", git)["items"]} == {
        "dry-small",
        "dry-large",
    }
    assert kubectl.get("ftj", "dry-run", "-n", git)["spec"]["deploy"] == {
        "enabled": True,
        "replicas": 1,
    }


def user_who_may_not_create_datasets(kubectl: Kubectl, ns: str, out: Path) -> Path:
    """A kubeconfig of a ServiceAccount that may write ConfigMaps in ``ns`` and only read
    Datasets there."""
    kubectl.run("create", "serviceaccount", "reader", "-n", ns)
    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "reader", "namespace": ns},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "verbs": ["get", "list", "create", "delete", "patch"],
                },
                {
                    "apiGroups": ["kubetune.io"],
                    "resources": ["datasets"],
                    "verbs": ["get", "list"],
                },
            ],
        }
    )
    kubectl.run(
        "create",
        "rolebinding",
        "reader",
        "--role=reader",
        f"--serviceaccount={ns}:reader",
        "-n",
        ns,
    )
    token = kubectl.run("create", "token", "reader", "-n", ns).stdout.strip()
    cluster = yaml.safe_load(kubectl.kubeconfig.read_text())["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "reader", "user": {"token": token}}],
        "contexts": [{"name": "reader", "context": {"cluster": cluster["name"], "user": "reader"}}],
        "current-context": "reader",
    }
    out.write_text(yaml.safe_dump(config))
    return out


def test_a_dataset_the_api_server_refuses_leaves_no_configmap_behind(
    kubectl: Kubectl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = kubectl.new_namespace("cli-refused")
    config = user_who_may_not_create_datasets(kubectl, ns, tmp_path / "kubeconfig")
    data = write_shapes_dataset(tmp_path, 1, seed=8, name="shapes.jsonl")
    code, _, err = kubetune(capsys, config, ns, "dataset", "create", "refused", "-f", str(data))
    assert code == 1
    assert 'cannot create resource "datasets"' in err
    assert configmaps(kubectl, ns) == {}
