"""The sidecar's data path: an HTTP/1.1 reverse proxy on raw asyncio protocols.

Every request asks the RoutingTable where to go (the local model on 127.0.0.1 or
the configured remote) and nowhere else. Design, from measurements on the target
machine: a raw asyncio Protocol on uvloop parsing with httptools (llhttp) on both
sides, with small keep-alive pools, reached ~0.8x HAProxy's throughput, where a
Starlette/httpx route reached 0.01x. So: no framework, no Task per request on
the hot path (only for opening a new upstream connection), no copy of bodies;
each piece read from one side is written to the other at once, and reading stops
while the other side's write buffer is full (flat memory for any body size).

    client --ClientConnection--> Exchange --UpstreamConnection--> local | remote
                                  (one per request: routing, retries, response
                                   relay; it is the response parser's protocol)

Failure rules: a remote that cannot be connected (refused, TLS, timeout) or
that drops the request before answering is replaced by the local model for that
request (the request body is held back until the upstream is connected, and
kept for a retry while under ``replay_buffer_bytes``); repeated remote failures
open a circuit breaker. A local model that is down sends the request to the
remote when one is configured, else the client gets a clear 502 (503 with
Retry-After while shutting down). Once any byte of a response reached the
client nothing is retried: a broken upstream then breaks the client's response.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import ssl
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httptools

from sidecar.breaker import BreakerSettings, CircuitBreaker
from sidecar.http1 import (
    BODY_CHUNKED,
    FRAME_CHUNKED,
    Rejection,
    RequestHead,
    inspect_request,
    render_error,
    render_extra,
    render_interim,
    render_request_head,
    render_response_head,
    split_response_head,
)
from sidecar.routing import RemoteTarget, RoutePlan, RoutingTable
from sidecar.stats import ProxyStats
from sidecar.upstream import (
    PAUSE_CONNECTING,
    PAUSE_PIPELINE,
    PAUSE_REJECTED,
    PAUSE_UPGRADE,
    CoarseClock,
    UpstreamConnection,
    UpstreamPool,
    set_nodelay,
)

log = logging.getLogger("sidecar.proxy")

MAX_ATTEMPTS = 4  # per request: stale keep-alive retry + fallback to the other side
LINGER_SECONDS = 2.0  # how long a refused client may still send before the close


@dataclass(frozen=True)
class ProxySettings:
    """Timeouts in seconds, sizes in bytes."""

    connect_timeout: float = 2.0  # TCP connect + TLS handshake to an upstream
    read_timeout: float = 300.0  # a request in flight with neither side sending anything
    client_idle_timeout: float = 60.0  # a client keep-alive connection between requests
    upstream_idle_timeout: float = 4.0  # pooled upstream connections (below uvicorn's 5 s)
    tunnel_idle_timeout: float = 3600.0  # a WebSocket tunnel with no bytes either way
    max_header_bytes: int = 32 * 1024  # request line + header fields, else 431
    max_header_count: int = 100  # header fields, else 431
    replay_buffer_bytes: int = 64 * 1024  # request body kept for a retry on the other side
    max_idle_per_upstream: int = 256
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    shutdown_grace: float = 1.0  # after readiness goes false, keep accepting this long
    remote_ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # None: system CAs
    tick: float = 0.5  # resolution of timeouts and idle sweeps


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


class _BadUpstream(Exception):
    """Raised inside a response parser callback for a response we can't relay."""


class _RemoteRoute:
    """Everything per remote target the data path needs, computed once."""

    __slots__ = ("authority", "breaker", "extra", "extra_names", "pool", "prefix")

    def __init__(self, target: RemoteTarget, pool: UpstreamPool, breaker: CircuitBreaker):
        self.pool = pool
        self.authority = target.authority.encode("latin-1")
        self.prefix = target.path_prefix.encode("latin-1")
        self.extra, self.extra_names = render_extra(target.headers)
        self.breaker = breaker


class Exchange:
    """One request and its response; the protocol of its response parser."""

    __slots__ = (
        "attempts",
        "backend",
        "client",
        "connect_task",
        "continue_sent",
        "done",
        "eof_body",
        "final",
        "frame",
        "head",
        "head_buf",
        "head_pos",
        "keep_alive",
        "out",
        "parser",
        "pending",
        "pool",
        "request_complete",
        "reused",
        "sent",
        "sent_size",
        "server",
        "status",
        "t_start",
        "target",
        "tried_local",
        "tried_remote",
        "up_out",
        "upstream",
    )

    def __init__(self, client: ClientConnection, head: RequestHead):
        self.client = client
        self.server = client.server
        self.head = head
        self.target: RemoteTarget | None = None
        self.backend = "local"
        self.pool: UpstreamPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task | None = None
        self.parser: Any = None
        self.pending: list[bytes] = []  # body read from the client, not yet sent on
        self.sent: list[bytes] | None = []  # body sent on, kept for a retry (None: too big)
        self.sent_size = 0
        self.request_complete = False
        self.reused = False
        self.status = 0
        self.head_buf = b""  # the response head's bytes until it is complete
        self.head_pos = 0  # where in head_buf the next head starts (after a 1xx)
        self.frame = -1
        self.final = False  # the final response head was received
        self.eof_body = False  # the upstream ends this response body by closing
        self.continue_sent = False
        self.done = False
        self.keep_alive = head.keep_alive
        self.t_start = 0.0
        self.attempts = 0
        self.tried_local = False
        self.tried_remote = False
        # Bytes for each side, gathered while one read is parsed and written
        # once after it: one send per read, like a C proxy, not one per piece.
        self.up_out: list[bytes] = []
        self.out: list[bytes] = []

    # --- routing and attempts ---------------------------------------------------

    def start(self) -> None:
        server = self.server
        self.t_start = server.loop.time()
        server.stats.in_flight += 1
        target = server.routing.choose()
        if target is not None and not server.remote_allowed(target):
            server.stats.count_fallback("remote", "local", "breaker_open")
            target = None
        self.attempt(target, fresh=False)

    def attempt(self, target: RemoteTarget | None, *, fresh: bool) -> None:
        self.attempts += 1
        self.target = target
        if target is None:
            self.backend = "local"
            self.tried_local = True
            pool = self.server.local_pool
        else:
            self.backend = "remote"
            self.tried_remote = True
            pool = self.server.remote_route(target).pool
        self.pool = pool
        conn = None if fresh else pool.take()
        if conn is not None:
            self.bind(conn, reused=True)
        else:
            # Hold the request body back until the upstream is there: a failed
            # connect can still go to the other side with nothing consumed.
            self.client.pause(PAUSE_CONNECTING)
            self.connect_task = self.server.loop.create_task(self.connect(pool))

    async def connect(self, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect(self.server.settings.connect_timeout)
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            kind, detail = "tls", exc
        except TimeoutError as exc:
            kind, detail = "timeout", exc
        except OSError as exc:
            kind, detail = "connect", exc
        else:
            self.connect_task = None
            if self.done:
                pool.put(conn)
            else:
                self.bind(conn, reused=False)
            return
        self.connect_task = None
        log.debug("connecting to %s %s:%s failed: %s", pool.label, pool.host, pool.port, detail)
        if not self.done:
            self.failed(kind)

    def bind(self, conn: UpstreamConnection, *, reused: bool) -> None:
        client = self.client
        server = self.server
        self.upstream = conn
        conn.exchange = self
        conn.last_activity = server.clock.now
        self.reused = reused
        self.parser = httptools.HttpResponseParser(self)
        self.final = False
        self.frame = -1
        self.head_buf = b""
        self.head_pos = 0
        head = self.head
        target = self.target
        if target is None:
            data = render_request_head(head, authority=None, client_ip=client.ip)
        else:
            route = server.remote_route(target)
            data = render_request_head(
                head,
                authority=route.authority,
                client_ip=client.ip,
                path_prefix=route.prefix,
                extra=route.extra,
                extra_names=route.extra_names,
            )
        if client.write_paused:
            conn.pause_reading()
        up_out = self.up_out
        up_out.clear()
        up_out.append(data)
        pending = self.pending
        if self.sent:  # a retry: what the last attempt sent goes first
            pending = self.sent + pending
            self.sent = []
            self.sent_size = 0
        if pending:
            self.pending = []
            for chunk in pending:
                self.send_body(chunk)
        if self.request_complete and head.body == BODY_CHUNKED:
            up_out.append(b"0\r\n\r\n")
        if not client.feeding:  # else the client's read ends with a flush
            self.flush_up()
        if client.paused:
            client.unpause(PAUSE_CONNECTING)

    def flush_up(self) -> None:
        up_out = self.up_out
        conn = self.upstream
        if conn is not None and not conn.closed:
            if len(up_out) == 1:
                conn.transport.write(up_out[0])
            else:
                conn.transport.writelines(up_out)
        up_out.clear()

    def flush(self) -> None:
        """Write what this upstream read produced for the client, in one send."""
        out = self.out
        if len(out) == 1:
            self.client.transport.write(out[0])
        else:
            self.client.transport.writelines(out)
        out.clear()

    def send_body(self, chunk: bytes) -> None:
        if self.head.body == BODY_CHUNKED:
            self.up_out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        else:
            self.up_out.append(chunk)
        sent = self.sent
        if sent is not None:
            self.sent_size += len(chunk)
            if self.sent_size > self.server.settings.replay_buffer_bytes:
                self.sent = None
            else:
                sent.append(chunk)

    def failed(self, kind: str) -> None:
        """The upstream failed before any of its response reached the client."""
        server = self.server
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
        self.up_out.clear()  # kept in self.sent for a retry
        server.stats.count_failure(self.backend, kind)
        if self.final:
            self.abort_client()
            return
        stale = kind == "reset" and self.reused  # the upstream closed an idle keep-alive
        if self.target is not None and not stale:
            server.remote_failed(self.target)
        if self.sent is not None and self.attempts < MAX_ATTEMPTS:
            if stale:
                self.attempt(self.target, fresh=True)
                return
            if self.target is not None:
                if not self.tried_local:
                    server.stats.count_fallback("remote", "local", kind)
                    self.attempt(None, fresh=False)
                    return
            else:
                remote = server.routing.plan.remote
                if remote is not None and not self.tried_remote and server.remote_allowed(remote):
                    server.stats.count_fallback("local", "remote", kind)
                    self.attempt(remote, fresh=False)
                    return
        if server.draining:
            self.respond_error(503, f"{self.backend} model unavailable ({kind}); shutting down", retry_after=5)
        elif kind == "timeout":
            self.respond_error(504, f"{self.backend} model did not answer in time")
        else:
            self.respond_error(502, f"{self.backend} model unavailable ({kind})")

    # --- request body from the client ------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        if self.upstream is not None:
            self.send_body(chunk)
            if not self.client.feeding:
                self.flush_up()
        elif not self.done:
            self.pending.append(chunk)

    def request_done(self) -> None:
        self.request_complete = True
        if self.upstream is not None and self.head.body == BODY_CHUNKED:
            self.up_out.append(b"0\r\n\r\n")

    # --- response parser callbacks ---------------------------------------------
    # Only the head, body and end callbacks: the fields are read from the raw head
    # (head_buf, filled by UpstreamConnection), not one Python call per field.

    def on_headers_complete(self) -> None:
        buf = self.head_buf
        start = self.head_pos
        while buf.startswith(b"\r\n", start):  # llhttp skips blank lines before a head
            start += 2
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            raise _BadUpstream("response head not found where the parser ended it")
        self.head_pos = end + 4
        status_text, block = split_response_head(buf[start:end])
        status = self.parser.get_status_code()
        head = self.head
        if status < 200:
            if status == 101:
                if not head.websocket:
                    raise _BadUpstream("101 Switching Protocols to a request that asked for no upgrade")
                self.status = 101
                self.final = True
                self.head_buf = b""
                data, _, _, _ = render_response_head(
                    101, status_text, block, has_body=False, client_http11=True, keep_alive=False, websocket=True
                )
                self.out.append(data)
                return
            if head.http11 and (status != 100 or (head.expect_continue and not self.continue_sent)):
                self.out.append(render_interim(status_text, block))
                self.continue_sent = self.continue_sent or status == 100
            return
        server = self.server
        self.status = status
        self.final = True
        self.head_buf = b""
        if self.target is not None:
            server.remote_succeeded(self.target)
        has_body = not (head.is_head or status == 204 or status == 304)
        keep = self.keep_alive and self.request_complete and not server.draining and not head.websocket
        data, self.frame, self.keep_alive, self.eof_body = render_response_head(
            status, status_text, block, has_body=has_body, client_http11=head.http11, keep_alive=keep
        )
        self.out.append(data)
        server.stats.response_head_seconds[self.backend].observe(server.loop.time() - self.t_start)
        if head.is_head:
            # llhttp would wait for the body a Content-Length announces; HEAD has none.
            self.finish(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.frame == FRAME_CHUNKED:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        elif not self.done:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if not self.final or self.done or self.status == 101:
            return  # an interim 1xx, a HEAD answered already, or a WebSocket switching
        if self.frame == FRAME_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.finish(self.parser.should_keep_alive())

    # --- endings -------------------------------------------------------------------

    def finish(self, reusable: bool) -> None:
        self.done = True
        self.parser = None  # no reference cycle: freed by refcount, not by the GC
        if self.out:
            self.flush()
        server = self.server
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.exchange = None
            if reusable and self.request_complete:
                self.pool.put(conn)  # type: ignore[union-attr]
            else:
                conn.close()
        stats = server.stats
        stats.in_flight -= 1
        stats.count_response(self.backend, self.status)
        stats.response_seconds[self.backend].observe(server.loop.time() - self.t_start)
        self.client.exchange_finished(self)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed while carrying this exchange."""
        self.upstream = None
        if self.done:
            return
        if self.final and self.eof_body:
            if self.frame == FRAME_CHUNKED:
                self.out.append(b"0\r\n\r\n")
            self.finish(False)
        elif self.final:
            self.server.stats.count_failure(self.backend, "reset")
            self.abort_client()
        else:
            self.failed("reset")

    def upstream_broken(self, reason: str) -> None:
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
        if self.done:
            return
        self.server.stats.count_failure(self.backend, "protocol")
        log.warning("%s upstream: %s", self.backend, reason)
        if self.final:
            self.abort_client()
        else:
            self.respond_error(502, f"{self.backend} model sent an invalid response")

    def upstream_upgraded(self, rest: bytes) -> None:
        """A WebSocket 101 arrived: from now on both connections are one byte tunnel."""
        conn = self.upstream
        if self.status != 101 or conn is None:
            self.upstream_broken("upgrade without a 101 response")
            return
        self.done = True
        self.upstream = None
        conn.exchange = None
        stats = self.server.stats
        stats.in_flight -= 1
        stats.count_response(self.backend, 101)
        stats.tunnels += 1
        client = self.client
        if rest:
            self.out.append(rest)
        if self.out:
            self.flush()
        client.open_tunnel(conn)

    def timed_out(self) -> None:
        if self.final:
            self.server.stats.count_failure(self.backend, "timeout")
            conn = self.upstream
            if conn is not None:
                self.upstream = None
                conn.close()
            self.abort_client()
        else:
            self.failed("timeout")

    def respond_error(self, status: int, reason: str, retry_after: int | None = None) -> None:
        self.done = True
        self.parser = None
        self.keep_alive = False
        stats = self.server.stats
        stats.in_flight -= 1
        stats.count_rejection(status)
        self.client.transport.write(render_error(status, reason, retry_after=retry_after))
        self.client.exchange_finished(self)

    def request_broken(self, rejection: Rejection) -> None:
        """The client's body turned out malformed: cancel upstream, answer or cut."""
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
        if self.done:
            self.client.close()
        elif self.final:
            self.abort_client()
        else:
            self.respond_error(rejection.status, rejection.reason)

    def abort_client(self) -> None:
        """Part of the response is out: the client must see it cut, not complete."""
        if not self.done:
            self.done = True
            self.server.stats.in_flight -= 1
        self.client.abort()

    def client_gone(self) -> None:
        if self.done:
            return
        self.done = True
        self.parser = None
        stats = self.server.stats
        stats.in_flight -= 1
        stats.client_aborts_total += 1
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.upstream
        if conn is not None:  # cancel the upstream request: it has no one to answer to
            self.upstream = None
            conn.close()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges in order."""

    __slots__ = (
        "closing",
        "current",
        "eof",
        "feed_completed",
        "feeding",
        "headers",
        "in_head",
        "ip",
        "last_activity",
        "max_header_count",
        "parser",
        "parsing",
        "paused",
        "queue",
        "raw_head_bytes",
        "read_size",
        "rejection",
        "replaying",
        "server",
        "transport",
        "tunnel",
        "tunnel_conn",
        "upgrading",
        "url",
        "write_paused",
    )

    def __init__(self, server: ProxyServer):
        self.server = server
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.ip = b"unknown"
        self.current: Exchange | None = None  # the exchange being answered
        self.parsing: Exchange | None = None  # the exchange whose request is being read
        self.queue: deque[Exchange] | None = None  # pipelined requests waiting
        self.paused = 0
        self.in_head = False
        self.raw_head_bytes = 0  # bytes of an unfinished head in earlier reads
        self.read_size = 0  # bytes in the read being parsed
        self.max_header_count = server.settings.max_header_count
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.last_activity = 0.0
        self.tunnel: Any = None  # the upstream transport once a WebSocket is switched
        self.tunnel_conn: UpstreamConnection | None = None
        self.write_paused = False
        self.rejection: Rejection | None = None
        self.closing = False
        self.replaying = False
        self.upgrading: Exchange | None = None
        self.eof = False  # the client half-closed: answer what was asked, then close
        self.feed_completed = False  # a request ended during the current read
        self.feeding = False  # a read is being parsed: upstream writes wait for its end

    # --- transport events ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip = peer[0].encode("ascii")
        self.last_activity = self.server.clock.now
        self.server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.server.clock.now
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.closing or self.rejection is not None:
            return
        if self.upgrading is not None:  # bytes after a WebSocket request, before the 101
            self.upgrading.request_body(data)
            return
        self.feeding = True
        self.feed(data)
        self.feeding = False
        exchange = self.current
        if exchange is not None and exchange.up_out:
            exchange.flush_up()

    def feed(self, data: bytes) -> None:
        was_in_head = self.in_head
        self.feed_completed = False
        self.read_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded(data, exc.args[0])
            return
        except httptools.HttpParserCallbackError:
            if self.rejection is None:
                log.exception("proxy error while handling a request")
                self.rejection = Rejection(500, "internal proxy error")
            self.reject()
            return
        except httptools.HttpParserInvalidMethodError:
            self.rejection = Rejection(501, "unknown request method")
            self.reject()
            return
        except httptools.HttpParserInvalidURLError:
            self.rejection = Rejection(400, "invalid request target")
            self.reject()
            return
        except httptools.HttpParserError as exc:
            self.rejection = Rejection(400, f"malformed request: {exc}")
            self.reject()
            return
        if self.in_head:
            # A head still incomplete after a read: cap what httptools may buffer
            # unseen (a field value is handed over only once it's complete).
            if was_in_head:
                self.raw_head_bytes += len(data)
            elif not self.feed_completed:  # this read began with this head
                self.raw_head_bytes = len(data)
            if self.raw_head_bytes > self.server.settings.max_header_bytes:
                self.rejection = Rejection(431, "request header section too large")
                self.reject()

    def eof_received(self) -> bool | None:
        # A client half-closing after its request still gets the answer.
        self.eof = True
        return self.current is not None or self.tunnel is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.parsing = None
        self.server.connection_closed(self)
        if self.tunnel_conn is not None:
            self.server.stats.tunnels -= 1
            self.tunnel_conn.tunnel = None
            self.tunnel_conn.transport.close()
            self.tunnel_conn = None
        if self.current is not None:
            self.current.client_gone()
            self.current = None
        self.queue = None

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()
        elif self.tunnel_conn is not None:
            self.tunnel_conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.server.clock.now
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
        elif self.tunnel_conn is not None:
            self.tunnel_conn.resume_reading()

    # --- request parser callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.replaying:
            return
        self.in_head = True
        self.raw_head_bytes = 0
        self.url = b""
        self.headers = []
        if self.current is not None:
            self.pause(PAUSE_PIPELINE)

    def on_url(self, url: bytes) -> None:
        if not self.replaying:
            self.url += url  # in pieces when the target spans reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # request trailers are not forwarded
            headers = self.headers
            if len(headers) >= self.max_header_count:  # checked here: one read may hold thousands
                self.rejection = Rejection(431, f"more than {self.max_header_count} header fields")
                raise _Reject
            headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.replaying:
            self.replaying = False
            return
        self.in_head = False
        if self.closing:
            return
        headers = self.headers
        settings = self.server.settings
        # The head lies within this read and the earlier reads of it: only when
        # those could exceed the limit is the head itself measured.
        if self.raw_head_bytes + self.read_size > settings.max_header_bytes:
            if len(self.url) > settings.max_header_bytes:
                self.rejection = Rejection(431, "request target too long")
                raise _Reject
            if len(self.url) + sum(len(n) + len(v) + 4 for n, v in headers) > settings.max_header_bytes:
                self.rejection = Rejection(431, f"header section larger than {settings.max_header_bytes} bytes")
                raise _Reject
        parser = self.parser
        head = inspect_request(parser.get_method(), self.url, parser.get_http_version(), headers)
        if type(head) is Rejection:
            self.rejection = head
            raise _Reject
        exchange = Exchange(self, head)  # type: ignore[arg-type]
        self.parsing = exchange
        if self.server.draining:
            exchange.keep_alive = False
        if self.current is None:
            self.current = exchange
            exchange.start()
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            exchange.request_body(body)

    def on_message_complete(self) -> None:
        self.feed_completed = True
        exchange = self.parsing
        if exchange is None:
            return
        head = exchange.head
        if head.upgrade is not None and not head.websocket and self.parser.should_upgrade():
            return  # llhttp skipped this body for an Upgrade we don't pass on; see upgraded()
        exchange.request_done()

    # --- upgrades ------------------------------------------------------------------

    def upgraded(self, data: bytes, offset: int) -> None:
        """llhttp stopped after a request with Connection: upgrade."""
        exchange = self.parsing
        rest = data[offset:]
        if exchange is None or self.rejection is not None:
            return
        if exchange.head.websocket:
            self.upgrading = exchange
            self.pause(PAUSE_UPGRADE)
            if rest:
                exchange.request_body(rest)
            return
        # Another protocol (h2c, ...): its Upgrade was dropped and the request goes
        # on as plain HTTP/1.1. llhttp skipped its body, so parse that body (and
        # whatever follows) with a fresh parser primed with an equivalent framing.
        self.parser = httptools.HttpRequestParser(self)
        framing = b""
        if exchange.head.body == BODY_CHUNKED:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif exchange.head.content_length:
            framing = b"Content-Length: %d\r\n" % exchange.head.content_length
        self.replaying = True
        self.parser.feed_data(b"POST / HTTP/1.1\r\nHost: replay\r\n" + framing + b"\r\n")
        if rest:
            self.feed(rest)

    def open_tunnel(self, conn: UpstreamConnection) -> None:
        self.current = None
        self.upgrading = None
        self.tunnel_conn = conn
        self.tunnel = conn.transport
        conn.tunnel = self.transport
        if self.write_paused:
            conn.pause_reading()
        self.paused = 0
        if not self.closing:
            self.transport.resume_reading()

    # --- flow ----------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closing:
            self.transport.pause_reading()
        self.paused |= reason

    def unpause(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closing:
                self.transport.resume_reading()

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self.current:
            return
        self.current = None
        if not exchange.keep_alive or self.closing or self.server.draining:
            if exchange.request_complete:
                self.close()
            else:
                self.linger_close()  # unread request bytes: a plain close would RST our answer
            return
        queue = self.queue
        if queue:
            nxt = queue.popleft()
            self.current = nxt
            if not queue:
                self.unpause(PAUSE_PIPELINE)
            nxt.start()
            return
        if self.paused:
            self.unpause(PAUSE_PIPELINE)
        if self.rejection is not None:
            self.send_rejection()
        elif self.eof:
            self.close()

    def reject(self) -> None:
        """Refuse the request being parsed: answer once earlier ones are answered, close."""
        self.pause(PAUSE_REJECTED)
        exchange = self.parsing
        if exchange is not None and not exchange.request_complete:
            # Broken mid-body (a bad chunk): that request can't be completed.
            if exchange is self.current:
                rejection = self.rejection
                assert rejection is not None
                exchange.request_broken(rejection)
                return
            if self.queue and exchange in self.queue:
                self.queue.remove(exchange)
        if self.current is None:
            self.send_rejection()

    def send_rejection(self) -> None:
        rejection = self.rejection
        assert rejection is not None
        self.server.stats.count_rejection(rejection.status)
        if not self.closing:
            self.transport.write(render_error(rejection.status, rejection.reason))
        self.linger_close()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()  # flushes what was written

    def linger_close(self) -> None:
        """Close after an answer while the client may still be sending: send FIN,
        read and discard for a moment, then close (so our answer isn't reset)."""
        if self.closing:
            return
        self.closing = True
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        self.paused = 0
        transport.resume_reading()
        self.server.loop.call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()

    def check_timeouts(self, now: float, settings: ProxySettings) -> None:
        if self.closing:
            return
        conn = self.tunnel_conn
        if conn is not None:
            if now - max(self.last_activity, conn.last_activity) > settings.tunnel_idle_timeout:
                self.close()
                conn.transport.close()
            return
        exchange = self.current
        if exchange is not None:
            if exchange.connect_task is not None or exchange.done:
                return
            up = exchange.upstream
            last = self.last_activity if up is None else max(self.last_activity, up.last_activity)
            if now - last > settings.read_timeout:
                exchange.timed_out()
            return
        if now - self.last_activity > settings.client_idle_timeout:
            if self.in_head:
                self.transport.write(render_error(408, "request head not received in time"))
            self.close()


class ProxyServer:
    """The proxy port. ``start`` listens; ``shutdown`` drains and stops.

    ``ready`` turns False the moment shutdown begins (``on_ready_change`` is called
    with the new value) so the admin port's /readyz can fail at once.
    """

    def __init__(
        self,
        routing: RoutingTable,
        local: tuple[str, int],
        settings: ProxySettings = ProxySettings(),
        stats: ProxyStats | None = None,
        on_ready_change: Callable[[bool], None] | None = None,
    ):
        self.routing = routing
        self.local = local
        self.settings = settings
        self.stats = stats if stats is not None else ProxyStats()
        self.on_ready_change = on_ready_change
        self.clock = CoarseClock()
        self.local_pool = UpstreamPool(
            local[0], local[1], clock=self.clock, label="local", max_idle=settings.max_idle_per_upstream
        )
        self._routes: dict[RemoteTarget, _RemoteRoute] = {}
        self._pools: dict[tuple[str, str, int], UpstreamPool] = {}
        self._breakers: dict[tuple[str, str, int], CircuitBreaker] = {}
        self._last_target: RemoteTarget | None = None
        self._last_route: _RemoteRoute | None = None
        self._ssl_context = settings.remote_ssl_context
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.ready = False
        self.port = 0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._idle: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 picks a free port); returns the port."""
        self.loop = asyncio.get_running_loop()
        self.clock.now = self.loop.time()
        self._server = await self.loop.create_server(
            partial(ClientConnection, self), host, port, backlog=2048, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = self.loop.call_later(self.settings.tick, self._tick)
        self._set_ready(True)
        return self.port

    async def shutdown(self, deadline: float = 30.0) -> None:
        """Drain within ``deadline`` seconds from now.

        Readiness goes false at once and every response from then on closes its
        connection; new connections are accepted for ``shutdown_grace`` seconds
        (while endpoints stop sending), then refused; idle keep-alive connections
        are closed; requests and streams in flight finish until the deadline,
        when whatever is left is cut.
        """
        loop = self.loop
        end = loop.time() + deadline
        self._set_ready(False)
        self.draining = True
        grace = min(self.settings.shutdown_grace, deadline)
        if grace > 0:
            await asyncio.sleep(grace)
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.current is None and conn.tunnel_conn is None and not conn.in_head:
                conn.close()
        self._idle = asyncio.Event()
        if self.connections:
            try:
                async with asyncio.timeout(max(0.0, end - loop.time())):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("shutdown deadline reached with %d connections open; closing them", len(self.connections))
        for conn in list(self.connections):
            conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        self.local_pool.close()
        for pool in self._pools.values():
            pool.close()
        await asyncio.sleep(0)  # let the transports' connection_lost run

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.on_ready_change is not None:
            self.on_ready_change(ready)

    def _tick(self) -> None:
        now = self.loop.time()
        self.clock.now = now
        settings = self.settings
        for conn in list(self.connections):
            conn.check_timeouts(now, settings)
        self.local_pool.sweep(now, settings.upstream_idle_timeout)
        for pool in self._pools.values():
            pool.sweep(now, settings.upstream_idle_timeout)
        self._ticker = self.loop.call_later(settings.tick, self._tick)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.stats.open_connections += 1

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.stats.open_connections -= 1
        if self._idle is not None and not self.connections:
            self._idle.set()

    # --- the remote --------------------------------------------------------------------

    def remote_route(self, target: RemoteTarget) -> _RemoteRoute:
        if target is self._last_target:
            return self._last_route  # type: ignore[return-value]
        route = self._routes.get(target)
        if route is None:
            key = (target.scheme, target.host, target.port)
            pool = self._pools.get(key)
            if pool is None:
                context = None
                if target.scheme == "https":
                    if self._ssl_context is None:
                        self._ssl_context = ssl.create_default_context()
                    context = self._ssl_context
                pool = UpstreamPool(
                    target.host,
                    target.port,
                    clock=self.clock,
                    label="remote",
                    ssl_context=context,
                    server_hostname=target.host,
                    max_idle=self.settings.max_idle_per_upstream,
                )
                self._pools[key] = pool
            breaker = self._breakers.get(key)
            if breaker is None:
                breaker = self._breakers[key] = CircuitBreaker(self.settings.breaker)
            route = self._routes[target] = _RemoteRoute(target, pool, breaker)
        self._last_target = target
        self._last_route = route
        return route

    def remote_allowed(self, target: RemoteTarget) -> bool:
        breaker = self.remote_route(target).breaker
        if breaker.state == "closed":
            return True
        allowed = breaker.allow(self.loop.time())
        self.stats.breaker_state = breaker.state
        return allowed

    def remote_failed(self, target: RemoteTarget) -> None:
        breaker = self.remote_route(target).breaker
        before = breaker.state
        breaker.record_failure(self.loop.time())
        if breaker.state != before:
            log.warning("remote %s:%s circuit breaker %s", target.host, target.port, breaker.state)
        self.stats.breaker_state = breaker.state

    def remote_succeeded(self, target: RemoteTarget) -> None:
        breaker = self.remote_route(target).breaker
        if breaker.failures or breaker.state != "closed":
            if breaker.state != "closed":
                log.warning("remote %s:%s circuit breaker closed", target.host, target.port)
            breaker.record_success(self.loop.time())
            self.stats.breaker_state = breaker.state


# --- a small command line for tests and the benchmark (the product CLI is offload-sidecar) ---


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def remote_target_from_url(url: str, headers: tuple[tuple[str, str], ...] = ()) -> RemoteTarget:
    """``https://host:port/prefix`` -> RemoteTarget."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"remote must be http(s)://host[:port][/prefix], got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return RemoteTarget(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        authority=parts.netloc,
        path_prefix=parts.path.rstrip("/"),
        headers=headers,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.proxy", description="The sidecar's data path alone.")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve on")
    parser.add_argument("--local", required=True, help="host:port of the local model")
    parser.add_argument("--remote", help="http(s)://host[:port][/prefix] of the remote backend")
    parser.add_argument("--percentage", type=int, default=0, help="share of requests offloaded to the remote")
    parser.add_argument("--header", action="append", default=[], help="Name=Value added to remote requests")
    parser.add_argument("--ca-file", help="CA bundle for an https remote (default: the system's)")
    parser.add_argument("--connect-timeout", type=float, default=ProxySettings.connect_timeout)
    parser.add_argument("--read-timeout", type=float, default=ProxySettings.read_timeout)
    parser.add_argument("--shutdown-deadline", type=float, default=30.0)
    parser.add_argument("--shutdown-grace", type=float, default=ProxySettings.shutdown_grace)
    args = parser.parse_args(argv)

    headers = tuple(tuple(h.split("=", 1)) for h in args.header)  # type: ignore[misc]
    remote = remote_target_from_url(args.remote, headers) if args.remote else None  # type: ignore[arg-type]
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    settings = ProxySettings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        shutdown_grace=args.shutdown_grace,
        remote_ssl_context=context,
    )
    routing = RoutingTable(RoutePlan(remote=remote, percentage=args.percentage, offloading=remote is not None))

    async def serve() -> None:
        server = ProxyServer(routing, _host_port(args.local), settings)
        host, port = _host_port(args.listen)
        port = await server.start(host, port)
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.shutdown(args.shutdown_deadline)

    gc.freeze()  # what was imported stays out of the collector's scans
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
