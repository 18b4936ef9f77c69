"""The remote backend as the data path sends to it: one route per RemoteTarget.

A :class:`RemoteRoute` holds everything per target computed once (the Host value,
the path prefix, the rendered extra headers) and the pool and circuit breaker it
shares with the other targets of the same address and TLS context (a token
refresh makes a new target and keeps both). An Exchange resolves its route once
and reports the remote's outcomes to it. :class:`RemoteRoutes` keeps a few
routes, the current one and the most recently used (requests still in flight
may use an old one), and the pools and breakers those use.
"""

from __future__ import annotations

import logging
import ssl
from collections import OrderedDict
from collections.abc import Callable

from sidecar.proxy.breaker import CircuitBreaker
from sidecar.proxy.flow import CoarseClock
from sidecar.proxy.http1 import LIMIT_PREFIX, LIMIT_TRACE, RequestHead, render_extra
from sidecar.proxy.routing import RemoteTarget, RoutingTable
from sidecar.proxy.settings import ProxySettings
from sidecar.proxy.stats import ProxyStats
from sidecar.proxy.upstream import UpstreamPool

log = logging.getLogger("sidecar.proxy")

# Remote routes kept besides the current one: a token refresh or a caBundle change
# makes a new RemoteTarget, and the old one (holding an old token, a pool, a
# breaker) must not be kept forever. A few are kept for requests still in flight.
MAX_KEPT_ROUTES = 4

PoolKey = tuple[str, str, int, "ssl.SSLContext | None"]


class RemoteRoute:
    """Everything per remote target the data path needs, computed once, and the
    remote's outcomes reported to its breaker.

    ``encoded`` is :func:`encode_target` of ``target``; ``time`` the event loop's
    clock (seconds), read only when the breaker needs it.
    """

    __slots__ = (
        "authority",
        "breaker",
        "extra",
        "extra_names",
        "key",
        "limits",
        "pool",
        "prefix",
        "stats",
        "target",
        "time",
    )

    def __init__(
        self,
        target: RemoteTarget,
        encoded: tuple[bytes, bytes, bytes, frozenset[bytes]],
        pool: UpstreamPool,
        breaker: CircuitBreaker,
        *,
        stats: ProxyStats,
        time: Callable[[], float],
    ):
        self.target = target
        self.authority, self.prefix, self.extra, self.extra_names = encoded
        # The RequestHead.remote_limits that keep a request off this route.
        self.limits = (LIMIT_PREFIX if self.prefix else 0) | (LIMIT_TRACE if self.extra else 0)
        self.key: PoolKey = pool_key(target)
        self.pool = pool
        self.breaker = breaker
        self.stats = stats
        self.time = time

    def refusal(self, head: RequestHead, *, last_resort: bool = False) -> str | None:
        """Why the request ``head`` may not go here now (a fallback reason), or None.

        ``last_resort``: no other backend is left for this request, so an open
        breaker does not stand in the way (the request becomes its probe); a
        route the request is unsafe on still does.
        """
        limits = head.remote_limits & self.limits
        if limits:
            return "path-outside-prefix" if limits & LIMIT_PREFIX else "trace-with-credentials"
        breaker = self.breaker
        if breaker.state == "closed":
            return None
        if last_resort:
            breaker.probe(self.time())
            allowed = True
        else:
            allowed = breaker.allow(self.time())
        self.stats.breaker_state = breaker.state
        return None if allowed else "breaker_open"

    def failed(self) -> None:
        """The remote failed a request (connect, TLS, timeout, reset, no answer)."""
        breaker = self.breaker
        before = breaker.state
        breaker.record_failure(self.time())
        if breaker.state != before:
            log.warning("remote %s:%s circuit breaker %s", self.target.host, self.target.port, breaker.state)
        self.stats.breaker_state = breaker.state

    def busy(self, retry_after: float | None) -> None:
        """The remote answered 503 or 429: with Retry-After its breaker holds it off
        that long; without, it is one more consecutive failure."""
        if retry_after is None:
            self.failed()
            return
        breaker = self.breaker
        before = breaker.state
        now = self.time()
        breaker.hold(now, retry_after)
        if breaker.state != before:
            log.warning(
                "remote %s:%s asked for a pause (Retry-After); circuit breaker %s for %.0f s",
                self.target.host,
                self.target.port,
                breaker.state,
                max(0.0, breaker.retry_at - now),  # capped: not what a hostile header says
            )
        self.stats.breaker_state = breaker.state

    def succeeded(self) -> None:
        """The remote answered (a final response other than 503/429)."""
        breaker = self.breaker
        if breaker.failures or breaker.state != "closed":
            if breaker.state != "closed":
                log.warning("remote %s:%s circuit breaker closed", self.target.host, self.target.port)
            breaker.record_success(self.time())
            self.stats.breaker_state = breaker.state


def encode_target(target: RemoteTarget) -> tuple[bytes, bytes, bytes, frozenset[bytes]]:
    """(Host value, path prefix, extra header lines, their lower-cased names), as sent.

    Raises UnicodeEncodeError (a ValueError) for a target that cannot be sent as is.
    """
    extra, extra_names = render_extra(target.headers)
    return target.authority.encode("latin-1"), target.path_prefix.encode("latin-1"), extra, extra_names


def pool_key(target: RemoteTarget) -> PoolKey:
    """Pools and breakers are shared by the targets of one address and TLS context:
    a changed caBundle must not reuse connections verified with the old one, nor
    inherit its breaker."""
    return (target.scheme, target.host, target.port, target.ssl_context)


class RemoteRoutes:
    """The routes to the remote targets in use, bounded (see MAX_KEPT_ROUTES).

    ``routing`` says which target is current (never dropped); ``clock`` is the
    coarse clock of the pools; ``time`` the event loop's clock for the breakers.
    """

    __slots__ = (
        "_bad_target_logged",
        "_last_route",
        "_last_target",
        "_ssl_context",
        "breakers",
        "clock",
        "pools",
        "routes",
        "routing",
        "settings",
        "stats",
        "time",
    )

    def __init__(
        self,
        routing: RoutingTable,
        settings: ProxySettings,
        stats: ProxyStats,
        *,
        clock: CoarseClock,
        time: Callable[[], float],
    ):
        self.routing = routing
        self.settings = settings
        self.stats = stats
        self.clock = clock
        self.time = time
        # The most recently used last.
        self.routes: OrderedDict[RemoteTarget, RemoteRoute] = OrderedDict()
        # Only those of kept routes.
        self.pools: dict[PoolKey, UpstreamPool] = {}
        self.breakers: dict[PoolKey, CircuitBreaker] = {}
        self._last_target: RemoteTarget | None = None
        self._last_route: RemoteRoute | None = None  # None with a target: it can't be sent
        self._bad_target_logged: RemoteTarget | None = None
        self._ssl_context = settings.remote_ssl_context

    def route(self, target: RemoteTarget) -> RemoteRoute | None:
        """The route to ``target``; None when the target cannot be sent as is (a
        header value or path prefix that is not latin-1): such requests stay local."""
        if target is self._last_target:
            return self._last_route
        routes = self.routes
        route = routes.get(target)
        if route is None:
            try:
                encoded = encode_target(target)
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
            key = pool_key(target)
            pool = self.pools.get(key)
            if pool is None:
                context = None
                if target.scheme == "https":
                    if self._ssl_context is None:
                        self._ssl_context = ssl.create_default_context()
                    context = target.ssl_context or self._ssl_context
                pool = self.pools[key] = UpstreamPool(
                    target.host,
                    target.port,
                    clock=self.clock,
                    label="remote",
                    ssl_context=context,
                    server_hostname=target.host,
                    max_idle=self.settings.max_idle_per_upstream,
                    refuse_link_local=self.settings.refuse_link_local_remotes,
                    resolve=self.settings.remote_resolver,
                )
            breaker = self.breakers.get(key)
            if breaker is None:
                breaker = self.breakers[key] = CircuitBreaker(self.settings.breaker)
            route = routes[target] = RemoteRoute(
                target, encoded, pool, breaker, stats=self.stats, time=self.time
            )
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
        routes = self.routes
        current = self.routing.plan.remote
        for target in list(routes):
            if len(routes) <= MAX_KEPT_ROUTES + 1:
                break
            if target is not current and target != current:
                del routes[target]
        used = {route.key for route in routes.values()}
        for key in [k for k in self.pools if k not in used]:
            self.pools.pop(key).close()  # an exchange still using it closes its connection after
        for key in [k for k in self.breakers if k not in used]:
            del self.breakers[key]

    def sweep(self, now: float, idle_timeout: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now, idle_timeout)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
