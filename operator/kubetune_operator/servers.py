"""The operator as a client of its vLLM servers: what a server pod has loaded
(``/v1/models``), and loading or unloading an adapter through the admin routes that
only the operator's token passes (kubetune_trainer/serving/guard.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

from kubetune_operator.pod_http import PodHttpError, request
from kubetune_operator.resources.modeldeployment.server import SERVE_PORT

log = logging.getLogger(__name__)

# Loading reads the adapter's weights and warms it up in the engine. The server runs
# the image its ModelDeployment names: each call has this deadline as a whole, and
# holds only its own ModelDeployment's reconcile (pod_http, context.ReconcileLocks).
LOAD_TIMEOUT = 300.0
# /v1/models of a server with many adapters is some KiB; errors are shorter.
MAX_ANSWER_BYTES = 1 << 20


def _call(
    ip: str, token: str, method: str, path: str, body: Any, timeout: float
) -> tuple[int, bytes]:
    answer = request(
        ip,
        SERVE_PORT,
        method,
        path,
        deadline=timeout,
        max_bytes=MAX_ANSWER_BYTES,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=None if body is None else json.dumps(body).encode(),
    )
    return answer.status, answer.body


def loaded(ip: str, token: str, timeout: float) -> dict[str, str] | None:
    """The adapters the server at ``ip`` serves (name → folder), or None when it does
    not answer."""
    try:
        status, body = _call(ip, token, "GET", "/v1/models", None, timeout)
        if status != 200:
            log.info("server %s: /v1/models answered %s", ip, status)
            return None
        cards = json.loads(body)["data"]
        return {str(c["id"]): str(c.get("root") or "") for c in cards if c.get("parent")}
    except (PodHttpError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # A server that is not vLLM (its image is the ModelDeployment's) may say anything.
        log.debug("server %s: /v1/models not readable: %s", ip, exc)
        return None


def load(ip: str, token: str, name: str, path: str) -> str | None:
    """Load an adapter: None when it serves, else the server's reason."""
    return _admin(ip, token, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def unload(ip: str, token: str, name: str) -> str | None:
    return _admin(ip, token, "/v1/unload_lora_adapter", {"lora_name": name})


def _admin(ip: str, token: str, path: str, body: dict[str, str]) -> str | None:
    try:
        status, answer = _call(ip, token, "POST", path, body, LOAD_TIMEOUT)
    except PodHttpError as exc:
        return f"no answer from {ip}: {exc}"
    if status == 200:
        return None
    try:
        message = str(json.loads(answer)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = answer.decode("utf-8", "replace")[:500]
    return f"{status} {message}"
