"""The objects a spec names that its pods cannot start without, and what status says
while one is missing.

A pod whose ConfigMap volume or claim does not exist waits in ContainerCreating or
Pending, with the reason only in an Event that nobody reads; its Dataset would say
"validating" for as long. So before it makes a Job the operator looks for them itself,
names the first missing one in the message and the Ready reason, makes nothing, and
looks again at each resync until it appears. (A missing Secret needs no look: the
kubelet reports it on the pod as CreateContainerConfigError, which status shows; and
the operator may not read Secrets.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetune_operator.api.common import ModelRef, PvcLocation
from kubetune_operator.api.dataset import DatasetSpec
from kubetune_operator.api.finetunejob import FineTuneJobSpec

CONFIG_MAP = "ConfigMap"
CLAIM = "PersistentVolumeClaim"


@dataclass(frozen=True)
class Reference:
    kind: str  # CONFIG_MAP or CLAIM
    name: str
    field: str  # the spec field that names it


def _claim(location: PvcLocation | None, field: str) -> tuple[Reference, ...]:
    return (Reference(CLAIM, location.claim_name, field),) if location is not None else ()


def _model(model: ModelRef, field: str) -> tuple[Reference, ...]:
    source = model.source
    return _claim(source.pvc, f"{field}.source.pvc.claimName") if source is not None else ()


def of_dataset(spec: DatasetSpec) -> tuple[Reference, ...]:
    source = spec.source
    refs = _claim(source.pvc, "spec.source.pvc.claimName")
    if source.config_map is not None:
        refs += (Reference(CONFIG_MAP, source.config_map.name, "spec.source.configMap.name"),)
    return refs


def of_finetunejob(spec: FineTuneJobSpec) -> tuple[Reference, ...]:
    """The claims of its base model and output (its Datasets are waited for as such)."""
    storage = spec.output_model.storage
    return _model(spec.base_model, "spec.baseModel") + _claim(
        storage.pvc if storage is not None else None, "spec.outputModel.storage.pvc.claimName"
    )


def missing_reason(missing: Sequence[Reference]) -> str:
    return f"{missing[0].kind}NotFound"


def missing_message(missing: Sequence[Reference], namespace: str) -> str:
    named = "; ".join(
        f"{ref.kind} {ref.name!r} ({ref.field}) does not exist in namespace {namespace!r}"
        for ref in missing
    )
    return f"{named}; waiting for it to be created"
