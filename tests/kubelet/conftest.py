"""Fixtures for the local kubelet's tests (hack/local_kubelet.py)."""

from __future__ import annotations

from typing import Any

import pytest
from kube import Kubectl

CLAIMS = ("work", "models", "gates", "marks")


@pytest.fixture(scope="module")
def namespace(kubectl: Kubectl, kubelet: Any) -> str:
    """A namespace enforcing the restricted Pod Security level, with the claims the
    tests' pods mount."""
    ns = kubectl.new_namespace("kubelet", {"pod-security.kubernetes.io/enforce": "restricted"})
    for claim in CLAIMS:
        kubelet.provide_claim(ns, claim)
    return ns
