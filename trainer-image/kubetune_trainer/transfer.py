"""Copies between the pod and remote storage: `kubetune fetch` brings a Dataset file or a
model folder from http(s), S3 or a model hub into the pod, for the sources a volume
cannot mount; `upload_s3` sends the trained model to S3. Credentials come from the
environment, which the operator fills only from Secret references."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kubetune_trainer.contract.fetch import DEFAULT_REVISION, FetchSource
from kubetune_trainer.data import remote
from kubetune_trainer.data.commands import memory_size


class FetchError(Exception):
    pass


class NotFound(FetchError):
    """The source answered that there is no such object or file."""


def atomic_target(out: Path) -> tuple[int, str]:
    # Write beside the target and rename, so that a failed fetch never leaves half a file.
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")


DOWNLOAD_TIMEOUT_S = 3600.0
"""The deadline of one http or hub download, from the first DNS query to the last byte."""
MAX_DOWNLOAD_BYTES = 16 << 30
"""The largest file an http or hub download may bring into the pod's emptyDir."""


def fetch_http(
    url: str, out: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S, max_bytes: int = MAX_DOWNLOAD_BYTES
) -> None:
    """A Dataset's ``http`` source: any public http(s) URL."""
    _download(url, out, timeout, max_bytes, url)


def fetch_hugging_face(
    repo: str,
    file: str,
    revision: str,
    out: Path,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> None:
    """A dataset repository's file, by its resolve URL on the hub (``HF_ENDPOINT``),
    through the same fetcher as any URL. The token (``HF_TOKEN``) goes to the hub
    only, not to the storage host its redirect names."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    token = {k: headers.pop(k) for k in list(headers) if k.lower() == "authorization"}
    _download(
        hf_hub_url(repo, file, repo_type="dataset", revision=revision),
        out,
        timeout,
        max_bytes,
        f"{file} from dataset repository {repo}@{revision}",
        headers,
        token,
    )


def _download(
    url: str,
    out: Path,
    timeout: float,
    max_bytes: int,
    what: str,
    headers: dict[str, str] | None = None,
    credentials: dict[str, str] | None = None,
) -> None:
    """``url`` to the file ``out`` through the guarded fetcher (``data/remote.py``):
    public addresses only, at every redirect; one deadline; a size cap."""
    fd, tmp = atomic_target(out)
    try:
        with os.fdopen(fd, "wb") as f:
            remote.fetch_to(
                url, f, max_bytes, timeout=timeout, headers=headers, credentials=credentials
            )
        os.replace(tmp, out)
    except (remote.RemoteError, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        missing = isinstance(exc, remote.RemoteError) and exc.status == 404
        raise (NotFound if missing else FetchError)(f"cannot download {what}: {exc}") from None


def _s3_client() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise FetchError("S3 needs boto3 in the trainer image") from exc
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Any failure of the S3 calls inside as a FetchError that says what was being done."""
    try:
        yield
    except FetchError:
        raise
    except Exception as exc:
        raise FetchError(f"{what}: {exc}") from exc


def _keys(s3: Any, bucket: str, prefix: str) -> Iterator[str]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from (obj["Key"] for obj in page.get("Contents", []))


def upload_s3(
    folder: Path, uri: str, exclude: tuple[str, ...] = (), last: tuple[str, ...] = ()
) -> int:
    """Every file under `folder` (but the top-level names in `exclude`) to the prefix
    `uri`, the top-level names in `last` after all others; returns the number of files.
    Keys keep their relative paths."""
    bucket, prefix = _split(uri)
    prefix = prefix.rstrip("/")
    s3 = _s3_client()
    files = [
        path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] not in exclude
    ]
    files.sort(key=lambda path: path.relative_to(folder).parts[0] in last)
    with _s3_errors(f"cannot upload {folder} to {uri}"):
        for path in files:
            rel = path.relative_to(folder).as_posix()
            s3.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)
    return len(files)


def s3_folders(uri: str) -> list[str]:
    """The names of the "folders" (common prefixes) right under the prefix `uri`."""
    bucket, prefix = _split(uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    s3 = _s3_client()
    names: list[str] = []
    with _s3_errors(f"cannot list {uri}"):
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            ]
    return names


def s3_exists(uri: str) -> bool:
    bucket, key = _split(uri)
    with _s3_errors(f"cannot read {uri}"):
        listing = _s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        return bool(listing.get("KeyCount"))


def delete_s3(uri: str) -> None:
    """Every object under the prefix `uri`."""
    bucket, prefix = _split(uri)
    s3 = _s3_client()
    with _s3_errors(f"cannot delete {uri}"):
        keys = [{"Key": key} for key in _keys(s3, bucket, prefix)]
        for start in range(0, len(keys), 1000):  # delete_objects takes 1000 at most
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start : start + 1000]})


def fetch_s3(uri: str, out: Path, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    """An object of at most ``max_bytes`` to a file, or every object under a prefix
    (ending in '/') to a folder."""
    bucket, key = _split(uri)
    s3 = _s3_client()
    with _s3_errors(f"cannot download {uri}"):
        if not key.endswith("/") and key:
            size = _s3_size(s3, bucket, key, uri)
            if size > max_bytes:
                raise FetchError(f"{uri} is {size:,} bytes, more than {max_bytes:,}")
            fd, tmp = atomic_target(out)
            os.close(fd)
            try:
                s3.download_file(bucket, key, tmp)
            except Exception:
                Path(tmp).unlink(missing_ok=True)
                raise
            os.replace(tmp, out)
            return
        for name in _keys(s3, bucket, key):
            rel = name[len(key) :]
            if not rel or rel.endswith("/"):
                continue
            target = (out / rel).resolve()
            if not target.is_relative_to(out.resolve()):
                raise FetchError(f"object key {name!r} would land outside {out}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, name, str(target))


def _s3_size(s3: Any, bucket: str, key: str, uri: str) -> int:
    from botocore.exceptions import ClientError

    try:
        size: int = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise NotFound(f"cannot download {uri}: there is no such bucket or key") from None
        raise
    return size


def fetch(
    source: FetchSource,
    out: Path,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> None:
    """``timeout`` and ``max_bytes`` bound the http and hub downloads (``max_bytes`` an
    S3 object's too); S3 goes through boto3, to the endpoint the Dataset names. A
    missing object or file raises ``NotFound``."""
    if source.http is not None:
        fetch_http(source.http.url, out, timeout=timeout, max_bytes=max_bytes)
    elif source.hugging_face is not None:
        hub = source.hugging_face
        fetch_hugging_face(
            hub.repo, hub.file, hub.revision, out, timeout=timeout, max_bytes=max_bytes
        )
    elif source.s3 is not None:
        fetch_s3(source.s3.uri, out, max_bytes)


class SourceError(Exception):
    """``--source`` is not a usable source: a usage error."""


def parse_source(text: str) -> FetchSource:
    """The ``--source`` JSON as a ``FetchSource``, or ``SourceError`` saying what is
    wrong with it."""
    try:
        given = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"--source is not JSON: {str(exc)[:200]}") from None
    if not isinstance(given, dict):
        raise SourceError("--source is not a JSON object")
    try:
        source = FetchSource.model_validate(given)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in error["loc"]) + ": " + error["msg"]
            if error["loc"]
            else error["msg"]
            for error in exc.errors()
        )
        raise SourceError(
            f"unusable source: {problems} (expected exactly one of http, s3 or huggingFace)"
        ) from None
    hub = source.hugging_face
    if hub is not None:
        _check_hub_file(hub.repo, hub.file)
    return source


def _check_hub_file(repo: str, file: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise SourceError(f"{repo!r} is not a repository id (name or namespace/name)") from None
    if any(part in ("", ".", "..") for part in file.split("/")):
        raise SourceError(f"{file!r} is not a path inside the repository")


def _run(args: argparse.Namespace) -> int:
    try:
        source = parse_source(args.source)
    except SourceError as exc:
        print(f"kubetune fetch: {exc}", file=sys.stderr)
        return 2
    try:
        fetch(source, Path(args.out), timeout=args.timeout, max_bytes=args.max_bytes)
    except FetchError as exc:
        print(f"kubetune fetch: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fetch", help="copy a dataset or model from http(s), S3 or a model hub into the pod"
    )
    p.add_argument(
        "--source",
        required=True,
        help='JSON: {"http": {"url"}} | {"s3": {"uri"}} | {"huggingFace": {"repo", "file", "revision"}}'
        f" (revision: {DEFAULT_REVISION} unless given)",
    )
    p.add_argument("--out", required=True, help="file (or folder, for an S3 prefix) to write")
    p.add_argument(
        "--timeout",
        type=float,
        default=DOWNLOAD_TIMEOUT_S,
        help="seconds an http or hub download may take, all of it (default: %(default)g)",
    )
    p.add_argument(
        "--max-bytes",
        type=memory_size,
        default=MAX_DOWNLOAD_BYTES,
        help="largest file an http or hub download may bring, as 1000, 64Mi or 2Gi "
        f"(default: {MAX_DOWNLOAD_BYTES >> 30}Gi)",
    )
    p.set_defaults(func=_run)
