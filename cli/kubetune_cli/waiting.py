"""Waiting on what the operator writes: poll an object until a verdict on it is in,
telling each new state on the way (the operator writes status a few times per
object; a poll every few seconds shows each as a watch would, and needs no `watch`
right)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO, TypeVar

from kubetune_cli.output import CommandError, Manifest

T = TypeVar("T")
POLL_SECONDS = 2.0


def generation_seen(obj: Manifest) -> bool:
    """Whether the operator has acted on the object's current spec."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    return status.get("observedGeneration") == meta.get("generation")


def wait_until(
    get: Callable[[], Manifest | None],
    verdict: Callable[[Manifest], T | None],
    state: Callable[[Manifest], str],
    *,
    what: str,
    timeout: float,
    stream: TextIO | None = None,
    interval: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Manifest, T]:
    """The object and ``verdict(object)`` once that is not None; each new
    ``state(object)`` is printed to ``stream`` (default: stderr) on the way. CommandError when the object
    is gone or ``timeout`` seconds pass."""
    deadline = clock() + timeout
    stream = stream or sys.stderr
    last = None
    while True:
        obj = get()
        if obj is None:
            raise CommandError(f"{what} was deleted while waiting")
        now = state(obj)
        result = verdict(obj)
        if result is not None:
            return obj, result
        if now != last:
            print(f"{what}: {now}", file=stream, flush=True)
            last = now
        if clock() >= deadline:
            raise CommandError(f"timed out after {timeout:g}s waiting for {what}: {now}")
        sleep(interval)
