"""Fetching remote images without letting a dataset reach inside the cluster.

A dataset is user input. An image URL must not make the validation Job or the
trainer talk to loopback, link-local, private or cloud-metadata addresses (SSRF).
The host is resolved once, every address it resolves to is checked, and the
connection goes to a checked address (so a second DNS answer cannot swap in a
private one). Redirects are followed only through the same checks; the download
has a deadline and a size cap.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

DEFAULT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3

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


class RemoteImageError(Exception):
    """A URL that is refused or could not be fetched; the message says why."""


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


def checked_addresses(
    url: str, resolve: Resolver | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> list[IPAddress]:
    """The addresses ``url``'s host resolves to, if every one of them is public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RemoteImageError(f"URL scheme {parts.scheme!r} is not http or https")
    host = parts.hostname
    if not host:
        raise RemoteImageError("URL has no host")
    if host.rstrip(".").lower() in METADATA_HOSTS:
        raise RemoteImageError(f"host {host} is a cloud metadata service")
    if parts.username or parts.password:
        raise RemoteImageError("URLs with credentials are not allowed")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RemoteImageError(f"bad port: {exc}") from None
    infos = _resolve_within(resolve or socket.getaddrinfo, host, port, timeout)
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone
        problem = address_problem(ip)
        if problem:
            raise RemoteImageError(f"host {host} resolves to {ip}, {problem}")
        addresses.append(ip)
    if not addresses:
        raise RemoteImageError(f"host {host} resolves to no address")
    return addresses


def _resolve_within(
    resolve: Resolver, host: str, port: int, timeout: float
) -> Sequence[tuple[Any, ...]]:
    """``resolve`` with a deadline: getaddrinfo has no timeout of its own and a slow
    DNS server could hold the validation Job for minutes."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(resolve(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise RemoteImageError(f"resolving {host} timed out")
    if isinstance(outcome[0], Exception):
        raise RemoteImageError(f"cannot resolve {host}: {outcome[0]}")
    result: Sequence[tuple[Any, ...]] = outcome[0]
    return result


def fetch(
    url: str,
    max_bytes: int,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    resolve: Resolver | None = None,
) -> bytes:
    """The body of ``url``, at most ``max_bytes``. The deadline is checked between
    reads and no single socket wait outlasts the time left at connect, so a slow
    server is cut off within about twice ``timeout``."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        addresses = checked_addresses(url, resolve, _remaining(deadline))
        status, location, body = _get(url, addresses, max_bytes, deadline)
        if status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise RemoteImageError(f"HTTP status {status}")
        return body
    raise RemoteImageError(f"more than {MAX_REDIRECTS} redirects")


def _get(
    url: str, addresses: list[IPAddress], max_bytes: int, deadline: float
) -> tuple[int, str | None, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    conn = _PinnedConnection(host, port, [str(a) for a in addresses], https, _remaining(deadline))
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("GET", path, headers={"User-Agent": "kubetune", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.getheader("Location"), b""
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise RemoteImageError(f"image is {int(length):,} bytes, more than {max_bytes:,}")
        chunks: list[bytes] = []
        size = 0
        while True:
            _remaining(deadline)  # each read may block for the socket timeout at most
            chunk = resp.read(min(1 << 16, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise RemoteImageError(f"image is more than {max_bytes:,} bytes")
        return 200, None, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        raise RemoteImageError(f"download failed: {exc or type(exc).__name__}") from None
    finally:
        conn.close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RemoteImageError("download timed out")
    return left


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one of the checked addresses (the first that answers),
    with the URL's host name kept for the Host header and TLS (SNI and certificate
    checks)."""

    def __init__(
        self, host: str, port: int, addresses: list[str], https: bool, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses
        self._https = https

    def connect(self) -> None:
        error: OSError | None = None
        for address in self._addresses:
            try:
                sock = socket.create_connection((address, self.port), self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            raise error or OSError("no address to connect to")
        if self._https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
