"""A tenant's pod cannot stall the operator: requests to pods end at one deadline
whatever the pod sends, take no more than a cap, follow no redirect; trainers'
metrics are read in the background, so a reconcile never waits on one; a reconcile
held up blocks no other object, and the resync loop waits on no reconcile."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kubetune_operator.handlers.context import ReconcileLocks, ResyncPool
from kubetune_operator.pod_http import PodHttpError, request
from kubetune_operator.scrapes import Scrapes, read_metrics

Serve = Callable[[socket.socket], None]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def pod() -> Iterator[Callable[[Serve], int]]:
    """``pod(serve)``: a loopback server whose connections ``serve`` answers; its port."""
    servers: list[_Server] = []

    def start(serve: Serve) -> int:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)
                with contextlib.suppress(OSError):  # the client gave up
                    serve(self.request)

        server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def trickle(head: bytes) -> Serve:
    """Sends ``head`` at once, then a byte every 50 ms for ever."""

    def serve(conn: socket.socket) -> None:
        conn.sendall(head)
        while True:
            conn.sendall(b"x")
            time.sleep(0.05)

    return serve


def answer(status: str, body: bytes, extra: str = "") -> Serve:
    def serve(conn: socket.socket) -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
        )

    return serve


METRICS = b"kubetune_train_step 7\nkubetune_train_total_steps 10\n"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Slow: ",  # headers that never end
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n",  # a body that never ends
    ],
)
def test_a_trickling_pod_is_cut_off_at_the_deadline(
    pod: Callable[[Serve], int], head: bytes
) -> None:
    port = pod(trickle(head))
    start = time.monotonic()
    with pytest.raises(PodHttpError, match=r"no whole answer within 0\.5 s"):
        request("127.0.0.1", port, "GET", "/metrics", deadline=0.5, max_bytes=1 << 30)
    assert time.monotonic() - start < 3  # without the deadline: for ever


def test_an_answer_over_the_cap_is_refused(pod: Callable[[Serve], int]) -> None:
    port = pod(answer("200 OK", b"k" * 4096))
    with pytest.raises(PodHttpError, match="larger than 1024 bytes"):
        request("127.0.0.1", port, "GET", "/metrics", deadline=5, max_bytes=1024)
    assert request("127.0.0.1", port, "GET", "/", deadline=5, max_bytes=4096).body == b"k" * 4096


def test_a_redirect_is_not_followed(pod: Callable[[Serve], int]) -> None:
    reached: list[bytes] = []

    def target(conn: socket.socket) -> None:
        reached.append(b"hit")
        answer("200 OK", METRICS)(conn)

    elsewhere = pod(target)
    port = pod(answer("302 Found", b"", f"Location: http://127.0.0.1:{elsewhere}/metrics\r\n"))
    assert request("127.0.0.1", port, "GET", "/metrics", deadline=5, max_bytes=1024).status == 302
    assert read_metrics("127.0.0.1", port, 5) is None
    time.sleep(0.2)
    assert reached == []


def test_a_reconcile_never_waits_on_a_trickling_trainer(pod: Callable[[Serve], int]) -> None:
    hostile = pod(trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"))
    honest = pod(answer("200 OK", METRICS))
    scrapes = Scrapes(deadline=2, interval=60)
    news = threading.Event()
    try:
        start = time.monotonic()
        assert scrapes.latest(("team", "bad"), ("127.0.0.1", hostile), then=news.set) is None
        assert scrapes.latest(("team", "good"), ("127.0.0.1", honest), then=news.set) is None
        assert time.monotonic() - start < 1  # neither waited on the pods (the deadline is 2 s)
        assert news.wait(1.5)  # the honest read came back while the hostile one hangs
        text = scrapes.latest(("team", "good"), ("127.0.0.1", honest), then=news.set)
        assert text == METRICS.decode()
        # Within the interval the honest one is not read again; the hostile one's read is
        # still under way and is not started twice.
        news.clear()
        scrapes.latest(("team", "good"), ("127.0.0.1", honest), then=news.set)
        scrapes.latest(("team", "bad"), ("127.0.0.1", hostile), then=news.set)
        assert not news.wait(2.5)  # the hostile read ended at its deadline, with no text
        assert scrapes.latest(("team", "bad"), ("127.0.0.1", hostile), then=news.set) is None
    finally:
        scrapes.shutdown()


def test_a_new_pod_s_metrics_are_not_taken_from_the_old_one(pod: Callable[[Serve], int]) -> None:
    old, new = pod(answer("200 OK", METRICS)), pod(answer("200 OK", b"kubetune_train_step 1\n"))
    scrapes = Scrapes(deadline=2, interval=60)
    news = threading.Event()
    try:
        scrapes.latest(("team", "run"), ("127.0.0.1", old), then=news.set)
        assert news.wait(2)
        news.clear()
        assert scrapes.latest(("team", "run"), ("127.0.0.1", new), then=news.set) is None
        assert news.wait(2)
        assert scrapes.latest(("team", "run"), ("127.0.0.1", new), then=news.set) == (
            "kubetune_train_step 1\n"
        )
    finally:
        scrapes.shutdown()


def test_a_reconcile_held_up_holds_no_other_object_s_lock() -> None:
    locks = ReconcileLocks()
    held, release = threading.Event(), threading.Event()

    def slow() -> None:
        with locks.hold("FineTuneJob", "team", "slow"):
            held.set()
            release.wait(10)

    worker = threading.Thread(target=slow)
    worker.start()
    assert held.wait(5)
    # Every other object, any number of them, is free; the held one is not.
    for i in range(200):
        got = threading.Event()

        def other(name: str = f"run-{i}", got: threading.Event = got) -> None:
            with locks.hold("FineTuneJob", "team", name):
                got.set()

        t = threading.Thread(target=other)
        t.start()
        assert got.wait(5), i
        t.join()
    blocked = threading.Event()

    def same() -> None:
        with locks.hold("FineTuneJob", "team", "slow"):
            blocked.set()

    waiter = threading.Thread(target=same)
    waiter.start()
    assert not blocked.wait(0.3)
    release.set()
    assert blocked.wait(5)
    worker.join()
    waiter.join()
    assert locks._locks == {}  # nothing kept for objects nobody reconciles


def test_the_resync_keeps_going_while_one_object_s_reconcile_hangs() -> None:
    pool = ResyncPool(workers=2)
    release = threading.Event()
    runs: list[str] = []

    def hang() -> None:
        runs.append("stuck")
        release.wait(10)

    try:
        for _ in range(5):  # five resync periods
            pool.submit(("ModelDeployment", "team", "stuck"), hang)
            done = threading.Event()
            assert pool.submit(
                ("FineTuneJob", "team", "run"), lambda done=done: (runs.append("run"), done.set())
            )
            assert done.wait(5)
        assert runs.count("stuck") == 1  # not started again while it hangs
        assert runs.count("run") == 5
    finally:
        release.set()
