"""Local executor: the kubelet and Job controller of the test control plane.

Tests and ``make demo``/``make dev-up`` only -- it is not part of the shipped packages
(``operator/``, ``trainer-image/``). The test control plane (``hack/controlplane.sh``)
runs etcd, kube-apiserver and a kube-controller-manager with only the garbage-collector,
namespace and service-account controllers, and this machine has no container runtime.
This module fills the gap and talks to the API server exactly as the real components do,
so admission, status subresources, owner references and garbage collection stay real.

Run it::

    python hack/local_executor.py --kubeconfig K --state-dir D [--namespace NS ...]

or embed it (pytest fixtures)::

    with LocalExecutor(kubeconfig, state_dir, namespaces=[ns]) as executor:
        ...

Job controller (batch/v1 Jobs, NonIndexed and Indexed completion modes, not ``spec.managedBy``)
    Creates each Job's Pods from ``spec.template`` through the API, so Pod Security
    admission judges them: generateName ``<job>-``, a controller ownerReference, the
    job-name/controller-uid labels, the ``batch.kubernetes.io/job-tracking`` finalizer and
    ``spec.nodeName: local-executor``. Job status follows kube-controller-manager v1.33:
    startTime, active/ready/terminating/succeeded/failed, uncountedTerminatedPods,
    SuccessCriteriaMet then Complete with completionTime, FailureTarget then Failed
    (BackoffLimitExceeded once more than backoffLimit pods failed, DeadlineExceeded after
    activeDeadlineSeconds), Suspended True/False (suspending deletes the running Pods
    without counting them; resuming resets startTime). Failed Pods are replaced after
    an exponential backoff starting at ``--pod-failure-backoff`` seconds (the real
    controller starts at 10 s).
    ``spec.podFailurePolicy`` as upstream's matchPodFailurePolicy: the rules, in order,
    are matched against each Failed Pod and the first match decides. ``onExitCodes``
    (``containerName`` optional, In/NotIn; exit code 0 never matches) looks at the
    terminated regular containers, then the init containers; ``onPodConditions`` at
    the Pod's conditions (``status`` defaults to True). FailJob: FailureTarget then
    Failed with reason PodFailurePolicy and upstream's message ("Container main for pod
    ns/p failed with exit code 3 matching FailJob rule at index 0"; "Pod ns/p has
    condition DisruptionTarget matching ..."), checked before the backoff limit, the
    other Pods deleted as for BackoffLimitExceeded. Ignore: the Pod loses its tracking
    finalizer without being counted in ``failed`` or towards backoffLimit, and is
    replaced (after the backoff, which ignored failures still lengthen, as upstream).
    Count, and a Pod no rule matches: counted as without a policy. FailIndex (valid
    only with backoffLimitPerIndex, not implemented) counts the failure like Count; the
    index is not marked failed. A rule with an unknown action is skipped. As upstream,
    a podFailurePolicy implies podReplacementPolicy Failed (the API server defaults it
    so): a deleted Pod is neither failed nor replaced until it reaches phase Failed,
    and counts as ``terminating`` meanwhile.
    Events on the Job: FailedCreate, Completed, and the failure reason.
    Indexed Jobs (``completionMode: Indexed``): one Pod per pending completion index,
    lowest first, at most ``parallelism`` active, each with generateName
    ``<job>-<index>-``, the ``batch.kubernetes.io/job-completion-index`` annotation and
    label, ``spec.hostname: <job>-<index>`` (the template's ``subdomain`` kept) and, in
    every container and init container that does not define it, the env var
    ``JOB_COMPLETION_INDEX`` as a fieldRef to that annotation (so
    ``$(JOB_COMPLETION_INDEX)`` expands in args). A succeeded Pod's index goes to
    ``completedIndexes`` ("0-2,4"; ``succeeded`` is their number, no UID is tracked); a
    failed Pod counts in ``failed`` and its index gets a new Pod after the backoff, until
    backoffLimit is exceeded (the Job then fails as above and its other Pods are
    deleted); SuccessCriteriaMet then Complete once every index 0..completions-1
    succeeded. Suspend/resume as for NonIndexed Jobs. Not implemented for Indexed Jobs:
    backoffLimitPerIndex/maxFailedIndexes/failedIndexes, successPolicy, and deleting
    duplicate Pods of one index or Pods with an index >= completions (the executor
    never creates them, but it would leave such Pods running and count them as active).
    Deviation: a Pod rejected for good at creation (Pod Security, or invalid: HTTP 403
    "violates PodSecurity" / 422) fails the Job with reason ``PodCreateFailed`` and the
    API server's message; the real controller would retry forever, which in a test only
    shows up as a timeout. Other creation errors (e.g. the namespace's default
    ServiceAccount not there yet) are retried.

Kubelet (node ``local-executor``: every Pod with ``spec.nodeName: local-executor``)
    Runs the ``initContainers`` one after the other, each to completion, then the first
    regular container, each as a local process of its own ``command`` + ``args``
    (``$(VAR)`` expanded); the image is ignored. The command is looked up on PATH with
    this Python's bin directory first, so ``kubetune`` is the venv's. Each container has
    its own environment: ``env`` (values, configMapKeyRef, secretKeyRef, fieldRef) and
    ``envFrom``, plus HOSTNAME (``spec.hostname``, else the Pod name), PATH and the host
    variables named by ``--pass-env`` (HOME,
    LANG, LC_ALL, TZ, TMPDIR by default); nothing else from the host leaks in. Working
    directory: ``workingDir``, else a per-pod scratch folder. Every container's env,
    command and mounts are resolved, and the volumes written, before the first one
    starts (see Limitations).
    Volumes become folders under the state dir: persistentVolumeClaim ->
    ``<state>/pvc/<namespace>/<claimName>/`` (the PVC object need not exist); emptyDir ->
    a per-pod folder, shared by all the Pod's containers (what an init container writes
    there is what the regular container reads); configMap, secret, downwardAPI and
    projected (including the service-account token, requested through the TokenRequest
    API) -> files written per pod. Each process runs in a private mount namespace
    (``unshare --mount``; ``unshare --user --map-root-user --mount`` when not root) in
    which each of its container's volumeMounts (``subPath``/``subPathExpr`` honoured) is
    bind-mounted onto its ``mountPath``, read-only where asked and always for
    configMap/secret/downwardAPI/projected volumes, so absolute paths such as
    ``/etc/kubetune`` or ``/data`` work without rewriting the command. Missing mount
    points are created on the host (empty folders or files; as root only). A
    per-container file is bind-mounted onto ``terminationMessagePath``
    (``/dev/termination-log`` by default). The process still sees the host's filesystem,
    so where a mountPath would hide the Python, the venv or the project it runs from
    (``/tmp`` over a checkout under /tmp, ``/usr``), those paths are bound back on top;
    a mountPath onto or inside them is refused with reason StartError.
    Pod status is reported like a kubelet: while an init container runs, Pending with
    ``initContainerStatuses`` (done ones terminated, the current one running, later ones
    waiting with PodInitializing), the regular container waiting with PodInitializing and
    Initialized False (ContainersNotInitialized); then Running with PodScheduled,
    Initialized, ContainersReady and Ready, then Succeeded/Failed with
    ``state.terminated`` (exitCode, reason Completed | Error | OOMKilled | StartError, the
    termination message truncated to 4096 bytes -- or, with ``FallbackToLogsOnError`` and
    a non-zero exit, the last 80 lines / 2048 bytes of the log). An init container that
    fails (or cannot start) fails the Pod at once, as with restartPolicy Never: it shows
    terminated with its exit code and message, the regular container never starts and
    stays waiting with PodInitializing; the executor's log shows the end of the init
    container's log. ``podIP``/``hostIP`` are 127.0.0.1. A missing ConfigMap/Secret
    leaves the Pod Pending (CreateContainerConfigError or ContainerCreating, on the
    container that needs it) and is retried. A Pod deleted through the API (by the Job
    controller, the garbage collector, a user, an eviction) has the process group of its
    current container sent SIGTERM, then SIGKILL after its grace period (capped at
    10 s); no later container starts. Before the deletion is confirmed (DELETE with
    grace 0; the Job's tracking finalizer still holds the object), its terminal status
    is written like a kubelet's: Failed with the container terminated (143 if SIGTERM
    killed it; Succeeded if it exited 0). A deleted Pod none of whose containers runs
    here (not started yet, or run by an earlier executor) is written Failed with its
    container states as they were (a running one as ContainerStatusUnknown). Conditions the
    kubelet does not own -- notably ``DisruptionTarget`` (reason EvictionByEvictionAPI),
    which the API server adds when a Pod is evicted through
    ``POST .../pods/NAME/eviction`` -- are kept in every status written, and each status
    patch carries the resourceVersion it was computed from (a 409 rereads the Pod), so
    an evicted Pod ends Failed with DisruptionTarget for a podFailurePolicy to match.

Environment contract: ``KUBETUNE_METRICS_PORT``
    Every local process shares 127.0.0.1, so two trainers cannot both listen on :9090.
    When the Job controller part creates a Pod, each container port named ``metrics``
    gets a free local port as its ``containerPort``, and the container gets the env var
    ``KUBETUNE_METRICS_PORT=<that port>``. The trainer must listen on
    ``$KUBETUNE_METRICS_PORT`` when it is set; the operator keeps scraping
    ``<pod IP>:<container port named metrics>``, which is then right in both worlds.

Limitations (it is a stand-in, not a node)
    * Processes run as the executor's user (root here): runAsUser, capabilities,
      seccomp and readOnlyRootFilesystem are admitted by the API server but not enforced;
      resources (GPUs included) are neither reserved nor limited; the image is ignored.
    * Only the init containers and the first regular container run; other regular
      containers, sidecars (init containers with ``restartPolicy: Always``, also left
      out of the status) and probes are ignored. restartPolicy OnFailure/Always behave
      like Never: a failed container, init or not, fails the Pod (the Job controller part
      creates a new Pod instead of restarting in place).
    * Env, command and mounts of every container are resolved before the first one
      starts, not as each starts: a ConfigMap/Secret missing for any container keeps the
      whole Pod Pending, even one the regular container alone needs (a kubelet would run
      the init containers first), and one changed while init containers run is not seen.
    * Name resolution: there is no cluster DNS. A Pod with ``spec.subdomain`` gets a
      generated hosts file (the host's /etc/hosts plus ``<hostname>.<subdomain>``,
      ``.<namespace>.svc`` and ``.svc.cluster.local`` forms of its own hostname and, for
      an Indexed Job's Pod, of every index ``<job>-<i>`` of its Job, all 127.0.0.1)
      bind-mounted read-only onto /etc/hosts (unless a volumeMount targets /etc/hosts).
      Since every Pod shares 127.0.0.1, two Pods of one Job cannot listen on the same
      port. Other Services' names do not resolve, and the Service itself is not checked.
      HOSTNAME is ``spec.hostname`` when set (else the Pod name), but the process's UTS
      hostname (``socket.gethostname()``) stays the host's.
    * ``kubectl logs`` and ``kubectl exec`` cannot work without a kubelet API: read the
      log at ``<state>/logs/<namespace>/<pod>.log``, or ``<pod>/<name>.log`` for init
      container ``name`` (``kubectl logs -c name``).
    * OOMKilled is a guess: a process killed by SIGKILL that the executor did not send.
    * successPolicy, backoffLimitPerIndex (so podFailurePolicy's FailIndex) and scaling
      parallelism down are not implemented; resourceFieldRef env/volume items are
      refused. Stopping the executor kills its processes; their Pods are marked Failed
      (ContainerStatusUnknown) by the next executor that sees them, as no kubelet could
      reattach to a killed process.
    * One executor per namespace: two executors watching the same namespace would both
      act as its Job controller and kubelet (scope them with ``--namespace``).
    * The kubeconfig may use client certificates or a static token (no exec plugins).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import ctypes
import heapq
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Protocol
from urllib.parse import urlencode

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

log = logging.getLogger("local_executor")

NODE_NAME = "local-executor"
POD_IP = "127.0.0.1"
JOB_CONTROLLER = "kubernetes.io/job-controller"
TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
METRICS_PORT_NAME = "metrics"
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # annotation and label
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
DEFAULT_PASS_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The kubelet's limits for the termination message (pkg/kubelet/kuberuntime).
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048

DEFAULT_BACKOFF_LIMIT = 6
DEFAULT_POD_FAILURE_BACKOFF = 1.0
MAX_POD_FAILURE_BACKOFF = 600.0
MAX_GRACE_SECONDS = 10.0
# On shutdown; short enough for supervisors that SIGKILL after 10 s (hack/dev.sh), which
# would leave the processes (each in its own session) running.
STOP_GRACE_SECONDS = 5.0
START_ERROR_EXIT = 128  # what container runtimes report when exec fails
SETUP_RETRY_SECONDS = 2.0
ERROR_RETRY_SECONDS = 1.0
WATCH_TIMEOUT_SECONDS = 300
REQUEST_TIMEOUT_SECONDS = 30.0
INIT_COMMAND = "_container-init"
TERMINATION_FILE = "termination-log"  # in each container's folder (container_dir)
START_ERROR_FILE = "start-error"

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """The API's timestamp format (metav1.Time has second precision)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def prune(value: Any) -> Any:
    """Drop None, "", {} and [] recursively, as the API server does with omitempty
    fields, so that a desired status compares equal to what the server returns."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", {}, [])}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


# ---------------------------------------------------------------- pods, pure ---


def pod_phase(pod: Obj) -> str:
    return str(pod.get("status", {}).get("phase") or "Pending")


def is_terminal(pod: Obj) -> bool:
    return pod_phase(pod) in ("Succeeded", "Failed")


def is_deleting(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def is_active(pod: Obj) -> bool:
    return not is_terminal(pod) and not is_deleting(pod)


def is_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def is_tracked(pod: Obj) -> bool:
    return TRACKING_FINALIZER in (pod["metadata"].get("finalizers") or [])


def is_pod_failed(pod: Obj, only_replace_failed: bool) -> bool:
    """The Job controller's isPodFailed: a deleted Pod that did not succeed counts as
    failed unless the Job only replaces Pods once they are Failed."""
    if pod_phase(pod) == "Failed":
        return True
    return not only_replace_failed and is_deleting(pod) and pod_phase(pod) != "Succeeded"


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind((POD_IP, 0))
        return int(sock.getsockname()[1])


def is_indexed(job: Obj) -> bool:
    return job["spec"].get("completionMode", "NonIndexed") == "Indexed"


def completion_index(pod: Obj) -> int | None:
    """The Job controller's getCompletionIndex: the annotation, else the label; None
    when missing or not a non-negative number."""
    meta = pod["metadata"]
    for source in (meta.get("annotations") or {}, meta.get("labels") or {}):
        if (value := source.get(COMPLETION_INDEX_KEY)) is not None:
            return int(value) if str(value).isdigit() else None
    return None


def format_indexes(indexes: Iterable[int]) -> str:
    """``status.completedIndexes``: sorted, consecutive runs as ``first-last`` ("0-2,4")."""
    runs: list[list[int]] = []
    for index in sorted(set(indexes)):
        if runs and runs[-1][1] == index - 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_indexes(text: str | None, completions: int) -> set[int]:
    """The inverse of ``format_indexes``; indexes >= ``completions`` are dropped (as the
    real controller does when completions shrank) and malformed parts ignored."""
    indexes: set[int] = set()
    for part in (text or "").split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            continue
        indexes.update(range(int(first), min(int(last or first), completions - 1) + 1))
    return indexes


def build_pod(
    job: Obj, free_port: Callable[[], int] = free_local_port, index: int | None = None
) -> Obj:
    """The Pod the Job controller creates from ``job.spec.template``.

    Container ports named ``metrics`` get a free local port and ``KUBETUNE_METRICS_PORT``
    (see the module docstring): every local Pod shares 127.0.0.1.

    For an Indexed Job, ``index`` is the completion index: like the real controller, the
    Pod gets the ``batch.kubernetes.io/job-completion-index`` annotation and label,
    generateName ``<job>-<index>-``, ``spec.hostname: <job>-<index>``, and every
    container and init container the env var ``JOB_COMPLETION_INDEX`` (a fieldRef to
    that annotation) unless it already defines it.
    """
    meta = job["metadata"]
    template = copy.deepcopy(job["spec"]["template"])
    template_meta = template.get("metadata") or {}
    labels = dict(template_meta.get("labels") or {})
    annotations = dict(template_meta.get("annotations") or {})
    for label in JOB_NAME_LABELS:
        labels.setdefault(label, meta["name"])
    for label in CONTROLLER_UID_LABELS:
        labels.setdefault(label, meta["uid"])
    spec = template["spec"]
    for container in spec["containers"]:
        _assign_metrics_port(container, free_port)
    generate_name = f"{meta['name']}-"
    if index is not None:
        annotations[COMPLETION_INDEX_KEY] = labels[COMPLETION_INDEX_KEY] = str(index)
        generate_name = f"{meta['name']}-{index}-"
        spec["hostname"] = f"{meta['name']}-{index}"
        for container in [*spec["containers"], *(spec.get("initContainers") or [])]:
            _add_completion_index_env(container)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": generate_name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "finalizers": [*(template_meta.get("finalizers") or []), TRACKING_FINALIZER],
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {**spec, "nodeName": NODE_NAME},
    }


def _assign_metrics_port(container: Obj, free_port: Callable[[], int]) -> None:
    for port in container.get("ports") or []:
        if port.get("name") == METRICS_PORT_NAME:
            port["containerPort"] = free_port()
            env = [e for e in container.get("env") or [] if e.get("name") != METRICS_PORT_ENV]
            env.append({"name": METRICS_PORT_ENV, "value": str(port["containerPort"])})
            container["env"] = env


def _add_completion_index_env(container: Obj) -> None:
    env = container.setdefault("env", [])
    if any(var.get("name") == COMPLETION_INDEX_ENV for var in env):
        return
    path = f"metadata.annotations['{COMPLETION_INDEX_KEY}']"
    env.append({"name": COMPLETION_INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": path}}})


# ---------------------------------------------------------- Job status, pure ---


class Target(NamedTuple):
    """A terminal (or interim terminal) Job condition the controller is heading to."""

    type: str
    reason: str
    message: str


class PodRef(NamedTuple):
    name: str
    uid: str


def pod_ref(pod: Obj) -> PodRef:
    return PodRef(pod["metadata"]["name"], pod["metadata"]["uid"])


def _finished_at(pod: Obj, default: datetime) -> datetime:
    status = pod.get("status", {})
    # A Pod whose init container failed has only that one terminated.
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    times = [
        parse_time(s["state"]["terminated"]["finishedAt"])
        for s in statuses
        if s.get("state", {}).get("terminated", {}).get("finishedAt")
    ]
    return max(times, default=default)


@dataclass(frozen=True)
class Backoff:
    """Consecutive Pod failures since the last success, like the Job controller's
    in-memory backoff store: the next Pod waits ``base * 2**(failures-1)`` seconds."""

    failures: int = 0
    last_failure: datetime | None = None

    def after(self, succeeded: Sequence[Obj], failed: Sequence[Obj], now: datetime) -> Backoff:
        failed_at = [_finished_at(p, now) for p in failed]
        if succeeded:
            last_success = max(_finished_at(p, now) for p in succeeded)
            later = [t for t in failed_at if t > last_success]
            return Backoff(len(later), max(later, default=None))
        if not failed:
            return self
        previous = [self.last_failure] if self.last_failure else []
        return Backoff(self.failures + len(failed), max(failed_at + previous))

    def remaining(self, now: datetime, base: float) -> float:
        if not self.failures or self.last_failure is None:
            return 0.0
        delay = min(base * 2 ** (self.failures - 1), MAX_POD_FAILURE_BACKOFF)
        return max(0.0, delay - (now - self.last_failure).total_seconds())


@dataclass(frozen=True)
class JobPlan:
    """One pass of the Job controller. The driver applies it in order: delete, create,
    write ``status`` (when it changed), then remove the tracking finalizer from
    ``release`` -- only once their UIDs are safely in uncountedTerminatedPods."""

    status: Obj
    backoff: Backoff
    create: int = 0
    create_indexes: tuple[int, ...] = ()  # Indexed Job: the completion index of each
    delete: tuple[PodRef, ...] = ()  # failed Job: delete, still counted
    untrack_and_delete: tuple[PodRef, ...] = ()  # suspended Job: not counted
    release: tuple[PodRef, ...] = ()
    requeue_after: float | None = None
    finished: Obj | None = None  # the Complete/Failed condition set by this pass


def find_condition(conditions: Sequence[Obj], ctype: str) -> Obj | None:
    return next((c for c in conditions if c.get("type") == ctype), None)


def _true_condition(conditions: Sequence[Obj], ctype: str) -> Obj | None:
    found = find_condition(conditions, ctype)
    return found if found is not None and found.get("status") == "True" else None


def job_finished(status: Obj) -> bool:
    conditions = status.get("conditions") or []
    return any(_true_condition(conditions, t) for t in ("Complete", "Failed"))


def new_condition(ctype: str, status: str, reason: str, message: str, now: datetime) -> Obj:
    stamp = rfc3339(now)
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": stamp,
        "lastTransitionTime": stamp,
    }


def ensure_condition(
    conditions: list[Obj], ctype: str, status: str, reason: str, message: str, now: datetime
) -> bool:
    """ensureJobConditionStatus: replace a differing condition; add a missing one unless
    it would be False. Returns whether anything changed."""
    current = find_condition(conditions, ctype)
    if current is not None:
        if (current.get("status"), current.get("reason"), current.get("message")) == (
            status,
            reason,
            message,
        ):
            return False
        current.clear()
        current.update(new_condition(ctype, status, reason, message, now))
        return True
    if status == "False":
        return False
    conditions.append(new_condition(ctype, status, reason, message, now))
    return True


def job_status_canonical(status: Obj | None) -> Obj:
    """Status as the API server stores it: zero counters are omitted (omitempty)."""
    canonical = prune(status or {})
    for counter in ("active", "succeeded", "failed"):
        if canonical.get(counter) == 0:
            del canonical[counter]
    return dict(canonical)


class PolicyMatch(NamedTuple):
    """matchPodFailurePolicy's answer for a failed Pod: the Job's failure message when a
    FailJob rule matched, whether the failure counts in ``failed`` and towards
    backoffLimit (not when an Ignore rule matched), and the matched rule's action (None
    when no rule matched: the failure counts, as without a policy)."""

    fail_job_message: str | None
    count_failed: bool
    action: str | None


def _matching_container(statuses: Sequence[Obj], requirement: Obj) -> Obj | None:
    """The first terminated container status whose non-zero exit code meets an onExitCodes
    requirement (exit code 0 never matches, not even ``NotIn``)."""
    name = requirement.get("containerName")
    values = requirement.get("values") or []
    operator = requirement.get("operator")
    for status in statuses:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is None or (name is not None and status.get("name") != name):
            continue
        code = terminated.get("exitCode", 0)
        if code != 0 and (
            (operator == "In" and code in values) or (operator == "NotIn" and code not in values)
        ):
            return status
    return None


def _matching_condition(conditions: Sequence[Obj], patterns: Sequence[Obj]) -> Obj | None:
    """The first Pod condition that one of the onPodConditions patterns (``status``
    defaults to True) matches."""
    for condition in conditions:
        for pattern in patterns:
            if condition.get("type") == pattern.get("type") and condition.get(
                "status"
            ) == pattern.get("status", "True"):
                return condition
    return None


def match_pod_failure_policy(policy: Obj | None, pod: Obj) -> PolicyMatch:
    """kube-controller-manager v1.33 matchPodFailurePolicy: the rules of
    ``spec.podFailurePolicy`` in order, the first that matches the Pod decides.

    ``onExitCodes`` looks at the regular containers' terminated states, then the init
    containers'; ``onPodConditions`` at ``status.conditions``. FailJob fails the Job with
    upstream's message, Ignore does not count the failure, Count and FailIndex count it
    (FailIndex needs backoffLimitPerIndex, which the executor does not implement: the
    index itself is not marked failed). A rule with an unknown action is skipped.
    """
    if policy is None:
        return PolicyMatch(None, True, None)
    status = pod.get("status") or {}
    meta = pod["metadata"]
    pod_name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    for index, rule in enumerate(policy.get("rules") or []):
        action = rule.get("action")
        if (requirement := rule.get("onExitCodes")) is not None:
            container = _matching_container(
                status.get("containerStatuses") or [], requirement
            ) or _matching_container(status.get("initContainerStatuses") or [], requirement)
            if container is None:
                continue
            code = container["state"]["terminated"]["exitCode"]
            message = (
                f"Container {container.get('name')} for pod {pod_name} failed with exit code"
                f" {code} matching {action} rule at index {index}"
            )
        elif (patterns := rule.get("onPodConditions")) is not None:
            found = _matching_condition(status.get("conditions") or [], patterns)
            if found is None:
                continue
            message = (
                f"Pod {pod_name} has condition {found.get('type')} matching {action} rule"
                f" at index {index}"
            )
        else:
            continue
        if action == "Ignore":
            return PolicyMatch(None, False, action)
        if action in ("Count", "FailIndex"):
            return PolicyMatch(None, True, action)
        if action == "FailJob":
            return PolicyMatch(message, True, action)
    return PolicyMatch(None, True, None)


def only_replaces_failed(spec: Obj) -> bool:
    """onlyReplaceFailedPods: podReplacementPolicy Failed, which a podFailurePolicy
    implies (the API server defaults it so and allows nothing else)."""
    return spec.get("podReplacementPolicy") == "Failed" or spec.get("podFailurePolicy") is not None


def _fail_job_message(policy: Obj | None, pods: Sequence[Obj]) -> str | None:
    """getFailJobMessage: the message of the first Failed Pod that matches a FailJob rule."""
    if policy is None:
        return None
    messages = (
        match_pod_failure_policy(policy, pod).fail_job_message
        for pod in pods
        if is_pod_failed(pod, only_replace_failed=True)
    )
    return next((m for m in messages if m is not None), None)


def _terminal_target(
    spec: Obj,
    status: Obj,
    failed: int,
    create_error: str | None,
    now: datetime,
    fail_job_message: str | None = None,
) -> tuple[Target | None, float | None]:
    """Where the Job is heading, and when to look again for activeDeadlineSeconds."""
    conditions = status.get("conditions") or []
    if met := _true_condition(conditions, "SuccessCriteriaMet"):
        return Target("SuccessCriteriaMet", met.get("reason", ""), met.get("message", "")), None
    if failing := _true_condition(conditions, "FailureTarget"):
        return Target("Failed", failing.get("reason", ""), failing.get("message", "")), None
    if fail_job_message is not None:
        return Target("FailureTarget", "PodFailurePolicy", fail_job_message), None
    if failed > spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT):
        return Target(
            "FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        ), None
    requeue = None
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and status.get("startTime") and not spec.get("suspend"):
        left = deadline - (now - parse_time(status["startTime"])).total_seconds()
        if left <= 0:
            return Target(
                "FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline"
            ), None
        requeue = left
    if create_error:
        return Target("FailureTarget", "PodCreateFailed", create_error), None
    return None, requeue


def _wanted_active(spec: Obj, succeeded: int, active: int) -> int:
    parallelism = int(spec.get("parallelism", 1))
    completions = spec.get("completions")
    if completions is None:
        # Work-queue Jobs: once one Pod succeeded, let the others finish, start none.
        return active if succeeded else parallelism
    return max(0, min(parallelism, completions - succeeded))


def _complete(spec: Obj, succeeded: int, active: int) -> bool:
    if active:
        return False
    completions = spec.get("completions")
    return succeeded > 0 if completions is None else succeeded >= completions


def _count_released(status: Obj, tracked_uids: set[str]) -> tuple[list[str], list[str]]:
    """Move uncounted UIDs whose Pod lost its tracking finalizer (released in an earlier
    pass) into the counters; return the UIDs still uncounted (succeeded, failed)."""
    uncounted = status.get("uncountedTerminatedPods") or {}
    remaining = []
    for outcome in ("succeeded", "failed"):
        uids = uncounted.get(outcome) or []
        status[outcome] = status.get(outcome, 0) + sum(u not in tracked_uids for u in uids)
        remaining.append([u for u in uids if u in tracked_uids])
    return remaining[0], remaining[1]


def _pods_to_create(
    spec: Obj,
    succeeded: int,
    active: int,
    terminating: int,
    backoff: Backoff,
    wait_base: float,
    now: datetime,
) -> tuple[int, float | None]:
    """How many Pods to create now, or how long to wait for the failure backoff."""
    missing = _wanted_active(spec, succeeded, active) - active
    if only_replaces_failed(spec):
        missing -= terminating
    if missing <= 0:
        return 0, None
    wait = backoff.remaining(now, wait_base)
    return (0, wait) if wait > 0 else (missing, None)


def _update_suspended(status: Obj, suspended: bool, now: datetime) -> None:
    conditions = status.setdefault("conditions", [])
    if suspended:
        ensure_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended", now)
    elif ensure_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed", now):
        # A resumed Job restarts its activeDeadlineSeconds clock.
        status["startTime"] = rfc3339(now)


def _track_finished(
    tracked: Sequence[Obj],
    uncounted: tuple[list[str], list[str]],
    only_replace_failed: bool,
    letting_go: bool,
    failing: bool,
    indexed: bool = False,
    policy: Obj | None = None,
) -> list[PodRef]:
    """Record finished Pods' UIDs in ``uncounted`` (succeeded, failed) and return the Pods
    whose tracking finalizer can go: finished ones, or all once the Job is finishing
    (``letting_go``). When the Job fails, every Pod that did not succeed failed. An
    Indexed Job counts its succeeded Pods by completion index (completedIndexes), not by
    UID, as the real controller does. A failed Pod that a podFailurePolicy Ignore rule
    matches is let go without being recorded: it never counts."""
    uncounted_ok, uncounted_failed = uncounted
    release = []
    for pod in tracked:
        pod_failed = is_pod_failed(pod, only_replace_failed)
        pod_succeeded = pod_phase(pod) == "Succeeded"
        if not (letting_go or pod_succeeded or pod_failed):
            continue
        release.append(pod_ref(pod))
        uid = pod["metadata"]["uid"]
        if pod_succeeded and uid not in uncounted_failed:
            if indexed:
                continue
            bucket = uncounted_ok
        elif (pod_failed or failing) and (
            uid in uncounted_failed or match_pod_failure_policy(policy, pod).count_failed
        ):
            bucket = uncounted_failed
        else:
            continue
        if uid not in bucket:
            bucket.append(uid)
    return release


def _enact(status: Obj, target: Target, settled: bool, now: datetime) -> Obj | None:
    """Write the interim condition (FailureTarget, SuccessCriteriaMet) and, once every Pod
    is counted and none is terminating (``settled``), the final one (Failed, Complete).
    Returns the final condition when it was set."""
    conditions = status.setdefault("conditions", [])
    final_type = target.type
    if target.type == "FailureTarget":
        conditions.append(new_condition(target.type, "True", target.reason, target.message, now))
        final_type = "Failed"
    elif target.type == "SuccessCriteriaMet":
        if find_condition(conditions, target.type) is None:
            conditions.append(
                new_condition(target.type, "True", target.reason, target.message, now)
            )
        final_type = "Complete"
    if not settled:
        return None
    final = new_condition(final_type, "True", target.reason, target.message, now)
    conditions.append(final)
    if final_type == "Complete":
        status["completionTime"] = rfc3339(now)
    return final


def _index_in(pod: Obj, completions: int) -> set[int]:
    """The Pod's completion index when valid for the Job, as a set (empty otherwise)."""
    index = completion_index(pod)
    return {index} if index is not None and index < completions else set()


def _pending_indexes(
    completions: int, completed: set[int], pods: Sequence[Obj], only_replace_failed: bool
) -> list[int]:
    """firstPendingIndexes: the indexes without success nor an active Pod (nor, when
    only failed Pods are replaced, a terminating one), lowest first."""
    taken = set(completed)
    for pod in pods:
        if is_active(pod) or (only_replace_failed and is_deleting(pod) and not is_terminal(pod)):
            taken |= _index_in(pod, completions)
    return [i for i in range(completions) if i not in taken]


def plan_job(
    job: Obj,
    pods: Sequence[Obj],
    now: datetime,
    backoff: Backoff = Backoff(),
    *,
    create_error: str | None = None,
    pod_failure_backoff: float = DEFAULT_POD_FAILURE_BACKOFF,
) -> JobPlan:
    """kube-controller-manager v1.33 syncJob for a NonIndexed or Indexed Job, as a pure
    function of the Job, the Pods it controls and the time.

    Finished Pods are counted the way the real controller does, so counts survive Pods
    being deleted: their UIDs first go to ``status.uncountedTerminatedPods``, then their
    tracking finalizer is removed (``release``), and a later pass moves UIDs whose Pod
    lost the finalizer into ``succeeded``/``failed``. A terminal condition is preceded by
    its interim one (SuccessCriteriaMet, FailureTarget) and only set once nothing is left
    uncounted or terminating -- the v1.33 status validation rejects anything else.

    Indexed Jobs: a succeeded Pod's completion index goes straight to
    ``completedIndexes`` (``succeeded`` is their number); failed Pods are counted as
    above. ``create_indexes`` names the lowest indexes neither completed nor held by an
    active Pod (nor, with podReplacementPolicy Failed, a terminating one), at most
    ``parallelism`` active in all; the Job is complete once every index
    0..completions-1 has succeeded.

    ``spec.podFailurePolicy`` (``match_pod_failure_policy``): a Failed Pod matching a
    FailJob rule sets FailureTarget (reason PodFailurePolicy) before the backoff limit is
    looked at; one matching an Ignore rule loses its finalizer without being counted in
    ``failed``, though it still delays the next Pod. As upstream, a policy implies
    podReplacementPolicy Failed: a terminating Pod counts as failed only once Failed.
    """
    status: Obj = copy.deepcopy(job.get("status") or {})
    tracked = [p for p in pods if is_tracked(p)]
    if job_finished(status):
        return JobPlan(status, backoff, release=tuple(map(pod_ref, tracked)))
    spec = job["spec"]
    suspended = bool(spec.get("suspend"))
    deleting = bool(job["metadata"].get("deletionTimestamp"))
    policy = spec.get("podFailurePolicy")
    only_replace_failed = only_replaces_failed(spec)
    indexed = is_indexed(job)

    uncounted = _count_released(status, {p["metadata"]["uid"] for p in tracked})
    fresh = [p for p in tracked if p["metadata"]["uid"] not in {*uncounted[0], *uncounted[1]}]
    new_ok = [p for p in fresh if pod_phase(p) == "Succeeded"]
    new_failed = [p for p in fresh if is_pod_failed(p, only_replace_failed)]
    # Failures an Ignore rule matches do not count (but do delay the next Pod).
    counted = [p for p in new_failed if match_pod_failure_policy(policy, p).count_failed]
    succeeded = status["succeeded"] + len(new_ok) + len(uncounted[0])
    failed = status["failed"] + len(counted) + len(uncounted[1])
    completed: set[int] = set()
    if indexed:
        completions = int(spec["completions"])
        completed = parse_indexes(status.get("completedIndexes"), completions)
        new_ok = [p for p in new_ok if _index_in(p, completions) - completed]
        completed |= {i for p in new_ok for i in _index_in(p, completions)}
        succeeded = status["succeeded"] = len(completed)
        status["completedIndexes"] = format_indexes(completed)
    backoff = backoff.after(new_ok, new_failed, now)
    if not status.get("startTime") and not suspended:
        status["startTime"] = rfc3339(now)

    active = [p for p in pods if is_active(p)]
    terminating = sum(is_deleting(p) and not is_terminal(p) for p in pods)
    target, requeue = _terminal_target(
        spec, status, failed, create_error, now, _fail_job_message(policy, pods)
    )
    create, delete, untrack = 0, [], []
    create_indexes: tuple[int, ...] = ()
    if target is not None:
        delete, active = active, []
    elif not deleting:
        if suspended:
            untrack, active = active, []
        else:
            create, wait = _pods_to_create(
                spec, succeeded, len(active), terminating, backoff, pod_failure_backoff, now
            )
            requeue = min((t for t in (requeue, wait) if t is not None), default=None)
            if indexed and create:
                create_indexes = tuple(
                    _pending_indexes(
                        int(spec["completions"]), completed, pods, only_replace_failed
                    )[:create]
                )
                create = len(create_indexes)
        if _complete(spec, succeeded, len(active) + create):
            target = Target(
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            )
        else:
            _update_suspended(status, suspended, now)
    terminating += len(delete) + len(untrack)

    failing = target is not None and target.type != "SuccessCriteriaMet"
    release = _track_finished(
        tracked,
        uncounted,
        only_replace_failed,
        deleting or target is not None,
        failing,
        indexed,
        policy,
    )
    status["uncountedTerminatedPods"] = {
        k: v for k, v in zip(("succeeded", "failed"), uncounted, strict=True) if v
    }
    status["active"] = len(active)
    status["ready"] = sum(is_ready(p) for p in active)
    status["terminating"] = terminating
    settled = not uncounted[0] and not uncounted[1] and terminating == 0
    finished = _enact(status, target, settled, now) if target is not None else None
    if not status.get("conditions"):
        status.pop("conditions", None)
    return JobPlan(
        status=status,
        backoff=backoff,
        create=create,
        create_indexes=create_indexes,
        delete=tuple(map(pod_ref, delete)),
        untrack_and_delete=tuple(map(pod_ref, untrack)),
        release=tuple(release),
        requeue_after=requeue,
        finished=finished,
    )


# ------------------------------------------------------- kubelet status, pure ---

POD_INITIALIZING = "PodInitializing"


def waiting_state(reason: str, message: str = "") -> Obj:
    return {"waiting": {"reason": reason, "message": message}}


def running_state(started_at: str) -> Obj:
    return {"running": {"startedAt": started_at}}


def terminated_state(
    exit_code: int, reason: str, message: str, started_at: str, finished_at: str
) -> Obj:
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": reason,
            "message": message,
            "startedAt": started_at,
            "finishedAt": finished_at,
        }
    }


def _exited_ok(state: Obj) -> bool:
    return bool("terminated" in state and state["terminated"].get("exitCode") == 0)


def _phase_of(state: Obj) -> str:
    """A Pod's phase from its (only running) regular container's state."""
    if "running" in state:
        return "Running"
    if "terminated" in state:
        return "Succeeded" if _exited_ok(state) else "Failed"
    return "Pending"


@dataclass(frozen=True)
class Report:
    """What the kubelet reports for a Pod: its phase, its (first) regular container's
    state and the states of the init containers that got a turn, in order (the others
    wait with PodInitializing)."""

    phase: str
    state: Obj
    init_states: tuple[Obj, ...] = ()

    @staticmethod
    def waiting(reason: str, message: str) -> Report:
        return Report("Pending", waiting_state(reason, message))

    @staticmethod
    def running(started_at: str) -> Report:
        return Report("Running", running_state(started_at))

    @staticmethod
    def terminated(
        exit_code: int, reason: str, message: str, started_at: str, finished_at: str
    ) -> Report:
        state = terminated_state(exit_code, reason, message, started_at, finished_at)
        return Report(_phase_of(state), state)


def kubelet_report(init_count: int, states: Sequence[Obj]) -> Report:
    """The report for a Pod whose containers, in the order the kubelet runs them (its
    ``init_count`` init containers, then the regular one), got as far as ``states``.

    Init containers run one at a time, each to completion, so an init container that
    ended without a next container starting ended the Pod: it failed, or (exit 0) the
    Pod was deleted meanwhile. Either way the Pod is Failed -- restartPolicy Never is
    all the local kubelet knows -- and the regular container still waits.
    """
    init_states = tuple(states[:init_count])
    if len(states) > init_count:
        return Report(_phase_of(states[init_count]), states[init_count], init_states)
    ended = bool(init_states) and "terminated" in init_states[-1]
    return Report("Failed" if ended else "Pending", waiting_state(POD_INITIALIZING), init_states)


def init_containers(spec: Obj) -> list[Obj]:
    """The init containers the local kubelet runs: sidecars (``restartPolicy: Always``)
    never complete, so they are ignored like the other extra containers."""
    return [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") != "Always"]


def _initialized(
    names: Sequence[str], init_states: Sequence[Obj], report: Report
) -> tuple[str, ...]:
    """The Initialized condition (status, reason, message), as the kubelet's
    GeneratePodInitializedCondition: True once every init container exited 0, or once
    the regular container was created."""
    if report.phase == "Succeeded":
        return "True", "PodCompleted", ""
    incomplete = [n for n, s in zip(names, init_states, strict=True) if not _exited_ok(s)]
    if not incomplete or "waiting" not in report.state:
        return "True", "", ""
    return (
        "False",
        "ContainersNotInitialized",
        f"containers with incomplete status: [{' '.join(incomplete)}]",
    )


# The Pod conditions the kubelet owns; it keeps the others as they are.
KUBELET_CONDITIONS = frozenset(
    ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
)


def _pod_conditions(
    old: Sequence[Obj], phase: str, container: str, initialized: tuple[str, ...], now: str
) -> list[Obj]:
    unready = ("False", "ContainersNotReady", f"containers with unready status: [{container}]")
    ready = {
        "Running": ("True", "", ""),
        "Succeeded": ("False", "PodCompleted", ""),
    }.get(phase, unready)
    terminal = phase in ("Succeeded", "Failed")
    wanted = [
        ("PodReadyToStartContainers", "False" if terminal else "True", "", ""),
        ("Initialized", *initialized),
        ("Ready", *ready),
        ("ContainersReady", *ready),
        ("PodScheduled", "True", "", ""),
    ]
    previous = {c.get("type"): c for c in old}
    conditions = []
    for ctype, status, reason, message in wanted:
        prev = previous.get(ctype) or {}
        # Keeping lastTransitionTime when nothing changed keeps the status idempotent.
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        conditions.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or now,
            }
        )
    # Conditions others own (the API server's DisruptionTarget on eviction, readiness
    # gates) are kept, as the kubelet's status manager does.
    conditions.extend(c for c in old if c.get("type") not in KUBELET_CONDITIONS)
    return conditions


def _container_status(pod: Obj, container: Obj, state: Obj, *, init: bool) -> Obj:
    running = "running" in state
    # A completed init container counts as ready; a regular one only while it runs.
    ready = _exited_ok(state) if init else running
    suffix = f"/{container['name']}" if init else ""
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        # Only a created container has an ID.
        "containerID": "" if "waiting" in state else f"local://{pod['metadata']['uid']}{suffix}",
        "ready": ready,
        "started": running,
        "restartCount": 0,
        "state": state,
    }


def pod_status(pod: Obj, report: Report, now: datetime) -> Obj:
    """The Pod status a kubelet would write for ``report``: the init containers and the
    first regular container (the only one that runs)."""
    old = pod.get("status") or {}
    container = pod["spec"]["containers"][0]
    inits = init_containers(pod["spec"])
    not_yet = [waiting_state(POD_INITIALIZING)] * (len(inits) - len(report.init_states))
    init_states = [*report.init_states, *not_yet]
    initialized = _initialized([c["name"] for c in inits], init_states, report)
    stamp = rfc3339(now)
    return prune(
        {
            "phase": report.phase,
            "conditions": _pod_conditions(
                old.get("conditions") or [], report.phase, container["name"], initialized, stamp
            ),
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": old.get("startTime") or stamp,
            "initContainerStatuses": [
                _container_status(pod, c, s, init=True)
                for c, s in zip(inits, init_states, strict=True)
            ],
            "containerStatuses": [_container_status(pod, container, report.state, init=False)],
        }
    )


def exit_reason(returncode: int, killed_by_executor: bool) -> tuple[int, str]:
    """(exitCode, reason) as a container runtime reports them. A SIGKILL the executor did
    not send is taken for the kernel's OOM killer."""
    if returncode >= 0:
        return returncode, "Completed" if returncode == 0 else "Error"
    signum = -returncode
    if signum == signal.SIGKILL and not killed_by_executor:
        return 128 + signum, "OOMKilled"
    return 128 + signum, "Error"


def termination_message(message: bytes, log_tail: bytes, policy: str, exit_code: int) -> str:
    """The kubelet's rules: the file's first 4096 bytes; with FallbackToLogsOnError and an
    empty file after a failure, the log's last 80 lines capped at 2048 bytes."""
    if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        return b"".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
    return message[:MAX_MESSAGE_BYTES].decode(errors="replace")


# ------------------------------------------------ environment and volumes ---


class PodSetupError(Exception):
    """The Pod cannot start yet (e.g. a missing Secret); the kubelet keeps it Pending
    with this waiting reason and retries. ``container`` is the position, in the order
    containers run (init containers first), of the one that waits with it."""

    def __init__(self, reason: str, message: str, container: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.container = container


class StartError(Exception):
    """The container cannot start at all (no command, executable not found)."""


class ObjectSource(Protocol):
    """Reads the API objects a Pod refers to (``None`` when they do not exist)."""

    def config_map(self, namespace: str, name: str) -> Obj | None: ...

    def secret(self, namespace: str, name: str) -> Obj | None: ...

    def service_account_token(self, pod: Obj, audience: str | None, expiration: int) -> str: ...


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, unknown references
    are left as they are, and ``$$`` escapes a ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(substitute, text)


def field_value(pod: Obj, path: str) -> str:
    """A downward-API fieldRef, as in env valueFrom and downwardAPI volumes."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path])
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
    raise PodSetupError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


def object_data(kind: str, obj: Obj) -> dict[str, bytes]:
    """A ConfigMap's data/binaryData or a Secret's data, decoded to bytes."""
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _fetch(source: ObjectSource, kind: str, namespace: str, name: str) -> Obj | None:
    return (
        source.secret(namespace, name) if kind == "Secret" else source.config_map(namespace, name)
    )


def _key_ref(
    source: ObjectSource, namespace: str, kind: str, ref: Obj, reason: str
) -> bytes | None:
    obj = _fetch(source, kind, namespace, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return None
        raise PodSetupError(reason, f'{kind.lower()} "{ref["name"]}" not found')
    data = object_data(kind, obj)
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise PodSetupError(
            reason, f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}"
        )
    return data[ref["key"]]


def container_env(pod: Obj, container: Obj, source: ObjectSource) -> dict[str, str]:
    """The container's environment from ``envFrom`` then ``env``, as the kubelet builds it."""
    namespace = pod["metadata"]["namespace"]
    reason = "CreateContainerConfigError"
    env: dict[str, str] = {}
    for ref in container.get("envFrom") or []:
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in ref:
                continue
            obj = _fetch(source, kind, namespace, ref[key]["name"])
            if obj is None and not ref[key].get("optional"):
                raise PodSetupError(reason, f'{kind.lower()} "{ref[key]["name"]}" not found')
            for name, value in object_data(kind, obj or {}).items():
                env[ref.get("prefix", "") + name] = value.decode()
    for var in container.get("env") or []:
        value_from = var.get("valueFrom")
        if value_from is None:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        if "fieldRef" in value_from:
            env[var["name"]] = field_value(pod, value_from["fieldRef"]["fieldPath"])
            continue
        kind, ref = (
            ("ConfigMap", value_from.get("configMapKeyRef"))
            if "configMapKeyRef" in value_from
            else ("Secret", value_from.get("secretKeyRef"))
        )
        if ref is None:
            raise PodSetupError(
                reason, f"unsupported valueFrom {sorted(value_from)} for {var['name']}"
            )
        found = _key_ref(source, namespace, kind, ref, reason)
        if found is not None:
            env[var["name"]] = found.decode()
    return env


@dataclass(frozen=True)
class Volume:
    path: Path
    read_only: bool  # configMap/secret/downwardAPI/projected are always mounted read-only


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


Files = dict[str, tuple[bytes, int]]  # relative path -> (content, mode)


def _key_files(data: dict[str, bytes], items: Sequence[Obj] | None, mode: int, what: str) -> Files:
    if items is None:
        return {key: (value, mode) for key, value in data.items()}
    files: Files = {}
    for item in items:
        if item["key"] not in data:
            raise PodSetupError(
                "ContainerCreating", f"{what} references non-existent key: {item['key']}"
            )
        files[item["path"]] = (data[item["key"]], item.get("mode", mode))
    return files


def _object_files(source: ObjectSource, namespace: str, kind: str, ref: Obj, mode: int) -> Files:
    name = ref.get("name") or ref.get("secretName", "")
    obj = _fetch(source, kind, namespace, name)
    if obj is None:
        if ref.get("optional"):
            return {}
        raise PodSetupError("ContainerCreating", f'{kind.lower()} "{name}" not found')
    return _key_files(object_data(kind, obj), ref.get("items"), mode, f"{kind.lower()} {name}")


def _downward_files(pod: Obj, items: Sequence[Obj], mode: int) -> Files:
    files: Files = {}
    for item in items:
        if "fieldRef" not in item:
            raise PodSetupError("ContainerCreating", "resourceFieldRef is not supported")
        value = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
        files[item["path"]] = (value, item.get("mode", mode))
    return files


def _projected_files(pod: Obj, projected: Obj, source: ObjectSource) -> Files:
    namespace = pod["metadata"]["namespace"]
    mode = projected.get("defaultMode", 0o644)
    files: Files = {}
    for item in projected.get("sources") or []:
        if "configMap" in item:
            files |= _object_files(source, namespace, "ConfigMap", item["configMap"], mode)
        elif "secret" in item:
            files |= _object_files(source, namespace, "Secret", item["secret"], mode)
        elif "downwardAPI" in item:
            files |= _downward_files(pod, item["downwardAPI"].get("items") or [], mode)
        elif "serviceAccountToken" in item:
            sat = item["serviceAccountToken"]
            token = source.service_account_token(
                pod, sat.get("audience"), sat.get("expirationSeconds", 3600)
            )
            files[sat["path"]] = (token.encode(), mode)
        else:
            raise PodSetupError("ContainerCreating", f"unsupported projected source {sorted(item)}")
    return files


def _write_files(folder: Path, files: Files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for relative, (content, mode) in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)


def materialize_volumes(
    pod: Obj, volumes_dir: Path, pvc_root: Path, source: ObjectSource
) -> dict[str, Volume]:
    """Map each Pod volume to a host folder, writing the files of the file-backed ones."""
    namespace = pod["metadata"]["namespace"]
    result: dict[str, Volume] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        folder = volumes_dir / name
        if "persistentVolumeClaim" in volume:
            folder = pvc_root / namespace / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
            result[name] = Volume(folder, bool(volume["persistentVolumeClaim"].get("readOnly")))
            continue
        if "emptyDir" in volume:
            folder.mkdir(parents=True, exist_ok=True)
            result[name] = Volume(folder, False)
            continue
        if "configMap" in volume:
            ref = volume["configMap"]
            files = _object_files(
                source, namespace, "ConfigMap", ref, ref.get("defaultMode", 0o644)
            )
        elif "secret" in volume:
            ref = volume["secret"]
            files = _object_files(source, namespace, "Secret", ref, ref.get("defaultMode", 0o644))
        elif "downwardAPI" in volume:
            ref = volume["downwardAPI"]
            files = _downward_files(pod, ref.get("items") or [], ref.get("defaultMode", 0o644))
        elif "projected" in volume:
            files = _projected_files(pod, volume["projected"], source)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodSetupError(
                "ContainerCreating", f'volume "{name}": {kinds} volumes are not supported locally'
            )
        _write_files(folder, files)
        result[name] = Volume(folder, True)
    return result


def container_mounts(
    container: Obj, volumes: dict[str, Volume], env: dict[str, str]
) -> list[Mount]:
    mounts = []
    for vm in container.get("volumeMounts") or []:
        volume = volumes[vm["name"]]
        sub = vm.get("subPath") or expand(vm.get("subPathExpr", ""), env)
        source = (volume.path / sub).resolve() if sub else volume.path
        if not source.is_relative_to(volume.path.resolve()):
            raise PodSetupError("CreateContainerConfigError", f"subPath {sub!r} leaves its volume")
        if sub and not source.exists():
            source.mkdir(parents=True)  # the kubelet creates missing subPath folders
        read_only = volume.read_only or bool(vm.get("readOnly"))
        mounts.append(Mount(str(source), vm["mountPath"], read_only))
    return mounts


# ------------------------------------- container init (in the mount namespace) ---

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384


def _mount(libc: ctypes.CDLL, source: str | None, target: str, flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    if libc.mount(src, os.fsencode(target), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source or ''} on {target}: {os.strerror(errno)}")


def _make_mount_point(target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.exists(target):
        with open(target, "a"):
            pass


def apply_mounts(mounts: Sequence[Mount], keep: Sequence[str] = ()) -> None:
    """Bind each source onto its target inside this (private) mount namespace, then
    bind each path in `keep` back over whatever mount hid it.

    Sources are opened first and bound through /proc/self/fd, because a mount over e.g.
    /tmp would otherwise hide sources that live under /tmp. Parents are mounted before
    their children, and read-only remounts come last so that mount points below a
    read-only mount can still be created.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    fds = [os.open(m.source, os.O_PATH | os.O_CLOEXEC) for m in mounts]
    kept = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path in keep]
    is_dir = [os.path.isdir(m.source) for m in mounts]
    order = sorted(range(len(mounts)), key=lambda i: os.path.normpath(mounts[i].target).count("/"))
    for i in order:
        _make_mount_point(mounts[i].target, is_dir[i])
        _mount(libc, f"/proc/self/fd/{fds[i]}", mounts[i].target, MS_BIND | MS_REC)
    for path, fd in zip(keep, kept, strict=True):
        _make_mount_point(path, True)
        _mount(libc, f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
    fds += kept
    for i in order:
        if mounts[i].read_only:
            # A remount must keep the flags the kernel locked on the original mount.
            locked = os.statvfs(mounts[i].target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            _mount(libc, None, mounts[i].target, MS_REMOUNT | MS_BIND | MS_RDONLY | locked)
    for fd in fds:
        os.close(fd)


def _describe(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


def container_init(spec_json: str) -> NoReturn:
    """Entry point run by ``unshare`` in the new mount namespace: mount, chdir, exec.

    A failure is written to the start-error file (opened before any mount can hide it)
    and reported by the executor as reason StartError.
    """
    spec = json.loads(spec_json)
    error_fd = os.open(spec["startErrorFile"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
    try:
        apply_mounts([Mount(**m) for m in spec["mounts"]], spec["keep"])
        if spec["workingDir"]:
            os.makedirs(spec["workingDir"], exist_ok=True)
            os.chdir(spec["workingDir"])
    except OSError as exc:
        os.write(error_fd, f"container setup: {_describe(exc)}".encode())
        os._exit(START_ERROR_EXIT)
    try:
        os.execv(spec["executable"], spec["argv"])
    except OSError as exc:
        os.write(error_fd, f'exec "{spec["argv"][0]}": {exc.strerror or exc}'.encode())
        os._exit(START_ERROR_EXIT)


# ----------------------------------------------------------------- API access ---


class ApiError(Exception):
    def __init__(self, status: int, body: Obj) -> None:
        self.status = status
        self.body = body
        self.message = str(body.get("message") or body.get("reason") or f"HTTP {status}")
        super().__init__(f"{status}: {self.message}")

    @property
    def namespace_terminating(self) -> bool:
        causes = (self.body.get("details") or {}).get("causes") or []
        # A StatusCause's type is serialised as "reason".
        return any(c.get("reason") == "NamespaceTerminating" for c in causes)


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class Kube:
    """JSON in, JSON out access to the API server.

    The kubernetes client loads the kubeconfig (server, TLS, token); requests go through
    urllib3 directly because the executor works on plain dicts end to end (merge patches
    of status, full-object status PUTs, watch streams it can interrupt on shutdown),
    which the client's typed models and Watch helper get in the way of.
    """

    def __init__(self, kubeconfig: Path) -> None:
        import urllib3
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self._host = cfg.host
        self._headers = {"Accept": "application/json", "User-Agent": "kubetune-local-executor"}
        for setting in cfg.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                self._headers[setting["key"]] = setting["value"]
        self._pool = urllib3.PoolManager(
            maxsize=8,
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
        )
        self._request_timeout = urllib3.Timeout(total=REQUEST_TIMEOUT_SECONDS)
        # The server ends each watch after WATCH_TIMEOUT_SECONDS; a longer silence means
        # a dead connection.
        self._watch_timeout = urllib3.Timeout(connect=10, read=WATCH_TIMEOUT_SECONDS + 30)
        self._streams: set[Any] = set()
        self._lock = threading.Lock()
        self._closed = False

    def _url(self, path: str, query: dict[str, str] | None) -> str:
        return f"{self._host}{path}" + (f"?{urlencode(query)}" if query else "")

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        response = self._pool.request(
            method,
            self._url(path, query),
            body=json.dumps(body).encode() if body is not None else None,
            headers={**self._headers, "Content-Type": content_type},
            timeout=self._request_timeout,
            retries=False,
        )
        payload = json.loads(response.data) if response.data else {}
        if response.status >= 400:
            raise ApiError(response.status, payload)
        return dict(payload)

    def get(self, path: str) -> Obj | None:
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def stream(self, path: str, query: dict[str, str]) -> Iterator[Obj]:
        """Watch events, one JSON object per line, until the server ends the watch or
        ``close()`` shuts the connection down."""
        response = self._pool.request(
            "GET",
            self._url(path, query),
            headers=self._headers,
            preload_content=False,
            timeout=self._watch_timeout,
            retries=False,
        )
        with self._lock:
            if self._closed:
                response.release_conn()
                return
            self._streams.add(response)
        try:
            if response.status >= 400:
                raise ApiError(response.status, json.loads(response.read() or b"{}"))
            buffer = b""
            for chunk in response.stream(amt=None):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                yield from (json.loads(line) for line in lines if line.strip())
        finally:
            with self._lock:
                self._streams.discard(response)
            response.release_conn()

    def close(self) -> None:
        """Interrupt open watches; later requests still work (for final status writes)."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for response in streams:
            response.shutdown()

    # ObjectSource
    def config_map(self, namespace: str, name: str) -> Obj | None:
        return self.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def secret(self, namespace: str, name: str) -> Obj | None:
        return self.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def service_account_token(self, pod: Obj, audience: str | None, expiration: int) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": expiration,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        try:
            return str(self.request("POST", path, request)["status"]["token"])
        except ApiError as exc:
            raise PodSetupError(
                "ContainerCreating", f"service account token: {exc.message}"
            ) from exc


def job_path(namespace: str, name: str = "") -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def pod_path(namespace: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods" + (f"/{name}" if name else "")


# ------------------------------------------------------------------ executor ---


class WorkQueue:
    """A deduplicating FIFO of keys with delayed adds. One worker drains it, so a key is
    never processed twice at the same time, and a key added while it is being processed
    is processed again afterwards (level-triggered reconciliation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: dict[Key, None] = {}
        self._delayed: list[tuple[float, int, Key]] = []
        self._seq = itertools.count()
        self._closed = False

    def add(self, key: Key, delay: float = 0.0) -> None:
        with self._cond:
            if delay <= 0:
                self._ready[key] = None
            else:
                heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), key))
            self._cond.notify()

    def get(self) -> Key | None:
        """The next key, blocking until one is due; None once closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._ready[heapq.heappop(self._delayed)[2]] = None
                if self._ready:
                    key = next(iter(self._ready))
                    del self._ready[key]
                    return key
                self._cond.wait(self._delayed[0][0] - now if self._delayed else None)
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Launch:
    """How to start a Pod's container (``container_init`` does the mounting)."""

    argv: list[str]
    executable: str
    env: dict[str, str]
    mounts: list[Mount]
    working_dir: str
    keep: list[str]


@dataclass(frozen=True)
class Step:
    """One container of a Pod, in the order the kubelet runs them: each init container,
    then the first regular container. ``launch`` is None when it cannot start at all
    (``start_error`` says why), which is reported as StartError when its turn comes."""

    name: str
    init: bool
    message_policy: str
    launch: Launch | None
    start_error: str = ""


def container_dir(pod_dir: Path, name: str) -> Path:
    """A container's own files in the per-pod folder (termination message, start error):
    each container has its own, as each has its own ``/dev/termination-log``."""
    return pod_dir / "containers" / name


@dataclass
class ContainerRun:
    """The local processes of one Pod, one container at a time (``steps``: its init
    containers, then its first regular container), from the first start until the last
    exit is reported. ``process``, ``log_path``, ``started_at``, ``exit_code``,
    ``finished_at`` and ``killed`` are the current step's; the kubelet's thread moves
    them on to the next step only once ``exit_code`` is set."""

    namespace: str
    pod: str
    uid: str
    pod_dir: Path
    steps: tuple[Step, ...]
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: str
    ended: list[Obj] = field(default_factory=list)  # states of the init containers done
    index: int = 0  # of the step that runs
    exit_code: int | None = None
    finished_at: str | None = None
    terminating: bool = False
    killed: bool = False  # SIGKILL sent by the executor, so not an OOM kill
    kill_timer: threading.Timer | None = field(default=None, repr=False)

    @property
    def key(self) -> Key:
        return self.namespace, self.pod

    @property
    def step(self) -> Step:
        return self.steps[self.index]

    @property
    def init_count(self) -> int:
        return len(self.steps) - 1

    @property
    def termination_file(self) -> Path:
        return container_dir(self.pod_dir, self.step.name) / TERMINATION_FILE

    @property
    def start_error_file(self) -> Path:
        return container_dir(self.pod_dir, self.step.name) / START_ERROR_FILE


def _read_head(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(size)
    except FileNotFoundError:
        return b""


def _read_tail(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read()
    except FileNotFoundError:
        return b""


def _signal_group(run: ContainerRun, signum: int) -> None:
    # The process leads its own session (start_new_session), so its pid is the group id
    # of everything it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(run.process.pid, signum)


def _grace_seconds(pod: Obj) -> float:
    seconds = pod["metadata"].get("deletionGracePeriodSeconds")
    if seconds is None:
        seconds = pod["spec"].get("terminationGracePeriodSeconds", 30)
    return float(min(seconds, MAX_GRACE_SECONDS))


def _abandoned_states(pod: Obj, now: str) -> list[Obj] | None:
    """The container states to report for a Pod one of whose containers (init or
    regular) a kubelet reported running: an executor that has stopped since started it,
    and killed it on stopping. That one ends as ContainerStatusUnknown, after the init
    containers that ran before it; the Pod fails. None when no container ever ran."""
    status = pod.get("status") or {}
    # In the order they run; only the first regular container ever runs.
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or [])[:1],
    ]
    states = [s.get("state") or {} for s in statuses]
    for position, state in enumerate(states):
        if "running" in state:
            started = state["running"].get("startedAt") or now
            message = "The container could not be located when the pod was terminated"
            unknown = terminated_state(137, "ContainerStatusUnknown", message, started, now)
            return [*states[:position], unknown]
    return None


def deleted_report(pod: Obj, now: datetime) -> Report:
    """The report for a deleted Pod none of whose containers runs here: Failed, with the
    container that a kubelet reported running (an earlier executor's, killed when it
    stopped) as ContainerStatusUnknown, or else the states as they were reported."""
    stamp = rfc3339(now)
    init_count = len(init_containers(pod["spec"]))
    if (abandoned := _abandoned_states(pod, stamp)) is not None:
        return kubelet_report(init_count, abandoned)
    status = pod.get("status") or {}
    regular = (status.get("containerStatuses") or [{}])[0].get("state")
    inits = [s.get("state") or {} for s in status.get("initContainerStatuses") or []]
    return Report(
        "Failed", regular or waiting_state("ContainerCreating"), tuple(inits[:init_count])
    )


def _running_report(run: ContainerRun) -> Report:
    return kubelet_report(run.init_count, [*run.ended, running_state(run.started_at)])


def _exit_state(run: ContainerRun) -> Obj:
    """The terminated state of ``run``'s current container, which exited."""
    assert run.exit_code is not None and run.finished_at is not None
    start_error = _read_head(run.start_error_file, MAX_MESSAGE_BYTES).decode(errors="replace")
    if start_error:
        return terminated_state(
            START_ERROR_EXIT, "StartError", start_error, run.started_at, run.finished_at
        )
    code, reason = exit_reason(run.exit_code, run.killed)
    message = termination_message(
        _read_head(run.termination_file, MAX_MESSAGE_BYTES),
        _read_tail(run.log_path, 16 * FALLBACK_LOG_BYTES),
        run.step.message_policy,
        code,
    )
    return terminated_state(code, reason, message, run.started_at, run.finished_at)


class LocalExecutor:
    """Job controller + kubelet for node ``local-executor``, on background threads.

    ``namespaces=None`` watches the whole cluster; otherwise only the given namespaces.
    ``start()`` returns once the initial lists are in; ``stop()`` (also on leaving the
    ``with`` block) ends the watches and kills every process it started.
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        state_dir: Path | str,
        namespaces: Sequence[str] | None = None,
        *,
        pass_env: Sequence[str] = DEFAULT_PASS_ENV,
        pod_failure_backoff: float = DEFAULT_POD_FAILURE_BACKOFF,
    ) -> None:
        self._kubeconfig = Path(kubeconfig)
        self.state_dir = Path(state_dir).resolve()
        self._namespaces = list(namespaces) if namespaces is not None else None
        self._pass_env = tuple(pass_env)
        self._pod_failure_backoff = pod_failure_backoff
        # The venv's bin first, so `kubetune ...` resolves to this environment's command.
        self._bin_dir = str(Path(sys.executable).parent)
        self._jobs = WorkQueue()
        self._pods = WorkQueue()
        self._runs: dict[str, ContainerRun] = {}  # by Pod UID
        self._backoffs: dict[str, Backoff] = {}  # by Job UID
        self._create_errors: dict[str, str] = {}  # by Job UID
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kube: Kube | None = None

    # -- public ---------------------------------------------------------------

    def pvc_dir(self, namespace: str, claim: str) -> Path:
        """The folder that stands for PersistentVolumeClaim ``claim``."""
        return self.state_dir / "pvc" / namespace / claim

    def log_path(self, namespace: str, pod: str, init_container: str | None = None) -> Path:
        """Where a container's stdout and stderr go, standing for ``kubectl logs POD [-c
        NAME]`` (which cannot work locally): ``<pod>.log`` for the regular container,
        ``<pod>/<name>.log`` for init container ``name``. Logs outlive their Pod."""
        folder = self.state_dir / "logs" / namespace
        return folder / pod / f"{init_container}.log" if init_container else folder / f"{pod}.log"

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("unshare") is None:
            raise RuntimeError("the local executor needs util-linux's `unshare`")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._kube = Kube(self._kubeconfig)
        synced: list[threading.Event] = []
        on_this_node = {"fieldSelector": f"spec.nodeName={NODE_NAME}"}
        scopes: list[str | None] = [None] if self._namespaces is None else [*self._namespaces]
        for namespace in scopes:
            for resource, query, on_event in (
                (self._jobs_path(namespace), {}, self._on_job),
                (self._pods_path(namespace), on_this_node, self._on_pod),
            ):
                ready = threading.Event()
                synced.append(ready)
                self._spawn(f"watch {resource}", self._watch, resource, query, on_event, ready)
        self._spawn("job-controller", self._work, self._jobs, self._sync_job)
        self._spawn("kubelet", self._work, self._pods, self._sync_pod)
        deadline = time.monotonic() + timeout
        for ready in synced:
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise TimeoutError("the local executor could not list Jobs and Pods")
        log.info("local executor ready (state dir %s)", self.state_dir)

    def stop(self) -> None:
        if self._kube is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._kube.close()
        self._jobs.close()
        self._pods.close()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT_SECONDS)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._terminate(run, STOP_GRACE_SECONDS)
        for run in runs:
            run.process.wait()
            self._forget(run)
        log.info("local executor stopped")

    def __enter__(self) -> LocalExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plumbing -------------------------------------------------------------

    @property
    def kube(self) -> Kube:
        assert self._kube is not None, "start() first"
        return self._kube

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @staticmethod
    def _jobs_path(namespace: str | None) -> str:
        return job_path(namespace) if namespace else "/apis/batch/v1/jobs"

    @staticmethod
    def _pods_path(namespace: str | None) -> str:
        return pod_path(namespace) if namespace else "/api/v1/pods"

    def _watch(
        self,
        path: str,
        query: dict[str, str],
        on_event: Callable[[Obj], None],
        synced: threading.Event,
    ) -> None:
        """List, then watch from the list's resourceVersion; list again when it expires."""
        while not self._stopping.is_set():
            try:
                listing = self.kube.request("GET", path, query=query)
                for item in listing.get("items") or []:
                    on_event(item)
                synced.set()
                version = listing["metadata"]["resourceVersion"]
                while not self._stopping.is_set():
                    version = self._watch_from(path, query, version, on_event)
            except WatchExpired:
                continue
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.warning("watch %s failed, retrying: %s", path, exc)
                self._stopping.wait(ERROR_RETRY_SECONDS)

    def _watch_from(
        self, path: str, query: dict[str, str], version: str, on_event: Callable[[Obj], None]
    ) -> str:
        params = {
            **query,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_SECONDS),
        }
        for event in self.kube.stream(path, params):
            obj = event["object"]
            if event["type"] == "ERROR":
                if obj.get("code") == 410:
                    raise WatchExpired
                raise ApiError(int(obj.get("code") or 500), obj)
            version = obj["metadata"]["resourceVersion"]
            if event["type"] != "BOOKMARK":
                on_event(obj)
        return version

    def _on_job(self, job: Obj) -> None:
        self._jobs.add((job["metadata"]["namespace"], job["metadata"]["name"]))

    def _on_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        self._pods.add((meta["namespace"], meta["name"]))
        # The label, not the ownerReference: orphaned Pods lose the latter.
        job_name = (meta.get("labels") or {}).get(JOB_NAME_LABELS[0])
        if job_name:
            self._jobs.add((meta["namespace"], job_name))

    def _work(self, queue: WorkQueue, sync: Callable[[str, str], float | None]) -> None:
        while (key := queue.get()) is not None:
            try:
                delay = sync(*key)
            except ApiError as exc:
                # 409: someone else wrote first; read again right away.
                delay = 0.0 if exc.status == 409 else ERROR_RETRY_SECONDS
                if exc.status != 409:
                    log.warning("%s/%s: %s", *key, exc)
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("%s/%s: unexpected error", *key)
                delay = ERROR_RETRY_SECONDS
            if delay is not None:
                queue.add(key, delay)

    def _event(self, job: Obj, kind: str, reason: str, message: str) -> None:
        meta = job["metadata"]
        stamp = rfc3339(utc_now())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": "job-controller"},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except ApiError as exc:
            log.warning("event %s on job %s: %s", reason, meta["name"], exc)

    # -- Job controller ---------------------------------------------------------

    def _sync_job(self, namespace: str, name: str) -> float | None:
        job = self.kube.get(job_path(namespace, name))
        if job is None:
            self._release_orphans(namespace, name)
            return None
        spec, uid = job["spec"], job["metadata"]["uid"]
        if spec.get("managedBy", JOB_CONTROLLER) != JOB_CONTROLLER:
            return None
        if spec.get("completionMode", "NonIndexed") not in ("NonIndexed", "Indexed"):
            log.warning(
                "job %s/%s: completionMode %s is not supported, ignored",
                namespace,
                name,
                spec["completionMode"],
            )
            return None
        pods = self.kube.request(
            "GET", pod_path(namespace), query={"labelSelector": f"{CONTROLLER_UID_LABELS[0]}={uid}"}
        )["items"]
        plan = plan_job(
            job,
            pods,
            utc_now(),
            self._backoffs.get(uid, Backoff()),
            create_error=self._create_errors.get(uid),
            pod_failure_backoff=self._pod_failure_backoff,
        )
        for ref in plan.delete:
            self._delete_pod(namespace, ref)
        for ref in plan.untrack_and_delete:
            self._release(namespace, ref)
            self._delete_pod(namespace, ref)
        indexes: Sequence[int | None] = (
            plan.create_indexes if is_indexed(job) else [None] * plan.create
        )
        if self._create_pods(job, indexes):
            return 0.0  # a Pod was rejected for good: the next pass fails the Job
        if job_status_canonical(plan.status) != job_status_canonical(job.get("status")):
            self.kube.request(
                "PUT", job_path(namespace, name) + "/status", {**job, "status": plan.status}
            )
        self._backoffs[uid] = plan.backoff
        for ref in plan.release:
            self._release(namespace, ref)
        if plan.finished is not None:
            self._finished(job, plan.finished)
        return plan.requeue_after

    def _finished(self, job: Obj, condition: Obj) -> None:
        uid = job["metadata"]["uid"]
        self._backoffs.pop(uid, None)
        self._create_errors.pop(uid, None)
        if condition["type"] == "Complete":
            self._event(job, "Normal", "Completed", "Job completed")
        else:
            self._event(job, "Warning", condition["reason"], condition["message"])
        log.info(
            "job %s/%s %s %s",
            job["metadata"]["namespace"],
            job["metadata"]["name"],
            condition["type"],
            condition["reason"],
        )

    def _create_pods(self, job: Obj, indexes: Sequence[int | None]) -> bool:
        """Create a Pod per entry of ``indexes`` (completion indexes, None for NonIndexed);
        True when one was rejected in a way retrying cannot fix."""
        meta = job["metadata"]
        for index in indexes:
            try:
                pod = self.kube.request(
                    "POST", pod_path(meta["namespace"]), build_pod(job, index=index)
                )
            except ApiError as exc:
                if exc.namespace_terminating:
                    return False  # the namespace controller is deleting the Job too
                self._event(job, "Warning", "FailedCreate", f"Error creating: {exc.message}")
                if not _rejected_for_good(exc):
                    raise  # e.g. the namespace's default ServiceAccount does not exist yet
                self._create_errors[meta["uid"]] = exc.message
                log.warning(
                    "job %s/%s: pod rejected: %s", meta["namespace"], meta["name"], exc.message
                )
                return True
            log.info(
                "job %s/%s: created pod %s",
                meta["namespace"],
                meta["name"],
                pod["metadata"]["name"],
            )
        return False

    def _delete_pod(self, namespace: str, ref: PodRef) -> None:
        with contextlib.suppress(ApiError):  # already gone, or replaced by a namesake
            self.kube.request(
                "DELETE", pod_path(namespace, ref.name), {"preconditions": {"uid": ref.uid}}
            )

    def _release(self, namespace: str, ref: PodRef) -> None:
        """Remove the tracking finalizer (the uid guards against a namesake Pod)."""
        patch = {
            "metadata": {
                "$deleteFromPrimitiveList/finalizers": [TRACKING_FINALIZER],
                "uid": ref.uid,
            }
        }
        try:
            self.kube.request(
                "PATCH", pod_path(namespace, ref.name), patch, content_type=STRATEGIC_MERGE_PATCH
            )
        except ApiError as exc:
            if exc.status not in (404, 409, 422):
                raise

    def _release_orphans(self, namespace: str, job_name: str) -> None:
        """The Job is gone (e.g. deleted, its Pods garbage-collected): its Pods no longer
        need to be counted, so let them go."""
        selector = f"{JOB_NAME_LABELS[0]}={job_name}"
        pods = self.kube.request("GET", pod_path(namespace), query={"labelSelector": selector})[
            "items"
        ]
        for pod in pods:
            if is_tracked(pod):
                self._release(namespace, pod_ref(pod))

    # -- kubelet ------------------------------------------------------------------

    def _sync_pod(self, namespace: str, name: str) -> float | None:
        pod = self.kube.get(pod_path(namespace, name))
        uid = pod["metadata"]["uid"] if pod is not None else None
        with self._lock:
            stale = [r for r in self._runs.values() if r.key == (namespace, name) and r.uid != uid]
        for run in stale:  # the Pod was removed (or replaced by a namesake) without us
            if run.exit_code is None:
                self._terminate(run, MAX_GRACE_SECONDS)
            else:
                self._forget(run)
        return None if pod is None else self._reconcile_pod(pod)

    def _reconcile_pod(self, pod: Obj) -> float | None:
        run = self._runs.get(pod["metadata"]["uid"])
        if run is not None and run.exit_code is None:
            if is_deleting(pod):
                self._terminate(run, _grace_seconds(pod))
            else:
                self._report(pod, _running_report(run))
            return None
        if run is not None:
            if self._exited(pod, run):
                return None
        elif not is_deleting(pod) and not is_terminal(pod):
            return self._start(pod)
        elif is_deleting(pod) and not is_terminal(pod):
            # None of its containers runs here (never started, or killed with an earlier
            # executor): a kubelet still gives a deleted Pod a terminal phase first.
            self._report(pod, deleted_report(pod, utc_now()))
        if is_deleting(pod):
            self._confirm_deletion(pod)
        return None

    def _start(self, pod: Obj) -> float | None:
        now = rfc3339(utc_now())
        init_count = len(init_containers(pod["spec"]))
        if (abandoned := _abandoned_states(pod, now)) is not None:
            self._report(pod, kubelet_report(init_count, abandoned))
            return None
        pod_dir = self._pod_dir(pod["metadata"]["uid"])
        try:
            steps = self._prepare_steps(pod, pod_dir)
        except PodSetupError as exc:
            shutil.rmtree(pod_dir, ignore_errors=True)
            # The containers before the one that cannot start wait too: none has run.
            waiting = [waiting_state(POD_INITIALIZING)] * exc.container
            waiting.append(waiting_state(exc.reason, exc.message))
            self._report(pod, kubelet_report(init_count, waiting))
            return SETUP_RETRY_SECONDS
        if steps[0].launch is None:
            shutil.rmtree(pod_dir, ignore_errors=True)
            failed = terminated_state(
                START_ERROR_EXIT, "StartError", steps[0].start_error, now, now
            )
            self._report(pod, kubelet_report(init_count, [failed]))
            return None
        run = self._launch(pod, steps)
        self._report(pod, _running_report(run))
        return None

    def _exited(self, pod: Obj, run: ContainerRun) -> bool:
        """``run``'s current container exited: start the next one (True), or report how
        the Pod ended and forget the run (False). Nothing changes before the report is
        written, so a failed write is simply retried."""
        states = [*run.ended, _exit_state(run)]
        if self._goes_on(pod, run, states[-1]):
            following = run.steps[run.index + 1]
            if following.launch is not None:
                self._run_next(run, states[-1])
                self._report(pod, _running_report(run))
                return True
            now = rfc3339(utc_now())
            states.append(
                terminated_state(START_ERROR_EXIT, "StartError", following.start_error, now, now)
            )
        if not is_terminal(pod):
            self._report(pod, kubelet_report(run.init_count, states))
        self._forget(run)
        return False

    def _goes_on(self, pod: Obj, run: ContainerRun, ended: Obj) -> bool:
        """Whether a next container starts after ``run``'s current one ``ended``: only
        after an init container that exited 0, and not while the Pod or the executor is
        going away (restartPolicy Never: a failed init container fails the Pod)."""
        return (
            run.index < run.init_count
            and _exited_ok(ended)
            and not run.terminating
            and not is_deleting(pod)
            and not is_terminal(pod)
            and not self._stopping.is_set()
        )

    def _pod_dir(self, uid: str) -> Path:
        return self.state_dir / "pods" / uid

    def _process_env(self, pod: Obj, env: dict[str, str]) -> dict[str, str]:
        inherited = {k: os.environ[k] for k in self._pass_env if k in os.environ}
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        merged = {**inherited, "HOSTNAME": hostname, **env}
        path = env.get("PATH") or os.environ.get("PATH") or DEFAULT_PATH
        merged["PATH"] = f"{self._bin_dir}{os.pathsep}{path}"
        return merged

    def _launch(self, pod: Obj, steps: Sequence[Step]) -> ContainerRun:
        """Start the Pod's first container (its first init container, if any)."""
        meta = pod["metadata"]
        pod_dir = self._pod_dir(meta["uid"])
        process, log_path = self._spawn_step(meta["namespace"], meta["name"], pod_dir, steps[0])
        run = ContainerRun(
            namespace=meta["namespace"],
            pod=meta["name"],
            uid=meta["uid"],
            pod_dir=pod_dir,
            steps=tuple(steps),
            process=process,
            log_path=log_path,
            started_at=rfc3339(utc_now()),
        )
        with self._lock:
            self._runs[run.uid] = run
        self._watch_exit(run)
        return run

    def _run_next(self, run: ContainerRun, ended: Obj) -> None:
        """Start the container after ``run``'s init container, which ``ended`` with 0."""
        # What the init container left running dies with it, as in a container runtime.
        _signal_group(run, signal.SIGKILL)
        following = run.steps[run.index + 1]
        process, log_path = self._spawn_step(run.namespace, run.pod, run.pod_dir, following)
        with self._lock:
            run.ended.append(ended)
            run.index += 1
            run.process, run.log_path, run.started_at = process, log_path, rfc3339(utc_now())
            run.exit_code = run.finished_at = None
            run.killed = False
        self._watch_exit(run)

    def _spawn_step(
        self, namespace: str, pod: str, pod_dir: Path, step: Step
    ) -> tuple[subprocess.Popen[bytes], Path]:
        assert step.launch is not None
        log_path = self.log_path(namespace, pod, step.name if step.init else None)
        process = _spawn(step.launch, pod_dir, container_dir(pod_dir, step.name), log_path)
        # Only the command: $(VAR) expansion may have put Secret values in the arguments.
        log.info(
            "pod %s/%s: %s started %s (pid %d)",
            namespace,
            pod,
            _describe_step(step),
            step.launch.argv[0],
            process.pid,
        )
        return process, log_path

    def _watch_exit(self, run: ContainerRun) -> None:
        threading.Thread(
            target=self._wait_for_exit, args=(run,), name=f"pod {run.pod}", daemon=True
        ).start()

    def _prepare_steps(self, pod: Obj, pod_dir: Path) -> list[Step]:
        """The Pod's containers in the order they run, all resolved before the first one
        starts: the volumes written once (an emptyDir an init container fills is what the
        regular container mounts), then each container's environment, command and mounts.

        A missing Secret or ConfigMap thus holds the whole Pod back, even one only the
        regular container needs (a kubelet would run the init containers first).
        """
        meta, spec = pod["metadata"], pod["spec"]
        if len(spec["containers"]) > 1:
            log.warning("pod %s/%s: only the first container runs", meta["namespace"], meta["name"])
        inits = init_containers(spec)
        if len(inits) < len(spec.get("initContainers") or []):
            log.warning(
                "pod %s/%s: sidecar containers are ignored", meta["namespace"], meta["name"]
            )
        volumes = materialize_volumes(pod, pod_dir / "volumes", self.state_dir / "pvc", self.kube)
        hosts = self._hosts_file(pod, pod_dir)
        containers = [*inits, spec["containers"][0]]
        return [
            self._step(pod, container, pod_dir, volumes, position, position < len(inits), hosts)
            for position, container in enumerate(containers)
        ]

    def _hosts_file(self, pod: Obj, pod_dir: Path) -> Path | None:
        """For a Pod with a ``subdomain``: a copy of the host's /etc/hosts plus the names
        of the Pod itself and, for a Job's Pod, of every completion index of its Job
        (``indexed_host_names``), all 127.0.0.1. Bind-mounted onto /etc/hosts."""
        spec, meta = pod["spec"], pod["metadata"]
        subdomain = spec.get("subdomain")
        if not subdomain:
            return None
        hostnames = [spec.get("hostname") or meta["name"]]
        job_name = (meta.get("labels") or {}).get(JOB_NAME_LABELS[0])
        job = self.kube.get(job_path(meta["namespace"], job_name)) if job_name else None
        if job is not None and is_indexed(job):
            completions = int(job["spec"]["completions"])
            hostnames += [f"{job_name}-{i}" for i in range(completions)]
        try:
            host_hosts = Path("/etc/hosts").read_text()
        except OSError:
            host_hosts = ""
        path = pod_dir / "etc-hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            hosts_file_text(host_hosts, dict.fromkeys(hostnames), subdomain, meta["namespace"])
        )
        return path

    def _step(
        self,
        pod: Obj,
        container: Obj,
        pod_dir: Path,
        volumes: dict[str, Volume],
        position: int,
        init: bool,
        hosts: Path | None = None,
    ) -> Step:
        policy = container.get("terminationMessagePolicy", "File")
        try:
            launch = self._prepare(pod, container, pod_dir, volumes, hosts)
        except PodSetupError as exc:
            raise PodSetupError(exc.reason, exc.message, position) from exc
        except StartError as exc:
            return Step(container["name"], init, policy, None, str(exc))
        return Step(container["name"], init, policy, launch)

    def _prepare(
        self,
        pod: Obj,
        container: Obj,
        pod_dir: Path,
        volumes: dict[str, Volume],
        hosts: Path | None = None,
    ) -> Launch:
        """Resolve the environment and the command, plan the mounts."""
        env = container_env(pod, container, self.kube)
        argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        proc_env = self._process_env(pod, env)
        executable = _resolve_executable(argv, proc_env["PATH"])
        own = container_dir(pod_dir, container["name"])
        own.mkdir(parents=True, exist_ok=True)
        termination = own / TERMINATION_FILE
        termination.write_bytes(b"")
        message_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mounts = [
            *container_mounts(container, volumes, env),
            Mount(str(termination), message_path, False),
        ]
        if hosts is not None and all(os.path.normpath(m.target) != "/etc/hosts" for m in mounts):
            mounts.append(Mount(str(hosts), "/etc/hosts", True))
        # The Python, the venv and the project (installed in editable mode) it runs from.
        needed = [sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1])]
        if "/" not in argv[0]:
            needed.append(os.path.dirname(executable))  # found on the host's PATH
        keep = paths_to_keep(mounts, needed)
        return Launch(argv, executable, proc_env, mounts, container.get("workingDir", ""), keep)

    def _wait_for_exit(self, run: ContainerRun) -> None:
        # Fixed until exit_code is set: only then may the run move on to its next step.
        process, step, log_path = run.process, run.step, run.log_path
        returncode = process.wait()
        with self._lock:
            run.exit_code = returncode
            run.finished_at = rfc3339(utc_now())
            timer, stopped = run.kill_timer, run.terminating
        if timer is not None:
            timer.cancel()
        log.info(
            "pod %s/%s: %s exited with %d", run.namespace, run.pod, _describe_step(step), returncode
        )
        if step.init and returncode != 0 and not stopped:
            # Its status message follows the kubelet's rules and is often empty (policy
            # File): the executor's log shows why the Pod never got to its container.
            tail = _read_tail(log_path, FALLBACK_LOG_BYTES).decode(errors="replace").rstrip()
            log.warning(
                "pod %s/%s: init container %s failed; the end of %s:\n%s",
                run.namespace,
                run.pod,
                step.name,
                log_path,
                tail,
            )
        self._pods.add(run.key)

    def _report(self, pod: Obj, report: Report) -> None:
        desired = pod_status(pod, report, utc_now())
        current = pod.get("status") or {}
        if all(prune(current.get(k)) == v for k, v in desired.items()):
            return
        meta = pod["metadata"]
        # A merge patch replaces the conditions list: the resourceVersion makes it fail
        # (409, read again) rather than drop a condition written since the Pod was read,
        # such as the DisruptionTarget an eviction adds.
        precondition = {"uid": meta["uid"], "resourceVersion": meta.get("resourceVersion")}
        self.kube.request(
            "PATCH",
            pod_path(meta["namespace"], meta["name"]) + "/status",
            {"metadata": prune(precondition), "status": desired},
            content_type=MERGE_PATCH,
        )

    def _terminate(self, run: ContainerRun, grace: float) -> None:
        """SIGTERM now, SIGKILL after ``grace`` seconds unless the process exited."""
        with self._lock:
            if run.terminating or run.exit_code is not None:
                return
            run.terminating = True
            run.kill_timer = threading.Timer(grace, self._kill, args=(run,))
            run.kill_timer.daemon = True
            run.kill_timer.start()
        log.info("pod %s/%s: terminating (grace %.0fs)", run.namespace, run.pod, grace)
        _signal_group(run, signal.SIGTERM)

    def _kill(self, run: ContainerRun) -> None:
        with self._lock:
            if run.exit_code is not None:
                return
            run.killed = True
        _signal_group(run, signal.SIGKILL)

    def _forget(self, run: ContainerRun) -> None:
        _signal_group(run, signal.SIGKILL)  # stray children left in the process group
        with self._lock:
            self._runs.pop(run.uid, None)
        shutil.rmtree(run.pod_dir, ignore_errors=True)

    def _confirm_deletion(self, pod: Obj) -> None:
        """What a kubelet does once a deleted Pod's containers are gone: delete it for
        good (it still waits for its finalizers, e.g. the Job's tracking one)."""
        meta = pod["metadata"]
        if meta.get("deletionGracePeriodSeconds") == 0:
            return
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.kube.request("DELETE", pod_path(meta["namespace"], meta["name"]), body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise


def hosts_file_text(
    host_hosts: str, hostnames: Iterable[str], subdomain: str, namespace: str
) -> str:
    """The host's hosts file plus, for each hostname, ``<hostname>.<subdomain>``, its
    ``.<namespace>.svc`` and ``.svc.<cluster domain>`` forms and the bare hostname, all
    at 127.0.0.1 (what cluster DNS and the kubelet's hosts file give a Pod)."""
    lines = [host_hosts.rstrip("\n"), "# local executor: pods of the subdomain"]
    for host in hostnames:
        fqdn = f"{host}.{subdomain}.{namespace}.svc"
        names = [f"{fqdn}.{CLUSTER_DOMAIN}", fqdn, f"{host}.{subdomain}", host]
        lines.append(f"{POD_IP}\t{' '.join(names)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _spawn(launch: Launch, pod_dir: Path, own_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``container_init`` in a new mount namespace, as the leader of a new process
    group (so the whole tree can be signalled), logging to ``log_path``. ``own_dir`` is
    the container's folder (``container_dir``), where a start error is written."""
    init_spec = {
        "mounts": [vars(m) for m in launch.mounts],
        "keep": launch.keep,
        "workingDir": launch.working_dir,
        "executable": launch.executable,
        "argv": launch.argv,
        "startErrorFile": str(own_dir / START_ERROR_FILE),
    }
    default_cwd = pod_dir / "work"  # a mount cannot hide a process's cwd
    default_cwd.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # -I: the container's PYTHON* variables must not affect the init helper.
    init = [
        sys.executable,
        "-I",
        str(Path(__file__).resolve()),
        INIT_COMMAND,
        json.dumps(init_spec),
    ]
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [*_unshare_command(), *init],
            env=launch.env,
            cwd=default_cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _describe_step(step: Step) -> str:
    return f"{'init container' if step.init else 'container'} {step.name}"


def _rejected_for_good(exc: ApiError) -> bool:
    """Pod Security and validation verdicts on the template do not change on retry."""
    return exc.status == 422 or (exc.status == 403 and "violates PodSecurity" in exc.message)


def _resolve_executable(argv: Sequence[str], path: str) -> str:
    if not argv:
        raise StartError("no command: the local executor cannot run an image's entrypoint")
    if "/" in argv[0]:
        return argv[0]  # may live in a volume, checked by exec after mounting
    found = shutil.which(argv[0], path=path)
    if found is None:
        raise StartError(f'exec: "{argv[0]}": executable file not found in $PATH')
    return found


def paths_to_keep(mounts: Sequence[Mount], needed: Sequence[str]) -> list[str]:
    """The needed host paths (the Python, the venv, the project) that some mount would
    hide: ``container_init`` binds them back on top, as if the pod's volume held them, so
    a pod may mount e.g. /tmp even when the checkout lives under /tmp. A mount onto such
    a path itself, or inside it, cannot be reconciled and is refused."""
    keep: list[str] = []
    for mount in mounts:
        target = os.path.normpath(mount.target)
        for path in needed:
            if target == "/" or path == target or target.startswith(path.rstrip("/") + "/"):
                raise StartError(
                    f"mountPath {mount.target} would hide or land in {path}, which the local "
                    "process needs: the local executor cannot mount there"
                )
            if path.startswith(target + "/") and path not in keep:
                keep.append(path)
    return keep


def _unshare_command() -> list[str]:
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private", "--"]
    # Without root, a user namespace grants the mount rights (mount points must exist).
    return ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "--"]


# ------------------------------------------------------------------------ CLI ---


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [INIT_COMMAND]:
        container_init(args[1])
    parser = argparse.ArgumentParser(
        description="Kubelet and Job controller for the test control plane (tests and demo only)."
    )
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path, help="volumes, logs, pod scratch")
    parser.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch only this namespace (repeatable; default: all)",
    )
    parser.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help=f"host variable passed to processes, besides {', '.join(DEFAULT_PASS_ENV)}",
    )
    parser.add_argument(
        "--pod-failure-backoff",
        type=float,
        default=DEFAULT_POD_FAILURE_BACKOFF,
        metavar="SECONDS",
        help="first delay before replacing a failed pod",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    opts = parser.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if opts.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    executor = LocalExecutor(
        opts.kubeconfig,
        opts.state_dir,
        opts.namespaces,
        pass_env=(*DEFAULT_PASS_ENV, *opts.pass_env),
        pod_failure_backoff=opts.pod_failure_backoff,
    )
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    executor.start()
    done.wait()
    executor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
