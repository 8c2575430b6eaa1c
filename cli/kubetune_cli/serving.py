"""`kubectl kubetune deploy`: serve a base model and tuned adapters through a
ModelDeployment, or attach adapters to one that already serves.

An adapter is a FineTuneJob's output (``--adapter JOB``, served under the run's
outputModel.name, else its name) or a folder (``--adapter NAME=pvc://CLAIM/PATH`` or
``NAME=s3://BUCKET/PREFIX``); both go into the ModelDeployment's own spec.adapters, so
the server is described by the one object this command writes. Each other flag sets one
spec field and shows that field's own description from the API models."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kubetune_cli.context import COMMAND_OPTIONS, Context
from kubetune_cli.flags import (
    SpecFlag,
    add_flags,
    base_model_ref,
    described,
    is_location,
    location,
    merge,
    spec_fields,
)
from kubetune_cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    UsageError,
    add_dry_run,
    api_message,
    error,
    print_objects,
)
from kubetune_operator.api.common import API_VERSION, GROUP, VERSION, ModelRef, Name, Resources
from kubetune_operator.api.modeldeployment import (
    MODEL_DEPLOYMENT,
    ModelDeploymentSpec,
    Runtime,
    ServerAuth,
)

Manifest = dict[str, Any]

POLL_SECONDS = 2.0
WRITE_ATTEMPTS = 3
# Adapter states that waiting mends: the rest need the user (a rank too high, a
# FineTuneJob that failed or trained another base model...).
PASSING_ADAPTER_REASONS = frozenset({"WaitingForFineTuneJob", "NoServerPod", "Loading"})

EXAMPLES = """\
examples:
  # Serve run shapes-lora's adapter on its base model (both read from the FineTuneJob)
  kubectl kubetune deploy shapes --adapter shapes-lora --wait

  # A server for a base model on a claim, with two runs' adapters, behind an API key
  kubectl kubetune deploy qwen-vl --base-model pvc://models/qwen2.5-vl \\
      --adapter shapes-lora --adapter captions=s3://team/adapters/captions \\
      --api-key-secret qwen-vl-key --max-model-len 4096 --limit-mm-per-prompt image=2

  # Attach another run to a ModelDeployment that already serves
  kubectl kubetune deploy qwen-vl --adapter shapes-lora-v2

  # The manifest, for Git, without touching the cluster
  kubectl kubetune deploy qwen-vl --adapter shapes-lora --dry-run=client -o yaml
"""


class DeployError(CommandError):
    """The deployment cannot be made as asked; the message says why."""


def _key_counts(values: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        kind, sep, count = value.partition("=")
        if not sep or not count.isdigit():
            raise UsageError(f"--limit-mm-per-prompt takes KIND=N, e.g. image=4, not {value!r}")
        counts[kind] = int(count)
    return counts


SPEC_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag("--replicas", ModelDeploymentSpec, "replicas", ("replicas",), int, "N"),
    SpecFlag(
        "--trust-remote-code",
        ModelRef,
        "trust_remote_code",
        ("baseModel", "trustRemoteCode"),
        type=None,
    ),
    SpecFlag("--gpus", Resources, "gpus", ("resources", "gpus"), int, "N"),
    SpecFlag("--gpu-resource", Resources, "gpu_resource", ("resources", "gpuResource")),
    SpecFlag("--cpu", Resources, "cpu", ("resources", "cpu"), metavar="CPU"),
    SpecFlag("--memory", Resources, "memory", ("resources", "memory"), metavar="QUANTITY"),
    SpecFlag("--image", Runtime, "image", ("runtime", "image")),
    SpecFlag("--max-model-len", Runtime, "max_model_len", ("runtime", "maxModelLen"), int, "N"),
    SpecFlag(
        "--gpu-memory-utilization",
        Runtime,
        "gpu_memory_utilization",
        ("runtime", "gpuMemoryUtilization"),
        float,
        "FRACTION",
    ),
    SpecFlag("--max-lora-rank", Runtime, "max_lora_rank", ("runtime", "maxLoraRank"), int, "R"),
    SpecFlag("--max-loras", Runtime, "max_loras", ("runtime", "maxLoras"), int, "N"),
    SpecFlag("--max-pixels", Runtime, "max_pixels", ("runtime", "maxPixels"), int, "N"),
    SpecFlag(
        "--limit-mm-per-prompt",
        Runtime,
        "limit_mm_per_prompt",
        ("runtime", "limitMmPerPrompt"),
        metavar="KIND=N",
        how="Repeatable.",
        repeat=True,
    ),
    SpecFlag(
        "--extra-arg",
        Runtime,
        "extra_args",
        ("runtime", "extraArgs"),
        metavar="ARG",
        how="Repeatable; write a flag as --extra-arg=--enforce-eager.",
        repeat=True,
    ),
    SpecFlag(
        "--api-key-secret",
        ServerAuth,
        "api_key_secret_ref",
        ("auth", "apiKeySecretRef", "name"),
        metavar="SECRET",
    ),
)


# -- pure: from flags to a manifest ---------------------------------------------------


@dataclass(frozen=True)
class AdapterArg:
    """What one --adapter names: a FineTuneJob, or a folder, and maybe the served name."""

    name: str | None
    fine_tune_job: str | None = None
    source: Manifest | None = None


def parse_adapter(text: str) -> AdapterArg:
    """``JOB``, ``NAME=JOB``, ``NAME=pvc://CLAIM/PATH`` or ``NAME=s3://BUCKET/PREFIX``."""
    name, sep, target = text.partition("=")
    if not sep:
        if is_location(text):
            raise UsageError(f"--adapter {text}: name the adapter, as NAME={text}")
        return AdapterArg(None, fine_tune_job=text)
    if not name or not target:
        raise UsageError(f"--adapter takes JOB, NAME=JOB or NAME=FOLDER, not {text!r}")
    if is_location(target):
        return AdapterArg(name, source=location(target, f"--adapter {text}"))
    return AdapterArg(name, fine_tune_job=target)


def job_output_name(ftj: Mapping[str, Any]) -> str:
    """The served name of a FineTuneJob's adapter: outputModel.name, else its own name."""
    spec = ftj.get("spec") or {}
    out = (spec.get("outputModel") or {}).get("name")
    return str(out or ftj["metadata"]["name"])


def job_problem(ftj: Mapping[str, Any], base: Mapping[str, Any] | None) -> str | None:
    """Why the FineTuneJob's output cannot be an adapter on ``base``, if it cannot."""
    spec = ftj.get("spec") or {}
    name = ftj["metadata"]["name"]
    if spec.get("tuning") == "full":
        return (
            f"FineTuneJob {name!r} tuned all parameters: its output is a whole model, not an "
            "adapter; serve it as --base-model (its outputModel folder)"
        )
    trained = (spec.get("baseModel") or {}).get("name")
    if base is not None and trained != base.get("name"):
        return (
            f"FineTuneJob {name!r} trained base model {trained!r}, but the server serves "
            f"{base.get('name')!r}"
        )
    return None


def resolve_adapters(
    asked: Sequence[AdapterArg],
    finetunejobs: Mapping[str, Mapping[str, Any] | None],
    missing_ok: bool = False,
) -> list[Manifest]:
    """spec.adapters entries for what --adapter named, each FineTuneJob looked up in
    ``finetunejobs`` (None: not found). With ``missing_ok`` (a manifest for Git, where
    the run may come in the same commit: the operator waits for it), a run not found is
    served under its own name."""
    adapters: list[Manifest] = []
    for arg in asked:
        if arg.source is not None:
            adapters.append({"name": arg.name, "source": arg.source})
            continue
        assert arg.fine_tune_job is not None
        ftj = finetunejobs.get(arg.fine_tune_job)
        if ftj is None and not missing_ok:
            raise DeployError(f"FineTuneJob {arg.fine_tune_job!r} not found")
        name = arg.name or (job_output_name(ftj) if ftj else arg.fine_tune_job)
        adapters.append({"name": name, "fineTuneJob": arg.fine_tune_job})
    return adapters


def base_from_jobs(
    asked: Sequence[AdapterArg], finetunejobs: Mapping[str, Mapping[str, Any] | None]
) -> Manifest | None:
    """The base model the first named FineTuneJob trained: a server for its adapter."""
    for arg in asked:
        ftj = finetunejobs.get(arg.fine_tune_job or "")
        if ftj is not None:
            base = (ftj.get("spec") or {}).get("baseModel")
            if base:
                return dict(base)
    return None


def deploy_fields(args: argparse.Namespace) -> Manifest:
    """The spec fields the flags given set, nested as in the spec."""
    fields = spec_fields(args, SPEC_FLAGS)
    runtime = fields.get("runtime") or {}
    if "limitMmPerPrompt" in runtime:
        runtime["limitMmPerPrompt"] = _key_counts(runtime["limitMmPerPrompt"])
    return fields


def add_adapters(
    present: Sequence[Mapping[str, Any]], adding: Sequence[Manifest], base_name: str
) -> list[Manifest]:
    """spec.adapters with ``adding`` appended; one already there as asked is kept as it
    is, and a name taken by something else is refused."""
    adapters = [dict(a) for a in present]
    for adapter in adding:
        if adapter["name"] == base_name:
            raise DeployError(
                f"adapter {adapter['name']!r} would take the base model's name: name it "
                f"otherwise (--adapter NAME={adapter.get('fineTuneJob') or '...'})"
            )
        same = next((a for a in adapters if a["name"] == adapter["name"]), None)
        if same is None:
            adapters.append(adapter)
        elif same != adapter:
            raise DeployError(
                f"adapter {adapter['name']!r} is already served, from "
                f"{_adapter_origin(same)}: name this one otherwise"
            )
    return adapters


def _adapter_origin(adapter: Mapping[str, Any]) -> str:
    if adapter.get("fineTuneJob"):
        return f"FineTuneJob {adapter['fineTuneJob']!r}"
    return json.dumps(adapter.get("source"), sort_keys=True)


def validated(manifest: Manifest) -> Manifest:
    """The manifest, once the API models accept its name and spec (the CEL rules the API
    server adds are checked where they bind: adapter names above, the rest on create)."""
    try:
        TypeAdapter(Name).validate_python(manifest["metadata"]["name"])
        ModelDeploymentSpec.model_validate(manifest["spec"])
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'name'}: {e['msg']}" for e in exc.errors()
        )
        raise UsageError(f"invalid ModelDeployment: {problems}") from None
    return manifest


def new_manifest(
    name: str,
    namespace: str,
    base_model: Mapping[str, Any],
    adapters: Sequence[Manifest],
    fields: Mapping[str, Any],
) -> Manifest:
    """A new ModelDeployment: the base model, the adapters and the flags' fields."""
    spec: Manifest = {"baseModel": dict(base_model)}
    spec = merge(spec, fields)
    adapters = add_adapters([], adapters, spec["baseModel"]["name"])
    if adapters:
        spec["adapters"] = adapters
    return validated(
        {
            "apiVersion": API_VERSION,
            "kind": MODEL_DEPLOYMENT.kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def attached_manifest(
    existing: Mapping[str, Any],
    base_model: Mapping[str, Any] | None,
    adapters: Sequence[Manifest],
    fields: Mapping[str, Any],
) -> Manifest:
    """An existing ModelDeployment with the adapters added and the flags' fields set; its
    name, namespace, labels and annotations are kept, and nothing the server adds."""
    meta = existing["metadata"]
    owner = next(
        (o for o in meta.get("ownerReferences") or [] if o.get("kind") == "FineTuneJob"), None
    )
    if owner is not None:
        # The operator keeps that server as the run's spec.deploy says, and would undo
        # what is changed here.
        raise DeployError(
            f"ModelDeployment {meta['name']!r} is FineTuneJob {owner.get('name')!r}'s own "
            "server (its spec.deploy): change that, or deploy a server under another name"
        )
    spec = dict(existing.get("spec") or {})
    serving = (spec.get("baseModel") or {}).get("name")
    if base_model is not None and base_model.get("name") != serving:
        raise DeployError(
            f"ModelDeployment {existing['metadata']['name']!r} serves base model "
            f"{serving!r}, not {base_model.get('name')!r}"
        )
    spec = merge(spec, fields)
    spec["adapters"] = add_adapters(spec.get("adapters") or [], adapters, serving or "")
    if not spec["adapters"]:
        del spec["adapters"]
    kept = {k: meta[k] for k in ("labels", "annotations") if meta.get(k)}
    return validated(
        {
            "apiVersion": API_VERSION,
            "kind": MODEL_DEPLOYMENT.kind,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], **kept},
            "spec": spec,
        }
    )


def plan(
    name: str,
    namespace: str,
    args: argparse.Namespace,
    existing: Mapping[str, Any] | None,
    finetunejobs: Mapping[str, Mapping[str, Any] | None],
) -> Manifest:
    """What `deploy` writes, given the ModelDeployment of that name (if any) and the
    FineTuneJobs --adapter names (None for each not found)."""
    asked = [parse_adapter(a) for a in args.adapter or []]
    fields = deploy_fields(args)
    base: Manifest | None = None
    if args.base_model:
        base = base_model_ref(args.base_model, args.base_model_name)
    adapters = resolve_adapters(asked, finetunejobs, missing_ok=args.dry_run == "client")
    if existing is not None:
        serving = (existing.get("spec") or {}).get("baseModel") or {}
        _check_jobs(asked, finetunejobs, base or serving)
        return attached_manifest(existing, base, adapters, fields)
    if base is None:
        base = base_from_jobs(asked, finetunejobs)
        if base is None:
            raise UsageError(
                f"ModelDeployment {name!r} does not exist: --base-model is needed to make it "
                "(or an --adapter FineTuneJob to take it from)"
            )
    _check_jobs(asked, finetunejobs, base)
    return new_manifest(name, namespace, base, adapters, fields)


def _check_jobs(
    asked: Sequence[AdapterArg],
    finetunejobs: Mapping[str, Mapping[str, Any] | None],
    base: Mapping[str, Any],
) -> None:
    for arg in asked:
        ftj = finetunejobs.get(arg.fine_tune_job or "")
        if ftj is not None and (problem := job_problem(ftj, base)) is not None:
            raise DeployError(problem)


# -- waiting, from what the operator writes -----------------------------------------


def settled(md: Mapping[str, Any], adapters: Sequence[str]) -> tuple[bool, str] | None:
    """Whether `--wait` is over: (True, summary) once the operator has acted on this
    generation, the server is Available and every adapter in ``adapters`` is served;
    (False, why) when it Failed or an adapter cannot be served without the user; None
    while it is on its way."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return None
    phase = status.get("phase")
    if phase == "Failed":
        return False, f"Failed: {status.get('message') or ''}".strip()
    states = {a.get("name"): a for a in status.get("adapters") or []}
    for name in adapters:
        state = states.get(name) or {}
        reason = state.get("reason")
        if reason and reason not in PASSING_ADAPTER_REASONS:
            return False, f"adapter {name!r} is not served: {reason}: {state.get('message', '')}"
    served = status.get("servedModels") or []
    if phase == "Available" and all(name in served for name in adapters):
        return True, f"Available: serves {', '.join(served)} at {status.get('endpoint')}"
    return None


# -- the command ------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "deploy",
        parents=[COMMAND_OPTIONS],
        help="serve a base model and tuned adapters (a ModelDeployment)",
        description=(
            "Make ModelDeployment NAME, which serves a base model and LoRA adapters from "
            "vLLM's OpenAI-compatible server, or attach adapters to it where it exists "
            "(other flags given then change its spec too)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help="the ModelDeployment")
    parser.add_argument(
        "--base-model",
        metavar="MODEL",
        help=described(
            ModelRef,
            "name",
            "Or a model folder, pvc://CLAIM/PATH or s3://BUCKET/PREFIX, served under its "
            "folder's name. Default: the base model the first --adapter run trained.",
        ),
    )
    parser.add_argument(
        "--base-model-name",
        metavar="NAME",
        help="the served name of a --base-model folder (default: the folder's name)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="JOB|NAME=JOB|NAME=FOLDER",
        help=(
            "a LoRA adapter to serve: a FineTuneJob's output, under its outputModel.name "
            "(else the run's name) unless NAME= says otherwise; or an adapter folder, "
            "NAME=pvc://CLAIM/PATH or NAME=s3://BUCKET/PREFIX. Repeatable."
        ),
    )
    add_flags(parser.add_argument_group("spec fields (each sets one)"), SPEC_FLAGS)
    add_dry_run(parser)
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until the server is Available and serves every adapter named "
        "(exit 1 if it fails, or an adapter cannot be served)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        metavar="SECONDS",
        help="how long --wait waits (default: 1800)",
    )
    parser.set_defaults(run=run)


def _objects(context: Context) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(context.api_client)


def _get(api: Any, namespace: str, plural: str, name: str) -> Manifest | None:
    from kubernetes.client.exceptions import ApiException

    try:
        found: Manifest = api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        return found
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def run(args: argparse.Namespace, context: Context) -> int:
    from kubernetes.client.exceptions import ApiException

    api, ns, name = _objects(context), context.namespace, args.name
    resource = f"{MODEL_DEPLOYMENT.singular}.{GROUP}/{name}"
    for attempt in range(WRITE_ATTEMPTS):
        try:
            existing = _get(api, ns, MODEL_DEPLOYMENT.plural, name)
            jobs = {
                a.fine_tune_job: _get(api, ns, "finetunejobs", a.fine_tune_job)
                for a in map(parse_adapter, args.adapter or [])
                if a.fine_tune_job
            }
            manifest = plan(name, ns, args, existing, jobs)
        except UsageError as exc:
            error(str(exc))
            return exc.code
        except CommandError as exc:
            error(f"{exc} (namespace {ns!r})")
            return exc.code
        if args.dry_run == "client":
            if context.output == "table":
                print(f"{resource} {_verb(existing, manifest)} (dry run)")
            else:
                print_objects([manifest], context.output)
            return EXIT_OK
        try:
            written, verb = _write(api, ns, manifest, existing, args.dry_run == "server")
            break
        except ApiException as exc:
            # Someone changed it between the read and the write: plan again on theirs.
            if exc.status == 409 and attempt + 1 < WRITE_ATTEMPTS:
                continue
            error(api_message(exc))
            return EXIT_FAILED
    if args.dry_run == "server":
        if context.output == "table":
            print(f"{resource} {verb} (server dry run)")
        else:
            print_objects([written], context.output)
        return EXIT_OK
    if context.output == "table":
        print(f"{resource} {verb}")
    if not args.wait:
        if context.output != "table":
            print_objects([written], context.output)
        return EXIT_OK
    adapters = [a["name"] for a in manifest["spec"].get("adapters") or []]
    return _wait(api, ns, name, adapters, args.timeout, context.output)


def _verb(existing: Mapping[str, Any] | None, manifest: Manifest) -> str:
    if existing is None:
        return "created"
    return "unchanged" if (existing.get("spec") or {}) == manifest["spec"] else "configured"


def _write(
    api: Any, ns: str, manifest: Manifest, existing: Mapping[str, Any] | None, dry_run: bool
) -> tuple[Manifest, str]:
    """Create it, or replace the existing one at the version read (the API server
    refuses the write with 409 if someone changed it since)."""
    options = {"dry_run": "All"} if dry_run else {}
    plural = MODEL_DEPLOYMENT.plural
    if existing is None:
        created = api.create_namespaced_custom_object(
            GROUP, VERSION, ns, plural, manifest, **options
        )
        return created, "created"
    if _verb(existing, manifest) == "unchanged":
        return dict(existing), "unchanged"
    # The object as read (its resourceVersion, owners and finalizers with it), with the
    # new spec.
    body = {**existing, "spec": manifest["spec"]}
    replaced = api.replace_namespaced_custom_object(
        GROUP, VERSION, ns, plural, manifest["metadata"]["name"], body, **options
    )
    return replaced, "configured"


def _wait(
    api: Any, ns: str, name: str, adapters: Sequence[str], timeout: float, output: str
) -> int:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        md = _get(api, ns, MODEL_DEPLOYMENT.plural, name)
        if md is None:
            error(f"ModelDeployment {name!r} was deleted while waiting")
            return EXIT_FAILED
        verdict = settled(md, adapters)
        status = md.get("status") or {}
        line = f"{status.get('phase') or 'Pending'}: {status.get('message') or ''}".strip()
        if verdict is None and line != last and output == "table":
            print(f"{MODEL_DEPLOYMENT.singular}.{GROUP}/{name} {line}", file=sys.stderr)
            last = line
        if verdict is not None:
            done, summary = verdict
            if output == "table":
                print(f"{MODEL_DEPLOYMENT.singular}.{GROUP}/{name} {summary}")
            else:
                print_objects([md], output)
            if not done:
                error(summary)
            return EXIT_OK if done else EXIT_FAILED
        if time.monotonic() >= deadline:
            error(f"timed out after {timeout:g}s waiting for ModelDeployment {name!r}: {line}")
            return EXIT_FAILED
        time.sleep(POLL_SECONDS)
