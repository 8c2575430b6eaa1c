"""Remote images: refused unless allowed, and even then never to loopback,
link-local, private or metadata addresses; short timeout, size cap. No test
touches the network: name resolution is faked and downloads go to a local server
that the address check is told to allow."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from data_helpers import image_bytes, sft, write_jsonl

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import ImageRef, check_image, remote, validate_file
from kubetune_trainer.data.remote import RemoteImageError, address_problem, checked_addresses, fetch

PNG = image_bytes("PNG", (9, 9))


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.170.2", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fc00::1", "a private address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::ffff:10.1.1.1", "a private address"),
        ("2002:a00:1::", "a private address"),  # 6to4 around 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),  # NAT64 around 169.254.169.254
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
        ("0.0.0.0", "not a public address"),
        ("224.0.0.1", "not a public address"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_rules(address: str, problem: str | None) -> None:
    assert address_problem(ipaddress.ip_address(address)) == problem


def resolver(tables: dict[str, list[str]]) -> Any:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        try:
            table = {
                **tables,
                host: [str(ipaddress.ip_address(host))],
            }  # literals resolve as themselves
        except ValueError:
            table = tables
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]

    return resolve


def test_every_resolved_address_must_be_public() -> None:
    resolve = resolver(
        {"cdn.test": ["93.184.216.34", "151.101.1.1"], "sneaky.test": ["93.184.216.34", "10.0.0.7"]}
    )
    assert [str(a) for a in checked_addresses("https://cdn.test/a.png", resolve)] == [
        "93.184.216.34",
        "151.101.1.1",
    ]
    with pytest.raises(
        RemoteImageError, match=r"sneaky.test resolves to 10.0.0.7, a private address"
    ):
        checked_addresses("https://sneaky.test/a.png", resolve)
    with pytest.raises(RemoteImageError, match="cannot resolve"):
        checked_addresses("https://nowhere.test/a.png", resolve)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("http:///a.png", "no host"),
        ("http://metadata.google.internal/x", "cloud metadata service"),
        ("http://METADATA.GOOGLE.INTERNAL./x", "cloud metadata service"),
        ("http://u:p@example.com/a.png", "credentials"),
        ("http://example.com:99999/a.png", "bad port"),
    ],
)
def test_refused_before_resolution(url: str, message: str) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("resolved")

    with pytest.raises(RemoteImageError, match=message):
        checked_addresses(url, no_dns)


def test_urls_are_refused_unless_allowed() -> None:
    result = check_image(ImageRef("https://example.com/a.png"), Path("/"), DatasetLimits())
    assert result.errors == ("remote image URLs are not allowed (allowRemoteImages is off)",)


# --- downloads against a local server --------------------------------------------


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/a.png":
            self._send(200, PNG)
        elif self.path == "/big-declared.png":
            self._send(200, b"x" * 5000)
        elif self.path == "/big-streamed.png":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body runs until close
            self.wfile.write(b"x" * 5000)
        elif self.path == "/slow.png":
            time.sleep(1.5)
            self._send(200, PNG)
        elif self.path == "/to-private":
            self._redirect("http://internal.test/a.png")
        elif self.path == "/to-self":
            self._redirect("/a.png")
        elif self.path == "/loop":
            self._redirect("/loop")
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out on purpose leave broken pipes behind


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local server reachable as http://images.test:PORT. The address check lets
    loopback through for this fixture only; every other rule stays."""
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    real = remote.address_problem
    monkeypatch.setattr(
        remote,
        "address_problem",
        lambda ip: None if str(ip) in ("127.0.0.1", "127.0.0.2") else real(ip),
    )
    table = resolver(
        {
            "images.test": ["127.0.0.1"],
            "internal.test": ["10.0.0.1"],
            "two.test": ["127.0.0.2", "127.0.0.1"],
        }
    )
    monkeypatch.setattr(socket, "getaddrinfo", table)
    try:
        yield f"http://images.test:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download(server: str) -> None:
    assert fetch(f"{server}/a.png", 10_000) == PNG
    assert fetch(f"{server}/to-self", 10_000) == PNG


def test_the_next_checked_address_is_tried_when_one_does_not_answer(server: str) -> None:
    # nothing listens on 127.0.0.2: the connection is refused, then 127.0.0.1 answers
    assert fetch(server.replace("images.test", "two.test") + "/a.png", 10_000) == PNG


def test_slow_name_resolution_times_out() -> None:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2)
        return []

    start = time.monotonic()
    with pytest.raises(RemoteImageError, match=r"resolving slow\.test timed out"):
        fetch("http://slow.test/a.png", 100, timeout=0.2, resolve=slow)
    assert time.monotonic() - start < 1


def test_size_cap(server: str) -> None:
    with pytest.raises(RemoteImageError, match="5,000 bytes, more than 1,000"):
        fetch(f"{server}/big-declared.png", 1000)
    with pytest.raises(RemoteImageError, match="more than 1,000 bytes"):
        fetch(f"{server}/big-streamed.png", 1000)


def test_timeout(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteImageError, match="timed out"):
        fetch(f"{server}/slow.png", 10_000, timeout=0.3)
    assert time.monotonic() - start < 1.2


def test_redirects_are_checked_again(server: str) -> None:
    with pytest.raises(
        RemoteImageError, match=re.escape("internal.test resolves to 10.0.0.1, a private address")
    ):
        fetch(f"{server}/to-private", 10_000)
    with pytest.raises(RemoteImageError, match="more than 3 redirects"):
        fetch(f"{server}/loop", 10_000)
    with pytest.raises(RemoteImageError, match="HTTP status 404"):
        fetch(f"{server}/missing.png", 10_000)


def test_validate_with_remote_images_allowed(server: str, tmp_path: Path) -> None:
    records = [
        sft("<image>x", images=[f"{server}/a.png"]),
        sft("<image>y", images=[f"{server}/to-private"]),
        sft("z"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = validate_file(path, limits=DatasetLimits(allow_remote_images=True))
    assert [(p.line, p.message) for p in report.errors] == [
        (
            2,
            f"image 1 ({server}/to-private): remote image refused: host internal.test resolves to 10.0.0.1, a private address",
        )
    ]
    refused = validate_file(path)
    assert [p.line for p in refused.errors] == [1, 2]
    assert all("not allowed" in p.message for p in refused.errors)
