"""What a reconcile decides to do, as plain values: each kind's ``decide`` returns a
``Decision``, and the handlers carry it out (handlers/act.py)."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_operator.resources.common import Manifest
from kubetune_operator.resources.conditions import StatusUpdate
from kubetune_operator.resources.workloads import ServerPod


@dataclass(frozen=True)
class Create:
    """Create the object unless it exists. One already there that its owner does not
    own, or a Job already there (whose state is what status reads), ends the actions:
    the reconcile looks again with it in view."""

    body: Manifest


@dataclass(frozen=True)
class Apply:
    """Make the object look like ``body`` (server-side apply: the operator owns the
    fields it sets and nothing else)."""

    body: Manifest


@dataclass(frozen=True)
class Delete:
    kind: str  # Job | ModelDeployment
    namespace: str
    name: str


@dataclass(frozen=True)
class Suspend:
    """Set a Job's spec.suspend."""

    namespace: str
    name: str
    suspend: bool


@dataclass(frozen=True)
class Activate:
    """Set a Kueue Workload's spec.active: how a Job that Kueue manages is suspended
    and resumed (Kueue would undo a write of the Job's own suspend)."""

    namespace: str
    name: str
    active: bool


@dataclass(frozen=True)
class LoadAdapter:
    pod: ServerPod
    name: str
    path: str


@dataclass(frozen=True)
class UnloadAdapter:
    pod: ServerPod
    name: str


@dataclass(frozen=True)
class OpenGate:
    """Set the pod's readiness-gate condition: it serves every adapter it can."""

    pod: ServerPod


# What goes to a server pod's guarded admin routes (handlers/servers.py) or its status.
ServerAction = LoadAdapter | UnloadAdapter | OpenGate
Action = Create | Apply | Delete | Suspend | Activate | ServerAction


@dataclass(frozen=True)
class Decision:
    """One reconcile's outcome: ``actions`` first, then the one status write, then
    ``after_status`` (what must not happen before status says why: deleting the Job of
    a run that failed before its pod started would otherwise bring back a reconcile
    that finds a run still wanting a Job). ``dependents_changed``: objects that use
    this one have something new to see. ``log``: a line for the operator's log, where
    the decision leaves nothing in the object's status to say why."""

    actions: tuple[Action, ...] = ()
    status: StatusUpdate | None = None
    after_status: tuple[Action, ...] = ()
    dependents_changed: bool = False
    log: str = ""
