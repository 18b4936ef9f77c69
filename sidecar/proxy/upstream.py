"""Keep-alive connections to the two upstreams (the local model, the remote backend).

An :class:`UpstreamConnection` is a raw asyncio protocol; while it carries a
request, bytes from the upstream go to that request's Exchange (or, after a
WebSocket 101, straight to the client). An
:class:`UpstreamPool` keeps idle connections per upstream, newest first, and
closes those idle longer than the pool's idle timeout (kept below common model
servers' own keep-alive timeouts, e.g. uvicorn's 5 s, so the proxy rarely reuses
a connection the upstream is closing).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from crds.addresses import ForbiddenAddressError, host_refusal, parse_ip, screen_addresses
from sidecar.proxy.flow import CoarseClock, set_nodelay

log = logging.getLogger("sidecar.proxy")

# loop.getaddrinfo's shape: (host, port, *, type=...) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]


class Carried(Protocol):
    """What an upstream connection tells the request it carries: the request's Exchange.

    Breaks the reversed dependency upstream -> exchange: sidecar.proxy.exchange
    binds these connections (it imports this module), so this module names only
    the calls it makes.
    """

    def response_data(self, data: bytes) -> None:
        """Bytes the upstream sent: (part of) the response to relay."""

    def upstream_lost(self) -> None:
        """The connection closed while carrying the request."""

    def upstream_full(self) -> None:
        """The connection's write buffer is full: stop reading the request body."""

    def upstream_drained(self) -> None:
        """The write buffer drained: read the request body again."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream: idle in its pool, or carrying one request.

    While it carries one, its bytes, its end and its write buffer's state go to
    that request (``carried``); after a WebSocket 101, bytes go straight to and
    from the client's transport.
    """

    __slots__ = (
        "clock",
        "closed",
        "idle_since",
        "last_activity",
        "carried",
        "pool",
        "reading_paused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.clock = pool.clock
        self.transport: Any = None
        self.carried: Carried | None = None
        self.closed = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.tunnel: Any = None  # the client transport once a WebSocket is switched
        self.reading_paused = False

    def carry(self, request: Carried) -> None:
        """Carry one request: what arrives from now on is its response."""
        self.carried = request
        self.last_activity = self.clock.now

    def release(self) -> None:
        """The request is answered: nothing is carried (the pool may keep it)."""
        self.carried = None

    def open_tunnel(self, client_transport: Any, held: list[bytes] | None) -> None:
        """A WebSocket 101 was relayed: from now on bytes go straight to
        ``client_transport``. ``held``: what the client sent after its upgrade
        request, written first (the upstream reads it as WebSocket frames now)."""
        self.carried = None
        if held:
            self.transport.writelines(held)
        self.tunnel = client_transport

    def close_tunnel(self) -> None:
        """The client's side of the tunnel is gone or idle: close after what was written."""
        self.tunnel = None
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.clock.now
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        carried = self.carried
        if carried is None:  # an idle connection talking: don't trust it further
            self.close()
            return
        carried.response_data(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        carried = self.carried
        if carried is not None:
            self.carried = None
            carried.upstream_lost()
        elif self.tunnel is not None:
            self.tunnel.close()

    def pause_writing(self) -> None:
        if self.carried is not None:
            self.carried.upstream_full()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        if self.carried is not None:
            self.carried.upstream_drained()
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
        self.carried = None
        if not self.closed:
            self.closed = True
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections to one upstream address."""

    __slots__ = (
        "clock",
        "closed",
        "host",
        "idle",
        "label",
        "logged",
        "max_idle",
        "port",
        "refused",
        "resolve",
        "screen",
        "server_hostname",
        "ssl",
    )

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
        refuse_link_local: bool = False,
        resolve: Resolver | None = None,
    ):
        """``refuse_link_local``: never connect to a link-local or cloud metadata address
        (crds.addresses), for a remote: ``host`` is resolved with ``resolve`` (None: the
        loop's getaddrinfo), the forbidden addresses are dropped and the rest tried in
        order. An IP literal is judged once, here, and not resolved."""
        self.host = host
        self.port = port
        self.ssl = ssl_context
        self.server_hostname = server_hostname
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.clock = clock
        self.label = label  # "local" or "remote"
        self.closed = False  # dropped (its remote target is gone): nothing is kept any more
        self.resolve = resolve
        self.refused: str | None = None  # why every connect fails at once (a forbidden host)
        self.screen = False  # resolve, then connect only to the allowed addresses
        self.logged: str | None = None  # the last screening outcome logged (logged once per change)
        if refuse_link_local:
            reason = host_refusal(host)
            if reason is not None:
                self.refused = f"{label} {host} is refused: {reason}"
            else:
                self.screen = parse_ip(host) is None  # a name: what it resolves to is judged

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for the next request to this upstream (or close it when full)."""
        if conn.closed:
            return
        if len(self.idle) >= self.max_idle or self.closed:
            conn.close()
            return
        conn.carried = None  # idle: it carries nothing (release(), inlined)
        if conn.reading_paused:  # a client that was slow to read: read again while idle
            conn.resume_reading()
        conn.idle_since = self.clock.now
        self.idle.append(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A new connection; ``timeout`` seconds cover resolution, TCP connect and TLS.

        Raises OSError (ssl.SSLError for TLS, TimeoutError); ForbiddenAddressError when
        the host is, or resolves only to, link-local or cloud metadata addresses."""
        if self.refused is not None:
            self._log_screening(self.refused)
            raise ForbiddenAddressError(self.refused)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if self.screen:
                conn = await self._connect_screened(loop)
            else:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname if self.ssl is not None else None,
                )
        conn.last_activity = self.clock.now
        return conn

    async def _connect_screened(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        """Resolve the host, drop the forbidden addresses, try the others in order (as
        create_connection does); TLS names the host, whatever address it reached."""
        resolve = self.resolve or loop.getaddrinfo
        infos = await resolve(self.host, self.port, type=socket.SOCK_STREAM)
        try:
            allowed = screen_addresses(f"{self.label} {self.host}", infos)
        except ForbiddenAddressError as exc:
            self._log_screening(str(exc))
            raise
        if len(allowed) < len(infos):
            dropped = ", ".join(
                sorted({str(i[4][0]) for i in infos if i not in allowed})
            )  # stable: logged once
            self._log_screening(
                f"{self.label} {self.host} resolves to link-local/cloud metadata addresses too ({dropped});"
                " connecting only to the others"
            )
        else:
            self.logged = None
        errors: list[OSError] = []
        for family, _, proto, _, address in allowed:
            try:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    address[0],
                    self.port,
                    family=family,
                    proto=proto,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname if self.ssl is not None else None,
                )
            except ssl.SSLError:  # the address answered: TLS failing is not the address's fault
                raise
            except OSError as exc:
                errors.append(exc)
            else:
                return conn
        if not errors:  # a resolver that answered nothing (getaddrinfo raises instead)
            raise OSError(f"{self.label} {self.host} resolved to no address")
        if len(errors) == 1:
            raise errors[0]
        raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")

    def _log_screening(self, message: str) -> None:
        """Warn when what screening found changes: not once per connect attempt."""
        if message != self.logged:
            self.logged = message
            log.warning("%s", message)

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
