"""Operator settings, from the command line or the environment (the Helm chart sets
the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kubetune_operator.resources.status import START_GRACE_SECONDS

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


@dataclass(frozen=True)
class Settings:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # How often a Running job's metrics are read.
    scrape_interval: float = 15.0
    scrape_timeout: float = 3.0
    # How long a pod may wait for what its containers need (a Secret, an image) before
    # its run fails.
    start_grace: float = START_GRACE_SECONDS

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            trainer_image=os.environ.get("KUBETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            scrape_interval=float(os.environ.get("KUBETUNE_SCRAPE_INTERVAL", "15")),
            scrape_timeout=float(os.environ.get("KUBETUNE_SCRAPE_TIMEOUT", "3")),
            start_grace=float(
                os.environ.get("KUBETUNE_START_GRACE_SECONDS", str(START_GRACE_SECONDS))
            ),
        )
