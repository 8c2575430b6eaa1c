"""Session fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import controlplane
import pytest
from kube import Kubectl

# Tiny random-weight models and the synthetic image task, built once per session.
pytest_plugins = ["tiny_models"]


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    """A real etcd + kube-apiserver (+ garbage collector) on loopback, for this session."""
    controlplane.require_binaries()
    started = controlplane.start(tmp_path_factory.mktemp("controlplane"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def kubeconfig(plane: controlplane.ControlPlane) -> Path:
    return plane.kubeconfig


@pytest.fixture(scope="session")
def kubectl(plane: controlplane.ControlPlane) -> Kubectl:
    """kubectl bound to the test control plane, with kubetune's CRDs installed."""
    k = Kubectl(plane.kubeconfig)
    k.install_crds()
    # The garbage collector learns of new resource types only every 30 s; a restart
    # makes it collect children of kubetune objects at once.
    plane.restart_controllers()
    return k


@pytest.fixture(scope="session")
def kubelet(
    kubectl: Kubectl, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The local kubelet of the test cluster: one node, on which kube-scheduler places
    every pod, run as local processes (hack/local_kubelet.py)."""
    from local_kubelet import LocalKubelet

    node = LocalKubelet(kubeconfig, tmp_path_factory.mktemp("kubelet"), gpus=GPUS)
    node.start()
    yield node
    node.stop()


# Enough for the end-to-end tests' training pods and model servers, which each ask
# for one GPU, to run side by side as the tests need.
GPUS = 8


@pytest.fixture()
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local S3-compatible endpoint speaking real HTTP (moto's server)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    server.stop()
