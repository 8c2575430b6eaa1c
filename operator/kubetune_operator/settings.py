"""The operator's settings: each from its command-line flag, or else from the
environment variable the Helm chart sets, or else its default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from kubetune_operator.resources.workloads import START_GRACE_SECONDS

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


@dataclass(frozen=True)
class Settings:
    # The image of validation and training pods (and of the init containers that fetch
    # what a server pod loads) when a spec names none.
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # How often every unfinished object is reconciled again, which also reads running
    # trainers' metrics into status and retries a reconcile that failed.
    resync_seconds: float = 15.0
    # How long one read of a trainer's metrics may take.
    scrape_timeout: float = 3.0
    # How long a pod may wait for what its containers need (a Secret, an image) before
    # its run fails.
    start_grace: float = START_GRACE_SECONDS
    # The key the admin token of each vLLM server is derived from (see
    # resources/modeldeployment/server.py admin_token). It must outlive the operator's
    # restarts: the chart keeps it in a Secret.
    admin_key: str = ""


# Each setting's flag and environment variable.
_SOURCES = {
    "trainer_image": ("--trainer-image", "KUBETUNE_TRAINER_IMAGE"),
    "resync_seconds": ("--resync-seconds", "KUBETUNE_RESYNC_SECONDS"),
    "scrape_timeout": ("--scrape-timeout", "KUBETUNE_SCRAPE_TIMEOUT"),
    "start_grace": ("--start-grace-seconds", "KUBETUNE_START_GRACE_SECONDS"),
    "admin_key": ("--admin-key", "KUBETUNE_ADMIN_KEY"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for field in fields(Settings):
        flag, variable = _SOURCES[field.name]
        parser.add_argument(
            flag,
            dest=field.name,
            type=type(getattr(defaults, field.name)),
            default=None,
            help=f"(or ${variable}; default {getattr(defaults, field.name)})",
        )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    defaults = Settings()

    def pick(name: str) -> str | None:
        given = getattr(args, name, None)
        if given is not None:
            return str(given)
        return env.get(_SOURCES[name][1]) or None

    image, resync, timeout, grace, key = (
        pick(name)
        for name in (
            "trainer_image",
            "resync_seconds",
            "scrape_timeout",
            "start_grace",
            "admin_key",
        )
    )
    return Settings(
        trainer_image=image or defaults.trainer_image,
        resync_seconds=float(resync) if resync else defaults.resync_seconds,
        scrape_timeout=float(timeout) if timeout else defaults.scrape_timeout,
        start_grace=float(grace) if grace else defaults.start_grace,
        admin_key=key or defaults.admin_key,
    )
