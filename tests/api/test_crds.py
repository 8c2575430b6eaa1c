"""The generated CRDs: current, structural, documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api.crds import ALL, crd, filename, render

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("folder", ["crds", "charts/kubetune/files/crds"])
@pytest.mark.parametrize("info", ALL, ids=lambda i: i.kind)
def test_committed_crds_are_current(folder: str, info: Any) -> None:
    committed = ROOT / folder / filename(info)
    assert committed.exists(), f"{committed} is missing: run `make crds`"
    assert committed.read_text() == render(info), f"{committed} is stale: run `make crds`"


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("info", ALL, ids=lambda i: i.kind)
def test_schemas_are_structural_and_every_field_is_described(info: Any) -> None:
    schema = crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "$defs", "anyOf", "allOf", "oneOf", "title"} & node.keys(), path
        if path.endswith(".properties"):
            for name, sub in node.items():
                if name != "metadata":
                    assert sub.get("description"), f"{path}.{name} has no description"
                    assert "type" in sub or sub.get("x-kubernetes-int-or-string"), f"{path}.{name}"


def test_names_columns_and_status_subresource() -> None:
    by_kind = {info.kind: crd(info) for info in ALL}
    columns = {
        kind: [
            c["name"]
            for c in c_["spec"]["versions"][0]["additionalPrinterColumns"]
            if "priority" not in c
        ]
        for kind, c_ in by_kind.items()
    }
    assert columns == {
        "Dataset": ["Phase", "Examples", "Images", "Age"],
        "FineTuneJob": ["Phase", "Progress", "Train Loss", "Eval Loss", "Tokens", "Score", "Age"],
        "ModelDeployment": ["Phase", "Endpoint", "Ready", "Age"],
    }
    for kind, short in [("Dataset", "kds"), ("FineTuneJob", "ftj"), ("ModelDeployment", "mdep")]:
        names = by_kind[kind]["spec"]["names"]
        assert names["shortNames"] == [short]
        assert names["categories"] == ["kubetune"]
        assert by_kind[kind]["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_crd_yaml_is_loadable() -> None:
    for info in ALL:
        assert yaml.safe_load(render(info))["metadata"]["name"] == f"{info.plural}.kubetune.io"
