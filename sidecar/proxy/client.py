"""The client side of the proxy port: one asyncio protocol per client connection.

It parses requests with httptools (llhttp, strict), enforces the head limits,
refuses what sidecar.proxy.http1 refuses (answering earlier pipelined requests first,
then a lingering close so the answer isn't reset), runs one Exchange at a time
in request order (pipelined ones wait, reading paused), applies flow control
both ways, and switches to a byte tunnel after a WebSocket 101.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from sidecar.proxy.exchange import Exchange
from sidecar.proxy.flow import PAUSE_PIPELINE, PAUSE_REJECTED, PAUSE_UPGRADE, ReadPauses, set_nodelay
from sidecar.proxy.http1 import BODY_CHUNKED, Rejection, inspect_request, render_error
from sidecar.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from sidecar.proxy.settings import ProxySettings
    from sidecar.proxy.types import Server

log = logging.getLogger("sidecar.proxy")

LINGER_SECONDS = 2.0  # how long a refused client may still send before the close
# Client bytes after a WebSocket upgrade request are held back until the upstream
# answers 101 (before it, they'd be read by the upstream as further requests);
# reading is paused meanwhile, so this bounds what one read may carry.
MAX_HELD_UPGRADE_BYTES = 64 * 1024


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges in order."""

    __slots__ = (
        "clock",
        "closing",
        "current",
        "eof",
        "feed_completed",
        "feeding",
        "head_began",
        "head_started",
        "headers",
        "held",
        "held_size",
        "in_head",
        "ip",
        "last_activity",
        "max_header_bytes",
        "max_header_count",
        "parser",
        "parsing",
        "queue",
        "raw_head_bytes",
        "read_size",
        "reading",
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

    reading: ReadPauses  # why this connection is not being read; made with the transport

    def __init__(self, server: Server):
        self.server = server
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.ip = b"unknown"
        self.current: Exchange | None = None  # the exchange being answered
        self.parsing: Exchange | None = None  # the exchange whose request is being read
        self.queue: deque[Exchange] | None = None  # pipelined requests waiting
        self.in_head = False
        self.raw_head_bytes = 0  # bytes of an unfinished head in earlier reads
        self.head_began = False  # a request head began during the read being parsed
        self.head_started = 0.0  # when the unfinished head's first byte was read
        self.read_size = 0  # bytes in the read being parsed
        self.max_header_count = server.settings.max_header_count
        self.max_header_bytes = server.settings.max_header_bytes
        self.clock = server.clock
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
        self.held: list[bytes] | None = None  # client bytes after an upgrade request, before its 101
        self.held_size = 0
        self.eof = False  # the client half-closed: answer what was asked, then close
        self.feed_completed = False  # a request ended during the current read
        self.feeding = False  # a read is being parsed: upstream writes wait for its end

    # --- transport events ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.reading = ReadPauses(transport)
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip = peer[0].encode("ascii")
        self.last_activity = self.clock.now
        self.server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.clock.now
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.closing or self.rejection is not None:
            return
        if self.upgrading is not None:  # bytes after a WebSocket request, before the 101
            self.hold(data)
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
        self.head_began = False
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
            # Only the bytes of the unfinished head count, never whole requests or
            # bodies that came before it in the same read.
            if was_in_head and not self.head_began:  # the same head, still going
                self.raw_head_bytes += len(data)
            elif not self.feed_completed:  # this read began with this head
                self.raw_head_bytes = len(data)
            if self.raw_head_bytes > self.max_header_bytes:
                self.rejection = Rejection(431, "request header section too large")
                self.reject()

    def eof_received(self) -> bool | None:
        # A client half-closing after its request still gets the answer.
        self.eof = True
        return self.current is not None or self.tunnel is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.reading.stop()
        self.parsing = None
        self.server.connection_closed(self)
        if self.tunnel_conn is not None:
            self.server.stats.tunnels -= 1
            self.tunnel_conn.close_tunnel()
            self.tunnel_conn = None
        if self.current is not None:
            self.current.client_gone()
            self.current = None
        self.queue = None

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.current
        if ex is not None:
            ex.pause_response()
        elif self.tunnel_conn is not None:
            self.tunnel_conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.clock.now
        ex = self.current
        if ex is not None:
            ex.resume_response()
        elif self.tunnel_conn is not None:
            self.tunnel_conn.resume_reading()

    # --- request parser callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.replaying:
            return
        self.in_head = True
        self.head_began = True
        self.head_started = self.clock.now
        self.raw_head_bytes = 0
        self.url = b""
        self.headers = []
        if self.current is not None:
            self.reading.pause(PAUSE_PIPELINE)

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
        limit = self.max_header_bytes
        # The head lies within this read and the earlier reads of it: only when
        # those could exceed the limit is the head itself measured.
        if self.raw_head_bytes + self.read_size > limit:
            if len(self.url) > limit:
                self.rejection = Rejection(431, "request target too long")
                raise _Reject
            if len(self.url) + sum(len(n) + len(v) + 4 for n, v in headers) > limit:
                self.rejection = Rejection(431, f"header section larger than {limit} bytes")
                raise _Reject
        parser = self.parser
        head = inspect_request(parser.get_method(), self.url, parser.get_http_version(), headers)
        if type(head) is Rejection:
            self.rejection = head
            raise _Reject
        exchange = Exchange(self, head)  # type: ignore[arg-type]  # not a Rejection here
        self.parsing = exchange
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
            self.reading.pause(PAUSE_UPGRADE)
            self.held = []
            self.held_size = 0
            if rest:
                self.hold(rest)
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

    def hold(self, data: bytes) -> None:
        """Keep bytes sent after an upgrade request until the upstream switches."""
        held = self.held
        if held is None:
            return
        self.held_size += len(data)
        if self.held_size > MAX_HELD_UPGRADE_BYTES:
            self.held = None
            log.debug(
                "client sent more than %d bytes before a WebSocket 101; closing", MAX_HELD_UPGRADE_BYTES
            )
            self.close()
            return
        held.append(data)

    def open_tunnel(self, conn: UpstreamConnection) -> None:
        self.current = None
        self.upgrading = None
        held = self.held
        self.held = None
        conn.open_tunnel(self.transport, held)
        self.tunnel_conn = conn
        self.tunnel = conn.transport
        if self.write_paused:
            conn.pause_reading()
        self.reading.clear()
        if not self.closing:
            self.transport.resume_reading()

    # --- flow ----------------------------------------------------------------------

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self.current:
            return
        self.current = None
        if exchange is self.upgrading:
            # Refused (no 101): what the client sent after its upgrade request is
            # dropped unread, and the connection ends with this answer.
            self.upgrading = None
            self.held = None
            self.linger_close()  # the client may have sent more than was read: no RST
            return
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
                self.reading.unpause(PAUSE_PIPELINE)
            nxt.start()
            return
        reading = self.reading
        if reading.reasons:
            reading.unpause(PAUSE_PIPELINE)
        if self.rejection is not None:
            self.send_rejection()
        elif self.eof:
            self.close()

    def reject(self) -> None:
        """Refuse the request being parsed: answer once earlier ones are answered, close."""
        self.reading.pause(PAUSE_REJECTED)
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
            self.reading.stop()
            self.transport.close()  # flushes what was written

    def linger_close(self) -> None:
        """Close after an answer while the client may still be sending: send FIN,
        read and discard for a moment, then close (so our answer isn't reset)."""
        if self.closing:
            return
        self.closing = True
        self.reading.stop()
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        self.reading.clear()
        transport.resume_reading()
        self.server.loop.call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        self.closing = True
        self.reading.stop()
        self.transport.abort()

    def check_timeouts(self, now: float, settings: ProxySettings) -> None:
        if self.closing:
            return
        conn = self.tunnel_conn
        if conn is not None:
            if now - max(self.last_activity, conn.last_activity) > settings.tunnel_idle_timeout:
                self.close()
                conn.close_tunnel()
            return
        exchange = self.current
        if exchange is not None:
            exchange.check_read_timeout(now, self.last_activity, settings.read_timeout)
            return
        # A head gets client_idle_timeout in all from its first byte, however slowly
        # its bytes trickle in (slowloris); between requests the same time of silence.
        if self.in_head and now - self.head_started > settings.client_idle_timeout:
            self.transport.write(render_error(408, "request head not received in time"))
            self.close()
        elif now - self.last_activity > settings.client_idle_timeout:
            self.close()
