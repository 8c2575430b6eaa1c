"""The operator as a client of its vLLM servers: what a server pod has loaded
(``/v1/models``), and loading or unloading an adapter through the admin routes that
only the operator's token passes (kubetune_trainer/serving/guard.py)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from kubetune_operator.resources.modeldeployment.server import SERVE_PORT

log = logging.getLogger(__name__)

# Loading reads the adapter's weights and warms it up in the engine.
LOAD_TIMEOUT = 300.0


def _call(
    ip: str, token: str, method: str, path: str, body: Any, timeout: float
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{ip}:{SERVE_PORT}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(1 << 16)


def loaded(ip: str, token: str, timeout: float) -> dict[str, str] | None:
    """The adapters the server at ``ip`` serves (name → folder), or None when it does
    not answer."""
    try:
        status, body = _call(ip, token, "GET", "/v1/models", None, timeout)
        if status != 200:
            log.info("server %s: /v1/models answered %s", ip, status)
            return None
        cards = json.loads(body)["data"]
    except (OSError, ValueError, KeyError) as exc:
        log.debug("server %s: /v1/models not readable: %s", ip, exc)
        return None
    return {c["id"]: c.get("root") or "" for c in cards if c.get("parent")}


def load(ip: str, token: str, name: str, path: str) -> str | None:
    """Load an adapter: None when it serves, else the server's reason."""
    return _admin(ip, token, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def unload(ip: str, token: str, name: str) -> str | None:
    return _admin(ip, token, "/v1/unload_lora_adapter", {"lora_name": name})


def _admin(ip: str, token: str, path: str, body: dict[str, str]) -> str | None:
    try:
        status, answer = _call(ip, token, "POST", path, body, LOAD_TIMEOUT)
    except OSError as exc:
        return f"no answer from {ip}: {exc}"
    if status == 200:
        return None
    try:
        message = str(json.loads(answer)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = answer.decode("utf-8", "replace")[:500]
    return f"{status} {message}"
