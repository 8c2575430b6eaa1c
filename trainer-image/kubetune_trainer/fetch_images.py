"""`kubetune fetch-images`: the images a Dataset's lines name, brought into the pod by
an init container before validation or a run reads the file.

* Relative paths of a Dataset on S3, http(s) or the hub: fetched from beside the file
  (or from its ``imageRoot``: a key prefix in the bucket, a path on the site, a folder
  in the repository) into a folder that becomes the image root. A path that would
  leave the root is not fetched; validation reports it on its line, as it does an
  image that is not there.
* http(s) URLs (``allowRemoteImages``), for a run: each fetched once, through the one
  fetcher and its address rules, to ``fetched_name(url)`` in the run's folder of them,
  and checked against the digest that validation recorded. So the training pod opens
  no connection for data, and trains on the bytes that were validated.

Lines that do not parse are skipped: reporting them is validation's work.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin, urlsplit

from pydantic import ValidationError

from kubetune_trainer import transfer
from kubetune_trainer.contract.fetch import FetchSource, HttpFile, HubFile, S3Object
from kubetune_trainer.contract.job import DatasetLimits, Task
from kubetune_trainer.data import remote
from kubetune_trainer.data.example import ImageRef
from kubetune_trainer.data.images import describe, fetched_name, remote_images_sha256
from kubetune_trainer.data.reader import Record, iter_records

PARALLEL = 8
"""Downloads at a time: images are many and small, so latency, not bandwidth, bounds
a fetch."""
REMOTE_TIMEOUT_S = 60.0
"""The deadline of one image download."""


def named_images(
    data: Path, limits: DatasetLimits, task: Task, style: str
) -> tuple[set[str], set[str]]:
    """(relative paths, URLs) that the file's parsed lines name, each once."""
    paths: set[str] = set()
    urls: set[str] = set()
    with data.open("rb") as fp:
        for item in iter_records(fp, limits=limits, task=task, style=style):
            if not isinstance(item, Record):
                continue
            example = item.example
            for ref in (*example.images, *(example.rejected_images or ())):
                if ref.kind == "path":
                    paths.add(ref.source)
                elif ref.kind == "url":
                    urls.add(ref.source)
    return paths, urls


def confined(path: str) -> str | None:
    """``path`` normalized, or None where it would leave the image root."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    clean = posixpath.normpath(path)
    if clean == ".." or clean.startswith("../") or clean == ".":
        return None
    return clean


def beside(source: FetchSource, image_root: str | None, path: str) -> FetchSource:
    """Where the image at ``path`` (``confined``) is, for a Dataset file at ``source``."""
    if source.s3 is not None:
        bucket, key = urlsplit(source.s3.uri).netloc, urlsplit(source.s3.uri).path.lstrip("/")
        folder = image_root if image_root is not None else posixpath.dirname(key)
        return FetchSource(s3=S3Object(uri=f"s3://{bucket}/{posixpath.join(folder, path)}"))
    if source.http is not None:
        url = source.http.url
        folder = urljoin(url, "/" + image_root.strip("/") + "/") if image_root else url
        return FetchSource(http=HttpFile(url=urljoin(folder, quote(path))))
    hub = source.hugging_face
    assert hub is not None  # FetchSource holds exactly one
    folder = image_root if image_root is not None else posixpath.dirname(hub.file)
    return FetchSource(
        hugging_face=HubFile(
            repo=hub.repo, file=posixpath.join(folder, path), revision=hub.revision
        )
    )


def fetch_beside(
    paths: Iterable[str], source: FetchSource, image_root: str | None, out: Path, cap: int
) -> int:
    """Each path that stays in the root, from beside the Dataset file into ``out``;
    returns how many were there. Missing ones are left for validation to report."""
    wanted = sorted({clean for p in paths if (clean := confined(p)) is not None})

    def one(path: str) -> bool:
        try:
            transfer.fetch(beside(source, image_root, path), out / path, max_bytes=cap)
        except transfer.NotFound:
            return False
        return True

    with ThreadPoolExecutor(PARALLEL) as pool:
        return sum(pool.map(one, wanted))


class _Hashing:
    """A file that hashes what is written to it."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fp.write(data)


def fetch_remote(urls: Iterable[str], out: Path, cap: int, expected: str | None) -> int:
    """Each URL once into ``out``, checked as a whole against ``expected`` (the
    Dataset's ``remoteImagesSha256``); returns how many."""
    out.mkdir(parents=True, exist_ok=True)

    def one(url: str) -> tuple[str, str]:
        target = out / fetched_name(url)
        fd, tmp = transfer.atomic_target(target)
        try:
            with os.fdopen(fd, "wb") as fp:
                hashing = _Hashing(fp)
                remote.fetch_to(url, hashing, cap, timeout=REMOTE_TIMEOUT_S)
            os.replace(tmp, target)
        except (remote.RemoteError, OSError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise transfer.FetchError(
                f"cannot fetch remote image {describe(ImageRef(url))}: {exc}"
            ) from None
        return url, hashing.digest.hexdigest()

    with ThreadPoolExecutor(PARALLEL) as pool:
        digests = dict(pool.map(one, sorted(set(urls))))
    if expected is not None and remote_images_sha256(digests) != expected:
        raise transfer.FetchError(
            f"the {len(digests)} remote images are not the ones validated: an image changed "
            "at its URL since the Dataset was validated. Validate it again (change its spec, "
            "or delete and apply it) before training on it"
        )
    return len(digests)


def _run(args: argparse.Namespace) -> int:
    try:
        limits = DatasetLimits.model_validate_json(args.limits)
        source = transfer.parse_source(args.source) if args.source else None
    except (ValidationError, transfer.SourceError) as exc:
        print(f"kubetune fetch-images: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    paths, urls = named_images(Path(args.data), limits, args.task, args.format)
    try:
        if source is not None and args.images_out:
            # The image root exists even when no line names a relative path.
            Path(args.images_out).mkdir(parents=True, exist_ok=True)
            found = fetch_beside(
                paths, source, args.image_root, Path(args.images_out), limits.max_image_bytes
            )
            print(f"fetched {found} of {len(paths)} images named by relative path")
        if args.remote_out and urls:
            count = fetch_remote(
                urls, Path(args.remote_out), limits.max_image_bytes, args.remote_sha256
            )
            print(f"fetched {count} remote images")
    except transfer.FetchError as exc:
        print(f"kubetune fetch-images: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fetch-images",
        help="bring the images a dataset's lines name into the pod (relative paths from "
        "beside a remote file, and http(s) URLs)",
    )
    p.add_argument("--data", required=True, help="the dataset file (already in the pod)")
    p.add_argument("--limits", default="{}", help="the Dataset's limits as JSON")
    p.add_argument("--task", choices=("sft", "dpo"), default="sft")
    p.add_argument("--format", default="auto", help="the Dataset's format (auto by default)")
    p.add_argument(
        "--source",
        help="the `kubetune fetch` source of the dataset file: its relative image paths "
        "are fetched from beside it",
    )
    p.add_argument("--image-root", help="with --source: the image root in that store")
    p.add_argument("--images-out", help="with --source: the folder to fetch them into")
    p.add_argument("--remote-out", help="fetch the http(s) image URLs into this folder")
    p.add_argument("--remote-sha256", help="with --remote-out: the digest that validation recorded")
    p.set_defaults(func=_run)
