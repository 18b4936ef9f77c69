"""The proxy as its own process: flat memory for huge bodies, SIGTERM loses nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from tests.integration.servers import (
    LoopThread,
    ProxyHarness,
    ProxyProcess,
    ResponseReader,
    Upstream,
    proc_status_kib,
    wait_until,
)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture(scope="module")
def local(lt):
    server = lt.run(Upstream.started("local"))
    yield server
    lt.run(server.kill())


def peak_rss_kib(proxy: ProxyProcess) -> int:
    return proc_status_kib(proxy.pid, "VmHWM")


def warm_up(port: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        for _ in range(20):
            assert c.post("/echo", content=b"w" * 100_000).status_code == 200
            assert c.get("/download?bytes=1000000").status_code == 200


def test_a_512_mib_upload_streams_through_with_flat_memory(local):
    size = 512 * MIB
    with ProxyProcess("--local", f"127.0.0.1:{local.port}") as proxy:
        warm_up(proxy.port)
        before = peak_rss_kib(proxy)
        piece = b"u" * MIB
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // MIB):
                sock.sendall(piece)
            status, _, body = ResponseReader(sock).response()
        growth_mib = (peak_rss_kib(proxy) - before) / 1024
    assert status == 200 and json.loads(body)["body_size"] == size
    assert growth_mib < 16, f"proxy peak RSS grew by {growth_mib:.1f} MiB during a 512 MiB upload"


def test_a_512_mib_download_streams_through_with_flat_memory(local):
    size = 512 * MIB
    with ProxyProcess("--local", f"127.0.0.1:{local.port}") as proxy:
        warm_up(proxy.port)
        before = peak_rss_kib(proxy)
        received = 0
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
            sock.sendall(b"GET /download?bytes=%d HTTP/1.1\r\nHost: svc\r\n\r\n" % size)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            head, rest = head.split(b"\r\n\r\n", 1)
            received = len(rest)
            while received < size:
                data = sock.recv(1 << 20)
                assert data
                received += len(data)
        growth_mib = (peak_rss_kib(proxy) - before) / 1024
    assert head.startswith(b"HTTP/1.1 200") and received == size
    assert growth_mib < 16, f"proxy peak RSS grew by {growth_mib:.1f} MiB during a 512 MiB download"


def test_sigterm_during_load_and_open_streams_loses_nothing(local):
    events_per_stream = 30  # 50 ms apart: each stream outlives the grace period
    results: dict[str, list] = {"streams": [], "statuses": [], "lost": [], "refused": []}
    started = threading.Barrier(5 + 1)

    def stream(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"GET /sse?n=%d&interval_ms=50 HTTP/1.1\r\nHost: svc\r\n\r\n" % events_per_stream)
            first = sock.recv(65536)
            started.wait()
            data = first
            while not data.endswith(b"0\r\n\r\n"):
                more = sock.recv(65536)
                if not more:
                    break
                data += more
            results["streams"].append((data.count(b"data: "), data.endswith(b"0\r\n\r\n")))

    def load(port: int, stop: threading.Event) -> None:
        # Like a load balancer's client: it sends until the proxy says it is draining
        # (Connection: close), then stops using this endpoint. A connection opened right
        # as the listener closes would be reset by the kernel from the accept backlog,
        # which no server can prevent, so refusal is probed separately below.
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
                while not stop.is_set():
                    r = c.get("/slow?delay_ms=20")
                    results["statuses"].append(r.status_code)
                    if r.headers.get("connection") == "close":
                        return
        except httpx.HTTPError as exc:  # a request lost
            results["lost"].append(repr(exc))

    def probe_refusal(port: int) -> None:
        while not stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                results["refused"].append(time.monotonic())
                return
            time.sleep(0.05)

    with ProxyProcess(
        "--local", f"127.0.0.1:{local.port}", "--shutdown-grace", "0.5", "--shutdown-deadline", "10"
    ) as proxy:
        stop = threading.Event()
        threads = [threading.Thread(target=stream, args=(proxy.port,)) for _ in range(5)]
        threads += [threading.Thread(target=load, args=(proxy.port, stop)) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait(10)
        wait_until("the load is being answered", lambda: len(results["statuses"]) >= 8)
        sent_at = time.monotonic()
        proxy.terminate()
        prober = threading.Thread(target=probe_refusal, args=(proxy.port,))
        prober.start()
        threads.append(prober)
        code = proxy.wait(15)
        exited_after = time.monotonic() - sent_at
        stop.set()
        for t in threads:
            t.join(20)
    assert code == 0
    assert results["lost"] == []
    assert results["streams"] == [(events_per_stream, True)] * 5
    assert results["statuses"] and set(results["statuses"]) == {200}
    # New connections were refused once the grace ended, while the streams still ran.
    assert results["refused"] and min(results["refused"]) - sent_at < exited_after
    assert exited_after < 10


def test_shutdown_turns_readiness_off_at_once_drains_in_flight_and_cuts_at_the_deadline(lt):
    from sidecar.proxy.server import ProxySettings

    h = ProxyHarness(lt, with_remote=False, settings=ProxySettings(shutdown_grace=0.3, tick=0.05))
    try:
        idle = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        idle.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert ResponseReader(idle).response()[0] == 200  # now an idle keep-alive connection
        busy = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        busy.sendall(b"GET /slow?delay_ms=800 HTTP/1.1\r\nHost: svc\r\n\r\n")
        endless = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        endless.sendall(b"GET /sse?n=1000&interval_ms=20 HTTP/1.1\r\nHost: svc\r\n\r\n")
        endless.recv(65536)
        wait_until("the slow request and the stream are in flight", lambda: h.proxy.stats.in_flight == 2)
        assert h.proxy.ready and h.ready_changes == [True]

        began = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(h.proxy.shutdown(1.5), lt.loop)
        wait_until("readiness turned off", lambda: not h.proxy.ready)
        assert not h.proxy.ready and h.ready_changes == [True, False]

        assert idle.recv(10) == b""  # closed once the grace is over
        assert 0.25 < time.monotonic() - began < 1.0
        status, headers, _ = ResponseReader(busy).response()  # in flight: finished, then closed
        assert status == 200 and headers["connection"] == ["close"]
        got = b""
        while data := endless.recv(65536):  # a stream runs until the deadline, then is cut
            got += data
        assert 1.4 < time.monotonic() - began < 3.0
        assert got.count(b"data: ") > 20 and not got.endswith(b"0\r\n\r\n")
        future.result(5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", h.port), timeout=2)
        for s in (idle, busy, endless):
            s.close()
    finally:
        h.close()
