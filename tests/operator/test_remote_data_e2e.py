"""End to end: runs train on images that are not on a volume beside their file.

* http(s) images (``allowRemoteImages``) from a web server of the platform's own on a
  private address (here loopback, listed in the operator's trusted hosts): validation
  fetches each once and records their digest; a run's pod fetches each once more, in
  an init container, before its trainer starts, and the trainer opens no connection.
* A Dataset on S3 whose lines name their images by relative path: the images come
  from beside the file in the bucket."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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
from operator_harness import Operator
from tiny_models import write_shapes_dataset

pytestmark = [pytest.mark.apiserver, pytest.mark.training]


@dataclass
class ImageServer:
    """Serves a folder's files; remembers when each path was asked for."""

    folder: Path
    port: int = 0
    requests: list[tuple[str, float]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    served = ImageServer(tmp_path_factory.mktemp("web"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.requests.append((self.path, time.time()))
            file = served.folder / self.path.lstrip("/")
            if not file.is_file():
                self.send_error(404)
                return
            body = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served
    server.shutdown()


@pytest.fixture(scope="module")
def ns(kubectl: Kubectl) -> str:
    return kubectl.new_namespace("remote-data", RESTRICTED)


@pytest.fixture(scope="module")
def operator(
    kubectl: Kubectl,
    kubelet: Any,
    ns: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_qwen2_5_vl: Path,
    images: ImageServer,
) -> Iterator[Operator]:
    provide_storage(kubelet, ns, tiny_qwen2_5_vl)
    trusted = {"KUBETUNE_TRUSTED_HOSTS": f"127.0.0.1:{images.port}"}
    with restricted_operator(kubectl, ns, tmp_path_factory.mktemp("operator"), trusted) as op:
        yield op


def _started(pod: dict[str, Any], container: str) -> float:
    (status,) = [s for s in pod["status"]["containerStatuses"] if s["name"] == container]
    state = status["state"].get("terminated") or status["state"]["running"]
    return (
        datetime.strptime(state["startedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    )


def test_remote_images_are_fetched_once_before_the_trainer_starts(
    kubectl: Kubectl, kubelet: Any, ns: str, operator: Operator, images: ImageServer
) -> None:
    data = write_shapes_dataset(images.folder / "shapes", 2, seed=5, name="train.jsonl")
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for line in lines:
        line["images"] = [images.url(f"shapes/{path}") for path in line["images"]]
    folder = kubelet.pvc_dir(ns, "datasets") / "remote"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    remote = dataset("remote-shapes", "remote/train.jsonl")
    remote["spec"]["limits"]["allowRemoteImages"] = True
    kubectl.apply(remote, "-n", ns)
    ready = wait_phase(
        operator,
        kubectl,
        "kds",
        ns,
        "remote-shapes",
        ("Ready", "Invalid", "Failed"),
        120,
        "validation",
    )
    assert ready["phase"] == "Ready", ready
    assert ready["remoteImages"] == len(lines) and len(ready["remoteImagesSha256"]) == 64
    paths = sorted(f"/shapes/images/train-{i}.png" for i in range(len(lines)))
    assert sorted(p for p, _ in images.requests) == paths  # validation: each once

    images.requests.clear()
    hyperparameters = {"epochs": 1, "batchSize": 2, "maxPixels": 3136}
    kubectl.apply(
        finetunejob("remote-run", "remote-shapes", hyperparameters=hyperparameters), "-n", ns
    )
    done = wait_phase(
        operator, kubectl, "ftj", ns, "remote-run", ("Succeeded", "Failed"), 300, "the run"
    )
    assert done["phase"] == "Succeeded", done
    assert sorted(p for p, _ in images.requests) == paths  # the run's pod: each once more
    (pod,) = kubectl.get("pods", "-n", ns, "-l", "kubetune.io/finetunejob=remote-run")["items"]
    fetch = [s for s in pod["status"]["initContainerStatuses"] if s["name"] == "images-train-data"]
    assert fetch and fetch[0]["state"]["terminated"]["exitCode"] == 0, pod["status"]
    # startedAt has whole seconds: the last request came before the trainer's second.
    assert max(t for _, t in images.requests) < _started(pod, "trainer") + 1


def test_an_s3_dataset_brings_the_images_its_lines_name_by_relative_path(
    kubectl: Kubectl, kubelet: Any, ns: str, operator: Operator, s3_endpoint: str, tmp_path: Path
) -> None:
    import boto3

    data = write_shapes_dataset(tmp_path, 2, seed=6, name="train.jsonl")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="kubetune-shapes")
    for file in [data, *sorted((tmp_path / "images").iterdir())]:
        s3.put_object(
            Bucket="kubetune-shapes",
            Key=f"set/{file.relative_to(tmp_path)}",
            Body=file.read_bytes(),
        )
    kubectl.apply_secret(
        ns, "s3-creds", {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    )
    on_s3 = dataset("s3-shapes", "unused")
    on_s3["spec"]["source"] = {
        "s3": {
            "uri": "s3://kubetune-shapes/set/train.jsonl",
            "endpoint": s3_endpoint,
            "secretRef": {"name": "s3-creds"},
        }
    }
    kubectl.apply(on_s3, "-n", ns)
    ready = wait_phase(
        operator, kubectl, "kds", ns, "s3-shapes", ("Ready", "Invalid", "Failed"), 120, "validation"
    )
    lines = len(data.read_text().splitlines())
    assert (ready["phase"], ready["examples"], ready["images"]) == ("Ready", lines, lines), ready
    hyperparameters = {"epochs": 1, "batchSize": 2, "maxPixels": 3136}
    kubectl.apply(finetunejob("s3-run", "s3-shapes", hyperparameters=hyperparameters), "-n", ns)
    done = wait_phase(
        operator, kubectl, "ftj", ns, "s3-run", ("Succeeded", "Failed"), 300, "the run"
    )
    assert done["phase"] == "Succeeded", done
