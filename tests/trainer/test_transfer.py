"""`kubetune fetch`: remote sources copied into the pod, atomically, through the guarded
fetcher (public addresses only, one deadline, a size cap); a bad --source is a usage
error. The web server is a loopback one (``tests/data/local_web.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_web import SECRET, TRICKLE_FOR_S, Web, serve

from kubetune_trainer.cli import main


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    with serve(monkeypatch) as server:
        server.files["/train.jsonl"] = b'{"messages": []}\n'
        yield server


def fetch(source: object, out: Path, *flags: str) -> int:
    return main(["fetch", "--source", json.dumps(source), "--out", str(out), *flags])


def test_http_source_is_downloaded(web: Web, tmp_path: Path) -> None:
    out = tmp_path / "data" / "data.jsonl"
    assert fetch({"http": {"url": web.url("/train.jsonl")}}, out) == 0
    assert out.read_text() == '{"messages": []}\n'


def test_a_failed_download_leaves_no_file(
    web: Web, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data.jsonl"
    assert fetch({"http": {"url": web.url("/missing.jsonl")}}, out) == 1
    assert capsys.readouterr().err == (
        f"kubetune fetch: cannot download {web.url('/missing.jsonl')}: HTTP status 404\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("path", "flags", "message"),
    [
        ("file:///etc/hostname", (), "URL scheme 'file' is not http or https"),
        ("not a url", (), "URL scheme '' is not http or https"),
        ("http://[/x", (), "not a valid URL"),
        ("http://169.254.169.254/latest/meta-data/", (), "resolves to a cloud metadata address"),
        ("/redirect?to=http://internal.test/x", (), "internal.test resolves to a private address"),
        ("/redirect?to=http://127.0.0.5:1/x", (), "127.0.0.5 resolves to a loopback address"),
        ("/redirect?to=file:///etc/hostname", (), "redirected to an unusable URL: URL scheme"),
        ("/big-declared", ("--max-bytes", "1000"), "is 5,000 bytes, more than 1,000"),
        ("/big-streamed", ("--max-bytes", "1000"), "more than 1,000 bytes"),
        ("/trickle-body", ("--timeout", "0.5"), "timed out after 0.5 s"),
        ("/trickle-headers", ("--timeout", "0.5"), "timed out after 0.5 s"),
        ("/server-error", (), "HTTP status 500"),
        ("/not-http", (), "the response from web.test is not valid HTTP"),
    ],
)
def test_the_http_source_goes_through_the_guarded_fetcher(
    web: Web,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    path: str,
    flags: tuple[str, ...],
    message: str,
) -> None:
    url = web.url(path) if path.startswith("/") else path
    start = time.monotonic()
    assert fetch({"http": {"url": url}}, tmp_path / "d.jsonl", *flags) == 1
    if "--timeout" in flags:
        assert time.monotonic() - start < 0.5 + TRICKLE_FOR_S / 2
    err = capsys.readouterr().err
    assert err.startswith(f"kubetune fetch: cannot download {url}: ") and message in err, err
    assert SECRET.decode() not in err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_address_reads_the_same_whatever_listens_there(
    web: Web, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fetch errors are copied into Dataset status: an open port on an internal
    address must read like a closed one."""
    reasons = set()
    for port in (web.port, 1):
        url = f"http://127.0.0.9:{port}/train.jsonl"
        assert fetch({"http": {"url": url}}, tmp_path / "d.jsonl") == 1
        reasons.add(capsys.readouterr().err.replace(url, "URL"))
    assert reasons == {
        "kubetune fetch: cannot download URL: host 127.0.0.9 resolves to a loopback address\n"
    }


def test_the_hub_download_sends_the_token_to_the_hub_only(
    web: Web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://web.test:{web.port}")
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://web.test:{web.port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    web.redirects["/datasets/org/ds/resolve/v1/dir/train%20set.jsonl"] = web.url(
        "/blob/1", host="cdn.test"
    )
    web.files["/blob/1"] = b"rows\n"
    out = tmp_path / "d.jsonl"
    source = {"huggingFace": {"repo": "org/ds", "file": "dir/train set.jsonl", "revision": "v1"}}
    assert fetch(source, out) == 0
    assert out.read_bytes() == b"rows\n"
    assert [(host.split(":")[0], h.get("authorization")) for host, _, h in web.seen] == [
        ("web.test", "Bearer hf_secret"),
        ("cdn.test", None),
    ]


def test_a_failed_hub_download_names_the_file(
    web: Web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://web.test:{web.port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )
    source = {"huggingFace": {"repo": "org/ds", "file": "train.jsonl"}}
    assert fetch(source, tmp_path / "d.jsonl") == 1
    assert capsys.readouterr().err == (
        "kubetune fetch: cannot download train.jsonl from dataset repository org/ds@main: "
        "HTTP status 404\n"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("[1]", "--source is not a JSON object"),
        ("{'http': 1}", "--source is not JSON"),
        ("[" * 100_000, "--source is not JSON"),
        ('{"ftp": {}}', "exactly one of http, s3 or huggingFace"),
        ('{"http": null}', "exactly one of http, s3 or huggingFace"),
        ('{"http": []}', "http: Input should be a valid dictionary"),
        ('{"http": {"url": 5}}', "http.url: Input should be a valid string"),
        ('{"http": {}}', "http.url: Field required"),
        ('{"http": {"url": "http://a/"}, "s3": {"uri": "s3://bucket/k"}}', "exactly one of"),
        ('{"s3": {"uri": "s3://"}}', "s3.uri: String should match pattern"),
        ('{"huggingFace": {"repo": "../../api", "file": "a"}}', "not a repository id"),
        ('{"huggingFace": {"repo": "org/ds", "file": "../x"}}', "not a path inside"),
        ('{"huggingFace": {"repo": "org/ds", "file": "/x"}}', "not a path inside"),
    ],
)
def test_a_bad_source_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, message: str
) -> None:
    assert main(["fetch", "--source", source, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kubetune fetch: ") and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


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
