"""Where `dataset create` puts a dataset: the platform's defaults (the ConfigMap the
chart publishes for every authenticated user), the stores they name, and the upload
of a file and its images to S3 with a progress bar.

The defaults ConfigMap is found by name, not by a label selector: the chart lets
every user `get` that one ConfigMap and nothing else in the release namespace (no
`list`), so only a name reaches it. The name is the chart's for release `kubetune`
in `kubetune-system`, the namespace of the chart's install instructions; another
install is named with ``--kubetune-namespace`` / ``--kubetune-defaults`` or the
environment's KUBETUNE_NAMESPACE / KUBETUNE_DEFAULTS, as kubectl plugins take their
settings."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kubetune_cli.context import Context
from kubetune_cli.output import CommandError, api_message

PLATFORM_NAMESPACE = "kubetune-system"
DEFAULTS_CONFIGMAP = "kubetune-defaults"
NAMESPACE_VARIABLE = "KUBETUNE_NAMESPACE"
DEFAULTS_VARIABLE = "KUBETUNE_DEFAULTS"
# The endpoint variables boto3 itself reads (the service-specific one first).
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
PARALLEL_UPLOADS = 8  # images are many and small: latency, not bandwidth, bounds an upload


@dataclass(frozen=True)
class PlatformDefaults:
    """What the chart's ``defaults`` publish to clients (templates/defaults.yaml)."""

    dataset_store: str = ""
    model_store: str = ""
    model_store_endpoint: str = ""
    source: str = ""  # namespace/name of the ConfigMap, for messages

    @classmethod
    def from_data(cls, data: Mapping[str, str], source: str = "") -> PlatformDefaults:
        return cls(
            dataset_store=(data.get("datasetStore") or "").strip(),
            model_store=(data.get("modelStore") or "").strip(),
            model_store_endpoint=(data.get("modelStoreEndpoint") or "").strip(),
            source=source,
        )


def defaults_location(namespace: str | None, name: str | None) -> tuple[str, str]:
    """The defaults ConfigMap's namespace and name: the flags, else the environment,
    else the chart's for release `kubetune` in `kubetune-system`."""
    return (
        namespace or os.environ.get(NAMESPACE_VARIABLE) or PLATFORM_NAMESPACE,
        name or os.environ.get(DEFAULTS_VARIABLE) or DEFAULTS_CONFIGMAP,
    )


def read_defaults(context: Context, namespace: str, name: str) -> PlatformDefaults | None:
    """The platform's defaults, or None where that ConfigMap does not exist."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        found = client.CoreV1Api(context.api_client).read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise CommandError(
            f"cannot read the platform's defaults, ConfigMap {namespace}/{name}: "
            f"{api_message(exc)} (name another with --kubetune-namespace and "
            "--kubetune-defaults)"
        ) from None
    return PlatformDefaults.from_data(found.data or {}, f"{namespace}/{name}")


@dataclass(frozen=True)
class S3Prefix:
    bucket: str
    prefix: str  # no leading or trailing '/'

    @classmethod
    def parse(cls, text: str, what: str) -> S3Prefix:
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not text.startswith("s3://") or not bucket:
            raise CommandError(f"{what}: expected s3://BUCKET/PREFIX, not {text!r}")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


def env_endpoint() -> str | None:
    """The S3 endpoint this machine's boto3 would use by itself, from the environment."""
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


@dataclass(frozen=True)
class Upload:
    """One file to send: where it is here and its key in the bucket."""

    local: Path
    key: str
    size: int


class Progress:
    """Bytes sent so far: a bar on a terminal (tqdm), plain lines at every tenth
    otherwise (a CI log, a pipe), where a bar's carriage returns would be noise."""

    def __init__(self, total: int, files: int, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.total, self.files, self.stream = total, files, stream
        self.sent = 0
        self.lock = threading.Lock()
        self.bar: Any = None
        self.tenths = 0  # the last tenth of the total told
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"uploading {files} files",
                file=stream,
                leave=True,
            )

    def add(self, sent: int) -> None:
        with self.lock:
            self.sent += sent
            if self.bar is not None:
                self.bar.update(sent)
                return
            tenths = self.sent * 10 // self.total if self.total else 10
            if tenths > self.tenths:
                self.tenths = tenths
                print(
                    f"uploaded {size_text(self.sent)} of {size_text(self.total)} "
                    f"({self.sent / max(self.total, 1):.0%})",
                    file=self.stream,
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def upload(
    uploads: Sequence[Upload],
    bucket: str,
    endpoint: str | None,
    progress: Callable[[int, int], Progress] = Progress,
) -> None:
    """Every file to its key, several at a time, the last one (the JSONL file, which
    names the others) only once the rest are there. boto3 finds the credentials
    (environment, profile, SSO, instance identity) by its own chain."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client("s3", endpoint_url=endpoint or None)
    config = TransferConfig(use_threads=True)
    shown = progress(sum(u.size for u in uploads), len(uploads))

    def send(item: Upload) -> None:
        try:
            s3.upload_file(str(item.local), bucket, item.key, Callback=shown.add, Config=config)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise CommandError(
                f"cannot upload {item.local} to s3://{bucket}/{item.key}: {exc}"
            ) from None

    try:
        *first, last = uploads
        with ThreadPoolExecutor(PARALLEL_UPLOADS) as pool:
            list(pool.map(send, first))
        send(last)
    finally:
        shown.close()
