"""The operator's settings: each from its command-line flag, or else from the
environment variable the Helm chart sets, or else its default."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune_operator.resources.platform import ModelStore, PodDefaults
from kubetune_operator.resources.policy import Policy, repository_patterns
from kubetune_operator.resources.workloads import START_GRACE_SECONDS
from kubetune_trainer.contract.fetch import TRUSTED_HOSTS_VARIABLE

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"


def default_policy() -> Policy:
    """Any tag of the default trainer and vLLM images, and the harmless vLLM flags."""
    return Policy(
        trainer_images=repository_patterns(DEFAULT_TRAINER_IMAGE),
        server_images=repository_patterns(DEFAULT_VLLM_IMAGE),
    )


@dataclass(frozen=True)
class Settings:
    # The image of validation and training pods (and of the init containers that fetch
    # what a server pod loads) when a spec names none.
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # The image of model servers whose runtime names none (the chart's
    # defaults.serverImage).
    server_image: str = DEFAULT_VLLM_IMAGE
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
    # What specs may name: the images and vLLM flags the chart's values allow (it also
    # enforces them at admission, from the same ConfigMap).
    policy: Policy = field(default_factory=default_policy)
    # Where runs that name no outputModel.storage write (the chart's defaults.modelStore);
    # None: such a run fails, naming the value.
    model_store: ModelStore | None = None
    # Pull secrets, node selector, tolerations and priority class added to every
    # validation, training and server pod (the chart's defaults.pods).
    pod_defaults: PodDefaults = field(default_factory=PodDefaults)
    # Annotations of the kubetune-trainer ServiceAccount those pods run as: a cloud
    # identity for S3 without a Secret (the chart's defaults.serviceAccountAnnotations).
    identity_annotations: Mapping[str, str] = field(default_factory=dict)


# Each setting's flag and environment variable.
_SOURCES = {
    "trainer_image": ("--trainer-image", "KUBETUNE_TRAINER_IMAGE"),
    "server_image": ("--server-image", "KUBETUNE_SERVER_IMAGE"),
    "resync_seconds": ("--resync-seconds", "KUBETUNE_RESYNC_SECONDS"),
    "scrape_timeout": ("--scrape-timeout", "KUBETUNE_SCRAPE_TIMEOUT"),
    "start_grace": ("--start-grace-seconds", "KUBETUNE_START_GRACE_SECONDS"),
    "admin_key": ("--admin-key", "KUBETUNE_ADMIN_KEY"),
}
# The platform defaults: a store URI (and its S3 endpoint), and two JSON objects.
_PLATFORM_SOURCES = {
    "model_store": ("--default-model-store", "KUBETUNE_DEFAULT_MODEL_STORE"),
    "model_store_endpoint": (
        "--default-model-store-endpoint",
        "KUBETUNE_DEFAULT_MODEL_STORE_ENDPOINT",
    ),
    "pod_defaults": ("--pod-defaults", "KUBETUNE_POD_DEFAULTS"),
    "identity_annotations": ("--identity-annotations", "KUBETUNE_IDENTITY_ANNOTATIONS"),
    "trusted_hosts": ("--trusted-hosts", TRUSTED_HOSTS_VARIABLE),
}
# The policy's lists, comma-separated. Unlike the settings above, a variable that is set
# but empty counts: it allows nothing.
_POLICY_SOURCES = {
    "trainer_images": ("--allowed-trainer-images", "KUBETUNE_ALLOWED_TRAINER_IMAGES"),
    "server_images": ("--allowed-server-images", "KUBETUNE_ALLOWED_SERVER_IMAGES"),
    "server_flags": ("--allowed-server-flags", "KUBETUNE_ALLOWED_SERVER_FLAGS"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for name, (flag, variable) in _SOURCES.items():
        parser.add_argument(
            flag,
            dest=name,
            type=type(getattr(defaults, name)),
            default=None,
            help=f"(or ${variable}; default {getattr(defaults, name)})",
        )
    platform_help = {
        "model_store": "pvc://claim/folder or s3://bucket/prefix; default none",
        "model_store_endpoint": "an S3-compatible endpoint for the store; default AWS",
        "pod_defaults": "JSON {imagePullSecrets, nodeSelector, tolerations, priorityClassName}",
        "identity_annotations": "JSON object of ServiceAccount annotations",
        "trusted_hosts": "comma-separated host:port the pods may fetch from on private addresses",
    }
    for name, (flag, variable) in _PLATFORM_SOURCES.items():
        parser.add_argument(
            flag, dest=name, default=None, help=f"{platform_help[name]} (or ${variable})"
        )
    for name, (flag, variable) in _POLICY_SOURCES.items():
        default = ",".join(getattr(defaults.policy, name))
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            help=f"comma-separated (or ${variable}; default {default})",
        )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    """The settings; ValueError for a policy that lists what cannot be allowed, or a
    platform default that does not parse."""
    defaults = Settings()

    def pick(name: str, variable: str) -> str | None:
        given = getattr(args, name, None)
        if given is not None:
            return str(given)
        return env.get(variable)

    chosen: dict[str, Any] = {}
    for name, (_, variable) in _SOURCES.items():
        value = pick(name, variable)
        if value:
            chosen[name] = type(getattr(defaults, name))(value)
    lists: dict[str, tuple[str, ...]] = {}
    for name, (_, variable) in _POLICY_SOURCES.items():
        value = pick(name, variable)
        if value is not None:
            lists[name] = tuple(item.strip() for item in value.split(",") if item.strip())
    platform = {
        name: pick(name, variable) or "" for name, (_, variable) in _PLATFORM_SOURCES.items()
    }
    if platform["model_store"]:
        chosen["model_store"] = ModelStore.parse(
            platform["model_store"], platform["model_store_endpoint"]
        )
    chosen["pod_defaults"] = replace(
        PodDefaults.from_json(platform["pod_defaults"]),
        trusted_hosts=tuple(h.strip() for h in platform["trusted_hosts"].split(",") if h.strip()),
    )
    chosen["identity_annotations"] = _string_map(
        platform["identity_annotations"], "identity annotations"
    )
    return Settings(**chosen, policy=replace(defaults.policy, **lists))


def _string_map(text: str, what: str) -> dict[str, str]:
    try:
        given = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"{what} are not JSON: {exc}") from None
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise ValueError(f"{what} must be a JSON object of strings")
    return given
