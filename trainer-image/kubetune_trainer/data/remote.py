"""The one fetcher for every URL kubetune opens: remote images (validation, training,
``convert --embed-images``), the Dataset ``http`` source and the hub download
(``kubetune fetch``).

A URL is user input, and so is every redirect a server answers with. The rules:

* http and https only, and no credentials in the URL;
* the host is resolved once, every address it resolves to must be public (not
  loopback, link-local, private, cloud metadata or otherwise reserved), and the
  connection goes to a checked address, so a second DNS answer cannot swap in a
  private one (SSRF, DNS rebinding);
* redirects go through the same checks at every hop; headers that carry a
  credential are sent to the first origin only;
* one deadline covers resolution, connection, TLS, the headers and the body: every
  socket wait gets only the time left, so a server that trickles bytes cannot
  stretch it;
* the body has a size cap, checked against Content-Length and while it arrives;
* errors are fixed summaries. Nothing the server sent (body, reason phrase, a
  malformed status line) and no socket error detail is repeated: the messages end
  up in Dataset status, and must not let a tenant probe what listens where.

urllib3, requests and httpx were considered: their timeouts bound each socket
operation, not the whole response (a trickled body passes), and pinning the
connection to the checked addresses needs their internals. The standard library's
``http.client`` with the socket classes below gives both in a few lines.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol
from urllib.parse import quote, urljoin, urlsplit

from kubetune_trainer.contract.fetch import TRUSTED_HOSTS_VARIABLE

DEFAULT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
STALL_S = 60.0
"""Longest wait for the next bytes, within the deadline: a long download (a dataset
has an hour) still fails soon when the server stops sending."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's shape

# Cloud metadata endpoints. Most are link-local or private already; listed so that
# the rule does not depend on that.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS over IPv6
    )
)
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_SIZE = 1 << 16
# Characters left as they are in a request target; everything else (spaces, control
# characters, non-ASCII) is percent-encoded, as browsers do, so that http.client can
# send any path a dataset or a redirect names.
_TARGET_SAFE = "/%:@!$&'()*+,;=?~[]"


class Sink(Protocol):
    """Where a body goes: a file, or anything else that takes bytes."""

    def write(self, data: bytes, /) -> int: ...


class RemoteError(Exception):
    """A URL that is refused or could not be fetched; the message says why, and
    ``status`` the HTTP status where the server answered with another than 200."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _trusted(target: _Target) -> bool:
    listed = os.environ.get(TRUSTED_HOSTS_VARIABLE, "")
    return f"{target.host.lower()}:{target.port}" in {
        h.strip().lower() for h in listed.split(",") if h.strip()
    }


RemoteImageError = RemoteError
"""The name ``images.py`` catches."""


def address_problem(ip: IPAddress) -> str | None:
    """Why an address must not be contacted, or None if it is a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address can carry an IPv4 one (mapped, 6to4, NAT64): judge that.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(embedded)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "not a public address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL that passed the checks that need no network."""

    https: bool
    host: str
    port: int
    request_target: str  # path and query, ASCII

    @property
    def origin(self) -> tuple[bool, str, int]:
        return self.https, self.host.lower(), self.port


def _parse_url(url: str) -> _Target:
    """``url`` as a ``_Target``, or ``RemoteError`` saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise RemoteError("not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise RemoteError(f"URL scheme {_short(parts.scheme)!r} is not http or https")
    if not host:
        raise RemoteError("URL has no host")
    if "@" in parts.netloc:
        raise RemoteError("URLs with credentials are not allowed")
    if host.rstrip(".").lower() in METADATA_HOSTS:
        raise RemoteError(f"host {host} is a cloud metadata service")
    if not _valid_host(host):
        raise RemoteError(f"host name {_short(host)!r} is not valid")
    https = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(https, host, port or (443 if https else 80), quote(target, safe=_TARGET_SAFE))


def _valid_host(host: str) -> bool:
    if any(c.isspace() or not c.isprintable() for c in host):
        return False
    try:
        host.encode("idna")  # what the resolver and TLS will do; refuses empty or long labels
    except UnicodeError:
        return False
    return True


def checked_addresses(
    url: str, resolve: Resolver | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> list[IPAddress]:
    """The addresses ``url``'s host resolves to, if every one of them is public."""
    return _checked(_parse_url(url), resolve, _Deadline(timeout))


def _checked(target: _Target, resolve: Resolver | None, deadline: _Deadline) -> list[IPAddress]:
    host = _short(target.host)
    infos = _resolve_within(resolve or socket.getaddrinfo, target, deadline)
    trusted = _trusted(target)
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone
        problem = None if trusted else address_problem(ip)
        if problem:
            # Not the address itself: a tenant must not learn the cluster's addresses.
            raise RemoteError(f"host {host} resolves to {problem}")
        addresses.append(ip)
    if not addresses:
        raise RemoteError(f"host {host} resolves to no address")
    return addresses


def _resolve_within(
    resolve: Resolver, target: _Target, deadline: _Deadline
) -> Sequence[tuple[Any, ...]]:
    """``resolve`` with a deadline: getaddrinfo has no timeout of its own and a slow
    DNS server could hold the validation Job for minutes."""
    outcome: list[Any] = []
    host = target.host

    def run() -> None:
        try:
            outcome.append(resolve(host, target.port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError, ValueError) as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, name="resolve", daemon=True)
    worker.start()
    worker.join(deadline.left())
    if not outcome:
        raise RemoteError(f"resolving {_short(host)} timed out")
    if isinstance(outcome[0], Exception):
        raise RemoteError(f"cannot resolve {_short(host)}")
    result: Sequence[tuple[Any, ...]] = outcome[0]
    return result


def fetch(
    url: str,
    max_bytes: int,
    *,
    timeout: float | None = None,
    resolve: Resolver | None = None,
) -> bytes:
    """The body of ``url``, at most ``max_bytes``, within ``timeout`` seconds overall
    (``DEFAULT_TIMEOUT_S`` as it is at the call)."""
    body = BytesIO()
    fetch_to(
        url,
        body,
        max_bytes,
        timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout,
        resolve=resolve,
    )
    return body.getvalue()


def fetch_to(
    url: str,
    out: Sink,
    max_bytes: int,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    credentials: Mapping[str, str] | None = None,
    resolve: Resolver | None = None,
) -> int:
    """Write the body of ``url`` (at most ``max_bytes``) to ``out`` within ``timeout``
    seconds overall; returns its size. ``credentials`` are headers sent only while
    the request stays on ``url``'s origin (a hub token must not follow a redirect to
    a storage host). Raises ``RemoteError``."""
    deadline = _Deadline(timeout)
    first = _parse_url(url)
    target = first
    for _ in range(MAX_REDIRECTS + 1):
        addresses = _checked(target, resolve, deadline)
        sent = {**(headers or {})}
        if credentials and target.origin == first.origin:
            sent.update(credentials)
        size, location = _get(target, addresses, sent, out, max_bytes, deadline)
        if location is None:
            return size
        try:
            url = urljoin(url, location)
            target = _parse_url(url)
        except ValueError:  # from urljoin, which parses both
            raise RemoteError("redirected to an unusable URL: not a valid URL") from None
        except RemoteError as exc:
            raise RemoteError(f"redirected to an unusable URL: {exc}") from None
    raise RemoteError(f"more than {MAX_REDIRECTS} redirects")


def _get(
    target: _Target,
    addresses: list[IPAddress],
    headers: Mapping[str, str],
    out: Sink,
    max_bytes: int,
    deadline: _Deadline,
) -> tuple[int, str | None]:
    """One request: (bytes written, None), or (0, the Location) for a redirect."""
    host = _short(target.host)
    conn = _PinnedConnection(target, addresses, deadline)
    try:
        conn.request("GET", target.request_target, headers={"User-Agent": "kubetune", **headers})
        resp = conn.getresponse()
        if resp.status in _REDIRECT_STATUSES:
            location = resp.getheader("Location")
            if not location:
                raise RemoteError(f"HTTP status {resp.status} without a Location")
            return 0, location
        if resp.status != 200:
            raise RemoteError(f"HTTP status {resp.status}", resp.status)
        declared = resp.getheader("Content-Length", "")
        length = int(declared) if declared.isdigit() else None
        if length is not None and length > max_bytes:
            raise RemoteError(f"the response is {length:,} bytes, more than {max_bytes:,}")
        size = 0
        while chunk := resp.read(min(_READ_SIZE, max_bytes + 1 - size)):
            size += len(chunk)
            if size > max_bytes:
                raise RemoteError(f"the response is more than {max_bytes:,} bytes")
            out.write(chunk)
        if length is not None and size < length:  # http.client returns a cut body as it is
            raise RemoteError(f"the response from {host} ended after {size:,} of {length:,} bytes")
        return size, None
    except TimeoutError:
        if deadline.over():
            raise RemoteError(deadline.expired) from None
        raise RemoteError(f"{host} sent nothing for {STALL_S:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise RemoteError(
            f"the TLS certificate of {host} is not valid: {exc.verify_message}"
        ) from None
    except http.client.HTTPException:
        raise RemoteError(f"the response from {host} is not valid HTTP") from None
    except OSError:
        raise RemoteError(f"the connection to {host} failed") from None
    finally:
        conn.close()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.expired = f"timed out after {seconds:g} s"
        self._at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; ``RemoteError`` once there are none."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise RemoteError(self.expired)
        return left

    def over(self) -> bool:
        """Whether a socket wait that just timed out was cut short by the deadline
        (it was given the time left, so it ends within a tick of it)."""
        return time.monotonic() > self._at - 0.1

    def wait(self) -> float:
        """How long the next socket operation may block."""
        return min(self.left(), STALL_S)


class _DeadlineSocket(socket.socket):
    """A socket whose every receive may wait only for the time left. http.client
    reads the status line, the headers and the body through ``recv_into``."""

    deadline: _Deadline

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(self.deadline.wait())
        return super().recv_into(buffer, nbytes, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """``_DeadlineSocket`` for TLS (``SSLContext.sslsocket_class``). The ssl module
    treats a socket timeout as the deadline of one whole read, handshakes included."""

    deadline: _Deadline

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self.settimeout(self.deadline.wait())
        return super().recv_into(buffer, nbytes, flags)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one of the checked addresses (the first that answers),
    with the URL's host name kept for the Host header and TLS (SNI and certificate
    checks)."""

    def __init__(self, target: _Target, addresses: list[IPAddress], deadline: _Deadline) -> None:
        super().__init__(target.host, target.port)
        self._target = target
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        sock = self._connect_any()
        if self._target.https:
            try:
                tls = _tls_context().wrap_socket(
                    sock, server_hostname=self.host, do_handshake_on_connect=False
                )
            except BaseException:
                sock.close()
                raise
            assert isinstance(tls, _DeadlineSSLSocket)
            tls.deadline = self._deadline
            tls.settimeout(self._deadline.wait())
            self.sock = tls
            tls.do_handshake()
        else:
            self.sock = sock

    def _connect_any(self) -> _DeadlineSocket:
        for ip in self._addresses:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sock = _DeadlineSocket(family, socket.SOCK_STREAM)
            sock.deadline = self._deadline
            try:
                sock.settimeout(self._deadline.wait())
                sock.connect((str(ip), self.port))
            except OSError:
                sock.close()
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        if self._deadline.over():
            raise RemoteError(self._deadline.expired)
        raise RemoteError(f"cannot connect to {_short(self.host)}:{self.port}")


def _short(text: str, limit: int = 100) -> str:
    """``text`` cut for a message: hosts may come from a redirect, that is from the server."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
