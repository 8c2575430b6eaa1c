"""Copies between the pod and remote storage: `kubetune fetch` brings a Dataset file or a
model folder from http(s), S3 or a model hub into the pod, for the sources a volume
cannot mount; `upload_s3` sends the trained model to S3. Credentials come from the
environment, which the operator fills only from Secret references."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kubetune_trainer.contract.fetch import DEFAULT_REVISION, FetchSource


class FetchError(Exception):
    pass


def _atomic_target(out: Path) -> tuple[int, str]:
    # Write beside the target and rename, so that a failed fetch never leaves half a file.
    out.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")


def fetch_http(url: str, out: Path, timeout: float = 60) -> None:
    fd, tmp = _atomic_target(out)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, f, 1 << 20)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FetchError(f"cannot download {url}: {exc}") from exc


def fetch_hugging_face(repo: str, file: str, revision: str, out: Path) -> None:
    from huggingface_hub import hf_hub_download

    try:
        cached = hf_hub_download(
            repo_id=repo, filename=file, revision=revision, repo_type="dataset"
        )
    except Exception as exc:
        raise FetchError(
            f"cannot download {file} from dataset repository {repo}@{revision}: {exc}"
        ) from exc
    fd, tmp = _atomic_target(out)
    os.close(fd)
    shutil.copyfile(cached, tmp)
    os.replace(tmp, out)


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


def fetch_s3(uri: str, out: Path) -> None:
    """An object to a file, or every object under a prefix (ending in '/') to a folder."""
    bucket, key = _split(uri)
    s3 = _s3_client()
    with _s3_errors(f"cannot download {uri}"):
        if not key.endswith("/") and key:
            fd, tmp = _atomic_target(out)
            os.close(fd)
            s3.download_file(bucket, key, tmp)
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


def fetch(source: FetchSource, out: Path) -> None:
    if source.http is not None:
        fetch_http(source.http.url, out)
    elif source.hugging_face is not None:
        hub = source.hugging_face
        fetch_hugging_face(hub.repo, hub.file, hub.revision, out)
    elif source.s3 is not None:
        fetch_s3(source.s3.uri, out)


def _run(args: argparse.Namespace) -> int:
    try:
        given = json.loads(args.source)
        if not isinstance(given, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        print(f"kubetune fetch: --source is not a JSON object: {exc}", file=sys.stderr)
        return 2
    try:
        fetch(_source(given), Path(args.out))
    except FetchError as exc:
        print(f"kubetune fetch: {exc}", file=sys.stderr)
        return 1
    return 0


def _source(given: dict[str, Any]) -> FetchSource:
    try:
        return FetchSource.model_validate(given)
    except ValidationError as exc:
        problems = "; ".join(error["msg"] for error in exc.errors())
        raise FetchError(
            f"unusable source {sorted(given)}: {problems} (expected exactly one of http, s3 or "
            "huggingFace)"
        ) from exc


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
    p.set_defaults(func=_run)
