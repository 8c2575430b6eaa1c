"""Local kubelet: runs the pods the scheduler binds to its node as local processes.

Tests, ``make demo`` and ``make dev-up`` only; not shipped. The test control plane
(hack/controlplane.sh) runs etcd, kube-apiserver, kube-controller-manager and
kube-scheduler; with no container runtime here, this stands in for the one piece
missing, the kubelet, and talks to the API server as one does::

    python hack/local_kubelet.py --kubeconfig K --state-dir D [--gpus 2]
    with LocalKubelet(kubeconfig, state_dir) as kubelet: ...

Node ``NODE_NAME``: allocatable CPU, memory, pods and ``nvidia.com/gpu`` (2 by default),
Ready, its Lease renewed. Every Pod bound to it runs:

* Init containers one after the other, then the first regular container, each a local
  process of its ``command`` + ``args`` with its env; in place of its image, a
  virtualenv's bin directory goes first on PATH: vLLM's images (``vllm/...``) get the
  serving venv (hack/serving-venv.sh), on the CPU; the others this Python's, so that
  ``kubetune`` is the project's. A missing ConfigMap or Secret keeps the Pod Pending.
* Volumes are folders under the state dir (a claim's: ``<state>/pvc/<namespace>/<claim>``),
  bind-mounted onto their mountPaths in the process's private mount namespace
  (``unshare --mount``), as is a per-container file onto ``terminationMessagePath``.
* Network: each Pod gets its own address, reported as its podIP: in 198.18.0.0/16
  (RFC 2544's benchmarking range, on no real network), which one route makes local
  (``ip route replace local 198.18.0.0/16 dev lo table local``, CAP_NET_ADMIN), since
  the API server's service proxy goes only to Endpoints, and those may not hold
  loopback addresses; without that right, on loopback (127.1.0.0/16), where all but
  the service proxy works. A Pod with ``hostname`` and ``subdomain`` (an Indexed
  Job's) gets one derived from those names, so its peers' names resolve before they
  start: its hosts file maps ``<hostname>.<subdomain>[.<namespace>.svc[.cluster.local]]``
  of itself and of every index of its Job. A server that binds all interfaces (0.0.0.0 or ::) binds its
  Pod's address instead (a small LD_PRELOAD library, built with cc on start, rewrites
  such binds), so two Pods may both listen on :9090 as on a real node.
* Restarts (restartPolicy Always, OnFailure) after the kubelet's back-off; startup,
  readiness and liveness probes (httpGet, tcpSocket; exec counts as passing); status
  and Events as a kubelet writes them. A deleted Pod's processes get SIGTERM, then
  SIGKILL after its grace period (at most 10 s); then the Pod is written terminal and
  deleted for good.

Limitations: processes run as the kubelet's user; security contexts and resources are
admitted but not enforced. Only the first regular container runs (sidecars and other
containers are ignored). No cluster DNS: Service names do not resolve. ``kubectl logs``
cannot work: logs are at ``<state>/logs/<namespace>/<pod>.log`` (``<pod>/<init>.log``).
A process that connects to 127.0.0.1 for a server its own Pod bound on all interfaces
is refused (that server listens on the Pod's address). Stopping the kubelet kills its
processes; the next one reports their Pods Failed (ContainerStatusUnknown).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
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
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

# Every container starts through this file (INIT_COMMAND below), which has no use for
# the kubernetes client, a second's import.
if sys.argv[1:2] != ["_container-init"]:
    from kubernetes import client, config, watch
    from kubernetes.client import ApiException

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

log = logging.getLogger("local_kubelet")

NODE_NAME = "local-node"
HOST_IP = "127.0.0.1"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
DEFAULT_PASS_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POD_IP_VARIABLE = "LOCAL_KUBELET_POD_IP"
POD_NETWORK, LOOPBACK_POD_NETWORK = "198.18.0.0/16", "127.1.0.0/16"
# The kubelet's limits for the termination message (pkg/kubelet/kuberuntime).
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
MAX_GRACE_SECONDS = 10.0
STOP_GRACE_SECONDS = 5.0
START_ERROR_EXIT = 128  # what container runtimes report when exec fails
SETUP_RETRY_SECONDS = 2.0
ERROR_RETRY_SECONDS = 1.0
LEASE_SECONDS, NODE_LEASES = 10.0, "kube-node-lease"
BACKOFF_SECONDS, MAX_BACKOFF_SECONDS = 10.0, 300.0
# The API server sends a watch a bookmark about every minute: more silence is a dead
# connection.
WATCH_READ_TIMEOUT_SECONDS = 330
REQUEST_TIMEOUT_SECONDS = 30.0
INIT_COMMAND = "_container-init"
TERMINATION_FILE, START_ERROR_FILE = "termination-log", "start-error"
POD_INITIALIZING = "PodInitializing"
CONFIG_ERROR = "CreateContainerConfigError"
MERGE_PATCH = "application/merge-patch+json"

# Rewrites a bind to any address (0.0.0.0, ::) into one to the Pod's own address.
BIND_SHIM = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("LOCAL_KUBELET_POD_IP");
    if (ip && addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in;
        memcpy(&in, addr, sizeof in);
        if (in.sin_addr.s_addr == htonl(INADDR_ANY) && inet_pton(AF_INET, ip, &in.sin_addr) == 1)
            return real(fd, (struct sockaddr *)&in, sizeof in);
    }
    if (ip && addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        char mapped[64] = "::ffff:";
        memcpy(&in6, addr, sizeof in6);
        strncat(mapped, ip, sizeof mapped - 8);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr) && inet_pton(AF_INET6, mapped, &in6.sin6_addr) == 1)
            return real(fd, (struct sockaddr *)&in6, sizeof in6);
    }
    return real(fd, addr, len);
}
"""


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def prune(value: Any) -> Any:
    """Drop None, "", {} and [] recursively, as the API server does with omitempty
    fields, so that a desired status compares equal to what the server returns."""
    if isinstance(value, dict):
        pruned = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", {}, [])}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def is_terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def is_deleting(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def restarts(pod: Obj, exit_code: int) -> bool:
    """Whether the container that exited with ``exit_code`` is started again."""
    policy = pod["spec"].get("restartPolicy", "Always")
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def back_off(restart_count: int) -> float:
    return min(BACKOFF_SECONDS * 2 ** max(restart_count - 1, 0), MAX_BACKOFF_SECONDS)


def local_pod_network() -> str:
    """The network Pods get addresses in: POD_NETWORK where this process may route it to
    loopback, else LOOPBACK_POD_NETWORK."""
    route = ["ip", "route", "replace", "local", POD_NETWORK, "dev", "lo", "table", "local"]
    try:
        subprocess.run(route, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning(
            "Pods get loopback addresses, which the service proxy does not reach: %s failed (%s)",
            " ".join(route),
            getattr(exc, "stderr", b"").decode().strip() or exc,
        )
        return LOOPBACK_POD_NETWORK
    return POD_NETWORK


def fixed_pod_ip(namespace: str, subdomain: str, hostname: str) -> str:
    """The address of a Pod named by hostname and subdomain, in 127.64.0.0/10: known
    before the Pod exists, as its DNS name would be on a cluster."""
    digest = hashlib.sha256(f"{namespace}/{subdomain}/{hostname}".encode()).digest()
    return f"127.{64 + digest[0] % 64}.{digest[1]}.{digest[2] % 254 + 1}"


# ---------------------------------------------------------- pod status, pure ---


def waiting_state(reason: str, message: str = "") -> Obj:
    return {"waiting": {"reason": reason, "message": message}}


def running_state(started_at: str) -> Obj:
    return {"running": {"startedAt": started_at}}


def terminated_state(
    exit_code: int, reason: str, message: str, started_at: str, finished_at: str
) -> Obj:
    times = {"startedAt": started_at, "finishedAt": finished_at}
    return {"terminated": {"exitCode": exit_code, "reason": reason, "message": message, **times}}


def _exited_ok(state: Obj) -> bool:
    return bool("terminated" in state and state["terminated"].get("exitCode") == 0)


@dataclass(frozen=True)
class Report:
    """What the kubelet reports for a Pod: its phase, its (first) regular container's
    state and the states of the init containers that got a turn, in order (the others
    wait with PodInitializing); for a restarted container, how often and how it last
    ended; and whether its probes say it is started and ready."""

    phase: str
    state: Obj
    init_states: tuple[Obj, ...] = ()
    restart_count: int = 0
    last_state: Obj = field(default_factory=dict)
    started: bool = True
    ready: bool = True


def kubelet_report(init_count: int, states: Sequence[Obj], **rest: Any) -> Report:
    """The report for a Pod whose containers, in the order they run (its ``init_count``
    init containers, then the regular one), got as far as ``states``. An init
    container that ended without a next container starting ended the Pod (restartPolicy
    Never; the others restart it instead), and the regular container still waits."""
    init_states = tuple(states[:init_count])
    if len(states) > init_count:
        state = states[init_count]
        if "running" in state:
            phase = "Running"
        elif "terminated" in state:
            phase = "Succeeded" if _exited_ok(state) else "Failed"
        else:
            phase = "Running" if rest.get("restart_count") else "Pending"
        return Report(phase, state, init_states, **rest)
    ended = bool(init_states) and "terminated" in init_states[-1]
    return Report(
        "Failed" if ended else "Pending", waiting_state(POD_INITIALIZING), init_states, **rest
    )


def init_containers(spec: Obj) -> list[Obj]:
    """The init containers that run: sidecars (``restartPolicy: Always``) never
    complete, so they are ignored like the other extra containers."""
    return [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") != "Always"]


# The Pod conditions the kubelet owns; it keeps the others as they are.
KUBELET_CONDITIONS = frozenset(
    ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
)


def _pod_conditions(pod: Obj, report: Report, inits: Sequence[str], now: str) -> list[Obj]:
    old = (pod.get("status") or {}).get("conditions") or []
    container = pod["spec"]["containers"][0]["name"]
    incomplete = [n for n, s in zip(inits, report.init_states, strict=False) if not _exited_ok(s)]
    incomplete += list(inits[len(report.init_states) :])
    if report.phase == "Succeeded":
        initialized = ("True", "PodCompleted", "")
    elif not incomplete or "waiting" not in report.state:
        initialized = ("True", "", "")
    else:
        message = f"containers with incomplete status: [{' '.join(incomplete)}]"
        initialized = ("False", "ContainersNotInitialized", message)
    ready = ("False", "ContainersNotReady", f"containers with unready status: [{container}]")
    if report.phase == "Succeeded":
        ready = ("False", "PodCompleted", "")
    elif "running" in report.state and report.ready:
        ready = ("True", "", "")
    previous = {c.get("type"): c for c in old}
    containers_ready = ready
    if ready[0] == "True":
        # As the kubelet's generatePodReadyCondition: the pod is Ready once its
        # containers are and every readiness gate's condition (set by someone else) is True.
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        closed = [g for g in gates if (previous.get(g) or {}).get("status") != "True"]
        if closed:
            message = f'the status of pod readiness gate "{closed[0]}" is not "True"'
            ready = ("False", "ReadinessGatesNotReady", message)
    terminal = report.phase in ("Succeeded", "Failed")
    wanted = [
        ("PodReadyToStartContainers", "False" if terminal else "True", "", ""),
        ("Initialized", *initialized),
        ("Ready", *ready),
        ("ContainersReady", *containers_ready),
        ("PodScheduled", "True", "", ""),
    ]
    conditions = []
    for ctype, status, reason, message in wanted:
        prev = previous.get(ctype) or {}
        # Keeping lastTransitionTime when nothing changed keeps the status idempotent.
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        fields = {"type": ctype, "status": status, "reason": reason, "message": message}
        conditions.append({**fields, "lastTransitionTime": since or now})
    return conditions + [c for c in old if c.get("type") not in KUBELET_CONDITIONS]


def _container_status(pod: Obj, container: Obj, state: Obj, init: bool, report: Report) -> Obj:
    running = "running" in state
    suffix = f"/{container['name']}" if init else ""
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "containerID": "" if "waiting" in state else f"local://{pod['metadata']['uid']}{suffix}",
        # A completed init container counts as ready; a regular one while it passes.
        "ready": _exited_ok(state) if init else running and report.ready,
        "started": running and (init or report.started),
        "restartCount": 0 if init else report.restart_count,
        "state": state,
        "lastState": {} if init else report.last_state,
    }


def pod_status(pod: Obj, report: Report, pod_ip: str, now: datetime) -> Obj:
    """The Pod status a kubelet would write for ``report``."""
    old = pod.get("status") or {}
    container = pod["spec"]["containers"][0]
    inits = init_containers(pod["spec"])
    not_yet = [waiting_state(POD_INITIALIZING)] * (len(inits) - len(report.init_states))
    stamp = rfc3339(now)
    return prune(
        {
            "phase": report.phase,
            "conditions": _pod_conditions(pod, report, [c["name"] for c in inits], stamp),
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": old.get("startTime") or stamp,
            "initContainerStatuses": [
                _container_status(pod, c, s, True, report)
                for c, s in zip(inits, [*report.init_states, *not_yet], strict=True)
            ],
            "containerStatuses": [_container_status(pod, container, report.state, False, report)],
        }
    )


def abandoned_report(pod: Obj, now: datetime) -> Report | None:
    """For a Pod one of whose containers a kubelet reported running, which no process
    of this kubelet runs (an earlier kubelet's, killed when it stopped): Failed, that
    container ContainerStatusUnknown after the ones that ran before it. None when no
    container was ever reported running."""
    status, stamp = pod.get("status") or {}, rfc3339(now)
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or [])[:1],
    ]
    states = [s.get("state") or {} for s in statuses]
    for position, state in enumerate(states):
        if "running" in state:
            started = state["running"].get("startedAt") or stamp
            message = "The container could not be located when the pod was terminated"
            unknown = terminated_state(137, "ContainerStatusUnknown", message, started, stamp)
            report = kubelet_report(
                len(init_containers(pod["spec"])), [*states[:position], unknown]
            )
            return Report("Failed", report.state, report.init_states)
    return None


def deleted_report(pod: Obj, now: datetime) -> Report:
    """The report for a deleted Pod none of whose containers runs here: Failed, as
    abandoned_report says, or else with the states as they were reported."""
    if (abandoned := abandoned_report(pod, now)) is not None:
        return abandoned
    status = pod.get("status") or {}
    inits = [s.get("state") or {} for s in status.get("initContainerStatuses") or []]
    regular = (status.get("containerStatuses") or [{}])[0].get("state")
    count = len(init_containers(pod["spec"]))
    return Report("Failed", regular or waiting_state("ContainerCreating"), tuple(inits[:count]))


def exit_reason(returncode: int, killed_by_kubelet: bool) -> tuple[int, str]:
    """(exitCode, reason) as a container runtime reports them. A SIGKILL the kubelet did
    not send is taken for the kernel's OOM killer."""
    if returncode >= 0:
        return returncode, "Completed" if returncode == 0 else "Error"
    signum = -returncode
    if signum == signal.SIGKILL and not killed_by_kubelet:
        return 128 + signum, "OOMKilled"
    return 128 + signum, "Error"


def termination_message(message: bytes, log_tail: bytes, policy: str, exit_code: int) -> str:
    """The kubelet's rules: the file's first 4096 bytes; with FallbackToLogsOnError and an
    empty file after a failure, the log's last 80 lines capped at 2048 bytes."""
    if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        return b"".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
    return message[:MAX_MESSAGE_BYTES].decode(errors="replace")


def hosts_file_text(host_hosts: str, hosts: dict[str, str], subdomain: str, namespace: str) -> str:
    """The host's hosts file plus, for each hostname, ``<hostname>.<subdomain>``, its
    ``.<namespace>.svc`` and ``.svc.<cluster domain>`` forms and the bare hostname, at
    that hostname's address (what cluster DNS and the kubelet's hosts file give)."""
    lines = [host_hosts.rstrip("\n"), "# local kubelet: pods of the subdomain"]
    for host, ip in hosts.items():
        fqdn = f"{host}.{subdomain}.{namespace}.svc"
        lines.append(f"{ip}\t{fqdn}.{CLUSTER_DOMAIN} {fqdn} {host}.{subdomain} {host}")
    return "\n".join(lines).lstrip("\n") + "\n"


# ------------------------------------------------ environment and volumes ---


class PodSetupError(Exception):
    """The Pod cannot start yet (e.g. a missing Secret): it stays Pending with this
    waiting reason, retried. ``container``: the position, in the order containers run,
    of the one that waits with it."""

    def __init__(self, reason: str, message: str, container: int = 0) -> None:
        super().__init__(message)
        self.reason, self.message, self.container = reason, message, container


class StartError(Exception):
    """The container cannot start at all (no command, executable not found)."""


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, unknown references
    are left as they are, and ``$$`` escapes a ``$``."""
    return _VAR_REF.sub(
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text
    )


def field_value(pod: Obj, path: str, pod_ip: str = HOST_IP) -> str:
    """A downward-API fieldRef, as in env valueFrom and downwardAPI volumes."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if path in simple:
        return str(simple[path])
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
    raise PodSetupError(CONFIG_ERROR, f"unsupported fieldRef {path!r}")


def object_data(kind: str, obj: Obj) -> dict[str, bytes]:
    """A ConfigMap's data/binaryData or a Secret's data, decoded to bytes."""
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    return data | {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}


def _referenced(source: Kube, namespace: str, kind: str, ref: Obj, reason: str) -> dict[str, bytes]:
    """The data of the ConfigMap or Secret ``ref`` names; none of a missing optional one.
    A key ``ref`` names that is not there is skipped where optional, as the kubelet does."""
    name = ref.get("name") or ref.get("secretName", "")
    obj = source.object(kind, namespace, name)
    if obj is None and not ref.get("optional"):
        raise PodSetupError(reason, f'{kind.lower()} "{name}" not found')
    data = object_data(kind, obj or {})
    keys = [i["key"] for i in ref.get("items") or []] + ([ref["key"]] if "key" in ref else [])
    missing = [key for key in keys if key not in data]
    if missing and not ref.get("optional"):
        message = f"couldn't find key {missing[0]} in {kind} {namespace}/{name}"
        raise PodSetupError(reason, message)
    return data


def container_env(pod: Obj, container: Obj, source: Kube, pod_ip: str = HOST_IP) -> dict[str, str]:
    """The container's environment from ``envFrom`` then ``env``, as the kubelet builds it."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for ref in container.get("envFrom") or []:
        kind, key = ("Secret", "secretRef") if "secretRef" in ref else ("ConfigMap", "configMapRef")
        for name, value in _referenced(source, namespace, kind, ref[key], CONFIG_ERROR).items():
            env[ref.get("prefix", "") + name] = value.decode()
    for var in container.get("env") or []:
        value_from = var.get("valueFrom")
        if value_from is None:
            env[var["name"]] = expand(var.get("value", ""), env)
        elif "fieldRef" in value_from:
            env[var["name"]] = field_value(pod, value_from["fieldRef"]["fieldPath"], pod_ip)
        elif ref := value_from.get("configMapKeyRef") or value_from.get("secretKeyRef"):
            kind = "Secret" if "secretKeyRef" in value_from else "ConfigMap"
            data = _referenced(source, namespace, kind, ref, CONFIG_ERROR)
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]].decode()
        else:
            message = f"unsupported valueFrom {sorted(value_from)} for {var['name']}"
            raise PodSetupError(CONFIG_ERROR, message)
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


def _volume_files(pod: Obj, volume: Obj, source: Kube, pod_ip: str) -> Files:
    """The files of a projected volume, or of a configMap, secret or downwardAPI one,
    which is a projected volume of that one source."""
    if one := next((k for k in ("configMap", "secret", "downwardAPI") if k in volume), None):
        projected = {**volume[one], "sources": [{one: volume[one]}]}  # with its defaultMode
    elif "projected" in volume:
        projected = volume["projected"]
    else:
        kinds = sorted(set(volume) - {"name"})
        message = f'volume "{volume["name"]}": {kinds} volumes are not supported locally'
        raise PodSetupError("ContainerCreating", message)
    mode = projected.get("defaultMode", 0o644)
    files: Files = {}
    for item in projected.get("sources") or []:
        if sat := item.get("serviceAccountToken"):
            token = source.token(pod, sat.get("audience"), sat.get("expirationSeconds", 3600))
            files[sat["path"]] = (token.encode(), mode)
        elif "downwardAPI" in item:
            for field_ in item["downwardAPI"].get("items") or []:
                if "fieldRef" not in field_:
                    raise PodSetupError("ContainerCreating", "resourceFieldRef is not supported")
                value = field_value(pod, field_["fieldRef"]["fieldPath"], pod_ip).encode()
                files[field_["path"]] = (value, field_.get("mode", mode))
        elif "configMap" in item or "secret" in item:
            kind, ref = (
                ("Secret", item["secret"]) if "secret" in item else ("ConfigMap", item["configMap"])
            )
            data = _referenced(source, pod["metadata"]["namespace"], kind, ref, "ContainerCreating")
            items = ref.get("items") or [{"key": key, "path": key} for key in data]
            files |= {
                i["path"]: (data[i["key"]], i.get("mode", mode)) for i in items if i["key"] in data
            }
        else:
            message = f"unsupported projected source {sorted(item)}"
            raise PodSetupError("ContainerCreating", message)
    return files


def materialize_volumes(
    pod: Obj, volumes_dir: Path, pvc_root: Path, source: Kube, pod_ip: str = HOST_IP
) -> dict[str, Volume]:
    """Map each Pod volume to a host folder, writing the files of the file-backed ones."""
    result: dict[str, Volume] = {}
    for volume in pod["spec"].get("volumes") or []:
        name, folder = volume["name"], volumes_dir / volume["name"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            folder = pvc_root / pod["metadata"]["namespace"] / claim["claimName"]
            result[name] = Volume(folder, bool(claim.get("readOnly")))
        elif "emptyDir" in volume:
            result[name] = Volume(folder, False)
        else:
            for relative, (content, mode) in _volume_files(pod, volume, source, pod_ip).items():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_bytes(content)
                (folder / relative).chmod(mode)
            result[name] = Volume(folder, True)
        folder.mkdir(parents=True, exist_ok=True)
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
            raise PodSetupError(CONFIG_ERROR, f"subPath {sub!r} leaves its volume")
        if sub and not source.exists():
            source.mkdir(parents=True)  # the kubelet creates missing subPath folders
        mounts.append(
            Mount(str(source), vm["mountPath"], volume.read_only or bool(vm.get("readOnly")))
        )
    return mounts


def paths_to_keep(mounts: Sequence[Mount], needed: Sequence[str]) -> list[str]:
    """The needed host paths (the Python, the venv, the project) that some mount would
    hide: ``container_init`` binds them back on top, so a Pod may mount e.g. /tmp even
    when the checkout lives under /tmp. A mount onto or inside one is refused."""
    keep: list[str] = []
    for mount in mounts:
        target = os.path.normpath(mount.target)
        for path in needed:
            if target == "/" or path == target or target.startswith(path.rstrip("/") + "/"):
                raise StartError(
                    f"mountPath {mount.target} would hide or land in {path}, which the local "
                    "process needs: the local kubelet cannot mount there"
                )
            if path.startswith(target + "/") and path not in keep:
                keep.append(path)
    return keep


# ------------------------------------- container init (in the mount namespace) ---

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384


def apply_mounts(mounts: Sequence[Mount], keep: Sequence[str] = ()) -> None:
    """Bind each source onto its target in this (private) mount namespace, then each
    path in `keep` back over whatever hid it. Sources are opened first and bound through
    /proc/self/fd, since a mount over e.g. /tmp would hide sources under /tmp; parents
    go before children, and read-only remounts last."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

    def mount(source: str | None, target: str, flags: int) -> None:
        src = os.fsencode(source) if source is not None else None
        if libc.mount(src, os.fsencode(target), None, flags, None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount {source or ''} on {target}: {os.strerror(errno)}")

    def mount_point(target: str, is_dir: bool) -> None:
        os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
        if not is_dir and not os.path.exists(target):
            open(target, "a").close()

    binds = [(m.source, m.target) for m in mounts] + [(path, path) for path in keep]
    fds = [os.open(src, os.O_PATH | os.O_CLOEXEC) for src, _ in binds]
    dirs = [os.path.isdir(src) for src, _ in binds]
    order = sorted(range(len(mounts)), key=lambda i: os.path.normpath(mounts[i].target).count("/"))
    for i in [*order, *range(len(mounts), len(binds))]:
        mount_point(binds[i][1], dirs[i])
        mount(f"/proc/self/fd/{fds[i]}", binds[i][1], MS_BIND | MS_REC)
    for i in order:
        if mounts[i].read_only:
            # A remount must keep the flags the kernel locked on the original mount.
            locked = os.statvfs(mounts[i].target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            mount(None, mounts[i].target, MS_REMOUNT | MS_BIND | MS_RDONLY | locked)
    for fd in fds:
        os.close(fd)


def container_init(spec_json: str) -> NoReturn:
    """Run by ``unshare`` in the new mount namespace: mount, chdir, exec. A failure goes
    to the start-error file (opened before a mount can hide it): reason StartError."""
    spec = json.loads(spec_json)
    error_fd = os.open(spec["startErrorFile"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
    try:
        apply_mounts([Mount(**m) for m in spec["mounts"]], spec["keep"])
        if spec["workingDir"]:
            os.makedirs(spec["workingDir"], exist_ok=True)
            os.chdir(spec["workingDir"])
    except OSError as exc:
        where = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
        os.write(error_fd, f"container setup: {where}".encode())
        os._exit(START_ERROR_EXIT)
    try:
        os.execv(spec["executable"], spec["argv"])
    except OSError as exc:
        os.write(error_fd, f'exec "{spec["argv"][0]}": {exc.strerror or exc}'.encode())
        os._exit(START_ERROR_EXIT)


# ----------------------------------------------------------------- API access ---


def api_call(call: Callable[..., Any], *args: Any, ok: Sequence[int] = (), **kwargs: Any) -> Any:
    """A kubernetes client call's response as the API server's JSON (the kubelet works
    on plain dicts, and the client's typed models would drop fields they do not know);
    None for an error status in ``ok``, such as a read's 404."""
    try:
        timeout = REQUEST_TIMEOUT_SECONDS
        response = call(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
    except ApiException as exc:
        if exc.status in ok:
            return None
        raise
    return json.loads(response.data or b"{}")


def api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


class Kube:
    """The API clients; ``object`` and ``token`` are what Pods' env and volumes read."""

    def __init__(self, kubeconfig: Path) -> None:
        api = config.new_client_from_config(str(kubeconfig))
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.leases = client.CoordinationV1Api(api)

    def object(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A ConfigMap or Secret a Pod refers to, or None when it does not exist."""
        read = self.core.read_namespaced_config_map
        if kind == "Secret":
            read = self.core.read_namespaced_secret
        return api_call(read, name, namespace, ok=(404,))

    def token(self, pod: Obj, audience: str | None, expiration: int) -> str:
        """A token of the Pod's ServiceAccount, bound to the Pod (TokenRequest API)."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        bound = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
        spec = {"audiences": [audience] if audience else [], "expirationSeconds": expiration}
        request = {"spec": {**spec, "boundObjectRef": bound}}
        create = self.core.create_namespaced_service_account_token
        try:
            return str(api_call(create, account, meta["namespace"], request)["status"]["token"])
        except ApiException as exc:
            message = f"service account token: {api_message(exc)}"
            raise PodSetupError("ContainerCreating", message) from exc


def volume_claim(namespace: str, claim: str, folder: Path, size: str = "100Gi") -> list[Obj]:
    """A PersistentVolumeClaim and, bound ahead to it, a PersistentVolume of ``folder``:
    what a cluster's storage provides, and the scheduler requires of a Pod's claims.
    (The kubelet mounts a claim from ``<state>/pvc/<namespace>/<claim>``.)"""
    volume = f"local-{namespace}-{claim}"
    modes = ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"]
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": modes,
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "local",
                "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "local",
                "volumeName": volume,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]


@dataclass(frozen=True)
class ImageRuntime:
    """What stands in for the images whose name starts with ``prefix``: the virtualenv
    whose bin directory goes first on PATH, and environment the stand-in needs."""

    prefix: str
    venv: Path
    env: dict[str, str] = field(default_factory=dict)


def default_runtimes() -> list[ImageRuntime]:
    """vLLM's server images run with the serving venv (hack/serving-venv.sh), on the
    CPU: its KV cache a fixed 1 GiB rather than a share of the host's memory, which
    is what gpuMemoryUtilization would reserve there."""
    serving = Path(__file__).resolve().parents[1] / ".venv-serving"
    cpu = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return [ImageRuntime("vllm/", serving, cpu)] if (serving / "bin" / "vllm").exists() else []


# ------------------------------------------------------------------ kubelet ---


class WorkQueue:
    """A deduplicating FIFO of keys with delayed adds. One worker drains it, so a key is
    never processed twice at once, and a key added while it is processed is processed
    again afterwards (level-triggered reconciliation)."""

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
class Step:
    """One container of a Pod, in the order they run: each init container, then the
    first regular one. How to start it: its environment, and what ``container_init``
    does (mounts, working folder, exec); or why it cannot start at all."""

    container: Obj
    init: bool
    env: dict[str, str] = field(default_factory=dict)
    spec: Obj = field(default_factory=dict)
    start_error: str = ""

    @property
    def name(self) -> str:
        return str(self.container["name"])


@dataclass
class ContainerRun:
    """The processes of one Pod, one container at a time, from the first start until
    the last exit is reported. ``process`` to ``killed`` are the current step's; the
    kubelet's thread moves them on only once ``exit_code`` is set."""

    key: Key
    uid: str
    pod_ip: str
    pod_dir: Path
    steps: tuple[Step, ...]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    started_at: str = ""
    ended: list[Obj] = field(default_factory=list)  # states of the init containers done
    index: int = 0  # of the step that runs
    exit_code: int | None = None
    finished_at: str | None = None
    terminating: bool = False
    killed: bool = False  # SIGKILL sent by the kubelet, so not an OOM kill
    restart_count: int = 0
    last_state: Obj = field(default_factory=dict)
    backing_off: bool = False
    restart_at: float = 0.0  # when the back-off ends (time.monotonic)
    started: bool = False  # the startup probe passed
    ready: bool = False  # the readiness probe passed

    @property
    def step(self) -> Step:
        return self.steps[self.index]

    @property
    def init_count(self) -> int:
        return len(self.steps) - 1

    def file(self, name: str) -> Path:
        """A file of the current container's own (each has its own termination log)."""
        return self.pod_dir / "containers" / self.step.name / name

    @property
    def meta(self) -> Obj:
        return {"namespace": self.key[0], "name": self.key[1], "uid": self.uid}

    def report(self) -> Report:
        """The Pod as it stands while this run goes on."""
        state = running_state(self.started_at)
        if self.backing_off:
            message = f"back-off restarting failed container {self.step.name}"
            state = waiting_state("CrashLoopBackOff", message)
        return kubelet_report(
            self.init_count,
            [*self.ended, state],
            restart_count=self.restart_count,
            last_state=self.last_state,
            started=self.started,
            ready=self.ready,
        )


def _read(path: Path, size: int, tail: bool = False) -> bytes:
    try:
        with path.open("rb") as fh:
            if tail:
                fh.seek(max(0, path.stat().st_size - size))
            return fh.read(size)
    except FileNotFoundError:
        return b""


def _signal_group(run: ContainerRun, signum: int) -> None:
    # Each container leads its own session, so its pid is the group id of all it started.
    if run.process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.process.pid, signum)


def _exit_state(run: ContainerRun) -> Obj:
    """The terminated state of ``run``'s current container, which exited."""
    assert run.exit_code is not None and run.finished_at is not None and run.log_path
    start_error = _read(run.file(START_ERROR_FILE), MAX_MESSAGE_BYTES).decode(errors="replace")
    if start_error:
        return terminated_state(
            START_ERROR_EXIT, "StartError", start_error, run.started_at, run.finished_at
        )
    code, reason = exit_reason(run.exit_code, run.killed)
    message = termination_message(
        _read(run.file(TERMINATION_FILE), MAX_MESSAGE_BYTES),
        _read(run.log_path, 16 * FALLBACK_LOG_BYTES, tail=True),
        run.step.container.get("terminationMessagePolicy", "File"),
        code,
    )
    return terminated_state(code, reason, message, run.started_at, run.finished_at)


def probe_passes(probe: Obj, pod_ip: str, container: Obj) -> bool:
    """One try of an httpGet or tcpSocket probe against the Pod's address (exec probes
    cannot run here: they pass)."""
    action = probe.get("httpGet") or probe.get("tcpSocket")
    if action is None:
        return True
    port = action["port"]
    if isinstance(port, str) and not port.isdigit():
        named = [p for p in container.get("ports") or [] if p.get("name") == port]
        if not named:
            return False
        port = named[0]["containerPort"]
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            url = f"http://{action.get('host') or pod_ip}:{port}{action.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return 200 <= response.status < 400
        with socket.create_connection((pod_ip, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class LocalKubelet:
    """The kubelet of node ``node``, on background threads. ``start()`` registers
    the node and returns once the Pods bound to it are listed; ``stop()`` (also on
    leaving the ``with`` block) ends the watch and kills every process it started."""

    def __init__(
        self,
        kubeconfig: Path | str,
        state_dir: Path | str,
        *,
        node: str = NODE_NAME,
        gpus: int = 2,
        cpu: str = "32",
        memory: str = "128Gi",
        pass_env: Sequence[str] = DEFAULT_PASS_ENV,
        runtimes: Sequence[ImageRuntime] | None = None,
    ) -> None:
        self._kubeconfig = Path(kubeconfig)
        self.node = node
        self.state_dir = Path(state_dir).resolve()
        self._capacity = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
        self._pass_env = tuple(pass_env)
        # The venv's bin first, so `kubetune ...` resolves to this environment's command.
        self._bin_dir = str(Path(sys.executable).parent)
        self._runtimes = list(default_runtimes() if runtimes is None else runtimes)
        self._pods = WorkQueue()
        self._runs: dict[str, ContainerRun] = {}  # by Pod UID
        self._ips: dict[str, str] = {}  # by Pod UID
        self._next_ip = itertools.count(2)
        self._pod_network = LOOPBACK_POD_NETWORK
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kube: Kube | None = None
        self._watcher = watch.Watch()
        self._shim = ""

    def pvc_dir(self, namespace: str, claim: str) -> Path:
        """The folder that stands for PersistentVolumeClaim ``claim``."""
        return self.state_dir / "pvc" / namespace / claim

    def provide_claim(self, namespace: str, claim: str) -> Path:
        """Make the PersistentVolumeClaim ``claim`` (bound to a volume of its folder) and
        return the folder."""
        folder = self.pvc_dir(namespace, claim)
        folder.mkdir(parents=True, exist_ok=True)
        volume, pvc = volume_claim(namespace, claim, folder)
        api_call(self.kube.core.create_persistent_volume, volume, ok=(409,))
        create = self.kube.core.create_namespaced_persistent_volume_claim
        api_call(create, namespace, pvc, ok=(409,))
        return folder

    def log_path(self, namespace: str, pod: str, init_container: str | None = None) -> Path:
        """Where a container's output goes (``kubectl logs POD [-c NAME]``): ``<pod>.log``,
        or ``<pod>/<name>.log`` for init container ``name``. Logs outlive their Pod."""
        folder = self.state_dir / "logs" / namespace
        return folder / pod / f"{init_container}.log" if init_container else folder / f"{pod}.log"

    @property
    def kube(self) -> Kube:
        assert self._kube is not None, "start() first"
        return self._kube

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("unshare") is None:
            raise RuntimeError("the local kubelet needs util-linux's `unshare`")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._shim = self._build_shim()
        self._pod_network = local_pod_network()
        self._kube = Kube(self._kubeconfig)
        self._register()
        listed = threading.Event()
        for name, target, args in (
            ("watch pods", self._watch, (listed,)),
            ("kubelet", self._work, ()),
            ("lease", self._renew_lease, ()),
        ):
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if not listed.wait(timeout):
            self.stop()
            raise TimeoutError("the local kubelet could not list its Pods")
        log.info("local kubelet ready: node %s (state dir %s)", self.node, self.state_dir)

    def stop(self) -> None:
        if self._kube is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._watcher.stop()  # interrupts the watch's read
        self._pods.close()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT_SECONDS)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._terminate(run, STOP_GRACE_SECONDS)
        for run in runs:
            if run.process is not None:
                run.process.wait()
            self._forget(run)
        log.info("local kubelet stopped")

    def __enter__(self) -> LocalKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the node ------------------------------------------------------------------

    def _build_shim(self) -> str:
        source = self.state_dir / "bind-pod-ip.c"
        library = (
            self.state_dir / f"bind-pod-ip-{hashlib.sha256(BIND_SHIM.encode()).hexdigest()[:12]}.so"
        )
        if not library.exists():
            source.write_text(BIND_SHIM)
            subprocess.run(
                ["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
                check=True,
                capture_output=True,
            )
        return str(library)

    def _register(self) -> None:
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"}
        node = {
            "metadata": {"name": self.node, "labels": {**labels, "kubernetes.io/arch": "amd64"}}
        }
        api_call(self.kube.core.create_node, node, ok=(409,))
        now = rfc3339(utc_now())
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady"}
        ready |= {"message": "local kubelet is posting ready status"}
        info = {"kubeletVersion": "local", "containerRuntimeVersion": "local://processes"}
        status = {
            "capacity": self._capacity,
            "allocatable": self._capacity,
            "conditions": [{**ready, "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": self.node},
            ],
            "nodeInfo": {**info, "operatingSystem": "linux", "architecture": "amd64"},
        }
        patch = self.kube.core.patch_node_status
        api_call(patch, self.node, {"status": status}, _content_type=MERGE_PATCH)
        lease = {"metadata": {"name": self.node}, "spec": {"leaseDurationSeconds": 40}}
        api_call(self.kube.leases.create_namespaced_lease, NODE_LEASES, lease, ok=(409,))

    def _renew_lease(self) -> None:
        renew = self.kube.leases.patch_namespaced_lease
        while not self._stopping.is_set():
            stamp = utc_now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lease = {"spec": {"holderIdentity": self.node, "renewTime": stamp}}
            try:
                api_call(renew, self.node, NODE_LEASES, lease, _content_type=MERGE_PATCH)
            except Exception as exc:
                log.warning("lease: %s", exc)
            self._stopping.wait(LEASE_SECONDS)

    # -- pods ------------------------------------------------------------------------

    def _watch(self, listed: threading.Event) -> None:
        """List, then watch from the list's resourceVersion; list again when it expires."""
        pods, selector = self.kube.core.list_pod_for_all_namespaces, f"spec.nodeName={self.node}"
        while not self._stopping.is_set():
            try:
                listing = api_call(pods, field_selector=selector)
                for pod in listing["items"]:
                    self._pods.add((pod["metadata"]["namespace"], pod["metadata"]["name"]))
                listed.set()
                if self._stopping.is_set():  # stop() came too early to interrupt the watch
                    return
                # The client's Watch resumes where the last watch ended (bookmarks too),
                # and raises 410 Gone when that is too old.
                for event in self._watcher.stream(
                    pods,
                    field_selector=selector,
                    resource_version=listing["metadata"]["resourceVersion"],
                    allow_watch_bookmarks=True,
                    _request_timeout=(REQUEST_TIMEOUT_SECONDS, WATCH_READ_TIMEOUT_SECONDS),
                ):
                    meta = event["raw_object"]["metadata"]
                    if event["type"] != "BOOKMARK":
                        self._pods.add((meta["namespace"], meta["name"]))
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.warning("watch of pods failed, listing again: %s", exc)
                self._stopping.wait(ERROR_RETRY_SECONDS)

    def _work(self) -> None:
        while (key := self._pods.get()) is not None:
            try:
                delay = self._sync(*key)
            except ApiException as exc:
                # 409: someone else wrote first; read again right away.
                delay = 0.0 if exc.status == 409 else ERROR_RETRY_SECONDS
                if exc.status != 409:
                    log.warning("%s/%s: %s", *key, api_message(exc))
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("%s/%s: unexpected error", *key)
                delay = ERROR_RETRY_SECONDS
            if delay is not None:
                self._pods.add(key, delay)

    def _sync(self, namespace: str, name: str) -> float | None:
        pod = api_call(self.kube.core.read_namespaced_pod, name, namespace, ok=(404,))
        uid = pod["metadata"]["uid"] if pod is not None else None
        with self._lock:
            stale = [r for r in self._runs.values() if r.key == (namespace, name) and r.uid != uid]
        for old in stale:  # the Pod was removed (or replaced by a namesake) without us
            if old.exit_code is None:
                self._terminate(old, MAX_GRACE_SECONDS)
            else:
                self._forget(old)
        if pod is None:
            return None
        run = self._runs.get(pod["metadata"]["uid"])
        if run is not None and run.exit_code is None:
            if is_deleting(pod):
                self._terminate(run, self._grace(pod))
            else:
                self._report(pod, run.report(), run.pod_ip)
            return None
        if run is not None:
            return self._exited(pod, run)
        if not is_deleting(pod) and not is_terminal(pod):
            return self._start(pod)
        if is_deleting(pod) and not is_terminal(pod):
            # None of its containers runs here (never started, or killed with an earlier
            # kubelet): a kubelet still gives a deleted Pod a terminal phase first.
            self._report(pod, deleted_report(pod, utc_now()), self._pod_ip(pod))
        if is_deleting(pod):
            self._confirm_deletion(pod)
        return None

    @staticmethod
    def _grace(pod: Obj) -> float:
        seconds = pod["metadata"].get("deletionGracePeriodSeconds")
        if seconds is None:
            seconds = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(min(seconds, MAX_GRACE_SECONDS))

    def _pod_ip(self, pod: Obj) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        with self._lock:
            if meta["uid"] not in self._ips:
                if spec.get("hostname") and spec.get("subdomain"):
                    ip = fixed_pod_ip(meta["namespace"], spec["subdomain"], spec["hostname"])
                else:
                    n = next(self._next_ip)
                    prefix = ".".join(self._pod_network.split(".")[:2])
                    ip = f"{prefix}.{n // 250}.{n % 250 + 2}"
                self._ips[meta["uid"]] = ip
            return self._ips[meta["uid"]]

    def _start(self, pod: Obj) -> float | None:
        meta, pod_ip = pod["metadata"], self._pod_ip(pod)
        if (abandoned := abandoned_report(pod, utc_now())) is not None:
            self._report(pod, abandoned, pod_ip)
            return None
        pod_dir = self.state_dir / "pods" / meta["uid"]
        try:
            steps = self._prepare_steps(pod, pod_dir, pod_ip)
        except PodSetupError as exc:
            shutil.rmtree(pod_dir, ignore_errors=True)
            # The containers before the one that cannot start wait too: none has run.
            waiting = [waiting_state(POD_INITIALIZING)] * exc.container
            waiting.append(waiting_state(exc.reason, exc.message))
            self._report(pod, kubelet_report(len(init_containers(pod["spec"])), waiting), pod_ip)
            return SETUP_RETRY_SECONDS
        run = ContainerRun(
            (meta["namespace"], meta["name"]), meta["uid"], pod_ip, pod_dir, tuple(steps)
        )
        with self._lock:
            self._runs[run.uid] = run
        self._launch(run)
        self._report(pod, run.report(), pod_ip)
        return None

    def _exited(self, pod: Obj, run: ContainerRun) -> float | None:
        """``run``'s current container exited, or waits out its back-off: start the next
        container, or the same again, or report how the Pod ended."""
        going = not run.terminating and not is_deleting(pod) and not self._stopping.is_set()
        if run.backing_off:
            if not going:
                return self._ended(pod, run, [*run.ended, run.last_state])
            if time.monotonic() < run.restart_at:
                self._report(pod, run.report(), run.pod_ip)
                return run.restart_at - time.monotonic()
            run.backing_off = False
            self._launch(run)
            self._report(pod, run.report(), run.pod_ip)
            return None
        ended = _exit_state(run)
        code = ended["terminated"]["exitCode"]
        if going and run.index < run.init_count and code == 0:
            run.ended.append(ended)
            run.index += 1
        elif going and restarts(pod, code):
            _signal_group(run, signal.SIGKILL)  # what it left running dies with it
            run.restart_count += 1
            run.last_state, run.backing_off, run.started, run.ready = ended, True, False, False
            run.restart_at = time.monotonic() + back_off(run.restart_count)
            message = f"Back-off restarting failed container {run.step.name}"
            self._event(pod["metadata"], "Warning", "BackOff", message)
            self._report(pod, run.report(), run.pod_ip)
            return back_off(run.restart_count)
        else:
            return self._ended(pod, run, [*run.ended, ended])
        self._launch(run)
        self._report(pod, run.report(), run.pod_ip)
        return None

    def _ended(self, pod: Obj, run: ContainerRun, states: list[Obj]) -> None:
        """Report how the Pod ended (restartPolicy Never, or deleted) and forget it."""
        if not is_terminal(pod):
            report = kubelet_report(
                run.init_count, states, restart_count=run.restart_count, last_state={}
            )
            self._report(pod, report, run.pod_ip)
        self._forget(run)
        if is_deleting(pod):
            self._confirm_deletion(pod)

    def _launch(self, run: ContainerRun) -> None:
        """Start ``run``'s current container, and its prober. One that cannot start at
        all exits at once, with its start error."""
        step, (namespace, pod) = run.step, run.key
        log_path = self.log_path(namespace, pod, step.name if step.init else None)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        error_file = run.file(START_ERROR_FILE)
        error_file.parent.mkdir(parents=True, exist_ok=True)
        if step.start_error:
            error_file.write_text(step.start_error)
            with self._lock:
                run.process, run.log_path, run.killed = None, log_path, False
                run.started_at = run.finished_at = rfc3339(utc_now())
                run.exit_code = START_ERROR_EXIT
            self._pods.add(run.key)
            return
        init_spec = {**step.spec, "startErrorFile": str(error_file)}
        work = run.pod_dir / "work"  # a mount cannot hide a process's cwd
        work.mkdir(parents=True, exist_ok=True)
        unshare = ["unshare", "--mount", "--propagation", "private", "--"]
        if os.geteuid() != 0:  # without root, a user namespace grants the mount rights
            unshare[1:1] = ["--user", "--map-root-user"]
        # -I: the container's PYTHON* variables must not affect the init helper.
        init = [sys.executable, "-I", str(Path(__file__).resolve()), INIT_COMMAND]
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [*unshare, *init, json.dumps(init_spec)],
                env=step.env,
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with self._lock:
            run.process, run.log_path, run.started_at = process, log_path, rfc3339(utc_now())
            run.exit_code = run.finished_at = None
            run.killed = False
        # Only the command: $(VAR) expansion may have put Secret values in the arguments.
        what = f"{'init container' if step.init else 'container'} {step.name}"
        argv0, pid = step.spec["argv"][0], process.pid
        log.info("pod %s/%s: %s started %s (pid %d)", namespace, pod, what, argv0, pid)
        threading.Thread(target=self._wait_for_exit, args=(run, process), daemon=True).start()
        if not step.init:
            threading.Thread(target=self._probe, args=(run, process), daemon=True).start()

    def _prepare_steps(self, pod: Obj, pod_dir: Path, pod_ip: str) -> list[Step]:
        """The Pod's containers in the order they run, all resolved before the first
        starts: the volumes written once (an emptyDir an init container fills is what
        the regular container mounts), then each container's env, command and mounts."""
        spec = pod["spec"]
        volumes = materialize_volumes(
            pod, pod_dir / "volumes", self.state_dir / "pvc", self.kube, pod_ip
        )
        hosts = self._hosts_file(pod, pod_dir)
        containers = [*init_containers(spec), spec["containers"][0]]
        steps = []
        for position, container in enumerate(containers):
            init = position < len(containers) - 1
            try:
                env, spec = self._prepare(pod, container, pod_dir, volumes, hosts, pod_ip)
                steps.append(Step(container, init, env, spec))
            except PodSetupError as exc:
                raise PodSetupError(exc.reason, exc.message, position) from exc
            except StartError as exc:
                steps.append(Step(container, init, start_error=str(exc)))
        return steps

    def _hosts_file(self, pod: Obj, pod_dir: Path) -> Path | None:
        """For a Pod with a ``subdomain``: the host's /etc/hosts plus the names of the
        Pod and, for an Indexed Job's Pod, of every index of its Job."""
        spec, meta = pod["spec"], pod["metadata"]
        subdomain = spec.get("subdomain")
        if not subdomain:
            return None
        hostnames = [spec.get("hostname") or meta["name"]]
        job_name = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
        read = self.kube.batch.read_namespaced_job
        job = api_call(read, job_name, meta["namespace"], ok=(404,)) if job_name else None
        if job is not None and job["spec"].get("completionMode") == "Indexed":
            hostnames += [f"{job_name}-{i}" for i in range(int(job["spec"]["completions"]))]
        hosts = {h: fixed_pod_ip(meta["namespace"], subdomain, h) for h in hostnames}
        hosts[hostnames[0]] = self._pod_ip(pod)
        path = pod_dir / "etc-hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            host_hosts = Path("/etc/hosts").read_text()
        except OSError:
            host_hosts = ""
        path.write_text(hosts_file_text(host_hosts, hosts, subdomain, meta["namespace"]))
        return path

    def _prepare(
        self,
        pod: Obj,
        container: Obj,
        pod_dir: Path,
        volumes: dict[str, Volume],
        hosts: Path | None,
        pod_ip: str,
    ) -> tuple[dict[str, str], Obj]:
        """The container's environment, and what ``container_init`` does for it."""
        env = container_env(pod, container, self.kube, pod_ip)
        argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        inherited = {k: os.environ[k] for k in self._pass_env if k in os.environ}
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        image = str(container.get("image", ""))
        runtime = next((r for r in self._runtimes if image.startswith(r.prefix)), None)
        bin_dir = str(runtime.venv / "bin") if runtime is not None else self._bin_dir
        proc_env = {**inherited, "HOSTNAME": hostname, **(runtime.env if runtime else {}), **env}
        path = env.get("PATH") or os.environ.get("PATH") or DEFAULT_PATH
        proc_env["PATH"] = f"{bin_dir}{os.pathsep}{path}"
        proc_env |= {"LD_PRELOAD": self._shim, POD_IP_VARIABLE: pod_ip}
        if not argv:
            raise StartError("no command: the local kubelet cannot run an image's entrypoint")
        executable = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=proc_env["PATH"])
        if executable is None:
            raise StartError(f'exec: "{argv[0]}": executable file not found in $PATH')
        own = pod_dir / "containers" / container["name"]
        own.mkdir(parents=True, exist_ok=True)
        (own / TERMINATION_FILE).write_bytes(b"")
        message_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mounts = [
            *container_mounts(container, volumes, env),
            Mount(str(own / TERMINATION_FILE), message_path, False),
        ]
        if hosts is not None and all(os.path.normpath(m.target) != "/etc/hosts" for m in mounts):
            mounts.append(Mount(str(hosts), "/etc/hosts", True))
        # The Python, the venv and the project (installed in editable mode) it runs from;
        # the bind shim and the working folder, which the processes it spawns open again.
        needed = [
            sys.prefix,
            sys.base_prefix,
            str(Path(__file__).resolve().parents[1]),
            self._shim,
            str(pod_dir / "work"),
        ]
        if "/" not in argv[0]:
            needed.append(os.path.dirname(executable))  # found on the host's PATH
        spec = {
            "mounts": [vars(m) for m in mounts],
            "keep": paths_to_keep(mounts, needed),
            "workingDir": container.get("workingDir", ""),
            "executable": executable,
            "argv": argv,
        }
        return proc_env, spec

    def _wait_for_exit(self, run: ContainerRun, process: subprocess.Popen[bytes]) -> None:
        returncode = process.wait()
        with self._lock:
            if run.process is not process:
                return
            run.exit_code, run.finished_at = returncode, rfc3339(utc_now())
        log.info("pod %s/%s: %s exited with %d", *run.key, run.step.name, returncode)
        if run.step.init and returncode != 0 and not run.terminating and run.log_path:
            # The kubelet's log shows why the Pod never got to its container.
            tail = _read(run.log_path, FALLBACK_LOG_BYTES, tail=True).decode(errors="replace")
            log.warning(
                "pod %s/%s: init container %s failed:\n%s", *run.key, run.step.name, tail.rstrip()
            )
        self._pods.add(run.key)

    def _probe(self, run: ContainerRun, process: subprocess.Popen[bytes]) -> None:
        """Run the regular container's probes while ``process`` lives: the startup probe
        until it passes, then readiness and liveness, each on its own period."""
        container, kinds = run.step.container, ("startup", "readiness", "liveness")
        probes = {k: p for k in kinds if (p := container.get(f"{k}Probe")) is not None}
        run.started = "startup" not in probes
        run.ready = run.started and "readiness" not in probes
        failures = dict.fromkeys(probes, 0)
        now = time.monotonic()
        due = {k: now + float(p.get("initialDelaySeconds", 0)) for k, p in probes.items()}
        while process.poll() is None and not run.terminating and not self._stopping.wait(0.5):
            changed = False
            for kind, probe in probes.items():
                if time.monotonic() < due[kind] or (kind != "startup") != run.started:
                    continue
                due[kind] = time.monotonic() + float(probe.get("periodSeconds", 10))
                passed = probe_passes(probe, run.pod_ip, container)
                failures[kind] = 0 if passed else failures[kind] + 1
                if kind == "readiness" and passed != run.ready:
                    run.ready, changed = passed, True
                if kind == "startup" and passed:
                    run.started = changed = True
                    run.ready = "readiness" not in probes
                if kind != "readiness" and failures[kind] >= int(probe.get("failureThreshold", 3)):
                    message = f"{kind.capitalize()} probe failed; container {run.step.name} will be restarted"
                    self._event(run.meta, "Warning", "Unhealthy", message)
                    with self._lock:
                        run.killed = True
                    _signal_group(run, signal.SIGKILL)
            if changed:
                self._pods.add(run.key)

    def _report(self, pod: Obj, report: Report, pod_ip: str) -> None:
        desired = pod_status(pod, report, pod_ip, utc_now())
        current = pod.get("status") or {}
        if all(prune(current.get(k)) == v for k, v in desired.items()):
            return
        meta = pod["metadata"]
        # A merge patch replaces the conditions list: the resourceVersion makes it fail
        # (409, read again) rather than drop a condition written since the Pod was read,
        # such as the DisruptionTarget an eviction adds.
        precondition = {"uid": meta["uid"], "resourceVersion": meta.get("resourceVersion")}
        patch = {"metadata": prune(precondition), "status": desired}
        write = self.kube.core.patch_namespaced_pod_status
        api_call(write, meta["name"], meta["namespace"], patch, _content_type=MERGE_PATCH)
        was = (current.get("containerStatuses") or [{}])[0].get("state") or {}
        if "running" in report.state and "running" not in was:
            message = f"Started container {pod['spec']['containers'][0]['name']}"
            self._event(meta, "Normal", "Started", message)

    def _event(self, meta: Obj, kind: str, reason: str, message: str) -> None:
        """An Event about the Pod of metadata ``meta``."""
        stamp, namespace = rfc3339(utc_now()), meta["namespace"]
        pod = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": meta["name"]}
        event = {
            "metadata": {"generateName": f"{meta['name']}."},
            "involvedObject": {**pod, "uid": meta["uid"]},
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.node},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            api_call(self.kube.core.create_namespaced_event, namespace, event)
        except ApiException as exc:
            log.warning("event %s on pod %s: %s", reason, meta["name"], api_message(exc))

    def _terminate(self, run: ContainerRun, grace: float) -> None:
        """SIGTERM now, SIGKILL after ``grace`` seconds unless the process exited."""
        with self._lock:
            if run.terminating or run.exit_code is not None or run.process is None:
                return
            run.terminating = True
        log.info("pod %s/%s: terminating (grace %.0fs)", *run.key, grace)
        self._event(run.meta, "Normal", "Killing", f"Stopping container {run.step.name}")
        _signal_group(run, signal.SIGTERM)
        timer = threading.Timer(grace, self._kill, args=(run, run.process))
        timer.daemon = True
        timer.start()

    def _kill(self, run: ContainerRun, process: subprocess.Popen[bytes] | None) -> None:
        with self._lock:
            if run.exit_code is not None or run.process is not process:
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
        delete = self.kube.core.delete_namespaced_pod
        api_call(delete, meta["name"], meta["namespace"], body=body, ok=(404, 409))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [INIT_COMMAND]:
        container_init(args[1])
    parser = argparse.ArgumentParser(
        description="The kubelet of the test control plane (tests and demo only)."
    )
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path, help="volumes, logs, pod scratch")
    parser.add_argument("--node", default=NODE_NAME, help=f"the Node's name ({NODE_NAME})")
    parser.add_argument("--gpus", type=int, default=2, help="nvidia.com/gpu the node offers (2)")
    parser.add_argument(
        "--pass-env",
        action="append",
        default=[],
        metavar="NAME",
        help=f"host variable passed to processes, besides {', '.join(DEFAULT_PASS_ENV)}",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    opts = parser.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if opts.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    kubelet = LocalKubelet(
        opts.kubeconfig,
        opts.state_dir,
        node=opts.node,
        gpus=opts.gpus,
        pass_env=(*DEFAULT_PASS_ENV, *opts.pass_env),
    )
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    kubelet.start()
    done.wait()
    kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
