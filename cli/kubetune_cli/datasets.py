"""`kubectl kubetune dataset create | list | get`: from a JSONL file on a laptop (its
images in folders beside it) to a Dataset the operator validates.

`create` validates the file first, with the validator the Dataset's validation Job
runs (`kubetune validate`: the same rules and line-numbered messages); an invalid file
is reported and nothing is uploaded or created. A valid one goes, with every image its
lines name by relative path:

* into a ConfigMap, its images embedded as ``data:`` URIs (`kubetune convert
  --embed-images`), when all of it fits in one (about 1 MiB): no storage needed;
* else to S3: ``--to s3://BUCKET/PREFIX``, or the platform's dataset store (the
  chart's ``defaults.datasetStore``), at ``<prefix>/<namespace>/<name>/<digest>/``.

The location is content-addressed (``<digest>`` is the SHA-256 over the file and its
images), so that the same file again is a no-op, and ``--replace`` with another file
changes the Dataset's spec, which has the operator validate it afresh. The file's own
SHA-256 (the one `kubetune validate` prints) and the digest are annotations of the
Dataset."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from kubetune_cli import kube
from kubetune_cli.context import COMMAND_OPTIONS, Context
from kubetune_cli.flags import SpecFlag, add_flags
from kubetune_cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    Manifest,
    UsageError,
    add_dry_run,
    age,
    error,
    fields,
    for_git,
    print_objects,
    table,
)
from kubetune_cli.stores import (
    PlatformDefaults,
    S3Prefix,
    Upload,
    defaults_location,
    env_endpoint,
    read_defaults,
    size_text,
    upload,
)
from kubetune_cli.waiting import generation_seen, wait_until
from kubetune_operator.api.common import API_VERSION, GROUP, VERSION, Name, SecretRef
from kubetune_operator.api.dataset import (
    DATASET,
    VALIDATED,
    ConfigMapSource,
    DatasetPhase,
    DatasetSpec,
)

ANNOTATION_SHA256 = "kubetune.io/sha256"
"""SHA-256 of the JSONL file as uploaded from the laptop (what `kubetune validate` prints)."""
ANNOTATION_CONTENT = "kubetune.io/content-sha256"
"""SHA-256 over the file and the images it names: what makes a re-run a no-op."""
ANNOTATION_FILE = "kubetune.io/source-file"
MANAGED_BY = "kubectl-kubetune"
LABEL_DATASET = "kubetune.io/dataset"

CONFIGMAP_LIMIT = 1024 * 1024
"""The API server's bound on a ConfigMap's data (keys and values together)."""
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
DIGEST_FOLDER = 16  # hex digits of the digest in the S3 folder and the ConfigMap name
WAIT_TIMEOUT = 1800.0

EXAMPLES = """\
examples:
  # Validate, upload (the file and the images beside it) and wait for the Dataset
  kubectl kubetune dataset create shapes -f shapes.jsonl --wait

  # Preference pairs, to a bucket of your own
  kubectl kubetune dataset create prefs -f prefs.jsonl --task dpo \\
      --to s3://team-data/kubetune --s3-secret team-s3

  # Another version of the file under the same name
  kubectl kubetune dataset create shapes -f shapes-v2.jsonl --replace --wait

  # The manifests, for Git, without touching the cluster or any store
  kubectl kubetune dataset create shapes -f shapes.jsonl --dry-run=client -o yaml

  kubectl kubetune dataset list
  kubectl kubetune dataset get shapes -o yaml
"""

SPEC_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag("--task", DatasetSpec, "task", ("task",), choices=("sft", "dpo")),
    SpecFlag(
        "--format",
        DatasetSpec,
        "format",
        ("format",),
        choices=("auto", "placeholder", "content-parts"),
    ),
    SpecFlag("--deep", DatasetSpec, "deep", ("deep",), type=None),
    SpecFlag("--queue", DatasetSpec, "queue_name", ("queueName",), metavar="LOCALQUEUE"),
)


# -- pure: what goes where ---------------------------------------------------------------


@dataclass(frozen=True)
class LocalData:
    """A validated file and what it names, as found on this machine."""

    path: Path
    sha256: str  # the file's
    images: Mapping[str, Path] = field(default_factory=dict)  # key (relative path) -> file
    image_sha256: Mapping[str, str] = field(default_factory=dict)
    unplaceable: tuple[str, ...] = ()  # image paths that S3 cannot hold beside the file

    @property
    def digest(self) -> str:
        return content_digest(self.sha256, self.image_sha256)

    @property
    def size(self) -> int:
        return self.path.stat().st_size + sum(p.stat().st_size for p in self.images.values())


def content_digest(file_sha256: str, images: Mapping[str, str]) -> str:
    """One SHA-256 over the file's and each image's (with its path): any change to
    the data changes it; the same data in another folder on the laptop does not."""
    digest = hashlib.sha256(f"jsonl {file_sha256}\n".encode())
    for path in sorted(images):
        digest.update(f"image {images[path]} {path}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Placement:
    """Where the data goes: a ConfigMap, or an S3 folder (with the endpoint and the
    Secret the Dataset names for the pods)."""

    kind: Literal["configmap", "s3"]
    s3: S3Prefix | None = None
    endpoint: str | None = None
    secret: str | None = None


def choose_placement(
    to: str | None,
    fits: bool,
    defaults: PlatformDefaults | None,
    *,
    endpoint: str | None,
    secret: str | None,
    size: int,
    env_endpoint: str | None = None,
) -> Placement:
    """``--to`` as given; else a ConfigMap where everything fits in one, else the
    platform's dataset store. CommandError saying what to do where none will do.

    The S3 endpoint is ``endpoint`` (--s3-endpoint), else the platform's for its own
    store, else ``env_endpoint`` (the one this machine's boto3 would use): the Dataset
    names the endpoint the upload went to, so that its pods read from there too."""
    if to == "configmap":
        if not fits:
            raise CommandError(
                f"the dataset does not fit in a ConfigMap ({_mib(size)} with its images, "
                f"embedded; the limit is {_mib(CONFIGMAP_LIMIT)}): name an S3 folder with "
                "--to s3://BUCKET/PREFIX"
            )
        return Placement("configmap")
    if to is not None:
        if to.startswith("pvc://"):
            raise CommandError(_pvc_refusal(to, size))
        return Placement("s3", S3Prefix.parse(to, "--to"), endpoint or env_endpoint, secret)
    if fits:
        return Placement("configmap")
    store = defaults.dataset_store if defaults is not None else ""
    if not store:
        where = (
            f"ConfigMap {defaults.source} names no datasetStore"
            if defaults is not None
            else "the platform's defaults ConfigMap was not found"
        )
        raise CommandError(
            f"the dataset ({_mib(size)} with its images) is too big for a ConfigMap and {where}: "
            "name an S3 folder with --to s3://BUCKET/PREFIX (or ask your platform team for "
            "the chart value defaults.datasetStore)"
        )
    assert defaults is not None
    if store.startswith("pvc://"):
        raise CommandError(
            _pvc_refusal(store, size, f" (the platform's dataset store, {defaults.source})")
        )
    return Placement(
        "s3",
        S3Prefix.parse(store, f"the platform's dataset store ({defaults.source})"),
        endpoint or defaults.model_store_endpoint or env_endpoint,
        secret,
    )


def _pvc_refusal(store: str, size: int, whose: str = "") -> str:
    claim = store.removeprefix("pvc://").split("/", 1)[0]
    return (
        f"{store}{whose} is a PersistentVolumeClaim, which this client cannot write from "
        f"outside the cluster, and the dataset ({_mib(size)} with its images) is too big "
        f"for a ConfigMap: upload it to S3 with --to s3://BUCKET/PREFIX, or copy the file "
        f"and its images onto claim {claim!r} yourself and create a Dataset whose "
        "spec.source.pvc names it"
    )


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.2f} MiB"


def configmap_key(path: Path) -> str:
    """The file's name where a ConfigMap key may have it, else data.jsonl."""
    return path.name if CONFIGMAP_KEY.match(path.name) and len(path.name) <= 253 else "data.jsonl"


def configmap_name(dataset: str, digest: str) -> str:
    return f"{dataset[: 253 - DIGEST_FOLDER - 1]}-{digest[:DIGEST_FOLDER]}"


def s3_folder(placement: Placement, namespace: str, dataset: str, digest: str) -> S3Prefix:
    """The data's folder: ``<prefix>/<namespace>/<name>/<digest>``, the model store's
    layout with the content's digest below it."""
    assert placement.s3 is not None
    base = placement.s3
    return S3Prefix(base.bucket, base.key(namespace, dataset, digest[:DIGEST_FOLDER]))


def uploads(data: LocalData, folder: S3Prefix) -> list[Upload]:
    """The images, then the file (its last is its key)."""
    files = [
        Upload(local, folder.key(key), local.stat().st_size)
        for key, local in sorted(data.images.items())
    ]
    files.append(Upload(data.path, folder.key(data.path.name), data.path.stat().st_size))
    return files


def dataset_manifest(
    name: str,
    namespace: str,
    source: Manifest,
    spec_fields: Mapping[str, Any],
    data: LocalData,
) -> Manifest:
    """The Dataset, checked by the API models before anything is sent."""
    spec = {"source": source, **spec_fields}
    manifest: Manifest = {
        "apiVersion": API_VERSION,
        "kind": DATASET.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {
                ANNOTATION_SHA256: data.sha256,
                ANNOTATION_CONTENT: data.digest,
                ANNOTATION_FILE: data.path.name,
            },
        },
        "spec": spec,
    }
    try:
        TypeAdapter(Name).validate_python(name)
        DatasetSpec.model_validate(spec)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise UsageError(
            f"Dataset {name!r}: {where + ': ' if where else ''}{problem['msg']}"
        ) from None
    return manifest


def configmap_manifest(
    name: str, namespace: str, dataset: str, key: str, text: str, digest: str
) -> Manifest:
    """The file, images embedded. Immutable: its name holds the digest of what it
    holds, so a new version is a new ConfigMap (and a new Dataset spec)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_DATASET: dataset},
            "annotations": {ANNOTATION_CONTENT: digest},
        },
        "immutable": True,
        "data": {key: text},
    }


def source_for(
    placement: Placement, data: LocalData, namespace: str, dataset: str, key: str
) -> Manifest:
    if placement.kind == "configmap":
        ref = ConfigMapSource(name=configmap_name(dataset, data.digest), key=key)
        return {"configMap": ref.model_dump(by_alias=True)}
    folder = s3_folder(placement, namespace, dataset, data.digest)
    s3: Manifest = {"uri": folder.uri(data.path.name)}
    if placement.endpoint:
        s3["endpoint"] = placement.endpoint
    if placement.secret:
        s3["secretRef"] = SecretRef(name=placement.secret).model_dump(by_alias=True)
    return {"s3": s3}


def difference(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> str | None:
    """Why the Dataset there is not the one ``desired`` describes (None: it is). Specs
    are compared as the API models read them, so the defaults the API server filled in
    make no difference."""
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    wanted = desired["metadata"]["annotations"]
    there = annotations.get(ANNOTATION_CONTENT)
    if there != wanted[ANNOTATION_CONTENT]:
        if there is None:
            return "it was not made from a file by this client"
        was = annotations.get(ANNOTATION_FILE) or "another file"
        return (
            f"it holds other data ({was}, sha256 {annotations.get(ANNOTATION_SHA256)}; "
            f"{wanted[ANNOTATION_FILE]} is sha256 {wanted[ANNOTATION_SHA256]})"
        )
    try:
        old = DatasetSpec.model_validate(existing.get("spec") or {})
    except ValidationError:
        return "its spec is not one this client reads"
    new = DatasetSpec.model_validate(desired["spec"])
    if old == new:
        return None
    changed = [
        name for name in DatasetSpec.model_fields if getattr(old, name) != getattr(new, name)
    ]
    return "its spec differs in " + ", ".join(
        DatasetSpec.model_fields[c].alias or c for c in changed
    )


def verdict(dataset: Mapping[str, Any]) -> bool | None:
    """Whether waiting is over: True Ready, False Invalid or Failed, None meanwhile."""
    status = dataset.get("status") or {}
    if not generation_seen(dict(dataset)) or status.get("phase") not in VALIDATED:
        return None
    return status.get("phase") == DatasetPhase.READY


def state(dataset: Mapping[str, Any]) -> str:
    status = dataset.get("status") or {}
    return f"{status.get('phase') or 'Pending'} {status.get('message') or ''}".strip()


# -- pure: showing Datasets ---------------------------------------------------------------


def source_text(spec: Mapping[str, Any]) -> str:
    """A Dataset's source in one word: the URI, claim path or ConfigMap key."""
    source = spec.get("source") or {}
    if "s3" in source:
        return str(source["s3"].get("uri"))
    if "pvc" in source:
        return f"pvc://{source['pvc'].get('claimName')}/{source['pvc'].get('path', '')}"
    if "configMap" in source:
        return f"configmap/{source['configMap'].get('name')}:{source['configMap'].get('key')}"
    if "http" in source:
        return str(source["http"].get("url"))
    if "huggingFace" in source:
        hub = source["huggingFace"]
        return f"hf://{hub.get('repo')}/{hub.get('file')}"
    return ""


def list_rows(items: Sequence[Mapping[str, Any]], now: datetime | None = None) -> str:
    rows = []
    for d in items:
        status = d.get("status") or {}
        rows.append(
            (
                d["metadata"]["name"],
                status.get("phase") or "Pending",
                status.get("examples"),
                status.get("images"),
                status.get("errorCount"),
                status.get("warningCount"),
                (d.get("spec") or {}).get("task", "sft"),
                age(d["metadata"].get("creationTimestamp"), now),
            )
        )
    return table(("name", "phase", "examples", "images", "errors", "warnings", "task", "age"), rows)


def describe(dataset: Mapping[str, Any], now: datetime | None = None) -> str:
    """What `dataset get` shows: where it stands, what validation counted, and the
    problems by line."""
    meta, spec, status = dataset["metadata"], dataset.get("spec") or {}, dataset.get("status") or {}
    annotations = meta.get("annotations") or {}
    text = fields(
        (
            ("Name", meta["name"]),
            ("Namespace", meta.get("namespace")),
            ("Phase", status.get("phase") or "Pending"),
            ("Message", status.get("message")),
            ("Source", source_text(spec)),
            ("Uploaded from", annotations.get(ANNOTATION_FILE)),
            ("Task", spec.get("task")),
            ("Format", spec.get("format")),
            ("Examples", status.get("examples")),
            ("Images", status.get("images")),
            ("Text-only examples", status.get("textOnlyExamples")),
            ("Errors", status.get("errorCount")),
            ("Warnings", status.get("warningCount")),
            ("SHA-256", status.get("sha256")),
            ("Age", age(meta.get("creationTimestamp"), now)),
        )
    )
    for title, key, count in (
        ("Errors", "errors", "errorCount"),
        ("Warnings", "warnings", "warningCount"),
    ):
        problems = status.get(key) or []
        if problems:
            more = (status.get(count) or 0) - len(problems)
            text += f"{title} (first {len(problems)}):\n" if more > 0 else f"{title}:\n"
            text += "".join(f"  line {p.get('line')}: {p.get('message')}\n" for p in problems)
    return text


def problems_text(dataset: Mapping[str, Any]) -> str:
    status = dataset.get("status") or {}
    lines = [f"line {p.get('line')}: {p.get('message')}" for p in status.get("errors") or []]
    lines += [
        f"line {p.get('line')}: warning: {p.get('message')}" for p in status.get("warnings") or []
    ]
    return "".join(f"{line}\n" for line in lines)


# -- the local file ---------------------------------------------------------------------


def validate_locally(args: argparse.Namespace) -> tuple[Any, LocalData]:
    """The validation report and the images named, from this machine's copy; the
    validator imports no torch."""
    from kubetune_trainer.contract.job import DatasetLimits
    from kubetune_trainer.data.validate import validate_file

    path = Path(args.file)
    try:
        report = validate_file(
            path,
            task=args.task or "sft",
            limits=DatasetLimits(),
            deep=bool(args.deep),
            style=args.format or "auto",
        )
    except OSError as exc:
        raise UsageError(f"{exc.filename or path}: {exc.strerror or exc}") from None
    if not report.valid:
        return report, LocalData(path, report.sha256)
    return report, named_images(path, report.sha256, args.task or "sft", args.format or "auto")


def named_images(path: Path, sha256: str, task: str, style: str) -> LocalData:
    """The image files the file's lines name by relative path, as `kubetune
    fetch-images` will look for them beside it in the store."""
    from kubetune_trainer.contract.job import DatasetLimits
    from kubetune_trainer.data.images import resolve_image_path, resolve_image_root
    from kubetune_trainer.fetch_images import confined
    from kubetune_trainer.fetch_images import named_images as named

    paths, _ = named(path, DatasetLimits(), task, style)  # type: ignore[arg-type]
    root = resolve_image_root(path.parent)
    images: dict[str, Path] = {}
    digests: dict[str, str] = {}
    unplaceable = []
    for given in sorted(paths):
        local = resolve_image_path(given, root)
        key = confined(given)
        if key is None:
            unplaceable.append(given)
            continue
        images[key] = local
        digests[key] = _file_sha256(local)
    return LocalData(path, sha256, images, digests, tuple(unplaceable))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded(data: LocalData, style: str) -> str | None:
    """The file with its images as data: URIs (`kubetune convert --embed-images`),
    where that fits in a ConfigMap; None where it does not."""
    from kubetune_trainer.contract.job import DatasetLimits
    from kubetune_trainer.data.convert import convert_file

    key = configmap_key(data.path)
    # Base64 makes each image 4/3 its size: no need to convert what cannot fit.
    if (
        len(key)
        + data.path.stat().st_size
        + sum(4 * p.stat().st_size // 3 for p in data.images.values())
        > CONFIGMAP_LIMIT
    ):
        return None
    with tempfile.TemporaryDirectory(prefix="kubetune-") as tmp:
        out = Path(tmp) / "embedded.jsonl"
        result = convert_file(
            data.path,
            out,
            "placeholder" if style == "placeholder" else "content-parts",
            embed_images=True,
            limits=DatasetLimits(),
        )
        if not result.ok or out.stat().st_size + len(key) > CONFIGMAP_LIMIT:
            return None
        try:
            return out.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return None


# -- the commands -------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "dataset",
        help="create, list and show Datasets",
        description="Datasets: chat-JSONL files validated before any GPU is booked.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = group.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create",
        parents=[COMMAND_OPTIONS],
        help="validate a local JSONL file, upload it with its images, make a Dataset",
        description=(
            "Validate FILE here (the validation Job's rules and line-numbered messages; "
            "an invalid file uploads and creates nothing), then put it and every image its "
            "lines name by relative path into a ConfigMap (images embedded as data: URIs) "
            "where it all fits, else into S3 (--to, else the platform's dataset store), "
            "and create Dataset NAME."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("name", metavar="NAME", help="the Dataset")
    create.add_argument(
        "-f",
        "--filename",
        dest="file",
        required=True,
        metavar="FILE",
        help="the JSONL file; relative image paths resolve in its folder",
    )
    add_flags(create, SPEC_FLAGS)
    create.add_argument(
        "--to",
        metavar="configmap|s3://BUCKET/PREFIX",
        help="where the data goes: a ConfigMap (it must fit), or an S3 folder (the data "
        "goes to PREFIX/NAMESPACE/NAME/DIGEST/). Default: a ConfigMap where it fits, else "
        "the platform's dataset store",
    )
    create.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible endpoint (MinIO, Ceph...) of --to, for this upload and the "
        "validation and training pods. Default: the platform's for its store, else "
        "$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS",
    )
    create.add_argument(
        "--s3-secret",
        metavar="SECRET",
        help="the Secret (in the namespace) with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "with which the pods read the data. Default: none, the pods' own identity",
    )
    create.add_argument(
        "--replace",
        action="store_true",
        help="replace a Dataset of that name that holds other data (or another spec)",
    )
    create.add_argument(
        "--wait",
        action="store_true",
        help="wait until the Dataset is Ready (exit 0) or Invalid (its errors; exit 1)",
    )
    create.add_argument(
        "--timeout",
        type=float,
        default=WAIT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long --wait waits (default: {WAIT_TIMEOUT:g})",
    )
    create.add_argument(
        "--kubetune-namespace",
        metavar="NAMESPACE",
        help="the namespace kubetune is installed in, where the platform's defaults are "
        "(default: $KUBETUNE_NAMESPACE, else kubetune-system)",
    )
    create.add_argument(
        "--kubetune-defaults",
        metavar="CONFIGMAP",
        help="the platform's defaults ConfigMap, <release fullname>-defaults (default: "
        "$KUBETUNE_DEFAULTS, else kubetune-defaults)",
    )
    add_dry_run(create)
    create.set_defaults(run=run_create)

    listing = commands.add_parser(
        "list",
        parents=[COMMAND_OPTIONS],
        help="the namespace's Datasets",
        aliases=["ls"],
    )
    listing.set_defaults(run=run_list)

    get = commands.add_parser(
        "get",
        parents=[COMMAND_OPTIONS],
        help="one Dataset: phase, counts, errors and warnings by line",
    )
    get.add_argument("name", metavar="NAME")
    get.set_defaults(run=run_get)


def run_create(args: argparse.Namespace, context: Context) -> int:
    name = args.name
    if not _valid_name(name):
        raise UsageError(
            f"{name!r} is not a valid name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    if (
        args.to is not None
        and args.to != "configmap"
        and not args.to.startswith(("s3://", "pvc://"))
    ):
        raise UsageError(f"--to takes configmap or s3://BUCKET/PREFIX, not {args.to!r}")
    report, data = validate_locally(args)
    if not report.valid:
        if context.output != "table":
            print_objects([report.to_json()], context.output)
        for line in report.plain_lines(str(data.path)):
            print(line, file=sys.stderr)
        error(f"{data.path} is invalid: nothing was uploaded and no Dataset was created")
        return EXIT_FAILED
    for problem in report.warnings:
        print(f"{problem}", file=sys.stderr)
    spec_fields = {
        key: value
        for key, value in (
            ("task", args.task),
            ("format", args.format),
            ("deep", args.deep),
            ("queueName", args.queue),
        )
        if value is not None
    }
    text = embedded(data, args.format or "auto") if args.to in (None, "configmap") else None
    defaults = None
    if text is None and args.to is None:
        defaults = read_defaults(
            context, *defaults_location(args.kubetune_namespace, args.kubetune_defaults)
        )
    placement = choose_placement(
        args.to,
        text is not None,
        defaults,
        endpoint=args.s3_endpoint,
        env_endpoint=env_endpoint(),
        secret=args.s3_secret,
        size=data.size,
    )
    if placement.kind == "s3" and data.unplaceable:
        raise CommandError(
            f"{data.path}: image paths {', '.join(data.unplaceable[:5])} are absolute; in S3 "
            "images sit beside the file: write their paths relative to its folder"
        )
    ns = context.namespace
    key = configmap_key(data.path)
    desired = dataset_manifest(
        name, ns, source_for(placement, data, ns, name, key), spec_fields, data
    )
    configmap = (
        configmap_manifest(configmap_name(name, data.digest), ns, name, key, text, data.digest)
        if placement.kind == "configmap" and text is not None
        else None
    )
    resource = f"{DATASET.singular}.{GROUP}/{name}"
    if args.dry_run == "client":
        objects = [o for o in (configmap, desired) if o is not None]
        if context.output == "table":
            for o in objects:
                print(f"{o['kind'].lower()}/{o['metadata']['name']} created (dry run)")
        else:
            print_objects([for_git(o, args.namespace) for o in objects], context.output)
        return EXIT_OK

    existing = kube.get(context, DATASET.plural, name)
    if existing is not None:
        why = difference(existing, desired)
        if why is None:
            _tell(context, f"{resource} unchanged (the same data)")
            return _finish(args, context, existing)
        if not args.replace:
            raise CommandError(
                f"Dataset {name!r} already exists in namespace {ns!r} and {why}: "
                "pass --replace to replace it, or choose another name"
            )
    server_dry = args.dry_run == "server"
    if placement.kind == "s3" and not server_dry:
        assert placement.s3 is not None
        folder = s3_folder(placement, ns, name, data.digest)
        files = uploads(data, folder)
        upload(files, folder.bucket, placement.endpoint)
        sent = size_text(sum(f.size for f in files))
        _tell(context, f"uploaded {len(files)} files ({sent}) to {folder.uri()}/")
    if configmap is not None:
        _create_configmap(context, configmap, server_dry)
    try:
        written = _write_dataset(context, desired, existing, server_dry)
    except BaseException:
        # No Dataset names it, and none will: leave nothing behind.
        if configmap is not None and not server_dry:
            _delete_quietly(context, configmap["metadata"]["name"])
        raise
    verb = "replaced" if existing is not None else "created"
    if server_dry:
        _tell(context, f"{resource} {verb} (server dry run)")
        if context.output != "table":
            print_objects([o for o in (configmap, written) if o is not None], context.output)
        return EXIT_OK
    if configmap is not None:
        _own(context, configmap, written)
    if existing is not None:
        _drop_old_configmap(context, existing, desired)
    _tell(context, f"{resource} {verb}")
    return _finish(args, context, written)


def _valid_name(name: str) -> bool:
    try:
        TypeAdapter(Name).validate_python(name)
    except ValidationError:
        return False
    return True


def _tell(context: Context, line: str) -> None:
    """A progress line: on stdout in the table output, on stderr where stdout is JSON
    or YAML for a program to read."""
    print(line, file=sys.stdout if context.output == "table" else sys.stderr)


def _finish(args: argparse.Namespace, context: Context, dataset: Manifest) -> int:
    if not args.wait:
        if context.output != "table":
            print_objects([dataset], context.output)
        return EXIT_OK
    name = dataset["metadata"]["name"]
    final, ready = wait_until(
        lambda: kube.get(context, DATASET.plural, name),
        verdict,
        state,
        what=f"dataset {name}",
        timeout=args.timeout,
    )
    if context.output != "table":
        print_objects([final], context.output)
    else:
        print(describe(final), end="")
    if not ready:
        if context.output != "table":
            sys.stderr.write(problems_text(final))
        status = final.get("status") or {}
        error(f"Dataset {name!r} is {status.get('phase')}: {status.get('message') or ''}")
        return EXIT_FAILED
    return EXIT_OK


def _create_configmap(context: Context, configmap: Manifest, dry_run: bool) -> None:
    from kubernetes.client.exceptions import ApiException

    options = {"dry_run": "All"} if dry_run else {}
    try:
        kube.core(context).create_namespaced_config_map(context.namespace, configmap, **options)
    except ApiException as exc:
        # The same content, already there (an earlier try that stopped before the Dataset).
        if exc.status != 409:
            raise


def _write_dataset(
    context: Context, desired: Manifest, existing: Manifest | None, dry_run: bool
) -> Manifest:
    api = kube.custom_objects(context)
    options = {"dry_run": "All"} if dry_run else {}
    if existing is None:
        created: Manifest = api.create_namespaced_custom_object(
            GROUP, VERSION, context.namespace, DATASET.plural, desired, **options
        )
        return created
    # The object as read (its resourceVersion: a conflicting change fails with 409),
    # its own annotations kept, with the new spec and data annotations.
    meta = dict(existing["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), **desired["metadata"]["annotations"]}
    body = {**existing, "metadata": meta, "spec": desired["spec"]}
    body.pop("status", None)
    replaced: Manifest = api.replace_namespaced_custom_object(
        GROUP,
        VERSION,
        context.namespace,
        DATASET.plural,
        desired["metadata"]["name"],
        body,
        **options,
    )
    return replaced


def _delete_quietly(context: Context, configmap: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        kube.core(context).delete_namespaced_config_map(configmap, context.namespace)
    except ApiException as exc:
        print(f"warning: could not delete ConfigMap {configmap}: {exc.reason}", file=sys.stderr)


def _own(context: Context, configmap: Manifest, dataset: Manifest) -> None:
    """The Dataset owns its ConfigMap: deleting the Dataset deletes the data."""
    meta = dataset["metadata"]
    owner = {
        "apiVersion": API_VERSION,
        "kind": DATASET.kind,
        "name": meta["name"],
        "uid": meta["uid"],
    }
    kube.core(context).patch_namespaced_config_map(
        configmap["metadata"]["name"],
        context.namespace,
        {"metadata": {"ownerReferences": [owner]}},
    )


def _drop_old_configmap(context: Context, existing: Manifest, desired: Manifest) -> None:
    """The ConfigMap this client made for the data replaced, now that nothing names it."""
    from kubernetes.client.exceptions import ApiException

    old = ((existing.get("spec") or {}).get("source") or {}).get("configMap") or {}
    new = (desired["spec"]["source"].get("configMap") or {}).get("name")
    if not old.get("name") or old["name"] == new:
        return
    core = kube.core(context)
    try:
        found = core.read_namespaced_config_map(old["name"], context.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    labels = found.metadata.labels or {}
    if (
        labels.get("app.kubernetes.io/managed-by") == MANAGED_BY
        and labels.get(LABEL_DATASET) == existing["metadata"]["name"]
    ):
        core.delete_namespaced_config_map(old["name"], context.namespace)


def run_list(args: argparse.Namespace, context: Context) -> int:
    items = kube.list_objects(context, DATASET.plural)
    if context.output != "table":
        print_objects([{"apiVersion": "v1", "kind": "List", "items": items}], context.output)
        return EXIT_OK
    if not items:
        print(f"No Datasets in namespace {context.namespace}.", file=sys.stderr)
        return EXIT_OK
    print(list_rows(items), end="")
    return EXIT_OK


def run_get(args: argparse.Namespace, context: Context) -> int:
    found = kube.get(context, DATASET.plural, args.name)
    if found is None:
        raise CommandError(f"Dataset {args.name!r} not found in namespace {context.namespace!r}")
    if context.output != "table":
        print_objects([found], context.output)
    else:
        print(describe(found), end="")
    return EXIT_OK
