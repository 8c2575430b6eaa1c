"""Operator start-up: kopf's settings, and the periodic resync."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from kubetune_operator.handlers import datasets, finetunejobs, modeldeployments
from kubetune_operator.handlers.context import Context, context_of

log = logging.getLogger(__name__)

HANDLER_THREADS = 16


def apply_kopf_settings(settings: kopf.OperatorSettings) -> None:
    # Every resource handler is an event handler (level-triggered on generation versus
    # observedGeneration), so kopf writes no bookkeeping onto the objects: nothing in
    # spec or annotations for Argo CD to see as drift, and no request per object for it.
    # kopf would post a Kubernetes Event for every handler it ran; only warnings and
    # errors, and the events the handlers post themselves, are worth a user's attention.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.batching.error_delays = [1, 2, 5, 10, 30]
    # Sync handlers run in this thread pool: room for a burst of watch events.
    settings.execution.max_workers = HANDLER_THREADS


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    apply_kopf_settings(settings)
    memo["resync"] = asyncio.create_task(_resync_forever(context_of(memo)))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()
    # What is queued is dropped; what runs ends at its request deadlines.
    ctx = context_of(memo)
    ctx.resyncs.shutdown()
    ctx.scrapes.shutdown()


async def _resync_forever(ctx: Context) -> None:
    while True:
        await asyncio.sleep(ctx.settings.resync_seconds)
        for resync in (datasets.resync, finetunejobs.resync, modeldeployments.resync):
            try:
                await asyncio.to_thread(resync, ctx)
            except Exception:
                log.exception("periodic resync failed")
