"""The data path's own signals and the spillover rule, through real sockets: requests in
flight and waiting at the local model, counted exactly whatever way a request ends, and
requests beyond ``spillover`` in flight sent to the remote at once."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from sidecar.proxy.breaker import BreakerSettings
from sidecar.proxy.server import ProxySettings
from tests.integration.servers import LoopThread, ProxyHarness, wait_until


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture
def harnesses(lt):
    made = []

    def make(**kw):
        h = ProxyHarness(lt, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def counters(h: ProxyHarness) -> tuple[int, int, int]:
    stats = h.proxy.stats
    return stats.local_in_flight, stats.local_waiting, stats.in_flight


def test_a_streamed_request_is_waiting_until_its_first_event_and_in_flight_until_its_end(harnesses):
    h = harnesses()
    assert counters(h) == (0, 0, 0)
    with httpx.Client(base_url=h.url, timeout=10) as client:
        with client.stream("GET", "/sse?n=2&first_ms=700&interval_ms=500") as response:
            assert response.status_code == 200  # the head came at once, as an LLM server's does
            assert counters(h) == (1, 1, 1)
            chunks = response.iter_raw()
            first = next(chunks)
            assert b'"i": 0' in first
            wait_until("no longer waiting once the first event is relayed", lambda: counters(h) == (1, 0, 1))
            rest = b"".join(chunks)
            assert b'"i": 1' in rest
    wait_until("nothing in flight once the stream ended", lambda: counters(h) == (0, 0, 0))


def test_a_request_served_by_the_remote_is_never_counted_at_the_local_model(harnesses):
    h = harnesses(percentage=100)
    with httpx.Client(base_url=h.url, timeout=10) as client:
        with client.stream("GET", "/sse?n=2&first_ms=300&interval_ms=300") as response:
            assert response.headers["x-upstream"] == "remote"
            assert counters(h) == (0, 0, 1)
            response.read()
    wait_until("the request ended", lambda: counters(h) == (0, 0, 0))


def _abort_mid_stream(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /sse?n=50&interval_ms=200 HTTP/1.1\r\nHost: m\r\n\r\n")
        data = b""
        while b'"i": 0' not in data:
            data += sock.recv(65536)
    # closed with the stream still running: the client is gone


def test_the_counters_come_back_to_zero_whatever_way_requests_end(harnesses, lt):
    """Normal, HEAD, no body, a local 503 retried on the remote, a local model that is
    down, a client gone mid-stream, the local model killed mid-stream, a WebSocket."""
    h = harnesses(percentage=0, settings=ProxySettings(breaker=BreakerSettings(failure_threshold=100)))
    with httpx.Client(base_url=h.url, timeout=10) as client:
        assert client.get("/echo").status_code == 200
        assert client.head("/echo").status_code == 200
        assert client.get("/status?code=204").status_code == 204
        h.local.answer = (503, [])
        assert client.get("/echo").headers["x-upstream"] == "remote"
        h.local.answer = None
    _abort_mid_stream(h.port)
    wait_until("the aborted stream is no longer counted", lambda: counters(h) == (0, 0, 0))

    # The local model killed in the middle of a stream: the client sees it cut.
    got_first = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(base_url=h.url, timeout=10) as client:
                with client.stream("GET", "/sse?n=50&interval_ms=200") as response:
                    for chunk in response.iter_raw():
                        if b'"i": 0' in chunk:
                            got_first.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=stream)
    thread.start()
    assert got_first.wait(10)
    assert counters(h) == (1, 0, 1)
    lt.run(h.local.kill())
    thread.join(10)
    wait_until("the cut stream is no longer counted", lambda: counters(h) == (0, 0, 0))

    # Local model down (its listener closed): the request goes to the remote.
    with httpx.Client(base_url=h.url, timeout=10) as client:
        assert client.get("/echo").headers["x-upstream"] == "remote"
    assert counters(h) == (0, 0, 0)

    # A WebSocket to the remote becomes a tunnel, never counted as in flight.
    with socket.create_connection(("127.0.0.1", h.port), timeout=5) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: m\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        assert counters(h) == (0, 0, 0)


def _slow_requests(url: str, n: int, delay_ms: int) -> tuple[list[threading.Thread], list[str]]:
    served: list[str] = []

    def one() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            served.append(client.get(f"/slow?delay_ms={delay_ms}").headers["x-upstream"])

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, served


def test_requests_beyond_the_spillover_limit_go_to_the_remote_at_once_without_offloading(harnesses):
    h = harnesses(percentage=0, spillover=2)
    threads, served = _slow_requests(h.url, 2, 1500)
    wait_until("two requests in flight at the local model", lambda: counters(h)[0] == 2)
    started = time.monotonic()
    with httpx.Client(base_url=h.url, timeout=10) as client:
        third = client.get("/echo")
        elapsed = time.monotonic() - started
        assert third.headers["x-upstream"] == "remote"
        assert elapsed < 1.0  # it did not wait for the local model
        assert h.routing.spillovers == 1
        for t in threads:
            t.join(10)
        assert served == ["local", "local"]
        assert client.get("/echo").headers["x-upstream"] == "local"
    assert h.routing.spillovers == 1
    assert h.local.count("slow") == 2 and h.remote.count("echo") == 1


def test_without_spillover_every_request_waits_for_the_local_model(harnesses):
    h = harnesses(percentage=0)
    threads, _ = _slow_requests(h.url, 3, 500)
    wait_until("three requests in flight at the local model", lambda: counters(h)[0] == 3)
    for t in threads:
        t.join(10)
    assert h.remote.count() == 0 and h.routing.spillovers == 0


def test_a_spilled_request_whose_remote_is_down_is_served_locally(harnesses, lt):
    h = harnesses(percentage=0, spillover=1)
    lt.run(h.remote.kill())
    threads, served = _slow_requests(h.url, 1, 800)
    wait_until("one request in flight at the local model", lambda: counters(h)[0] == 1)
    with httpx.Client(base_url=h.url, timeout=10) as client:
        response = client.get("/echo")
    assert response.status_code == 200 and response.headers["x-upstream"] == "local"
    for t in threads:
        t.join(10)
    assert served == ["local"]
    assert h.proxy.stats.fallbacks_total == {("remote", "local", "connect"): 1}
