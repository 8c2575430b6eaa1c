"""The guard in front of vLLM's OpenAI server: ASGI middleware the server loads with
``--middleware`` (vLLM adds it last, so it sees every request first).

Why: with runtime adapter updates on, anyone who reaches the server could load an
adapter from any path or hub id (``/v1/load_lora_adapter``, and the SageMaker-style
``/adapters`` routes vLLM registers alongside), or unload what others use; and
vLLM's ``--api-key`` covers only the ``/v1`` routes. So:

* the adapter routes answer only to the operator's admin token;
* with an API key set, every other route but the probes' and Prometheus' needs the
  key (or the admin token, which the operator uses to list what is loaded).

This file is copied alone into the server pod (``kubetune install-guard``) and
imported by vLLM's Python: it uses the standard library only.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# The module's name in the server pod, and the class vLLM's --middleware names.
MODULE = "kubetune_server_guard"
MIDDLEWARE = f"{MODULE}.ServerGuard"
ADMIN_TOKEN_VARIABLE = "KUBETUNE_ADMIN_TOKEN"
API_KEY_VARIABLE = "KUBETUNE_API_KEY"

ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters"})
ADMIN_PREFIX = "/adapters/"
# What probes and Prometheus reach without a key.
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})


def is_admin(path: str) -> bool:
    path = path.rstrip("/") or "/"
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIX)


# The API server's service proxy authenticates its caller with Authorization and removes
# it, so a client that comes through the proxy (`kubectl kubetune chat`) sends the key in
# this header instead: the one Azure OpenAI's clients use.
API_KEY_HEADER = b"api-key"


def bearer(scope: Scope) -> str:
    """The token the request carries: Authorization's Bearer token, else the api-key
    header's."""
    key = ""
    for name, value in scope.get("headers") or []:
        if name.lower() == b"authorization":
            text = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
        if name.lower() == API_KEY_HEADER:
            key = value.decode("latin-1").strip()
    return key


def verdict(path: str, token: str, admin: str, api_key: str) -> int:
    """The HTTP status that refuses the request, or 0 when it may pass."""

    def matches(secret: str) -> bool:
        return bool(secret) and hmac.compare_digest(token.encode(), secret.encode())

    if is_admin(path):
        return 0 if matches(admin) else 403
    if api_key and (path.rstrip("/") or "/") not in OPEN_PATHS:
        return 0 if matches(api_key) or matches(admin) else 401
    return 0


class ServerGuard:
    def __init__(self, app: App) -> None:
        self.app = app
        self.admin = os.environ.get(ADMIN_TOKEN_VARIABLE, "")
        self.api_key = os.environ.get(API_KEY_VARIABLE, "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        status = verdict(scope.get("path") or "/", bearer(scope), self.admin, self.api_key)
        if status == 0:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _refuse(send, status)


async def _refuse(send: Send, status: int) -> None:
    message = "admin only" if status == 403 else "missing or wrong API key"
    body = json.dumps({"error": {"message": message, "type": "Unauthorized", "code": status}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
