"""No open proxy, no smuggling: bad heads get a 4xx and reach no upstream.

Each case sends exact bytes on a raw socket and checks three things: the status
the proxy answers, that it closes the connection, and that neither the local
nor the remote server saw any request at all. (Requests dangerous on one route
only are kept off that route instead: tests/integration/test_proxy_routes.py.)
"""

from __future__ import annotations

import socket

import pytest

from sidecar.proxy.server import ProxySettings
from tests.integration.servers import LoopThread, ProxyHarness, exchange_raw


@pytest.fixture(scope="module")
def h():
    with LoopThread() as lt:
        harness = ProxyHarness(
            lt, percentage=50, settings=ProxySettings(max_header_bytes=32 * 1024, max_header_count=100)
        )
        yield harness
        harness.close()


H = b"Host: svc\r\n"

CASES = {
    # open proxy
    "absolute-form http": (b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400),
    "absolute-form https": (b"GET https://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "absolute-form to the local port": (b"GET http://127.0.0.1:9/echo HTTP/1.1\r\n" + H + b"\r\n", 400),
    "CONNECT": (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "asterisk-form other than OPTIONS": (b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    # Host
    "no Host on HTTP/1.1": (b"GET /echo HTTP/1.1\r\n\r\n", 400),
    "two Hosts": (b"GET /echo HTTP/1.1\r\nHost: svc\r\nHost: evil\r\n\r\n", 400),
    "Host with whitespace": (b"GET /echo HTTP/1.1\r\nHost: svc evil\r\n\r\n", 400),
    "Host with userinfo": (b"GET /echo HTTP/1.1\r\nHost: user@evil\r\n\r\n", 400),
    "Host with a path": (b"GET /echo HTTP/1.1\r\nHost: evil/x\r\n\r\n", 400),
    # smuggling shapes
    "Content-Length and Transfer-Encoding": (
        b"POST /echo HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n"
        + H
        + b"\r\n",
        400,
    ),
    "Transfer-Encoding and Content-Length": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    "differing Content-Lengths": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    "equal Content-Lengths": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    "Content-Length list": (b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    "negative Content-Length": (b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    "Transfer-Encoding gzip": (b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nxx", 501),
    "Transfer-Encoding gzip, chunked": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "Transfer-Encoding twice": (
        b"POST /echo HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding xchunked": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n",
        501,
    ),
    "obs-fold": (b"GET /echo HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    "space before colon": (b"GET /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n", 400),
    "bare LF line ends": (b"GET /echo HTTP/1.1\nHost: svc\n\n", 400),
    "NUL in a field": (b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    # sizes
    "header section over 32 KiB": (
        b"GET /echo HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 40000 + b"\r\n\r\n",
        431,
    ),
    "many medium fields over 32 KiB": (
        b"GET /echo HTTP/1.1\r\n"
        + H
        + b"".join(b"X-F%d: %b\r\n" % (i, b"v" * 500) for i in range(70))
        + b"\r\n",
        431,
    ),
    "101 fields": (
        b"GET /echo HTTP/1.1\r\n" + H + b"".join(b"X-F%d: v\r\n" % i for i in range(100)) + b"\r\n",
        431,
    ),
    "request target over 32 KiB": (b"GET /echo?" + b"q" * 40000 + b" HTTP/1.1\r\n" + H + b"\r\n", 431),
    # versions and methods
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "HTTP/1.2": (b"GET /echo HTTP/1.2\r\n" + H + b"\r\n", 400),
    "HTTP/0.9 style": (b"GET /echo\r\n\r\n", 505),
    "unknown method": (b"FROB /echo HTTP/1.1\r\n" + H + b"\r\n", 501),
    "WebSocket upgrade with a body": (
        b"POST /ws HTTP/1.1\r\n"
        + H
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_any_upstream(h, case):
    data, status = CASES[case]
    before = (h.local.count(), h.remote.count())
    answer = exchange_raw(h.port, data)  # returns once the proxy closes the connection
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"Connection: close\r\n" in answer
    reason = answer.split(b"\r\n\r\n", 1)[1]
    assert 0 < len(reason) < 200 and b"evil" not in reason
    assert (h.local.count(), h.remote.count()) == before


def test_a_refusal_after_a_good_pipelined_request_comes_after_its_answer(h):
    before = h.local.count() + h.remote.count()
    answer = exchange_raw(
        h.port,
        b"GET /echo HTTP/1.1\r\n"
        + H
        + b"\r\n"
        + b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    )
    first, _, second = answer.partition(b"HTTP/1.1 400 ")
    assert first.startswith(b"HTTP/1.1 200 OK") and b"absolute-form" in second
    assert h.local.count() + h.remote.count() == before + 1


def test_a_malformed_chunked_body_cancels_the_upstream_request_and_gets_a_400(h):
    before = h.local.count() + h.remote.count()
    answer = exchange_raw(
        h.port, b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 ") and b"chunk" in answer
    # The head may have gone on (bodies stream), the request never completed there:
    # the upstream connection was cut, so no upstream answered anything.
    assert h.local.count() + h.remote.count() <= before + 1
    assert h.proxy.stats.in_flight == 0


def test_a_slow_endless_header_is_cut_at_the_limit(h):
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\nX-Slow: ")
        answer = b""
        try:
            for _ in range(64):
                sock.sendall(b"a" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_the_proxy_never_connects_anywhere_but_its_two_upstreams(h):
    """Every request above went through the proxy's pools; only two pools exist."""
    assert {(p.host, p.port) for p in h.proxy.remotes.pools.values()} <= {("127.0.0.1", h.remote.port)}
    assert (h.proxy.local_pool.host, h.proxy.local_pool.port) == ("127.0.0.1", h.local.port)
