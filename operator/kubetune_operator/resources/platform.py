"""What the platform team sets once for every namespace (the chart's ``defaults``
values), so that an ML engineer's FineTuneJob needs no storage details: where tuned
models go when a run does not say, and the pull secrets, placement and cloud identity
of the validation, training and server pods the operator makes."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kubetune_operator.api.common import PvcLocation, S3Location, Toleration
from kubetune_operator.api.finetunejob import FineTuneJobSpec, OutputModel, OutputStorage
from kubetune_operator.resources.common import Manifest
from kubetune_trainer.contract.fetch import TRUSTED_HOSTS_VARIABLE

MODEL_STORE_VALUE = "defaults.modelStore"
"""The chart value that names the default model store, for messages."""


@dataclass(frozen=True)
class ModelStore:
    """Where runs that name no output storage write: ``<store>/<namespace>/<name>``.
    A PersistentVolumeClaim of that name in each namespace, or an S3 prefix reached
    with the pods' own identity (no Secret)."""

    pvc: PvcLocation | None = None
    s3: S3Location | None = None

    @classmethod
    def parse(cls, uri: str, endpoint: str = "") -> ModelStore:
        """``pvc://claim[/folder]`` or ``s3://bucket[/prefix]``; ValueError saying what
        is wrong."""
        scheme, sep, rest = uri.partition("://")
        rest = rest.strip("/")
        if not sep or not rest:
            raise ValueError(
                f"model store {uri!r}: expected pvc://claim/folder or s3://bucket/prefix"
            )
        try:
            if scheme == "pvc":
                claim, _, folder = rest.partition("/")
                return cls(pvc=PvcLocation(claim_name=claim, path=folder or "."))
            if scheme == "s3":
                return cls(s3=S3Location(uri=f"s3://{rest}", endpoint=endpoint or None))
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ValueError(f"model store {uri!r}: {problem}") from None
        raise ValueError(f"model store {uri!r}: the scheme must be pvc or s3")

    def storage_for(self, namespace: str, name: str) -> OutputStorage:
        if self.pvc is not None:
            path = posixpath.normpath(posixpath.join(self.pvc.path, namespace, name))
            return OutputStorage(pvc=self.pvc.model_copy(update={"path": path}))
        assert self.s3 is not None
        return OutputStorage(
            s3=self.s3.model_copy(update={"uri": f"{self.s3.uri.rstrip('/')}/{namespace}/{name}"})
        )


def with_output(
    spec: FineTuneJobSpec, meta: Mapping[str, Any], store: ModelStore | None
) -> FineTuneJobSpec:
    """The spec with ``outputModel`` completed: its name defaults to the FineTuneJob's,
    its storage to the platform's store. Without a store, a run that names no storage
    keeps none, and fails (``output_problem``)."""
    out = spec.output_model
    storage = out.storage
    if storage is None and store is not None:
        storage = store.storage_for(meta["namespace"], meta["name"])
    resolved = OutputModel(name=out.name or meta["name"], storage=storage)
    return spec.model_copy(update={"output_model": resolved})


def output_problem(spec: FineTuneJobSpec) -> str | None:
    """Why a spec that ``with_output`` completed has nowhere to write, or None."""
    if spec.output_model.storage is not None:
        return None
    return (
        "spec.outputModel.storage is not set and the cluster has no default model store: "
        f"set one of them (the chart value {MODEL_STORE_VALUE}, or "
        "outputModel.storage.pvc or .s3 in this FineTuneJob)"
    )


def output_storage(spec: FineTuneJobSpec) -> OutputStorage:
    """The output storage of a spec that passed ``output_problem``."""
    storage = spec.output_model.storage
    if storage is None:
        raise ValueError(output_problem(spec))
    return storage


def output_name(spec: FineTuneJobSpec) -> str:
    """The tuned model's name in a spec that ``with_output`` completed."""
    name = spec.output_model.name
    if name is None:
        raise ValueError("outputModel.name is set by with_output")
    return name


_TOLERATIONS = TypeAdapter(list[Toleration])


@dataclass(frozen=True)
class PodDefaults:
    """Added to the pod of every Job and server the operator makes. A spec's own
    node selector keys and priority class win; tolerations and pull secrets add up."""

    image_pull_secrets: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Manifest, ...] = ()
    priority_class_name: str = ""
    # host:port pairs the pods' fetches may reach on private addresses (every container
    # gets them in TRUSTED_HOSTS_VARIABLE).
    trusted_hosts: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, text: str) -> PodDefaults:
        """The chart's ``defaults.pods`` as JSON: ``imagePullSecrets`` (names, or
        ``{name}`` objects as in a pod), ``nodeSelector``, ``tolerations``,
        ``priorityClassName``. ValueError naming what is wrong."""
        try:
            given = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise ValueError(f"pod defaults are not JSON: {exc}") from None
        if not isinstance(given, dict):
            raise ValueError("pod defaults must be a JSON object")
        unknown = set(given) - {
            "imagePullSecrets",
            "nodeSelector",
            "tolerations",
            "priorityClassName",
        }
        if unknown:
            raise ValueError(f"pod defaults: unknown keys {sorted(unknown)}")
        secrets = tuple(
            s["name"] if isinstance(s, dict) else str(s)
            for s in given.get("imagePullSecrets") or ()
        )
        selector = given.get("nodeSelector") or {}
        if not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values()):
            raise ValueError("pod defaults: nodeSelector must map labels to strings")
        try:
            tolerations = _TOLERATIONS.validate_python(given.get("tolerations") or [])
        except ValidationError as exc:
            raise ValueError(f"pod defaults: tolerations: {exc.errors()[0]['msg']}") from None
        return cls(
            image_pull_secrets=secrets,
            node_selector=dict(selector),
            tolerations=tuple(t.model_dump(by_alias=True, exclude_none=True) for t in tolerations),
            priority_class_name=str(given.get("priorityClassName") or ""),
        )

    def apply(self, workload: Manifest) -> Manifest:
        """A Job or Deployment with these defaults in its pod template (a copy)."""
        pod = dict(workload["spec"]["template"]["spec"])
        if self.image_pull_secrets:
            own = list(pod.get("imagePullSecrets") or [])
            names = {s["name"] for s in own}
            pod["imagePullSecrets"] = own + [
                {"name": n} for n in self.image_pull_secrets if n not in names
            ]
        if self.node_selector:
            pod["nodeSelector"] = {**self.node_selector, **(pod.get("nodeSelector") or {})}
        if self.tolerations:
            own_tolerations = list(pod.get("tolerations") or [])
            pod["tolerations"] = own_tolerations + [
                t for t in self.tolerations if t not in own_tolerations
            ]
        if self.priority_class_name and not pod.get("priorityClassName"):
            pod["priorityClassName"] = self.priority_class_name
        if self.trusted_hosts:
            trusted = {"name": TRUSTED_HOSTS_VARIABLE, "value": ",".join(self.trusted_hosts)}
            for key in ("initContainers", "containers"):
                if key in pod:
                    pod[key] = [{**c, "env": [*(c.get("env") or []), trusted]} for c in pod[key]]
        template = {**workload["spec"]["template"], "spec": pod}
        return {**workload, "spec": {**workload["spec"], "template": template}}
