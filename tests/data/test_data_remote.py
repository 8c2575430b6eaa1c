"""The one fetcher (``data/remote.py``): remote images and every other URL kubetune
opens are refused unless http(s) to public addresses, at every redirect; one
deadline covers connection, headers and body; a size cap; errors that repeat
nothing a server said. No test touches the network: name resolution is faked and
downloads go to a loopback server that the address check is told to allow (see
``local_web.py``)."""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from data_helpers import image_bytes, sft, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from local_web import SECRET, TRICKLE_FOR_S, Web, fake_resolver, self_signed_certificate, serve

from kubetune_trainer.contract.job import DatasetLimits
from kubetune_trainer.data import ImageRef, check_image, convert_file, remote, validate_file
from kubetune_trainer.data.remote import (
    MAX_REDIRECTS,
    RemoteError,
    address_problem,
    checked_addresses,
    fetch,
    fetch_to,
)

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


def test_every_resolved_address_must_be_public() -> None:
    resolve = fake_resolver(
        {"cdn.test": ["93.184.216.34", "151.101.1.1"], "sneaky.test": ["93.184.216.34", "10.0.0.7"]}
    )
    assert [str(a) for a in checked_addresses("https://cdn.test/a.png", resolve)] == [
        "93.184.216.34",
        "151.101.1.1",
    ]
    # The message does not give the address away: a tenant must not map the cluster.
    with pytest.raises(RemoteError, match=r"^host sneaky\.test resolves to a private address$"):
        checked_addresses("https://sneaky.test/a.png", resolve)
    with pytest.raises(RemoteError, match=r"^cannot resolve nowhere\.test$"):
        checked_addresses("https://nowhere.test/a.png", resolve)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("file:///etc/hostname", "scheme 'file'"),
        ("http:///a.png", "no host"),
        ("http://metadata.google.internal/x", "cloud metadata service"),
        ("http://METADATA.GOOGLE.INTERNAL./x", "cloud metadata service"),
        ("http://u:p@example.com/a.png", "credentials"),
        ("http://@example.com/a.png", "credentials"),
        ("http://example.com:99999/a.png", "not a valid URL"),
        ("http://[/x.png", "not a valid URL"),
        ("http://[::1/x.png", "not a valid URL"),
        ("http://exa mple.com/x.png", "is not valid"),
        ("http://example..com/x.png", "is not valid"),
        ("http://" + "a" * 64 + ".com/x.png", "is not valid"),
    ],
)
def test_refused_before_resolution(url: str, message: str) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("resolved")

    with pytest.raises(RemoteError, match=re.escape(message)):
        checked_addresses(url, no_dns)


def test_urls_are_refused_unless_allowed() -> None:
    result = check_image(ImageRef("https://example.com/a.png"), Path("/"), DatasetLimits())
    assert result.errors == ("remote image URLs are not allowed (allowRemoteImages is off)",)


def test_slow_name_resolution_times_out() -> None:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2)
        return []

    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"resolving slow\.test timed out"):
        fetch("http://slow.test/a.png", 100, timeout=0.2, resolve=slow)
    assert time.monotonic() - start < 1


# --- against a local server ------------------------------------------------------


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    with serve(monkeypatch) as server:
        server.files["/a.png"] = PNG
        server.files["/%E5%9B%BE%20x.png"] = PNG
        yield server


def test_download(web: Web) -> None:
    assert fetch(web.url("/a.png"), 10_000) == PNG
    assert fetch(web.url("/redirect?to=/a.png"), 10_000) == PNG
    # Non-ASCII and spaces are sent percent-encoded, as a browser would.
    assert fetch(web.url("/图 x.png"), 10_000) == PNG


def test_the_next_checked_address_is_tried_when_one_does_not_answer(web: Web) -> None:
    # nothing listens on 127.0.0.2: the connection is refused, then 127.0.0.1 answers
    assert fetch(web.url("/a.png", host="two.test"), 10_000) == PNG


def test_size_cap(web: Web) -> None:
    with pytest.raises(RemoteError, match="is 5,000 bytes, more than 1,000"):
        fetch(web.url("/big-declared"), 1000)
    with pytest.raises(RemoteError, match="more than 1,000 bytes"):
        fetch(web.url("/big-streamed"), 1000)


@pytest.mark.parametrize("path", ["/slow", "/trickle-headers", "/trickle-body"])
def test_one_deadline_covers_headers_and_body(web: Web, path: str) -> None:
    """A server that sends a byte every 50 ms keeps each socket wait short: only an
    overall deadline stops it."""
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"^timed out after 0\.5 s$"):
        fetch(web.url(path), 10_000, timeout=0.5)
    assert time.monotonic() - start < 0.5 + TRICKLE_FOR_S / 2


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    return self_signed_certificate(tmp_path)


@pytest.fixture
def tls_web(monkeypatch: pytest.MonkeyPatch, tls_files: tuple[Path, Path]) -> Iterator[Web]:
    """The server over TLS, with its certificate trusted (``SSL_CERT_FILE``, which the
    default context reads when it is made)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    remote._tls_context.cache_clear()
    with serve(monkeypatch, tls_files) as server:
        server.files["/a.png"] = PNG
        yield server
    remote._tls_context.cache_clear()


def test_tls_download(tls_web: Web) -> None:
    assert fetch(tls_web.url("/a.png"), 10_000) == PNG


@pytest.mark.parametrize("path", ["/trickle-headers", "/trickle-body"])
def test_one_deadline_covers_a_tls_response_too(tls_web: Web, path: str) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"^timed out after 0\.5 s$"):
        fetch(tls_web.url(path), 10_000, timeout=0.5)
    assert time.monotonic() - start < 0.5 + TRICKLE_FOR_S / 2


def test_an_untrusted_certificate_is_refused(
    monkeypatch: pytest.MonkeyPatch, tls_files: tuple[Path, Path]
) -> None:
    remote._tls_context.cache_clear()
    with serve(monkeypatch, tls_files) as server, pytest.raises(RemoteError) as caught:
        fetch(server.url("/a.png"), 10_000)
    assert str(caught.value).startswith("the TLS certificate of web.test is not valid: ")


def test_redirects_are_checked_again_at_every_hop(web: Web) -> None:
    hop = web.url("/redirect?to=" + quote(web.url("/redirect?to=http://internal.test/a.png")))
    with pytest.raises(
        RemoteError, match=re.escape("host internal.test resolves to a private address")
    ):
        fetch(hop, 10_000)
    with pytest.raises(RemoteError, match=r"host 127\.0\.0\.3 resolves to a loopback address"):
        fetch(web.url("/redirect?to=http://127.0.0.3/"), 10_000)
    with pytest.raises(RemoteError, match="scheme 'file'"):
        fetch(web.url("/redirect?to=file:///etc/hostname"), 10_000)
    with pytest.raises(RemoteError, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch(web.url("/loop"), 10_000)


@pytest.mark.parametrize(
    "location", ["http://[/x.png", "http://[::1/x", "http://exa mple.com/", "http://a:99999/"]
)
def test_a_redirect_to_a_malformed_url_is_an_error(web: Web, location: str) -> None:
    with pytest.raises(RemoteError, match=r"^redirected to an unusable URL: "):
        fetch(web.url("/redirect?to=" + quote(location)), 10_000)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/server-error", "HTTP status 500"),
        ("/missing", "HTTP status 404"),
        ("/not-http", "the response from web.test is not valid HTTP"),
        ("/cut-short", "the response from web.test ended after 10 of 1,000 bytes"),
    ],
)
def test_errors_repeat_nothing_the_server_sent(web: Web, path: str, message: str) -> None:
    with pytest.raises(RemoteError) as caught:
        fetch(web.url(path), 10_000)
    assert str(caught.value) == message
    assert SECRET.decode() not in str(caught.value)


def test_a_refused_address_reads_the_same_whatever_listens_there(web: Web) -> None:
    """Fetch errors end up in Dataset status: they must not tell an open port on an
    internal address from a closed one."""
    messages = set()
    for port in (web.port, 1, 9):  # this server, and (almost surely) nothing
        with pytest.raises(RemoteError) as caught:
            fetch(f"http://127.0.0.9:{port}/", 10_000)
        messages.add(str(caught.value))
    assert messages == {"host 127.0.0.9 resolves to a loopback address"}


def test_credentials_go_to_the_first_origin_only(web: Web) -> None:
    web.files["/blob"] = b"data"
    other = quote(web.url("/blob", host="cdn.test"))
    out = _Sink()
    fetch_to(
        web.url(f"/redirect?to={quote(web.url(f'/redirect?to={other}'))}"),
        out,
        100,
        headers={"X-Plain": "1"},
        credentials={"Authorization": "Bearer hf_secret"},
    )
    assert out.data == b"data"
    sent = [(host.split(":")[0], headers.get("authorization")) for host, _, headers in web.seen]
    assert sent == [
        ("web.test", "Bearer hf_secret"),
        ("web.test", "Bearer hf_secret"),
        ("cdn.test", None),
    ]
    assert all(headers.get("x-plain") == "1" for _, _, headers in web.seen)


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


def test_validate_with_remote_images_allowed(web: Web, tmp_path: Path) -> None:
    records = [
        sft("<image>x", images=[web.url("/a.png")]),
        sft("<image>y", images=[web.url("/redirect?to=http://internal.test/a.png")]),
        sft("<image>z", images=["http://[/x.png"]),
        sft("<image>w", images=[web.url("/redirect?to=http://[/x.png")]),
        sft("v"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = validate_file(path, limits=DatasetLimits(allow_remote_images=True))
    assert [(p.line, p.message.split("): ", 1)[1]) for p in report.errors] == [
        (2, "remote image refused: host internal.test resolves to a private address"),
        (3, "remote image refused: not a valid URL"),
        (4, "remote image refused: redirected to an unusable URL: not a valid URL"),
    ]
    refused = validate_file(path)
    assert [p.line for p in refused.errors] == [1, 2, 3, 4]
    assert all("not allowed" in p.message for p in refused.errors)


def test_convert_names_the_line_of_a_malformed_url(web: Web, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [sft("<image>x", images=[web.url("/a.png")]), sft("<image>y", images=["http://[/x.png"])],
    )
    result = convert_file(
        path,
        tmp_path / "out.jsonl",
        "content-parts",
        embed_images=True,
        limits=DatasetLimits(allow_remote_images=True),
    )
    assert [str(p) for p in result.errors] == [
        "line 2: http://[/x.png: remote image refused: not a valid URL"
    ]


def test_convert_embed_stops_a_trickling_server(
    web: Web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "DEFAULT_TIMEOUT_S", 0.5)
    path = write_jsonl(tmp_path / "d.jsonl", [sft("<image>x", images=[web.url("/trickle-body")])])
    start = time.monotonic()
    result = convert_file(
        path,
        tmp_path / "out.jsonl",
        "placeholder",
        embed_images=True,
        limits=DatasetLimits(allow_remote_images=True),
    )
    assert [str(p) for p in result.errors] == [
        f"line 1: {web.url('/trickle-body')}: remote image refused: timed out after 0.5 s"
    ]
    assert time.monotonic() - start < 0.5 + TRICKLE_FOR_S / 2


# --- whatever the URL --------------------------------------------------------------

_hosts = st.text(alphabet=st.sampled_from("ab.-_:[]%@ \x00é\u2028\u3002"), max_size=12) | (
    st.sampled_from(["::1", "10.0.0.1", "example.com", "xn--", "a" * 70, "127.1", "0x7f.1"])
)
_urls = st.text(max_size=40) | st.builds(
    lambda scheme, user, host, port, path: f"{scheme}://{user}{host}{port}{path}",
    st.sampled_from(["http", "https", "HTTP", "file", "ftp", "", "data"]),
    st.sampled_from(["", "u@", "u:p@", "@"]),
    _hosts,
    st.sampled_from(["", ":", ":0", ":80", ":65536", ":-1", ":x", ":\uff18\uff10"]),
    st.text(max_size=12),
)


@given(_urls)
@settings(max_examples=400, deadline=None)
def test_any_url_is_checked_or_refused_with_a_remote_error(url: str) -> None:
    """Only ``RemoteError`` comes out of the checks, and a URL that passes them has
    only public addresses; no connection is attempted (the resolver is fake)."""
    public = fake_resolver({})  # names fail, IP literals resolve as themselves

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        try:
            return public(host, port)
        except socket.gaierror:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    try:
        addresses = checked_addresses(url, resolve, timeout=2)
    except RemoteError as exc:
        assert str(exc)
    else:
        assert all(address_problem(a) is None for a in addresses)


_locations = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30
) | st.builds(lambda host: f"http://{host}/x", _hosts)


@given(_locations)
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_redirect_is_followed_or_refused_with_a_remote_error(web: Web, location: str) -> None:
    try:
        fetch(web.url("/redirect?to=" + quote(location)), 10_000, timeout=2)
    except RemoteError as exc:
        assert str(exc) and SECRET.decode() not in str(exc)
