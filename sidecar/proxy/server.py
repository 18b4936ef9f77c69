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
           (sidecar.proxy.client)   (sidecar.proxy.exchange)  (sidecar.proxy.upstream)

This module holds the server: listening, draining, and the timer that drives
timeouts and idle sweeps. The settings are in sidecar.proxy.settings, the
remote's routes, pools and breakers in sidecar.proxy.remote, and what the
connections may see of the server in sidecar.proxy.types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from sidecar.proxy.client import ClientConnection
from sidecar.proxy.flow import CoarseClock
from sidecar.proxy.remote import RemoteRoutes
from sidecar.proxy.routing import RoutingTable
from sidecar.proxy.settings import ProxySettings
from sidecar.proxy.stats import ProxyStats
from sidecar.proxy.upstream import UpstreamPool

__all__ = ["ProxyServer", "ProxySettings"]

log = logging.getLogger("sidecar.proxy")


class ProxyServer:
    """The proxy port. ``start`` listens; ``shutdown`` drains and stops.

    ``ready`` turns False the moment shutdown begins (``on_ready_change`` is called
    with the new value) so the admin port's /readyz can fail at once.

    ``loop`` is the event loop its connections use; ``start`` sets it to the running
    loop. Given, connections can be driven without listening (protocol tests).
    """

    def __init__(
        self,
        routing: RoutingTable,
        local: tuple[str, int],
        settings: ProxySettings = ProxySettings(),
        stats: ProxyStats | None = None,
        on_ready_change: Callable[[bool], None] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.routing = routing
        self.local = local
        # Host for an HTTP/1.0 request that came without one (HTTP/1.1 requires it).
        self.local_authority = (f"[{local[0]}]" if ":" in local[0] else local[0]).encode() + b":%d" % local[1]
        self.settings = settings
        self.stats = stats if stats is not None else ProxyStats()
        self.on_ready_change = on_ready_change
        self.clock = CoarseClock()
        self.local_pool = UpstreamPool(
            local[0], local[1], clock=self.clock, label="local", max_idle=settings.max_idle_per_upstream
        )
        self.remotes = RemoteRoutes(routing, settings, self.stats, clock=self.clock, time=self._time)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.ready = False
        self.port = 0
        self.loop: asyncio.AbstractEventLoop = loop  # type: ignore[assignment]
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
                log.warning(
                    "shutdown deadline reached with %d connections open; closing them", len(self.connections)
                )
        for conn in list(self.connections):
            conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        self.local_pool.close()
        self.remotes.close()
        await asyncio.sleep(0)  # let the transports' connection_lost run

    def _time(self) -> float:
        """The event loop's clock, for the breakers (the loop exists once started)."""
        return self.loop.time()

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
        self.remotes.sweep(now, settings.upstream_idle_timeout)
        self._ticker = self.loop.call_later(settings.tick, self._tick)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.stats.open_connections += 1

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.stats.open_connections -= 1
        if self._idle is not None and not self.connections:
            self._idle.set()
