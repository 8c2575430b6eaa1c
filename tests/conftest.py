"""Session fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import controlplane
import pytest
from kube import Kubectl


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real etcd + kube-apiserver on loopback, for this test session only."""
    controlplane.require_binaries()
    plane = controlplane.start(tmp_path_factory.mktemp("controlplane"))
    try:
        yield plane.kubeconfig
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    """kubectl bound to the test control plane, with kubetune's CRDs installed."""
    k = Kubectl(kubeconfig)
    k.install_crds()
    return k
