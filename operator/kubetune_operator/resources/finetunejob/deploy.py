"""What a FineTuneJob's spec.deploy asks for once it has trained: the ModelDeployment
that serves its result, kept in step with deploy, and deleted when deploy is off; or,
with deploy.modelDeployment, nothing of its own: that shared server loads the adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_operator.api.common import API_VERSION
from kubetune_operator.api.finetunejob import Deploy, FineTuneJobSpec
from kubetune_operator.api.modeldeployment import MODEL_DEPLOYMENT
from kubetune_operator.resources.actions import Action, Apply, Delete
from kubetune_operator.resources.common import (
    LABEL_FINETUNEJOB,
    Manifest,
    labels,
    owned_by,
    owner_reference,
)
from kubetune_operator.resources.platform import output_name, output_storage
from kubetune_operator.resources.policy import Policy, runtime_refusal


def model_deployment(ftj: Mapping[str, Any], spec: FineTuneJobSpec, deploy: Deploy) -> Manifest:
    """The ModelDeployment a FineTuneJob with deploy.enabled asks for, named after it
    and owned by it: its adapter on the base model, or with full tuning its output as
    the model."""
    meta = ftj["metadata"]
    name = output_name(spec)
    served: dict[str, Any]
    if spec.tuning == "lora":
        served = {
            "baseModel": spec.base_model.model_dump(by_alias=True, exclude_none=True),
            "adapters": [{"name": name, "fineTuneJob": meta["name"]}],
        }
    else:
        source = output_storage(spec).model_dump(by_alias=True, exclude_none=True)
        served = {
            "baseModel": {
                "name": name,
                "source": source,
                "trustRemoteCode": spec.base_model.trust_remote_code,
            }
        }
    md_spec: Manifest = {**served, "replicas": deploy.replicas}
    runtime = deploy.runtime.model_dump(by_alias=True, exclude_none=True) if deploy.runtime else {}
    # Images at serve time are sized as in training, unless the runtime says otherwise.
    runtime.setdefault("maxPixels", spec.hyperparameters.max_pixels)
    md_spec["runtime"] = runtime
    # The server runs where the trainer ran, on as many GPUs: serving needs less
    # memory than training did.
    md_spec["resources"] = spec.resources.model_dump(
        by_alias=True,
        exclude_none=True,
        include={"gpus", "gpu_resource", "node_selector", "tolerations", "priority_class_name"},
    )
    return {
        "apiVersion": API_VERSION,
        "kind": MODEL_DEPLOYMENT.kind,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": labels("serving", meta["name"], {LABEL_FINETUNEJOB: meta["name"]}),
            "ownerReferences": [owner_reference(ftj)],
        },
        "spec": md_spec,
    }


def shared_server(spec: FineTuneJobSpec) -> str | None:
    """The shared ModelDeployment the run's adapter joins, if deploy names one."""
    deploy = spec.deploy
    return deploy.model_deployment if deploy is not None and deploy.enabled else None


def deploy(
    ftj: Mapping[str, Any],
    spec: FineTuneJobSpec,
    existing: Manifest | None,
    policy: Policy,
    shared: Manifest | None = None,
) -> tuple[tuple[Action, ...], Manifest]:
    """Serve the result as spec.deploy says, given the ModelDeployment of the
    FineTuneJob's name (``existing``): apply it, or delete the one it made once deploy
    is turned off; or, with deploy.modelDeployment, say whether that one (``shared``)
    can take the adapter. Returns the actions and the status fields that go with them."""
    meta = ftj["metadata"]
    wanted = spec.deploy if spec.deploy is not None and spec.deploy.enabled else None
    if wanted is not None and wanted.model_deployment:
        # The shared server finds the runs that attach to it and loads their adapters;
        # a server of its own, from before, goes.
        mine = existing is not None and owned_by(existing, meta["uid"])
        gone = (Delete(MODEL_DEPLOYMENT.kind, meta["namespace"], meta["name"]),) if mine else ()
        fields: Manifest = {"deployment": {"name": wanted.model_deployment}}
        server = f"ModelDeployment {wanted.model_deployment!r} (spec.deploy.modelDeployment)"
        base = ((shared or {}).get("spec") or {}).get("baseModel") or {}
        if shared is None:
            fields["message"] = (
                f"trained; {server} did not exist in namespace {meta['namespace']!r} when "
                "the run succeeded: the adapter joins it once it is created"
            )
        elif base.get("name") != spec.base_model.name:
            fields["message"] = (
                f"trained, but not served: {server} serves base model {base.get('name')!r}, "
                f"not this run's {spec.base_model.name!r}"
            )
        return gone, fields
    if existing is not None and not owned_by(existing, meta["uid"]):
        if wanted is not None:
            return (), {
                "deployment": None,
                "message": f"trained, but not deployed: ModelDeployment {meta['name']} "
                "exists and belongs to something else",
            }
        return (), {"deployment": None}
    if wanted is not None:
        # A runtime edited after training (or made before the policy): the server it
        # asks for would be refused, and the one already serving stays as it is.
        refusal = runtime_refusal(wanted.runtime, "spec.deploy.runtime", policy)
        if refusal is not None:
            return (), {"message": f"trained, but not deployed: {refusal}"}
        return (Apply(model_deployment(ftj, spec, wanted)),), {"deployment": {"name": meta["name"]}}
    if existing is not None:
        return (Delete(MODEL_DEPLOYMENT.kind, meta["namespace"], meta["name"]),), {
            "deployment": None
        }
    return (), {"deployment": None}
