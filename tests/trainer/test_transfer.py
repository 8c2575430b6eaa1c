"""`kubetune fetch`: remote sources copied into the pod, atomically."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_trainer.cli import main


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "train.jsonl").write_text('{"messages": []}\n')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_source_is_downloaded(served: str, tmp_path: Path) -> None:
    out = tmp_path / "data" / "data.jsonl"
    source = json.dumps({"http": {"url": f"{served}/train.jsonl"}})
    assert main(["fetch", "--source", source, "--out", str(out)]) == 0
    assert out.read_text() == '{"messages": []}\n'


def test_a_failed_download_leaves_no_file(
    served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data.jsonl"
    source = json.dumps({"http": {"url": f"{served}/missing.jsonl"}})
    assert main(["fetch", "--source", source, "--out", str(out)]) == 1
    assert "cannot download" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_bad_source_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["fetch", "--source", "[1]", "--out", str(tmp_path / "x")]) == 2
    assert main(["fetch", "--source", '{"ftp": {}}', "--out", str(tmp_path / "x")]) == 1


def test_s3_upload_and_fetch_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    from kubetune_trainer.transfer import upload_s3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-1" / "optimizer.pt").write_bytes(b"x")
    (out / "adapter_config.json").write_text("{}")
    (out / "nested").mkdir()
    (out / "nested" / "a.txt").write_text("a")
    assert upload_s3(out, "s3://models/runs/one", exclude=("checkpoints",)) == 2
    back = tmp_path / "back"
    source = json.dumps({"s3": {"uri": "s3://models/runs/one/"}})
    assert main(["fetch", "--source", source, "--out", str(back)]) == 0
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == [
        "adapter_config.json",
        "nested/a.txt",
    ]
    single = tmp_path / "single.json"
    assert (
        main(
            [
                "fetch",
                "--source",
                json.dumps({"s3": {"uri": "s3://models/runs/one/adapter_config.json"}}),
                "--out",
                str(single),
            ]
        )
        == 0
    )
    assert single.read_text() == "{}"


def test_an_s3_failure_is_reported_not_raised(
    s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = json.dumps({"s3": {"uri": "s3://no-such-bucket/data.jsonl"}})
    assert main(["fetch", "--source", source, "--out", str(tmp_path / "d.jsonl")]) == 1
    assert "cannot download s3://no-such-bucket/data.jsonl" in capsys.readouterr().err
