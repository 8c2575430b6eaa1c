"""State the handlers share: the API client, settings and the clock."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from kubetune_operator.kube import Api, Manifest
from kubetune_operator.settings import Settings


@dataclass
class Context:
    api: Api
    settings: Settings
    # Dataset bodies as the Dataset watch last delivered them: a FineTuneJob reads its
    # dataset's spec and status from here instead of asking the API server each time.
    datasets: dict[tuple[str, str], Manifest] = field(default_factory=dict)

    def dataset(self, namespace: str, name: str) -> Manifest | None:
        """The Dataset, from the watch's copy, or read (and kept) when the watch has not
        delivered it yet."""
        body = self.datasets.get((namespace, name))
        if body is None:
            body = self.api.get_object("datasets", namespace, name)
            if body is not None:
                self.datasets.setdefault((namespace, name), body)
        return body


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
