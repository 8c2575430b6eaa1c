"""`kubetune fetch-images`: a remote Dataset's images come from beside its file, under
the path rules; http(s) images are fetched once before a run and must be the ones
validation saw; training then reads them from the pod, and a platform's trusted host
is the only way past the address rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_helpers import image_bytes, sft, write_jsonl
from local_web import Web, serve

from kubetune_trainer.cli import main
from kubetune_trainer.contract.fetch import TRUSTED_HOSTS_VARIABLE, FetchSource
from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import DatasetError, open_image, remote
from kubetune_trainer.data.example import ImageRef
from kubetune_trainer.data.images import fetched_name
from kubetune_trainer.data.validate import validate_file
from kubetune_trainer.fetch_images import beside, confined

PNG = image_bytes("PNG")
REMOTE = DatasetLimits(allow_remote_images=True)


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    with serve(monkeypatch) as server:
        server.files["/sets/train.jsonl"] = b""
        server.files["/sets/a.png"] = PNG
        server.files["/sets/sub/b.png"] = PNG
        server.files["/pics/c.png"] = image_bytes("PNG", size=(9, 9))
        yield server


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("a.png", "a.png"),
        ("sub/./b.png", "sub/b.png"),
        ("sub/../a.png", "a.png"),
        ("../outside.png", None),
        ("sub/../../outside.png", None),
        ("/etc/passwd", None),
        ("..", None),
        ("a\\..\\b.png", None),
    ],
)
def test_only_paths_that_stay_under_the_root_are_fetched(path: str, clean: str | None) -> None:
    assert confined(path) == clean


def test_images_are_found_beside_the_file_or_under_its_image_root() -> None:
    s3 = FetchSource.model_validate({"s3": {"uri": "s3://bkt/sets/train.jsonl"}})
    assert beside(s3, None, "x/a.png").s3.uri == "s3://bkt/sets/x/a.png"  # type: ignore[union-attr]
    assert beside(s3, "pics", "a.png").s3.uri == "s3://bkt/pics/a.png"  # type: ignore[union-attr]
    http = FetchSource.model_validate({"http": {"url": "https://h.test/sets/train.jsonl?v=2"}})
    assert beside(http, None, "a b.png").http.url == "https://h.test/sets/a%20b.png"  # type: ignore[union-attr]
    assert beside(http, "pics", "a.png").http.url == "https://h.test/pics/a.png"  # type: ignore[union-attr]
    hub = FetchSource.model_validate({"huggingFace": {"repo": "o/d", "file": "data/t.jsonl"}})
    found = beside(hub, None, "img/a.png").hugging_face
    assert found is not None and (found.repo, found.file) == ("o/d", "data/img/a.png")


def test_an_http_dataset_brings_its_relative_images_and_validation_reports_the_missing(
    web: Web, tmp_path: Path
) -> None:
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [
            sft("<image>a", images=["a.png"]),
            sft("<image>b", images=["sub/b.png"]),
            sft("<image>gone", images=["missing.png"]),
            sft("<image>escape", images=["../pics/c.png"]),
        ],
    )
    source = json.dumps({"http": {"url": web.url("/sets/train.jsonl")}})
    images = tmp_path / "images"
    code = main(
        ["fetch-images", "--data", str(data), "--source", source, "--images-out", str(images)]
    )
    assert code == 0
    assert sorted(str(p.relative_to(images)) for p in images.rglob("*.png")) == [
        "a.png",
        "sub/b.png",
    ]
    report = validate_file(data, image_root=images)
    assert [e.line for e in report.errors] == [3, 4]
    assert report.errors[0].message == "image 1 (missing.png): image file not found"
    assert report.errors[1].message == (
        "image 1 (../pics/c.png): the path leaves the image root through '..'"
    )


def test_an_s3_dataset_brings_its_relative_images(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="sets")
    s3.put_object(Bucket="sets", Key="pics/a.png", Body=PNG)
    data = write_jsonl(tmp_path / "data.jsonl", [sft("<image>a", images=["a.png"])])
    images = tmp_path / "images"
    source = json.dumps({"s3": {"uri": "s3://sets/chat/train.jsonl"}})
    args = ["fetch-images", "--data", str(data), "--source", source, "--images-out", str(images)]
    assert main([*args, "--image-root", "pics"]) == 0
    assert (images / "a.png").read_bytes() == PNG
    # A key that is not there is validation's to report, line by line.
    assert main([*args, "--image-root", "elsewhere"]) == 0
    too_big = ["--limits", json.dumps({"maxImageBytes": 10})]
    assert main([*args, "--image-root", "pics", *too_big]) == 1


def test_remote_images_are_fetched_once_and_must_be_the_validated_ones(
    web: Web, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = [web.url("/sets/a.png"), web.url("/sets/sub/b.png")]
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [
            sft("<image>a", images=[urls[0]]),
            sft("<image>b", images=[urls[1]]),
            sft("<image>c", images=[urls[0]]),
        ],
    )
    report = validate_file(data, limits=REMOTE)
    assert report.valid and report.remote_images == 3 and report.remote_images_sha256
    web.seen.clear()
    out = tmp_path / "remote"
    args = ["fetch-images", "--data", str(data), "--limits", REMOTE.model_dump_json(by_alias=True)]
    fetch = [*args, "--remote-out", str(out), "--remote-sha256", report.remote_images_sha256]
    assert main(fetch) == 0
    assert sorted(path for _, path, _ in web.seen) == ["/sets/a.png", "/sets/sub/b.png"]
    assert {p.name for p in out.iterdir()} == {fetched_name(u) for u in urls}

    # Training reads them from the folder, and opens no connection.
    web.seen.clear()
    image = open_image(ImageRef(urls[1]), tmp_path, REMOTE, fetched=out, line=2)
    assert image.size == (8, 6) and web.seen == []
    with pytest.raises(DatasetError, match=r"line 2: .*it fetched none"):
        open_image(ImageRef(urls[1]), tmp_path, REMOTE, line=2)

    # An image that changed at its URL since validation fails the fetch.
    web.files["/sets/sub/b.png"] = image_bytes("PNG", size=(5, 5))
    capsys.readouterr()
    assert main(fetch) == 1
    assert "not the ones validated" in capsys.readouterr().err


def test_only_a_platform_trusted_host_is_reached_on_a_private_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve`` makes 127.0.0.1 public for its tests; without it, loopback is refused
    unless the platform lists the host and port."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
    try:
        with pytest.raises(remote.RemoteError, match="resolves to a loopback address"):
            remote.fetch(url, 1 << 20)
        monkeypatch.setenv(TRUSTED_HOSTS_VARIABLE, f"other:1, 127.0.0.1:{server.server_address[1]}")
        assert remote.fetch(url, 1 << 20) == PNG
        with pytest.raises(remote.RemoteError, match="the response is 77 bytes, more than 10"):
            remote.fetch(url, 10)
    finally:
        server.shutdown()
