"""`kubectl kubetune job create | list | get | follow | cancel | resume`: FineTuneJobs
from the command line.

`create` sets each spec field from one flag whose help is that field's own
description in the API models; the manifest is built by a pure function and checked by
the same models (and the cross-field rules the CRD carries as CEL) before it is sent.
`follow` shows the run as the operator writes it: phase, a progress bar with the
trainer's ETA, the losses, and the Events of the run, its Jobs and their pods; it
exits 0 when the run Succeeded (and was scored), 1 when it Failed."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import TypeAdapter, ValidationError

from kubetune_cli import kube
from kubetune_cli.context import COMMAND_OPTIONS, Context
from kubetune_cli.flags import (
    SpecFlag,
    add_flags,
    base_model_ref,
    described,
    location,
    merge,
    model_flags,
    spec_fields,
)
from kubetune_cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    Manifest,
    UsageError,
    add_dry_run,
    age,
    duration,
    error,
    fields,
    for_git,
    number,
    parse_time,
    percent,
    print_objects,
    table,
)
from kubetune_cli.waiting import POLL_SECONDS
from kubetune_operator.api.common import API_VERSION, GROUP, VERSION, ModelRef, Name, Resources
from kubetune_operator.api.dataset import DATASET
from kubetune_operator.api.finetunejob import (
    FINE_TUNE_JOB,
    FINISHED,
    Deploy,
    Evaluation,
    FineTuneJobSpec,
    JobPhase,
    OutputModel,
    Preflight,
    TrainingResources,
    Validation,
)
from kubetune_operator.resources.conditions import settled
from kubetune_operator.resources.finetunejob.evaluation import evaluating
from kubetune_operator.resources.workloads import TRAINING
from kubetune_trainer.contract.job import EarlyStopping, Hyperparameters, PreserveGeneralSkills
from kubetune_trainer.contract.rules import RULES, broken

RESOURCE = f"{FINE_TUNE_JOB.singular}.{GROUP}"
EVENTS_SHOWN = 10

EXAMPLES = """\
examples:
  # LoRA SFT of a model on a claim, held-out 10%, served and followed to the end
  kubectl kubetune job create shapes-lora --base-model pvc://models/qwen2.5-vl \\
      --dataset shapes --validation-split 0.1 --epochs 3 --deploy --follow

  # DPO, full tuning on 2 nodes of 8 GPUs, through a Kueue queue
  kubectl kubetune job create prefs-dpo --base-model Qwen/Qwen2.5-VL-3B-Instruct \\
      --dataset prefs --method dpo --tuning full --gpus 8 --nodes 2 --queue team-a

  # SFT that keeps the base model's general skills, its adapter on a shared server
  kubectl kubetune job create captions --base-model Qwen/Qwen2.5-VL-3B-Instruct \\
      --dataset captions --preserve-skills --lambda 0.5 --deploy --to qwen-vl

  # The manifest, for Git
  kubectl kubetune job create shapes-lora --base-model Qwen/Qwen2.5-VL-3B-Instruct \\
      --dataset shapes --dry-run=client -o yaml

  kubectl kubetune job list
  kubectl kubetune job get shapes-lora
  kubectl kubetune job follow shapes-lora
  kubectl kubetune job cancel shapes-lora     # suspend; --delete deletes it
  kubectl kubetune job resume shapes-lora
"""

# The flags of `job create`, each one spec field. Hyperparameters come from the model's
# own fields, so that a new one is a new flag.
BASE_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag(
        "--trust-remote-code", ModelRef, "trust_remote_code", ("baseModel", "trustRemoteCode"), None
    ),
    SpecFlag("--method", FineTuneJobSpec, "method", ("method",), choices=("sft", "dpo")),
    SpecFlag("--tuning", FineTuneJobSpec, "tuning", ("tuning",), choices=("lora", "full")),
    SpecFlag("--display-name", FineTuneJobSpec, "display_name", ("displayName",), metavar="TEXT"),
)
VALIDATION_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag(
        "--validation-dataset",
        Validation,
        "dataset",
        ("validation", "dataset", "name"),
        metavar="DATASET",
    ),
    SpecFlag("--validation-split", Validation, "split", ("validation", "split"), float, "FRACTION"),
)
HYPERPARAMETER_FLAGS = model_flags(Hyperparameters, ("hyperparameters",))
SKILL_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag(
        "--preserve-skills",
        PreserveGeneralSkills,
        "enabled",
        ("preserveGeneralSkills", "enabled"),
        None,
    ),
    SpecFlag(
        "--lambda",
        PreserveGeneralSkills,
        "lambda_",
        ("preserveGeneralSkills", "lambda"),
        float,
        "X",
        "With --preserve-skills.",
    ),
    SpecFlag(
        "--temperature",
        PreserveGeneralSkills,
        "temperature",
        ("preserveGeneralSkills", "temperature"),
        float,
        "T",
        "With --preserve-skills.",
    ),
    SpecFlag(
        "--early-stopping-patience",
        EarlyStopping,
        "patience",
        ("earlyStopping", "patience"),
        int,
        "N",
    ),
)
RESOURCE_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag("--gpus", Resources, "gpus", ("resources", "gpus"), int, "N"),
    SpecFlag("--nodes", TrainingResources, "nodes", ("resources", "nodes"), int, "N"),
    SpecFlag("--gpu-resource", Resources, "gpu_resource", ("resources", "gpuResource")),
    SpecFlag("--cpu", Resources, "cpu", ("resources", "cpu"), metavar="CPU"),
    SpecFlag("--memory", Resources, "memory", ("resources", "memory"), metavar="QUANTITY"),
    SpecFlag("--queue", FineTuneJobSpec, "queue_name", ("queueName",), metavar="LOCALQUEUE"),
    SpecFlag("--image", FineTuneJobSpec, "image", ("image",)),
)
OUTPUT_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag("--output-name", OutputModel, "name", ("outputModel", "name"), metavar="NAME"),
    SpecFlag("--deploy", Deploy, "enabled", ("deploy", "enabled"), None),
    SpecFlag(
        "--to",
        Deploy,
        "model_deployment",
        ("deploy", "modelDeployment"),
        metavar="MODELDEPLOYMENT",
        how="With --deploy.",
    ),
    SpecFlag("--preflight", Preflight, "enabled", ("preflight", "enabled"), negatable=True),
    SpecFlag("--evaluation", Evaluation, "enabled", ("evaluation", "enabled"), negatable=True),
    SpecFlag(
        "--evaluation-max-examples",
        Evaluation,
        "max_examples",
        ("evaluation", "maxExamples"),
        int,
        "N",
    ),
)
SPEC_FLAGS = (
    *BASE_FLAGS,
    *VALIDATION_FLAGS,
    *HYPERPARAMETER_FLAGS,
    *SKILL_FLAGS,
    *RESOURCE_FLAGS,
    *OUTPUT_FLAGS,
)


# -- pure: the manifest ------------------------------------------------------------------


def job_manifest(name: str, namespace: str, args: argparse.Namespace) -> Manifest:
    """The FineTuneJob the flags describe, checked by the API models and the rules the
    CRD carries as CEL, so that a mistake is told here, before anything is sent."""
    if not args.base_model or not args.dataset:
        raise UsageError("--base-model and --dataset are required")
    given = spec_fields(args, SPEC_FLAGS)
    if "preserveGeneralSkills" in given and not args.preserve_skills:
        raise UsageError("--lambda and --temperature go with --preserve-skills")
    if "modelDeployment" in given.get("deploy", {}) and not args.deploy:
        raise UsageError("--to names the ModelDeployment of --deploy: add --deploy")
    spec: Manifest = {
        "baseModel": base_model_ref(args.base_model, args.base_model_name),
        "dataset": {"name": args.dataset},
    }
    if args.output_uri:
        spec["outputModel"] = {"storage": location(args.output_uri, "--output-uri")}
    spec = merge(spec, given)
    manifest: Manifest = {
        "apiVersion": API_VERSION,
        "kind": FINE_TUNE_JOB.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError:
        raise UsageError(
            f"{name!r} is not a valid name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        ) from None
    try:
        parsed = FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise UsageError(_first_problem(exc)) from None
    problems = broken(RULES, parsed)
    if problems:
        raise UsageError("; ".join(problems))
    return manifest


def _first_problem(exc: ValidationError) -> str:
    problem = exc.errors()[0]
    where = "spec." + ".".join(str(p) for p in problem["loc"])
    return f"{where}: {problem['msg']}"


# -- pure: showing runs --------------------------------------------------------------------


def score(status: Mapping[str, Any]) -> str | None:
    """The tuned model's exact match, with the base's beside it where scored."""
    evaluation = status.get("evaluation") or {}
    tuned = (evaluation.get("tuned") or {}).get("accuracy")
    base = (evaluation.get("base") or {}).get("accuracy")
    if tuned is None:
        return None
    shown = percent(tuned)
    return f"{shown} (base {percent(base)})" if base is not None else shown


def list_table(items: Sequence[Mapping[str, Any]], now: datetime | None = None) -> str:
    rows = []
    for job in items:
        status = job.get("status") or {}
        progress = status.get("progress") or {}
        metrics = status.get("metrics") or {}
        rows.append(
            (
                job["metadata"]["name"],
                status.get("phase") or JobPhase.PENDING,
                f"{progress['percent']}%" if progress.get("percent") is not None else None,
                number(metrics.get("trainLoss")),
                number(metrics.get("evalLoss")),
                score(status),
                age(job["metadata"].get("creationTimestamp"), now),
            )
        )
    return table(("name", "phase", "progress", "train loss", "eval loss", "score", "age"), rows)


def model_text(ref: Mapping[str, Any]) -> str:
    source = ref.get("source") or {}
    name = str(ref.get("name") or "")
    if "pvc" in source:
        return f"{name} (pvc://{source['pvc'].get('claimName')}/{source['pvc'].get('path', '')})"
    if "s3" in source:
        return f"{name} ({source['s3'].get('uri')})"
    return name


def progress_text(status: Mapping[str, Any]) -> str | None:
    progress = status.get("progress") or {}
    # Until the trainer has counted its steps, there is nothing to show.
    if progress.get("step") is None or not progress.get("totalSteps"):
        return None
    text = f"step {progress['step']}/{progress.get('totalSteps', '?')}"
    if progress.get("epoch") is not None:
        text += f", epoch {progress['epoch']:.2f}"
    if progress.get("percent") is not None:
        text = f"{progress['percent']}% ({text})"
    if progress.get("etaSeconds") is not None and status.get("phase") == JobPhase.RUNNING:
        text += f", ETA {duration(progress['etaSeconds'])}"
    return text


def losses_text(metrics: Mapping[str, Any]) -> str | None:
    parts = []
    if metrics.get("trainLoss") is not None:
        parts.append(f"train loss {number(metrics['trainLoss'])}")
    if metrics.get("evalLoss") is not None:
        parts.append(f"eval loss {number(metrics['evalLoss'])}")
    if metrics.get("bestEvalLoss") is not None:
        best = f"best {number(metrics['bestEvalLoss'])}"
        if metrics.get("bestStep") is not None:
            best += f" at step {metrics['bestStep']}"
        parts.append(best)
    return ", ".join(parts) or None


def evaluation_text(evaluation: Mapping[str, Any]) -> str:
    """The tuned model beside its base, as two columns."""
    if not evaluation:
        return ""
    head = f"Evaluation: {evaluation.get('phase')}"
    if evaluation.get("message"):
        head += f" ({evaluation['message']})"
    text = head + "\n"
    tuned, base = evaluation.get("tuned") or {}, evaluation.get("base") or {}
    if tuned or base:
        rows = []
        for label, key, shown in (
            ("examples", "examples", str),
            ("exact match", "accuracy", percent),
            ("loss", "loss", number),
            ("preference accuracy", "preferenceAccuracy", percent),
            ("reward margin", "rewardMargin", number),
        ):
            if tuned.get(key) is None and base.get(key) is None:
                continue
            rows.append(
                (
                    label,
                    shown(tuned[key]) if tuned.get(key) is not None else None,
                    shown(base[key]) if base.get(key) is not None else None,
                )
            )
        text += _indent(table(("", "tuned", "base"), rows))
    if evaluation.get("klToBase") is not None:
        text += f"  KL to base: {number(evaluation['klToBase'])}\n"
    samples = evaluation.get("samples") or []
    if samples:
        text += "  Samples:\n"
        for sample in samples:
            text += f"    prompt:   {_one_line(sample.get('prompt'))}\n"
            text += f"    expected: {_one_line(sample.get('expected'))}\n"
            text += f"    tuned:    {_one_line(sample.get('tuned'))}\n"
            if sample.get("base") is not None:
                text += f"    base:     {_one_line(sample.get('base'))}\n"
    return text


def _indent(text: str, by: str = "  ") -> str:
    return "".join(f"{by}{line}\n" for line in text.splitlines())


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


def event_line(event: Mapping[str, Any], now: datetime | None = None) -> str:
    """One Event as `kubectl events` lists it: age, type, reason, object, message."""
    obj = event.get("involvedObject") or {}
    when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
    count = event.get("count") or 1
    seen = f" (x{count})" if count > 1 else ""
    return (
        f"{age(when, now)}\t{event.get('type', '')}\t{event.get('reason', '')}\t"
        f"{obj.get('kind', '').lower()}/{obj.get('name', '')}\t"
        f"{_one_line(event.get('message'))}{seen}"
    )


def event_note(event: Mapping[str, Any]) -> str:
    """One Event as `follow` prints it when it comes: type, reason, object, message."""
    obj = event.get("involvedObject") or {}
    count = event.get("count") or 1
    return (
        f"{event.get('type', '')} {event.get('reason', '')} "
        f"{obj.get('kind', '').lower()}/{obj.get('name', '')}: "
        f"{_one_line(event.get('message'))}{f' (x{count})' if count > 1 else ''}"
    )


def events_table(events: Sequence[Mapping[str, Any]], now: datetime | None = None) -> str:
    rows = [line.split("\t") for line in (event_line(e, now) for e in events)]
    return table(("last seen", "type", "reason", "object", "message"), rows)


def job_names(job: Mapping[str, Any]) -> set[str]:
    """The names of the Jobs the operator made for the run (training, pre-flight,
    evaluation), as status names them."""
    status = job.get("status") or {}
    names = {status.get("jobName")}
    names.add((status.get("preflight") or {}).get("jobName"))
    names.add((status.get("evaluation") or {}).get("jobName"))
    return {n for n in names if n}


def related(event: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """Whether an Event is about the run: the FineTuneJob itself, one of its Jobs, or
    a pod of one of them (scheduling, pulling, a crash)."""
    obj = event.get("involvedObject") or {}
    kind, name = obj.get("kind"), obj.get("name") or ""
    if kind == FINE_TUNE_JOB.kind:
        return bool(name == job["metadata"]["name"])
    jobs = job_names(job)
    if kind == "Job":
        return name in jobs
    if kind == "Pod":
        return any(name.startswith(f"{j}-") for j in jobs)
    return False


def describe(
    job: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime | None = None
) -> str:
    """What `job get` shows: where the run stands, what it trains, its losses, where
    the output is, the evaluation beside the base, and its recent Events."""
    meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    validation = spec.get("validation") or {}
    held_out = (
        f"Dataset {validation['dataset']['name']}"
        if validation.get("dataset")
        else f"{validation['split']:g} of the training set"
        if validation.get("split") is not None
        else None
    )
    started, completed = (
        parse_time(status.get("startTime")),
        parse_time(status.get("completionTime")),
    )
    took = duration(completed - started) if started and completed else None
    deployment = (status.get("deployment") or {}).get("name")
    preflight = status.get("preflight") or {}
    text = fields(
        (
            ("Name", meta["name"]),
            ("Namespace", meta.get("namespace")),
            ("Phase", status.get("phase") or JobPhase.PENDING),
            ("Message", status.get("message")),
            ("Base model", model_text(spec.get("baseModel") or {})),
            ("Method", f"{spec.get('method', 'sft')}, {spec.get('tuning', 'lora')}"),
            ("Dataset", (spec.get("dataset") or {}).get("name")),
            ("Validation", held_out),
            ("Progress", progress_text(status)),
            ("Losses", losses_text(status.get("metrics") or {})),
            ("Training tokens", preflight.get("trainingTokens")),
            ("Started", status.get("startTime")),
            ("Completed", status.get("completionTime")),
            ("Duration", took),
            ("Output", (status.get("outputModel") or {}).get("uri")),
            ("Served by", f"ModelDeployment {deployment}" if deployment else None),
            ("Age", age(meta.get("creationTimestamp"), now)),
        )
    )
    text += evaluation_text(status.get("evaluation") or {})
    recent = list(events)[-EVENTS_SHOWN:]
    text += "Events:\n" + (_indent(events_table(recent, now)) if recent else "  <none>\n")
    return text


def outcome(job: Mapping[str, Any]) -> int | None:
    """How `follow` ends: 0 once the run Succeeded and its scoring is over, 1 once it
    Failed, None while it goes on (the operator's own test of a finished run)."""
    if not settled(job, FINISHED) or evaluating(job):
        return None
    return EXIT_OK if (job.get("status") or {}).get("phase") == JobPhase.SUCCEEDED else EXIT_FAILED


def failure(job: Mapping[str, Any]) -> str:
    """Why a run failed: the Ready condition's reason and the status message."""
    status = job.get("status") or {}
    conditions: list[Manifest] = status.get("conditions") or []
    ready: Manifest = next((c for c in conditions if c.get("type") == "Ready"), {})
    reason = ready.get("reason")
    message = status.get("message") or ready.get("message") or ""
    return f"{reason}: {message}" if reason and reason != "Failed" else message or "Failed"


def state_line(job: Mapping[str, Any]) -> str:
    """One line of where the run stands, for plain output and the bar's caption."""
    status = job.get("status") or {}
    parts = [str(status.get("phase") or JobPhase.PENDING)]
    progress = progress_text(status)
    if progress:
        parts.append(progress)
    losses = losses_text(status.get("metrics") or {})
    if losses:
        parts.append(losses)
    evaluation = status.get("evaluation") or {}
    if evaluation.get("phase"):
        parts.append(f"evaluation {evaluation['phase']}")
    ready: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    # With progress the message only repeats it, unless the run is between trainers
    # (the job controller finishing the Job, a pod being replaced, Kueue requeueing it).
    between = ready.get("reason") not in (None, TRAINING) and status.get("phase") == "Running"
    if status.get("message") and (not progress or between):
        parts.append(status["message"])
    return " | ".join(parts)


# -- follow: the view --------------------------------------------------------------------


class PlainView:
    """Plain lines, one per change: for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def show(self, job: Mapping[str, Any]) -> None:
        line = state_line(job)
        if line != self.last:
            print(line, file=self.stream, flush=True)
            self.last = line

    def event(self, line: str) -> None:
        print(f"event: {line}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class TerminalView:
    """A progress bar of training steps (tqdm), captioned with the phase and losses and
    the operator's ETA; Events and phase changes printed above it."""

    def __init__(self, stream: TextIO) -> None:
        from tqdm import tqdm

        self.stream = stream
        self.bar = tqdm(
            total=1,
            file=stream,
            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} steps {postfix}",
            dynamic_ncols=True,
            leave=True,
        )
        self.bar.set_description_str(JobPhase.PENDING)
        self.phase = ""

    def show(self, job: Mapping[str, Any]) -> None:
        status = job.get("status") or {}
        phase = str(status.get("phase") or JobPhase.PENDING)
        if phase != self.phase:
            message = status.get("message")
            self.bar.write(f"{phase}{': ' + message if message else ''}", file=self.stream)
            self.phase = phase
        progress = status.get("progress") or {}
        if progress.get("totalSteps"):
            self.bar.total = progress["totalSteps"]
        if progress.get("step") is not None:
            self.bar.n = progress["step"]
        self.bar.set_description_str(phase, refresh=False)
        postfix = losses_text(status.get("metrics") or {}) or ""
        if progress.get("etaSeconds") is not None and phase == JobPhase.RUNNING:
            postfix += f"  ETA {duration(progress['etaSeconds'])}"
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()

    def event(self, line: str) -> None:
        self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def follow(
    get: Callable[[], Manifest | None],
    events: Callable[[Manifest], Sequence[Manifest]],
    view: Any,
    *,
    timeout: float | None = None,
    interval: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Manifest, int]:
    """Show the run until it ends; the run as it ended, and the exit code."""
    deadline = None if timeout is None else clock() + timeout
    seen: set[str] = set()
    try:
        while True:
            job = get()
            if job is None:
                raise CommandError("the FineTuneJob was deleted while it was followed")
            for event in events(job):
                key = f"{(event.get('metadata') or {}).get('uid')}/{event.get('count')}"
                if key not in seen:
                    seen.add(key)
                    view.event(event_note(event))
            view.show(job)
            code = outcome(job)
            if code is not None:
                return job, code
            if deadline is not None and clock() >= deadline:
                raise CommandError(
                    f"timed out after {timeout:g}s; the run goes on: {state_line(job)}"
                )
            sleep(interval)
    finally:
        view.close()


# -- the commands -------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "job",
        help="create, list, show, follow, cancel and resume FineTuneJobs",
        description="FineTuneJobs: fine-tuning runs, from a Dataset to a served model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = group.add_subparsers(dest="job_command", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create",
        parents=[COMMAND_OPTIONS],
        help="start a fine-tuning run (a FineTuneJob)",
        description=(
            "Create FineTuneJob NAME. Each flag sets one spec field; its help is the "
            "field's description (as `kubectl explain finetunejob.spec` shows it)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("name", metavar="NAME", help="the FineTuneJob")
    create.add_argument(
        "--base-model",
        metavar="MODEL",
        help=described(
            ModelRef,
            "name",
            "Or a model folder, pvc://CLAIM/PATH or s3://BUCKET/PREFIX, named by its last segment.",
        ),
    )
    create.add_argument(
        "--base-model-name",
        metavar="NAME",
        help="the name of a --base-model folder (default: the folder's name)",
    )
    create.add_argument(
        "--dataset",
        metavar="DATASET",
        help=described(FineTuneJobSpec, "dataset"),
    )
    run_group = create.add_argument_group("the run")
    add_flags(run_group, BASE_FLAGS)
    held_out = run_group.add_mutually_exclusive_group()
    add_flags(held_out, VALIDATION_FLAGS)
    add_flags(create.add_argument_group("hyperparameters"), HYPERPARAMETER_FLAGS)
    add_flags(create.add_argument_group("preserving skills, stopping early"), SKILL_FLAGS)
    add_flags(create.add_argument_group("compute"), RESOURCE_FLAGS)
    output = create.add_argument_group("output, serving and scoring")
    output.add_argument(
        "--output-uri",
        metavar="pvc://CLAIM/PATH|s3://BUCKET/PREFIX",
        help=described(OutputModel, "storage"),
    )
    add_flags(output, OUTPUT_FLAGS)
    create.add_argument(
        "--follow", action="store_true", help="then follow the run, as `job follow` does"
    )
    create.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long --follow follows (default: to the end)",
    )
    add_dry_run(create)
    create.set_defaults(run=run_create)

    listing = commands.add_parser(
        "list",
        aliases=["ls"],
        parents=[COMMAND_OPTIONS],
        help="the namespace's runs: phase, progress, losses, score, age",
    )
    listing.set_defaults(run=run_list)

    for command, text, runner in (
        ("get", "one run: status, evaluation beside the base, output, recent Events", run_get),
        ("follow", "follow a run live until it ends (exit 0 Succeeded, 1 Failed)", run_follow),
        ("resume", "resume a suspended run", run_resume),
    ):
        parser = commands.add_parser(
            command, parents=[COMMAND_OPTIONS], help=text, description=text
        )
        parser.add_argument("name", metavar="NAME")
        if command == "follow":
            parser.add_argument(
                "--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 1)"
            )
        parser.set_defaults(run=runner)

    cancel = commands.add_parser(
        "cancel",
        parents=[COMMAND_OPTIONS],
        help="suspend a run (its pods stop; resume continues from its last checkpoint), "
        "or --delete it",
    )
    cancel.add_argument("name", metavar="NAME")
    cancel.add_argument(
        "--delete", action="store_true", help="delete the FineTuneJob (and what it made)"
    )
    cancel.set_defaults(run=run_cancel)


def run_create(args: argparse.Namespace, context: Context) -> int:
    manifest = job_manifest(args.name, context.namespace, args)
    if args.dry_run == "client":
        if context.output == "table":
            print(f"{RESOURCE}/{args.name} created (dry run)")
        else:
            print_objects([for_git(manifest, args.namespace)], context.output)
        return EXIT_OK
    server_dry = args.dry_run == "server"
    if kube.get(context, DATASET.plural, args.dataset) is None:
        print(
            f"warning: Dataset {args.dataset!r} is not in namespace {context.namespace!r} "
            "yet: the run waits for it",
            file=sys.stderr,
        )
    options = {"dry_run": "All"} if server_dry else {}
    created: Manifest = kube.custom_objects(context).create_namespaced_custom_object(
        GROUP, VERSION, context.namespace, FINE_TUNE_JOB.plural, manifest, **options
    )
    suffix = " (server dry run)" if server_dry else ""
    if context.output == "table" or args.follow:
        print(
            f"{RESOURCE}/{args.name} created{suffix}",
            file=sys.stdout if context.output == "table" else sys.stderr,
        )
    if server_dry or not args.follow:
        if context.output != "table":
            print_objects([created], context.output)
        return EXIT_OK
    return _follow(context, args.name, args.timeout)


def run_list(args: argparse.Namespace, context: Context) -> int:
    items = kube.list_objects(context, FINE_TUNE_JOB.plural)
    if context.output != "table":
        print_objects([{"apiVersion": "v1", "kind": "List", "items": items}], context.output)
        return EXIT_OK
    if not items:
        print(f"No FineTuneJobs in namespace {context.namespace}.", file=sys.stderr)
        return EXIT_OK
    print(list_table(items), end="")
    return EXIT_OK


def _get(context: Context, name: str) -> Manifest:
    found = kube.get(context, FINE_TUNE_JOB.plural, name)
    if found is None:
        raise CommandError(f"FineTuneJob {name!r} not found in namespace {context.namespace!r}")
    return found


def _events(context: Context, job: Manifest) -> list[Manifest]:
    return [e for e in kube.namespace_events(context) if related(e, job)]


def run_get(args: argparse.Namespace, context: Context) -> int:
    job = _get(context, args.name)
    if context.output != "table":
        print_objects([job], context.output)
        return EXIT_OK
    print(describe(job, _events(context, job), datetime.now(UTC)), end="")
    return EXIT_OK


def run_follow(args: argparse.Namespace, context: Context) -> int:
    _get(context, args.name)
    return _follow(context, args.name, args.timeout)


def _follow(context: Context, name: str, timeout: float | None) -> int:
    stream = sys.stderr if context.output != "table" else sys.stdout
    view = TerminalView(stream) if stream.isatty() else PlainView(stream)
    job, code = follow(
        lambda: kube.get(context, FINE_TUNE_JOB.plural, name),
        lambda job: _events(context, job),
        view,
        timeout=timeout,
    )
    if context.output != "table":
        print_objects([job], context.output)
    else:
        status = job.get("status") or {}
        succeeded = code == EXIT_OK
        summary = fields(
            (
                ("Phase", status.get("phase")),
                ("Output", (status.get("outputModel") or {}).get("uri") if succeeded else None),
                ("Score", score(status)),
                ("Served by", (status.get("deployment") or {}).get("name")),
            )
        )
        print(summary, end="")
    if code != EXIT_OK:
        error(f"FineTuneJob {name!r} Failed: {failure(job)}")
    return code


def _set_suspend(context: Context, name: str, suspend: bool) -> Manifest:
    patched: Manifest = kube.custom_objects(context).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        context.namespace,
        FINE_TUNE_JOB.plural,
        name,
        {"spec": {"suspend": suspend}},
    )
    return patched


def run_cancel(args: argparse.Namespace, context: Context) -> int:
    job = _get(context, args.name)
    if args.delete:
        kube.custom_objects(context).delete_namespaced_custom_object(
            GROUP, VERSION, context.namespace, FINE_TUNE_JOB.plural, args.name
        )
        print(f"{RESOURCE}/{args.name} deleted")
        return EXIT_OK
    phase = (job.get("status") or {}).get("phase")
    if phase in FINISHED:
        raise CommandError(
            f"FineTuneJob {args.name!r} has already {phase}: nothing to cancel "
            "(--delete deletes it)"
        )
    if (job.get("spec") or {}).get("suspend"):
        print(f"{RESOURCE}/{args.name} already suspended")
        return EXIT_OK
    _set_suspend(context, args.name, True)
    print(
        f"{RESOURCE}/{args.name} suspended (resume with `kubectl kubetune job resume {args.name}`)"
    )
    return EXIT_OK


def run_resume(args: argparse.Namespace, context: Context) -> int:
    job = _get(context, args.name)
    if not (job.get("spec") or {}).get("suspend"):
        print(f"{RESOURCE}/{args.name} is not suspended")
        return EXIT_OK
    _set_suspend(context, args.name, False)
    print(f"{RESOURCE}/{args.name} resumed")
    return EXIT_OK
