"""Keep-alive connections to the two upstreams (the local model, the remote backend).

An :class:`UpstreamConnection` is a raw asyncio protocol; while it carries an
exchange, bytes from the upstream go straight into that exchange's response
parser (or, after a WebSocket 101, straight to the client). An
:class:`UpstreamPool` keeps idle connections per upstream, newest first, and
closes those idle longer than the pool's idle timeout (kept below common model
servers' own keep-alive timeouts, e.g. uvicorn's 5 s, so the proxy rarely reuses
a connection the upstream is closing).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from sidecar.proxy.exchange import Exchange


MAX_RESPONSE_HEAD_BYTES = 64 * 1024  # an upstream's status line and fields, else 502


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already closed
            pass


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "exchange",
        "idle_since",
        "last_activity",
        "pool",
        "reading_paused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: Any = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.tunnel: Any = None  # the client transport once a WebSocket is switched
        self.reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.pool.clock.now
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        exchange = self.exchange
        if exchange is None:  # an idle connection talking: don't trust it further
            self.close()
            return
        if not exchange.final:  # (part of) a response head: kept for its fields
            buf = exchange.head_buf
            exchange.head_buf = buf + data if buf else data
        try:
            exchange.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            exchange.upstream_upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            if not self.closed:  # closed: its exchange went to the other backend (Retried)
                exchange.upstream_broken(f"invalid response from upstream: {exc}")
            return
        if exchange.out:
            exchange.flush()
        if not exchange.final and exchange.upstream is self:
            if exchange.head_pos:  # past a 1xx: drop what was relayed
                exchange.head_buf = exchange.head_buf[exchange.head_pos :]
                exchange.head_pos = 0
            if len(exchange.head_buf) > MAX_RESPONSE_HEAD_BYTES:
                exchange.upstream_broken(f"response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self)
        elif self.tunnel is not None:
            self.tunnel.close()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.pause(PAUSE_UPSTREAM_FULL)
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.unpause(PAUSE_UPSTREAM_FULL)
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close without reusing (an unfinished or doubtful exchange)."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.transport.abort()


# Why a client connection stops reading (a bit mask; reading resumes at zero).
PAUSE_CONNECTING = 1  # the upstream is being connected: keep the body unread
PAUSE_PIPELINE = 2  # a pipelined request waits for the one before
PAUSE_UPSTREAM_FULL = 4  # the upstream isn't taking bytes as fast as the client sends
PAUSE_UPGRADE = 8  # waiting for the upstream's answer to a WebSocket upgrade
PAUSE_REJECTED = 16  # a bad request was seen; nothing more is read


class CoarseClock:
    """``now`` as of the last tick: timeouts need seconds, not a syscall per read."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0):
        self.now = now


class UpstreamPool:
    """Idle keep-alive connections to one upstream address."""

    __slots__ = ("clock", "closed", "host", "idle", "label", "max_idle", "port", "server_hostname", "ssl")

    def __init__(
        self,
        host: str,
        port: int,
        *,
        clock: CoarseClock,
        label: str,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_idle: int = 128,
    ):
        self.host = host
        self.port = port
        self.ssl = ssl_context
        self.server_hostname = server_hostname
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.clock = clock
        self.label = label  # "local" or "remote"
        self.closed = False  # dropped (its remote target is gone): nothing is kept any more

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        if len(self.idle) >= self.max_idle or self.closed:
            conn.close()
            return
        conn.resume_reading()
        conn.idle_since = self.clock.now
        self.idle.append(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.server_hostname if self.ssl is not None else None,
            )
        conn.last_activity = self.clock.now
        return conn

    def sweep(self, now: float, idle_timeout: float) -> None:
        """Close connections idle too long (the oldest sit at the bottom)."""
        idle = self.idle
        if idle and (now - idle[0].idle_since >= idle_timeout or any(c.closed for c in idle)):
            keep = []
            for c in idle:
                if c.closed:
                    continue
                if now - c.idle_since >= idle_timeout:
                    c.close()
                else:
                    keep.append(c)
            self.idle = keep

    def close(self) -> None:
        self.closed = True
        for c in self.idle:
            c.close()
        self.idle = []
