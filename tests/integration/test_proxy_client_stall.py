"""A client that stops sending its request body, over real sockets: the read timeout
fires in the proxy's own tick, and the timeout is the client's, never a backend's."""

from __future__ import annotations

import socket

import pytest

from sidecar.proxy.breaker import BreakerSettings
from sidecar.proxy.server import ProxySettings
from tests.integration.servers import LoopThread, ProxyHarness, read_response, wait_until

STALLED = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"  # 3 of 10 bytes


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture
def harness(lt):
    # One failure would open the breaker: any blame on the remote would show.
    settings = ProxySettings(read_timeout=0.3, tick=0.05, breaker=BreakerSettings(failure_threshold=1))
    h = ProxyHarness(lt, percentage=100, settings=settings)
    yield h
    h.close()


def test_clients_stalling_their_bodies_get_408s_and_the_remote_is_not_blamed(harness):
    clients = [socket.create_connection(("127.0.0.1", harness.port), timeout=10) for _ in range(4)]
    try:
        for sock in clients:
            sock.sendall(STALLED)
        answers = [read_response(sock) for sock in clients]
    finally:
        for sock in clients:
            sock.close()

    for status, headers, body in answers:
        assert status == 408 and headers["connection"] == ["close"]
        assert body == b"request body not received in time (the client stopped sending it)\n"
    stats = harness.proxy.stats
    assert stats.upstream_failures_total == {} and stats.fallbacks_total == {}
    assert stats.breaker_state == "closed" and stats.rejected_total == {408: 4}
    assert harness.remote.count() == 4 and harness.local.count() == 0  # never retried locally
    # The remote's half-fed connections are closed, not pooled.
    wait_until("the remote's connections closed", lambda: harness.remote.open_connections == 0)
    assert stats.in_flight == 0
