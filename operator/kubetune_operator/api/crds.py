"""Turn the pydantic models into apiextensions.k8s.io/v1 CustomResourceDefinitions.

`python -m kubetune_operator.api.crds DIR...` writes one YAML file per kind into each
DIR (`make crds` writes crds/ and the Helm chart's copy). Kubernetes wants
*structural* schemas: every node typed, no $ref, no anyOf-with-null, OpenAPI v3.0
keywords. This module does that translation and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune_operator.api.common import CATEGORY, GROUP, VERSION, CrdInfo, model_description
from kubetune_operator.api.dataset import DATASET
from kubetune_operator.api.finetunejob import FINE_TUNE_JOB
from kubetune_operator.api.modeldeployment import MODEL_DEPLOYMENT

ALL: tuple[CrdInfo, ...] = (DATASET, FINE_TUNE_JOB, MODEL_DEPLOYMENT)

Schema = dict[str, Any]

# JSON-schema keys with no meaning (or another meaning) in a Kubernetes schema.
_DROPPED = {"title", "additionalProperties", "format", "$defs", "propertyNames"}
_ALLOWED = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "additionalProperties",
}


class SchemaError(ValueError):
    pass


def _null_branch(s: Schema) -> bool:
    return s.get("type") == "null"


def _convert(node: Schema, defs: dict[str, Schema], where: str) -> Schema:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        # Keys beside the $ref (the field's description, default) win over the
        # referenced model's own.
        return _convert({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs, where)
    if "allOf" in node and len(node["allOf"]) == 1:
        rest = {k: v for k, v in node.items() if k != "allOf"}
        return _convert({**node["allOf"][0], **rest}, defs, where)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if not _null_branch(b)]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        nullable = len(branches) < len(node["anyOf"])
        if len(branches) == 1:
            merged = _convert({**branches[0], **rest}, defs, where)
        elif sorted(b.get("type", "") for b in branches) == ["integer", "string"]:
            merged = _convert({**rest, "x-kubernetes-int-or-string": True}, defs, where)
        else:
            raise SchemaError(f"{where}: a union of {branches} has no structural form")
        if nullable:
            merged["nullable"] = True
            if merged.get("default", 0) is None:
                del merged["default"]
        return merged

    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020 gives the bound; OpenAPI v3.0 a flag beside minimum/maximum.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _convert(sub, defs, f"{where}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, f"{where}[]")
        elif key == "default" and value is None:
            continue
        elif key == "description":
            out[key] = " ".join(str(value).split())
        elif key in _ALLOWED or key.startswith("x-kubernetes-"):
            out[key] = value
        else:
            raise SchemaError(f"{where}: {key!r} has no place in a Kubernetes schema")
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], defs, f"{where}.*")
    if "enum" in node.get("propertyNames", {}):
        # Map keys from an enum: Kubernetes schemas cannot say that, CEL can.
        keys = node["propertyNames"]["enum"]
        out.setdefault("x-kubernetes-validations", []).append(
            {
                "rule": f"self.all(k, k in {keys!r})",
                "message": f"keys must be among {', '.join(keys)}",
            }
        )
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out:
        out["type"] = "object"
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"{where}: no type")
    return out


def _check_descriptions(node: Schema, where: str) -> None:
    for name, sub in node.get("properties", {}).items():
        if not sub.get("description"):
            raise SchemaError(f"{where}.{name} has no description (it shows in kubectl explain)")
        _check_descriptions(sub, f"{where}.{name}")
    if "items" in node:
        _check_descriptions(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        _check_descriptions(node["additionalProperties"], f"{where}.*")


def structural_schema(model: type[BaseModel], where: str) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _convert(raw, raw.get("$defs", {}), where)
    _check_descriptions(schema, where)
    return schema


def crd(info: CrdInfo) -> Schema:
    spec = structural_schema(info.spec, "spec")
    spec["description"] = model_description(info.spec)
    if info.spec_transition_rules:
        spec.setdefault("x-kubernetes-validations", []).extend(info.spec_transition_rules)
    status = structural_schema(info.status, "status")
    status["description"] = model_description(info.status)
    # Handlers write status before they know every field; phase defaults matter only
    # to the operator, not to the stored object.
    status["properties"]["phase"].pop("default", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": c.name,
                            "type": c.type,
                            "jsonPath": c.json_path,
                            "description": c.description,
                            **({"priority": c.priority} if c.priority else {}),
                        }
                        for c in info.printer_columns
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": info.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {
                                    "type": "string",
                                    "description": "kubetune.io/v1alpha1",
                                },
                                "kind": {"type": "string", "description": info.kind},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def render(info: CrdInfo) -> str:
    header = "# Generated by `make crds` from kubetune_operator/api; do not edit.\n"
    return header + yaml.safe_dump(crd(info), sort_keys=False, width=100)


def filename(info: CrdInfo) -> str:
    return f"{GROUP}_{info.plural}.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dirs", nargs="+", type=Path, help="folders to write the CRD files into")
    args = parser.parse_args(argv)
    for folder in args.dirs:
        folder.mkdir(parents=True, exist_ok=True)
        for info in ALL:
            (folder / filename(info)).write_text(render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
