"""The operator as an HTTP client of pods whose image a tenant chooses: trainers'
/metrics and vLLM servers' adapter routes.

Such a pod may answer slowly, trickle its headers or body a byte at a time, redirect,
or send gigabytes. So every request has one deadline for connect, headers and body
together (a watchdog shuts the socket when it passes: per-read socket timeouts alone
let a trickle go on for ever), a cap on the body, and follows no redirect (following
one would make the operator's pod send requests of the tenant's choosing).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from dataclasses import dataclass


class PodHttpError(Exception):
    """The pod gave no whole answer: refused, timed out, cut off or too large."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def request(
    ip: str,
    port: int,
    method: str,
    path: str,
    *,
    deadline: float,
    max_bytes: int,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Answer:
    """One request to ``ip:port``, answered in full within ``deadline`` seconds with
    at most ``max_bytes`` of body; a redirect comes back as its own status."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(ip, port, timeout=deadline)
    expired = threading.Event()

    def cut_off() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    try:
        conn.connect()
        left = deadline - (time.monotonic() - start)
        if left <= 0:
            raise PodHttpError(f"no answer within {deadline:g} s")
        watchdog = threading.Timer(left, cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read(max_bytes + 1)
        finally:
            watchdog.cancel()
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise PodHttpError(f"no whole answer within {deadline:g} s") from exc
        raise PodHttpError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    if expired.is_set():
        # The watchdog fired as the last bytes came: the answer may be cut short.
        raise PodHttpError(f"no whole answer within {deadline:g} s")
    if len(data) > max_bytes:
        raise PodHttpError(f"answer larger than {max_bytes} bytes")
    return Answer(response.status, data)
