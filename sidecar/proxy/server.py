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
           (sidecar.proxy.client)   (sidecar.proxy.exchange,  (sidecar.proxy.upstream)
                               sidecar.proxy.response)

This module holds the settings, the server (listening, draining, the timer that
drives timeouts, the remote's pools and circuit breakers) and a small CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import ssl
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

from sidecar.proxy.breaker import BreakerSettings, CircuitBreaker
from sidecar.proxy.client import ClientConnection
from sidecar.proxy.http1 import LIMIT_PREFIX, LIMIT_TRACE, RequestHead, render_extra
from sidecar.proxy.routing import RemoteTarget, RoutePlan, RoutingTable
from sidecar.proxy.stats import ProxyStats
from sidecar.proxy.upstream import CoarseClock, UpstreamPool

log = logging.getLogger("sidecar.proxy")

# Remote routes kept besides the current one: a token refresh or a caBundle change
# makes a new RemoteTarget, and the old one (holding an old token, a pool, a
# breaker) must not be kept forever. A few are kept for requests still in flight.
MAX_KEPT_ROUTES = 4

PoolKey = tuple[str, str, int, "ssl.SSLContext | None"]


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


class _RemoteRoute:
    """Everything per remote target the data path needs, computed once.

    Raises UnicodeEncodeError (a ValueError) for a target that cannot be sent as is.
    """

    __slots__ = ("authority", "breaker", "extra", "extra_names", "key", "limits", "pool", "prefix")

    def __init__(self, target: RemoteTarget):
        self.authority = target.authority.encode("latin-1")
        self.prefix = target.path_prefix.encode("latin-1")
        self.extra, self.extra_names = render_extra(target.headers)
        # The RequestHead.remote_limits that keep a request off this route.
        self.limits = (LIMIT_PREFIX if self.prefix else 0) | (LIMIT_TRACE if self.extra else 0)
        # Pools and breakers are shared by the targets of one address and TLS context
        # (a token refresh keeps them); set by ProxyServer.
        self.key: PoolKey = (target.scheme, target.host, target.port, target.ssl_context)
        self.pool: UpstreamPool = None  # type: ignore[assignment]
        self.breaker: CircuitBreaker = None  # type: ignore[assignment]


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
        # Host for an HTTP/1.0 request that came without one (HTTP/1.1 requires it).
        self.local_authority = (f"[{local[0]}]" if ":" in local[0] else local[0]).encode() + b":%d" % local[1]
        self.settings = settings
        self.stats = stats if stats is not None else ProxyStats()
        self.on_ready_change = on_ready_change
        self.clock = CoarseClock()
        self.local_pool = UpstreamPool(
            local[0], local[1], clock=self.clock, label="local", max_idle=settings.max_idle_per_upstream
        )
        # The most recently used last; bounded (see MAX_KEPT_ROUTES).
        self._routes: OrderedDict[RemoteTarget, _RemoteRoute] = OrderedDict()
        # Keyed by the TLS context too: a changed caBundle must not reuse connections
        # verified with the old one, nor inherit its breaker. Only those of kept routes.
        self._pools: dict[PoolKey, UpstreamPool] = {}
        self._breakers: dict[PoolKey, CircuitBreaker] = {}
        self._last_target: RemoteTarget | None = None
        self._last_route: _RemoteRoute | None = None  # None with a target: it can't be sent
        self._bad_target_logged: RemoteTarget | None = None
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
                log.warning(
                    "shutdown deadline reached with %d connections open; closing them", len(self.connections)
                )
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

    def remote_route(self, target: RemoteTarget) -> _RemoteRoute | None:
        """The route to ``target``; None when the target cannot be sent as is (a
        header value or path prefix that is not latin-1): such requests stay local."""
        if target is self._last_target:
            return self._last_route
        routes = self._routes
        route = routes.get(target)
        if route is None:
            try:
                route = _RemoteRoute(target)
            except ValueError:  # UnicodeEncodeError is one
                if target != self._bad_target_logged:
                    self._bad_target_logged = target
                    log.error(
                        "remote %s:%s cannot be used: a header value or the path prefix is not latin-1;"
                        " serving requests locally",
                        target.host,
                        target.port,
                    )
                self._last_target = target
                self._last_route = None
                return None
            key = route.key
            pool = self._pools.get(key)
            if pool is None:
                context = None
                if target.scheme == "https":
                    if self._ssl_context is None:
                        self._ssl_context = ssl.create_default_context()
                    context = target.ssl_context or self._ssl_context
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
            route.pool = pool
            route.breaker = breaker
            routes[target] = route
            if len(routes) > MAX_KEPT_ROUTES + 1:
                self._forget_old_routes()
        else:
            routes.move_to_end(target)
        self._last_target = target
        self._last_route = route
        return route

    def _forget_old_routes(self) -> None:
        """Drop the least recently used routes beyond the bound (never the plan's
        current remote), then close the pools and drop the breakers no kept route uses."""
        routes = self._routes
        current = self.routing.plan.remote
        for target in list(routes):
            if len(routes) <= MAX_KEPT_ROUTES + 1:
                break
            if target is not current and target != current:
                del routes[target]
        used = {route.key for route in routes.values()}
        for key in [k for k in self._pools if k not in used]:
            self._pools.pop(key).close()  # an exchange still using it closes its connection after
        for key in [k for k in self._breakers if k not in used]:
            del self._breakers[key]

    def remote_refusal(
        self, target: RemoteTarget, head: RequestHead, *, last_resort: bool = False
    ) -> str | None:
        """Why the request ``head`` may not go to ``target`` now (a fallback reason), or None.

        ``last_resort``: no other backend is left for this request, so an open
        breaker does not stand in the way (the request becomes its probe); a
        remote that can't be sent to, or a route the request is unsafe on, still does.
        """
        route = self.remote_route(target)
        if route is None:
            return "bad-remote-config"
        limits = head.remote_limits & route.limits
        if limits:
            return "path-outside-prefix" if limits & LIMIT_PREFIX else "trace-with-credentials"
        breaker = route.breaker
        if breaker.state == "closed":
            return None
        if last_resort:
            breaker.probe(self.loop.time())
            allowed = True
        else:
            allowed = breaker.allow(self.loop.time())
        self.stats.breaker_state = breaker.state
        return None if allowed else "breaker_open"

    def remote_failed(self, target: RemoteTarget) -> None:
        breaker = self.remote_route(target).breaker  # type: ignore[union-attr]
        before = breaker.state
        breaker.record_failure(self.loop.time())
        if breaker.state != before:
            log.warning("remote %s:%s circuit breaker %s", target.host, target.port, breaker.state)
        self.stats.breaker_state = breaker.state

    def remote_busy(self, target: RemoteTarget, retry_after: float | None) -> None:
        """The remote answered 503 or 429: with Retry-After its breaker holds it off
        that long; without, it is one more consecutive failure."""
        if retry_after is None:
            self.remote_failed(target)
            return
        breaker = self.remote_route(target).breaker  # type: ignore[union-attr]
        before = breaker.state
        breaker.hold(self.loop.time(), retry_after)
        if breaker.state != before:
            log.warning(
                "remote %s:%s asked for %.0f s without requests; circuit breaker %s",
                target.host,
                target.port,
                retry_after,
                breaker.state,
            )
        self.stats.breaker_state = breaker.state

    def remote_succeeded(self, target: RemoteTarget) -> None:
        breaker = self.remote_route(target).breaker  # type: ignore[union-attr]
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
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.proxy", description="The sidecar's data path alone."
    )
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
    routing = RoutingTable(
        RoutePlan(remote=remote, percentage=args.percentage, offloading=remote is not None)
    )

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
