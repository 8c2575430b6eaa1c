"""The guard in front of vLLM's server, as ASGI middleware around a stand-in app (the
end-to-end tests put it in front of the real server)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kubetune_trainer.serving.guard import ServerGuard, verdict

ADMIN, KEY = "admin-token", "user-key"


def call(
    path: str,
    token: str | None,
    env: dict[str, str],
    kind: str = "http",
    header: bytes = b"authorization",
) -> tuple[int, list[Any]]:
    """The status the client gets, and whether the app behind saw the request."""
    reached: list[Any] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    value = f"Bearer {token}" if header == b"authorization" else f"{token}"
    headers = [(header, value.encode())] if token is not None else []
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        guard = ServerGuard(app)
    asyncio.run(guard({"type": kind, "path": path, "headers": headers}, receive, send))
    status = sent[0].get("status") or sent[0].get("code")
    return int(status), reached


ADMIN_ONLY = {"KUBETUNE_ADMIN_TOKEN": ADMIN}
WITH_KEY = {"KUBETUNE_ADMIN_TOKEN": ADMIN, "KUBETUNE_API_KEY": KEY}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/load_lora_adapter/",
        "/adapters",
        "/adapters/x",
    ],
)
@pytest.mark.parametrize("token", [None, "", "wrong", KEY])
def test_adapter_routes_refuse_anyone_without_the_admin_token(path: str, token: str | None) -> None:
    status, reached = call(path, token, WITH_KEY)
    assert (status, reached) == (403, [])


def test_adapter_routes_answer_the_admin_token() -> None:
    assert call("/v1/load_lora_adapter", ADMIN, ADMIN_ONLY) == (200, ["/v1/load_lora_adapter"])


def test_without_an_admin_token_set_nobody_reaches_the_adapter_routes() -> None:
    assert call("/v1/load_lora_adapter", "", {}) == (403, [])


def test_without_an_api_key_inference_is_open() -> None:
    assert call("/v1/chat/completions", None, ADMIN_ONLY)[0] == 200


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/invocations", "/tokenize", "/v1/models"]
)
def test_with_an_api_key_every_other_route_needs_it(path: str) -> None:
    assert call(path, None, WITH_KEY) == (401, [])
    assert call(path, "wrong", WITH_KEY) == (401, [])
    assert call(path, KEY, WITH_KEY)[0] == 200
    assert call(path, ADMIN, WITH_KEY)[0] == 200


def test_the_key_may_come_in_the_api_key_header() -> None:
    """What a client behind the API server's service proxy sends (the proxy removes
    Authorization)."""
    assert call("/v1/chat/completions", KEY, WITH_KEY, header=b"api-key")[0] == 200
    assert call("/v1/chat/completions", "wrong", WITH_KEY, header=b"API-Key") == (401, [])
    assert call("/v1/load_lora_adapter", KEY, WITH_KEY, header=b"api-key") == (403, [])


@pytest.mark.parametrize("path", ["/health", "/ping", "/metrics", "/version"])
def test_probes_and_prometheus_need_no_key(path: str) -> None:
    assert call(path, None, WITH_KEY)[0] == 200


def test_a_websocket_without_the_key_is_closed() -> None:
    assert call("/v1/realtime", None, WITH_KEY, kind="websocket") == (1008, [])


def test_the_refusal_is_an_openai_style_error() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def never(*_: Any) -> None:
        raise AssertionError("reached the server")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_ADMIN_TOKEN", ADMIN)
        guard = ServerGuard(never)
    asyncio.run(guard({"type": "http", "path": "/adapters", "headers": []}, never, send))
    assert json.loads(sent[1]["body"])["error"]["code"] == 403


def test_verdict_compares_whole_tokens() -> None:
    assert verdict("/adapters", ADMIN[:-1], ADMIN, "") == 403
    assert verdict("/adapters", ADMIN + "x", ADMIN, "") == 403
