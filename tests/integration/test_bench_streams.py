"""The benchmark's streamed figures measure intervals on one clock, so they can't be negative.

bench/proxy_bench.py's own SSE upstream and client run here on loopback, straight
and through the sidecar's proxy, with a few short streams.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket

import pytest

from sidecar.proxy.routing import RoutingTable
from sidecar.proxy.server import ProxyServer
from tests.integration.servers import REPO

spec = importlib.util.spec_from_file_location("proxy_bench", REPO / "bench" / "proxy_bench.py")
assert spec is not None and spec.loader is not None
proxy_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(proxy_bench)

STREAMS, EVENTS, INTERVAL = 5, 6, 0.005


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(through_proxy: bool) -> dict:
    port = free_port()
    server = asyncio.get_running_loop().create_task(proxy_bench.sse_server(port, EVENTS, INTERVAL))
    proxy = None
    try:
        for _ in range(200):  # the upstream is listening once a connection succeeds
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.01)
        target = port
        if through_proxy:
            proxy = ProxyServer(RoutingTable(), ("127.0.0.1", port))
            target = await proxy.start()
        return await proxy_bench.sse_client(target, STREAMS, EVENTS, INTERVAL)
    finally:
        if proxy is not None:
            await proxy.shutdown(0.5)
        server.cancel()


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "sidecar"])
def test_streamed_figures_are_one_clock_intervals_and_never_negative(through_proxy):
    result = asyncio.run(measure(through_proxy))
    assert result["complete"] == STREAMS
    assert 0 <= result["delay_p50_ms"] <= result["delay_p99_ms"]
    assert result["delay_p99_ms"] < 1000  # milliseconds, not a unit mix-up
    assert result["ttfb_p50_ms"] >= 0


def test_a_negative_interval_is_refused_not_printed():
    assert proxy_bench.stream_figures([3, 1, 2], [4]) == {
        "delay_p50_ms": 2e-6,
        "delay_p99_ms": 3e-6,
        "ttfb_p50_ms": 4e-6,
    }
    with pytest.raises(ValueError, match="negative"):
        proxy_bench.stream_figures([5, -1], [4])
    with pytest.raises(ValueError, match="every stream failed"):
        proxy_bench.stream_figures([], [])
