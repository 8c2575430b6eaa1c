"""Adapters into running server pods: which to load and unload on each pod, when a pod
may take requests (its readiness gate), and each adapter's state for status.

The operator loads adapters through each pod's guarded admin routes (see
kubetune_trainer/serving/guard.py), so adding or removing one never replaces a pod;
a pod that starts later gets the whole list before its gate lets requests in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kubetune_operator.api.modeldeployment import AdapterState
from kubetune_operator.resources.actions import LoadAdapter, OpenGate, ServerAction, UnloadAdapter
from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.modeldeployment.adapters import (
    Resolved,
    ServedAdapter,
    Unservable,
)
from kubetune_operator.resources.modeldeployment.server import ADAPTERS_LOADED, adapter_path
from kubetune_operator.resources.workloads import ServerPod

# (pod uid, adapter name, folder) → what the server said when loading it failed. Not
# tried again on that pod while the folder stays the same.
LoadFailures = Mapping[tuple[str, str, str], str]


def server_pods(pods: Sequence[Manifest]) -> list[Manifest]:
    """The pods worth asking: running, with an address, their containers ready (the
    pod itself is Ready only once its gate is open)."""
    chosen = []
    for pod in pods:
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if (
            not pod["metadata"].get("deletionTimestamp")
            and status.get("phase") == "Running"
            and status.get("podIP")
            and conditions.get("ContainersReady") == "True"
        ):
            chosen.append(pod)
    return chosen


def gate_open(pod: Manifest) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == ADAPTERS_LOADED and c.get("status") == "True" for c in conditions)


def plan_loading(
    resolved: Sequence[Resolved], pods: Sequence[ServerPod], failures: LoadFailures
) -> tuple[list[ServerAction], list[AdapterState]]:
    """What to do on each pod, and each adapter's state as the pods show it now."""
    wanted = {a.name: adapter_path(a) for a in resolved if isinstance(a, ServedAdapter)}
    actions: list[ServerAction] = []
    for pod in pods:
        if pod.loaded is None:
            continue
        for name, path in sorted(pod.loaded.items()):
            if wanted.get(name) != path:
                actions.append(UnloadAdapter(pod, name))
        missing = [
            LoadAdapter(pod, name, path)
            for name, path in sorted(wanted.items())
            if pod.loaded.get(name) != path and (pod.uid, name, path) not in failures
        ]
        actions += missing
        if not missing and not pod.gate_open:
            actions.append(OpenGate(pod))
    return actions, [_state(a, wanted, pods, failures) for a in resolved]


def _state(
    adapter: Resolved, wanted: Mapping[str, str], pods: Sequence[ServerPod], failures: LoadFailures
) -> AdapterState:
    answering = [p for p in pods if p.loaded is not None]
    if isinstance(adapter, Unservable):
        return AdapterState(
            name=adapter.name,
            loaded=0,
            replicas=len(answering),
            reason=adapter.reason,
            message=adapter.message,
        )
    path = wanted[adapter.name]
    loaded = sum(1 for p in answering if (p.loaded or {}).get(adapter.name) == path)
    state = AdapterState(name=adapter.name, loaded=loaded, replicas=len(answering))
    failed = [
        failures[(p.uid, adapter.name, path)]
        for p in answering
        if (p.uid, adapter.name, path) in failures
    ]
    if failed:
        return state.model_copy(
            update={"reason": "LoadFailed", "message": f"the server refused it: {failed[0]}"}
        )
    if not answering:
        return state.model_copy(
            update={"reason": "NoServerPod", "message": "no server pod is running yet"}
        )
    if loaded < len(answering):
        return state.model_copy(
            update={"reason": "Loading", "message": f"loading into {len(answering) - loaded} pods"}
        )
    return state
