"""State the handlers share: the API client, settings and the clock."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from kubetune_operator.kube import Api
from kubetune_operator.settings import Settings


@dataclass
class Context:
    api: Api
    settings: Settings


_context: Context | None = None


def configure(context: Context) -> None:
    global _context
    _context = context


def context() -> Context:
    if _context is None:
        raise RuntimeError(
            "the operator has not started: kubetune_operator.handlers.common.configure() first"
        )
    return _context


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
