"""The platform's policy on what a spec may name, and the check each kind's decide makes
before it creates anything.

A FineTuneJob's image runs with the Secrets its spec names, and a ModelDeployment's
runtime.extraArgs reach vLLM as they are: without a policy, whoever may create kubetune
objects but not pods could run code of their choosing in the namespace (an image of
their own, `--trust-remote-code`, a `--tool-parser-plugin` file, `--allowed-local-media-
path /`). The chart sets the policy once (values `policy`, in the ConfigMap
kubetune-policy): the operator gets it as settings, and the chart's
ValidatingAdmissionPolicies read the same ConfigMap, so that `kubectl apply` of a refused
spec fails with the message the operator would write (templates/policy.yaml spells the
same rules in CEL).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.finetunejob import FineTuneJobSpec
from kubetune_operator.api.modeldeployment import ModelDeploymentSpec, Runtime
from kubetune_operator.resources.conditions import ready_reason

# The Ready reason of a spec the policy refuses.
NOT_ALLOWED = "NotAllowed"

# The vLLM flags that runtime.extraArgs may never carry, whatever the policy lists, with
# what sets each instead: the operator's own (a second value would win, extraArgs
# coming last), and those that would let other flags or a model in by another door.
# The chart keeps a copy (files/reserved-server-flags.yaml) for its admission policy.
RESERVED_FLAGS: Mapping[str, str] = {
    "--model": "the operator sets the model from baseModel",
    "--served-model-name": "the operator sets it from baseModel.name",
    "--trust-remote-code": "the operator sets it from baseModel.trustRemoteCode",
    "--no-trust-remote-code": "the operator sets it from baseModel.trustRemoteCode",
    "--host": "the operator sets it",
    "--port": "the operator sets it",
    "--middleware": "the operator sets it (its adapter and API-key guard)",
    "--api-key": "auth.apiKeySecretRef sets the API key",
    "--enable-lora": "the operator sets it",
    "--no-enable-lora": "the operator sets it",
    "--lora-modules": "the operator loads the adapters that spec.adapters lists",
    "--max-loras": "the operator sets it from runtime.maxLoras",
    "--max-lora-rank": "the operator sets it from runtime.maxLoraRank",
    "--tensor-parallel-size": "the operator sets it from resources.gpus",
    "--gpu-memory-utilization": "the operator sets it from runtime.gpuMemoryUtilization",
    "--device-memory-utilization": "the operator sets it from runtime.gpuMemoryUtilization",
    "--max-model-len": "the operator sets it from runtime.maxModelLen",
    "--limit-mm-per-prompt": "the operator sets it from runtime.limitMmPerPrompt",
    "--mm-processor-kwargs": "the operator sets it from runtime.maxPixels",
    "--config": "it reads more flags from a file",
}

# Tuning flags of vLLM's server (v0.11) that change how fast or how precisely it serves
# but load no code, read no file and open nothing: batching and scheduling, the KV
# cache, numeric precision, the sampler's seed, CUDA graphs, tool-call and reasoning
# parsers by built-in name, and log volume.
DEFAULT_SERVER_FLAGS = (
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--long-prefill-token-threshold",
    "--scheduling-policy",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--block-size",
    "--kv-cache-dtype",
    "--cpu-offload-gb",
    "--mm-processor-cache-gb",
    "--dtype",
    "--quantization",
    "--seed",
    "--max-logprobs",
    "--enforce-eager",
    "--no-enforce-eager",
    "--disable-sliding-window",
    "--disable-cascade-attn",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "--reasoning-parser",
    "--chat-template-content-format",
    "--disable-log-stats",
)

# What a listed flag and an image pattern may look like: a flag in vLLM's own spelling
# (it reads `_` as `-`, so only one spelling can be listed), and an image reference
# with `*`; neither holds the `,` that separates them in the ConfigMap.
FLAG_NAME = re.compile(r"--[a-z0-9]+(?:-[a-z0-9]+)*")
IMAGE_PATTERN = re.compile(r"[A-Za-z0-9._/:@*-]+")


def repository_patterns(image: str) -> tuple[str, ...]:
    """The patterns of any tag or digest of ``image``'s repository."""
    repository = image.split("@", 1)[0]
    if repository.rfind(":") > repository.rfind("/"):
        repository = repository[: repository.rfind(":")]
    return (f"{repository}:*", f"{repository}@*")


@dataclass(frozen=True)
class Policy:
    """What specs may name: trainer images (FineTuneJob spec.image), server images
    (runtime.image) and the vLLM flags of runtime.extraArgs. In an image pattern `*`
    matches any characters but '/', and `**` any characters."""

    trainer_images: tuple[str, ...]
    server_images: tuple[str, ...]
    server_flags: tuple[str, ...] = DEFAULT_SERVER_FLAGS

    def __post_init__(self) -> None:
        for pattern in (*self.trainer_images, *self.server_images):
            if not IMAGE_PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"image pattern {pattern!r}: only letters, digits and ._/:@-* may appear"
                )
        for flag in self.server_flags:
            if not FLAG_NAME.fullmatch(flag):
                raise ValueError(f"server flag {flag!r}: list flags as --lower-case-words")
            if flag in RESERVED_FLAGS:
                raise ValueError(f"server flag {flag!r} cannot be allowed: {RESERVED_FLAGS[flag]}")


def image_regex(patterns: Sequence[str]) -> str:
    """The one anchored regular expression of ``patterns``. The chart builds its twin
    for the API server's CEL (templates/_policy.tpl), and the chart tests hold the two
    to the same verdicts."""
    wild = {"**": ".*", "*": "[^/]*"}
    alternatives = (
        "".join(wild.get(piece) or re.escape(piece) for piece in re.split(r"(\*\*|\*)", p))
        for p in patterns
    )
    return f"^(?:{'|'.join(alternatives)})$"


@functools.cache
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(image_regex(patterns))


def image_allowed(image: str, patterns: tuple[str, ...]) -> bool:
    return bool(patterns) and _compiled(patterns).match(image) is not None


def _listing(items: Iterable[str]) -> str:
    return ", ".join(items) or "none"


def reserved(arg: str) -> str | None:
    """What sets the flag of this element of extraArgs instead, where it is one that
    extraArgs may never carry (in any spelling vLLM reads: it takes `_` for `-`)."""
    if not arg.startswith("-"):
        return None
    return RESERVED_FLAGS.get(arg.split("=", 1)[0].replace("_", "-"))


def flag_refusal(arg: str, allowed: tuple[str, ...]) -> str | None:
    """Why one element of extraArgs may not reach vLLM (the end of a message), or None.
    An element that does not start with '-' is a flag's value: vLLM reads it as the
    value of the flag before it, or refuses to start (a second model)."""
    if not arg.startswith("-"):
        return None
    setter = reserved(arg)
    if setter is not None:
        return f": {setter}"
    if arg.split("=", 1)[0] not in allowed:
        return f" (allowed: {_listing(allowed)})"
    return None


def runtime_refusal(runtime: Runtime | None, path: str, policy: Policy) -> str | None:
    """The first thing the policy refuses in a vLLM runtime at ``path``, or None. A
    runtime that names no image gets the platform's own (the operator's server_image),
    which the policy does not restrict, as a FineTuneJob without spec.image gets its
    trainer image: a platform that moves the default to a mirror need not list it."""
    if runtime is None:
        return None
    if runtime.image is not None and not image_allowed(runtime.image, policy.server_images):
        return (
            f'{path}.image "{runtime.image}" is not an allowed server image '
            f"(allowed: {_listing(policy.server_images)})"
        )
    for i, arg in enumerate(runtime.extra_args or []):
        why = flag_refusal(arg, policy.server_flags)
        if why is not None:
            return f'{path}.extraArgs[{i}] "{arg}" is not an allowed server flag{why}'
    return None


def finetunejob_refusal(spec: FineTuneJobSpec, policy: Policy) -> str | None:
    """The first thing the policy refuses in a FineTuneJob's spec, or None: its trainer
    image, then the runtime of the server it asks for."""
    if spec.image is not None and not image_allowed(spec.image, policy.trainer_images):
        return (
            f'spec.image "{spec.image}" is not an allowed trainer image '
            f"(allowed: {_listing(policy.trainer_images)})"
        )
    runtime = spec.deploy.runtime if spec.deploy is not None else None
    return runtime_refusal(runtime, "spec.deploy.runtime", policy)


def modeldeployment_refusal(spec: ModelDeploymentSpec, policy: Policy) -> str | None:
    return runtime_refusal(spec.runtime, "spec.runtime", policy)


def was_refused(obj: Mapping[str, Any]) -> bool:
    """Whether status says the policy refused the object's spec (maybe an earlier one)."""
    return ready_reason(obj) == NOT_ALLOWED
