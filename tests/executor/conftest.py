"""Fixtures for the local executor's tests (hack/local_executor.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kube import Kubectl
from local_executor import LocalExecutor  # hack/ is on pytest's pythonpath


@pytest.fixture(scope="module")
def namespace(kubectl: Kubectl) -> str:
    """A namespace enforcing the restricted Pod Security level."""
    return kubectl.new_namespace("executor", {"pod-security.kubernetes.io/enforce": "restricted"})


@pytest.fixture(scope="module")
def executor(
    kubeconfig: Path, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalExecutor]:
    """The executor, watching only this module's namespace; retries after 0.2 s."""
    state = tmp_path_factory.mktemp("executor-state")
    with LocalExecutor(kubeconfig, state, [namespace], pod_failure_backoff=0.2) as running:
        yield running
