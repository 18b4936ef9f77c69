"""The data path's protocols fed bytes directly, without sockets (uvicorn's way).

A ClientConnection and pooled UpstreamConnections run on FakeTransports, which
stand in for the kernel's sockets: they record what the proxy writes and whether
it reads, and they report a full send buffer the way asyncio transports do
(``pause_writing``/``resume_writing`` on the protocol). Everything else is the
product's own code: the ProxyServer (not listening), its pools, the parsers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from sidecar.proxy.client import ClientConnection
from sidecar.proxy.exchange import MAX_RESPONSE_HEAD_BYTES
from sidecar.proxy.routing import RemoteTarget, RoutePlan, RoutingTable
from sidecar.proxy.server import ProxyServer, ProxySettings
from sidecar.proxy.upstream import UpstreamConnection, UpstreamPool


class FakeTransport(asyncio.Transport):
    """Stands in for a connected TCP socket's asyncio transport."""

    def __init__(self, protocol: Any, peer: tuple[str, int] = ("127.0.0.1", 40000)):
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.data = bytearray()  # everything written, in order
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False

    # what the protocols call
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def writelines(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        for piece in pieces:
            self.data += piece

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)  # no "socket": nothing to set options on

    # what the kernel would do
    def send_buffer_full(self) -> None:
        self.protocol.pause_writing()

    def send_buffer_drained(self) -> None:
        self.protocol.resume_writing()

    def taken(self) -> bytes:
        """What was written since the last call."""
        out = bytes(self.data)
        self.data.clear()
        return out


class Proxy:
    """A ProxyServer driven by hand: one client connection, local model connections on demand."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, settings: ProxySettings, plan: RoutePlan | None = None
    ):
        self.server = ProxyServer(RoutingTable(plan or RoutePlan()), ("127.0.0.1", 8000), settings, loop=loop)
        self.client = ClientConnection(self.server)
        self.client_side = FakeTransport(self.client, peer=("10.1.2.3", 51000))
        self.client.connection_made(self.client_side)

    def upstream(self, pool: UpstreamPool | None = None) -> tuple[UpstreamConnection, FakeTransport]:
        """A connection to the local model (or to ``pool``'s upstream), idle in its
        pool (as after an earlier request)."""
        pool = pool or self.server.local_pool
        conn = UpstreamConnection(pool)
        transport = FakeTransport(conn)
        conn.connection_made(transport)
        pool.put(conn)
        return conn, transport

    def send(self, data: bytes) -> None:
        self.client.data_received(data)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # never run: only its clock and timer queue are used
    yield loop
    loop.close()


@pytest.fixture
def proxy(loop) -> Proxy:
    return Proxy(loop, ProxySettings(max_header_bytes=1024))


GET = b"GET /v1/models?x=1 HTTP/1.1\r\nHost: model.example\r\nAccept: */*\r\n\r\n"


def test_a_get_is_relayed_and_its_connection_goes_back_to_the_pool(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)

    assert upstream.taken() == (
        b"GET /v1/models?x=1 HTTP/1.1\r\nHost: model.example\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: model.example\r\n\r\n"
    )
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")

    assert proxy.client_side.taken() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert proxy.server.local_pool.idle == [conn] and not upstream.closed
    stats = proxy.server.stats
    assert stats.requests_total == {("local", "2xx"): 1}
    assert stats.in_flight == stats.local_in_flight == stats.local_waiting == 0
    assert proxy.client.current is None and proxy.client_side.reading and not proxy.client_side.closed


def test_pipelined_requests_are_answered_in_order_one_at_a_time(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET.replace(b"/v1/models?x=1", b"/first") + GET.replace(b"/v1/models?x=1", b"/second"))

    assert upstream.taken().startswith(b"GET /first ")  # the second waits for the first's answer
    assert not proxy.client_side.reading  # and the client is not read meanwhile

    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    assert proxy.client_side.taken() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
    assert upstream.taken().startswith(b"GET /second ")  # on the same pooled connection
    assert proxy.client_side.reading

    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    assert proxy.client_side.taken() == b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
    assert proxy.server.stats.requests_total == {("local", "2xx"): 2}


def test_an_absolute_form_request_is_answered_400_and_nothing_goes_upstream(proxy):
    _, upstream = proxy.upstream()
    proxy.send(b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close\r\n" in answer
    assert b"absolute-form" in answer
    assert upstream.taken() == b"" and proxy.server.stats.rejected_total == {400: 1}
    # A lingering close: our FIN first, the client's further bytes read and dropped.
    assert proxy.client_side.eof_written and proxy.client_side.reading and not proxy.client_side.closed
    proxy.send(GET)
    assert upstream.taken() == b"" and proxy.client_side.taken() == b""


def test_a_request_head_over_the_limit_across_reads_is_answered_431(proxy):
    _, upstream = proxy.upstream()
    proxy.send(b"GET / HTTP/1.1\r\nHost: model.example\r\nX-Long: ")
    for _ in range(3):  # an unfinished field value: llhttp holds it unseen, the proxy counts it
        assert proxy.client_side.taken() == b""
        proxy.send(b"a" * 400)

    assert proxy.client_side.taken().startswith(b"HTTP/1.1 431 ")
    assert upstream.taken() == b"" and proxy.server.stats.rejected_total == {431: 1}


def test_a_response_head_over_the_limit_is_answered_502(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    upstream.taken()
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Big: ")
    conn.data_received(b"b" * (MAX_RESPONSE_HEAD_BYTES // 2))
    assert proxy.client_side.taken() == b"" and not upstream.aborted  # not over the limit yet
    conn.data_received(b"b" * (MAX_RESPONSE_HEAD_BYTES // 2))

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"invalid response" in answer
    assert upstream.aborted and proxy.server.local_pool.idle == []  # never reused
    stats = proxy.server.stats
    assert stats.upstream_failures_total == {("local", "protocol"): 1}
    assert stats.in_flight == stats.local_in_flight == 0
    assert proxy.client_side.closed  # the client's request was complete: a plain close


def test_a_broken_body_in_the_same_read_as_its_head_is_answered_502_not_cut(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    upstream.taken()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n")

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"invalid response" in answer
    assert b"200 OK" not in answer and upstream.aborted
    stats = proxy.server.stats
    assert stats.upstream_failures_total == {("local", "protocol"): 1}
    assert stats.in_flight == stats.local_in_flight == 0
    assert proxy.client_side.closed and not proxy.client_side.aborted


def test_a_broken_body_after_the_head_went_out_cuts_the_client(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert proxy.client_side.taken().startswith(b"HTTP/1.1 200 OK\r\n")
    conn.data_received(b"zz\r\n")

    # The client has a 200 under way: it must see it cut, never a clean end.
    assert proxy.client_side.taken() == b"" and proxy.client_side.aborted
    assert proxy.server.stats.in_flight == 0


def test_a_full_upstream_pauses_reading_the_client_until_it_drains(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(b"POST /v1/completions HTTP/1.1\r\nHost: model.example\r\nContent-Length: 10\r\n\r\n01234")
    assert upstream.taken().endswith(b"\r\n\r\n01234")

    upstream.send_buffer_full()
    assert not proxy.client_side.reading
    upstream.send_buffer_drained()
    assert proxy.client_side.reading

    proxy.send(b"56789")
    assert upstream.taken() == b"56789"


def test_a_full_client_pauses_reading_the_upstream_until_it_drains(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert proxy.client_side.taken() == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    proxy.client_side.send_buffer_full()
    assert not upstream.reading
    proxy.client_side.send_buffer_drained()
    assert upstream.reading

    conn.data_received(b"0\r\n\r\n")
    assert proxy.client_side.taken() == b"0\r\n\r\n" and proxy.server.local_pool.idle == [conn]


def test_a_client_paused_for_two_reasons_reads_again_only_when_both_are_gone(proxy):
    conn, upstream = proxy.upstream()
    first, second = GET.replace(b"?x=1", b"?n=1"), GET.replace(b"?x=1", b"?n=2")
    proxy.send(b"POST /a HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\n\r\nab" + first)
    upstream.send_buffer_full()  # the upstream is full, and a pipelined request waits
    assert not proxy.client_side.reading

    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")  # answered: the waiting one starts
    assert upstream.taken().endswith(
        b"GET /v1/models?n=1 HTTP/1.1\r\nHost: model.example\r\n"
        b"Accept: */*\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: model.example\r\n\r\n"
    )
    assert not proxy.client_side.reading  # still full
    upstream.send_buffer_drained()
    assert proxy.client_side.reading
    proxy.send(second)
    assert not proxy.client_side.reading  # pipelined behind the request in flight


def test_only_the_unfinished_head_counts_toward_the_head_limit_not_what_came_before_it(proxy):
    conn, upstream = proxy.upstream()
    body = b"b" * 4000  # four times the head limit, in the same read as the next head's start
    proxy.send(b"GET /a HTTP/1.1\r\nHo")
    proxy.send(
        b"st: model.example\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: model.example\r\nContent-Length: 4000\r\n\r\n"
        + body
        + b"GET /c HTTP/1.1\r\nHo"
    )
    proxy.send(b"st: model.example\r\n\r\n")
    assert b" 431 " not in proxy.client_side.data

    for path, answer in ((b"/a", b"a"), (b"/b", b"b"), (b"/c", b"c")):
        assert upstream.taken().startswith(b"GET " + path if path != b"/b" else b"POST /b")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + answer)
    assert proxy.client_side.taken() == b"".join(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + a for a in (b"a", b"b", b"c")
    )


def test_a_head_trickled_in_byte_by_byte_gets_408_once_its_time_in_all_is_up(proxy):
    settings = proxy.server.settings
    clock = proxy.server.clock
    _, upstream = proxy.upstream()
    clock.now = started = 100.0
    proxy.send(b"GET / HTTP/1.1\r\n")
    while clock.now - started <= settings.client_idle_timeout:
        proxy.client.check_timeouts(clock.now, settings)
        assert proxy.client_side.taken() == b"" and not proxy.client_side.closed
        clock.now += settings.client_idle_timeout / 8  # far less than the idle time: never silent
        proxy.send(b"X")
    proxy.client.check_timeouts(clock.now, settings)

    assert proxy.client_side.taken().startswith(b"HTTP/1.1 408 ")
    assert upstream.taken() == b""


def test_a_response_head_over_the_limit_in_one_read_is_answered_502(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * MAX_RESPONSE_HEAD_BYTES + b"\r\n\r\n")

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"response head larger than 65536 bytes" in answer and b"X-Big" not in answer
    assert upstream.aborted and proxy.server.stats.upstream_failures_total == {("local", "protocol"): 1}


def test_a_response_head_just_under_the_limit_in_one_read_is_relayed(proxy):
    conn, _ = proxy.upstream()
    proxy.send(GET)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: "
    head += b"b" * (MAX_RESPONSE_HEAD_BYTES - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_RESPONSE_HEAD_BYTES
    conn.data_received(head + b"ok")

    assert proxy.client_side.taken().startswith(b"HTTP/1.1 200 OK\r\n")
    assert proxy.server.stats.requests_total == {("local", "2xx"): 1}


@pytest.mark.parametrize("status", [b"099", b"000", b"600", b"999"])
def test_a_status_outside_100_to_599_is_answered_502_and_its_body_never_relayed(proxy, status):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 2\r\n\r\nhi")

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
    assert b"status " + status + b" outside 100-599" in answer and b"hi" not in answer.split(b"\r\n\r\n")[1]
    assert upstream.aborted and proxy.server.stats.upstream_failures_total == {("local", "protocol"): 1}
    assert proxy.server.stats.in_flight == proxy.server.stats.local_in_flight == 0


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"gzip", b"chunked, chunked"])
def test_a_response_body_in_a_transfer_coding_other_than_chunked_is_answered_502(proxy, coding):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
    assert b"Transfer-Encoding" in answer and b"abc" not in answer
    assert upstream.aborted and proxy.server.stats.upstream_failures_total == {("local", "protocol"): 1}


def test_an_http10_request_with_transfer_encoding_is_refused_400_and_the_connection_closed(proxy):
    _, upstream = proxy.upstream()
    proxy.send(
        b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\nGET /second HTTP/1.0\r\n\r\n"
    )

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close\r\n" in answer
    assert b"Transfer-Encoding is not allowed in an HTTP/1.0 request" in answer
    assert upstream.taken() == b""  # neither request reached the model
    assert proxy.client_side.eof_written  # a lingering close


POST_STALLED = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"


def read_timeout_passes(proxy: Proxy) -> None:
    """Move the clock past the read timeout with neither side sending, and tick."""
    settings = proxy.server.settings
    proxy.server.clock.now += settings.read_timeout + 1
    proxy.client.check_timeouts(proxy.server.clock.now, settings)


def test_a_client_that_stalls_its_body_gets_408_and_no_backend_is_blamed(proxy):
    _, upstream = proxy.upstream()
    proxy.send(POST_STALLED)  # 3 of its 10 body bytes, then nothing
    assert upstream.taken().endswith(b"\r\n\r\nabc")
    read_timeout_passes(proxy)

    answer = proxy.client_side.taken()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"Connection: close\r\n" in answer
    assert b"request body not received in time" in answer
    assert upstream.aborted and proxy.server.local_pool.idle == []  # it holds half a request
    stats = proxy.server.stats
    assert stats.upstream_failures_total == {} and stats.fallbacks_total == {}
    assert stats.rejected_total == {408: 1}
    assert stats.in_flight == stats.local_in_flight == stats.local_waiting == 0
    assert proxy.client_side.eof_written  # unread body bytes: a lingering close


def test_a_client_that_stops_reading_its_response_is_cut_and_no_backend_is_blamed(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    proxy.client_side.send_buffer_full()  # the client reads nothing more: the upstream is not read
    read_timeout_passes(proxy)

    assert proxy.client_side.aborted and upstream.aborted
    stats = proxy.server.stats
    assert stats.upstream_failures_total == {} and stats.in_flight == stats.local_in_flight == 0


def test_a_model_that_stops_sending_its_response_is_blamed(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    read_timeout_passes(proxy)  # the client reads: the model owes the next byte

    assert proxy.client_side.aborted
    assert proxy.server.stats.upstream_failures_total == {("local", "timeout"): 1}


def test_a_client_that_stalls_its_body_after_a_100_continue_still_gets_408(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(POST_STALLED.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n"))
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert proxy.client_side.taken() == b"HTTP/1.1 100 Continue\r\n\r\n"
    read_timeout_passes(proxy)

    assert proxy.client_side.taken().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert proxy.server.stats.upstream_failures_total == {} and upstream.aborted


def test_a_client_that_stalls_its_body_while_its_response_is_under_way_is_cut(proxy):
    conn, upstream = proxy.upstream()
    proxy.send(POST_STALLED)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")  # answers early
    assert proxy.client_side.taken().startswith(b"HTTP/1.1 200 OK\r\n")
    read_timeout_passes(proxy)

    assert proxy.client_side.aborted and proxy.client_side.taken() == b""
    assert upstream.aborted
    stats = proxy.server.stats
    assert stats.upstream_failures_total == {} and stats.in_flight == stats.local_in_flight == 0


def test_a_body_held_back_by_a_full_upstream_times_out_as_the_upstreams_fault(proxy):
    _, upstream = proxy.upstream()
    proxy.send(POST_STALLED)
    upstream.send_buffer_full()  # the model is not reading: the client is not read either
    read_timeout_passes(proxy)

    assert proxy.client_side.taken().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert proxy.server.stats.upstream_failures_total == {("local", "timeout"): 1}


def test_a_client_that_stalls_its_body_on_the_remote_leaves_its_breaker_and_the_local_model_alone(loop):
    remote = RemoteTarget(scheme="http", host="127.0.0.1", port=9, authority="remote.example")
    proxy = Proxy(loop, ProxySettings(), RoutePlan(remote=remote, percentage=100, offloading=True))
    route = proxy.server.remotes.route(remote)
    assert route is not None
    _, upstream = proxy.upstream(route.pool)
    proxy.send(POST_STALLED)
    assert upstream.taken().startswith(b"POST /a HTTP/1.1\r\nHost: remote.example\r\n")
    read_timeout_passes(proxy)

    assert proxy.client_side.taken().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert upstream.aborted and proxy.client.current is None
    stats = proxy.server.stats
    assert stats.upstream_failures_total == {} and stats.fallbacks_total == {}
    assert route.breaker.state == "closed" and route.breaker.failures == 0
    assert stats.local_in_flight == 0 and proxy.server.local_pool.idle == []  # never tried locally
