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
