"""A loopback web server for the fetcher's tests (remote images, ``kubetune fetch``),
with the one relaxation of the address rules they need.

No test touches the network. ``serve`` fakes name resolution (``web.test`` and
``cdn.test`` are this server, ``internal.test`` is a private address, ``two.test``
has a loopback address that nothing answers on, then this server) and lets
127.0.0.1 and 127.0.0.2 count as public for the duration of one test; every other
rule stays as it is.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from kubetune_trainer.data import remote

TRICKLE_FOR_S = 3.0
"""How long the trickling routes keep sending a byte every 50 ms: long enough that
a fetcher without an overall deadline is seen to overrun one of 0.5 s, short enough
that such a fetcher does not hang the test."""

SECRET = b"SECRET-INTERNAL-TEXT"
"""What some routes answer with; no error message may repeat it."""


@dataclass
class Web:
    """The server as a test sees it."""

    port: int
    scheme: str = "http"
    files: dict[str, bytes] = field(default_factory=dict)
    """Extra paths to serve, with a Content-Length."""
    redirects: dict[str, str] = field(default_factory=dict)
    """Extra paths to answer with a 302 to the given location."""
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    """(Host header, path, headers with lower-case names) of every request, in order."""

    def url(self, path: str, host: str = "web.test") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    web: Web

    def do_GET(self) -> None:
        web = self.web
        headers = {k.lower(): v for k, v in self.headers.items()}
        web.seen.append((headers.get("host", ""), self.path, headers))
        path, _, query = self.path.partition("?")
        if path in web.files:
            self._send(200, web.files[path])
        elif path in web.redirects:
            self._redirect(web.redirects[path])
        elif path == "/redirect":
            self._raw(b"HTTP/1.1 302 Found\r\nLocation: " + parse_qs(query)["to"][0].encode())
            self._raw(b"\r\nContent-Length: 0\r\n\r\n")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/big-declared":
            self._send(200, b"x" * 5000)
        elif path == "/big-streamed":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body runs until close
            self.wfile.write(b"x" * 5000)
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, b"late")
        elif path == "/trickle-headers":
            self._raw(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            self._trickle()
            self._raw(b"\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/trickle-body":
            self._raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            self._trickle()
        elif path == "/cut-short":
            self._raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        elif path == "/server-error":
            self._send(500, SECRET)
        elif path == "/not-http":
            self._raw(SECRET + b" garbage\r\n\r\n")
        else:
            self._send(404, SECRET)

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

    def _raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _trickle(self) -> None:
        end = time.monotonic() + TRICKLE_FOR_S
        while time.monotonic() < end:
            self._raw(b"x")
            time.sleep(0.05)

    def log_message(self, *args: Any) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that give up on purpose leave broken pipes behind


HOSTS = {
    "web.test": ["127.0.0.1"],
    "cdn.test": ["127.0.0.1"],
    "internal.test": ["10.0.0.1"],
    "two.test": ["127.0.0.2", "127.0.0.1"],
}


def fake_resolver(table: dict[str, list[str]]) -> Any:
    """``socket.getaddrinfo`` over ``table``; IP literals resolve as themselves."""

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            if host not in table:
                raise socket.gaierror(f"unknown host {host}") from None
            addresses = table[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


def self_signed_certificate(folder: Path, host: str = "web.test") -> tuple[Path, Path]:
    """A certificate for ``host`` and its key, as PEM files in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@contextmanager
def serve(monkeypatch: pytest.MonkeyPatch, tls: tuple[Path, Path] | None = None) -> Iterator[Web]:
    """The server, over TLS with ``tls`` (certificate and key files)."""
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    web = Web(server.server_address[1], "https" if tls else "http")
    server.RequestHandlerClass = type("Handler", (_Handler,), {"web": web})
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    real = remote.address_problem
    monkeypatch.setattr(
        remote,
        "address_problem",
        lambda ip: None if str(ip) in ("127.0.0.1", "127.0.0.2") else real(ip),
    )
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver(HOSTS))
    try:
        yield web
    finally:
        server.shutdown()
        server.server_close()
