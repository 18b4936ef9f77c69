"""A lane's "local model": the Service's own ready pods, watched through its EndpointSlices
and waited for up to the cold-start hold."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.cluster.informer import Listed, list_and_watch
from sidecar.proxy.upstream import CoarseClock, UpstreamConnection, UpstreamPool

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
STANDIN_MANAGER = "controller.offload.beamlit.com"  # the controller's own slices: never "local"


class LocalPods:
    """What a lane's ProxyServer takes for its local model (the pool interface of
    :class:`sidecar.proxy.upstream.UpstreamPool`): the Service's ready pods, from ``endpoints()``.

    ``connect`` waits up to ``hold`` seconds for one to be there (``notify()`` says the
    endpoints changed) and connects to it, round robin; with none by then it raises
    ConnectionRefusedError, and the exchange sends the request to the remote, the last
    backend left. ``hold`` 0: it refuses at once (no local backend at all).
    """

    label = "local"

    def __init__(
        self,
        clock: CoarseClock,
        endpoints: Callable[[], list[tuple[str, int]]] = list,
        *,
        hold: float = 0.0,
        max_idle: int = 64,
    ):
        self.clock = clock
        self.endpoints = endpoints
        self.hold = hold
        self.max_idle = max_idle
        self.host, self.port = "the Service's ready pods", 0  # for the data path's log lines
        self.closed = False
        self.held = 0  # requests held now
        self.held_total = 0  # requests that found no ready pod and waited
        self.hold_expired_total = 0  # ... and went to the remote after the hold
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        self._next = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """The endpoints may have changed: wake the requests being held."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _pool(self, address: tuple[str, int]) -> UpstreamPool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = UpstreamPool(
                *address, clock=self.clock, label="local", max_idle=self.max_idle
            )
        return pool

    def take(self) -> UpstreamConnection | None:
        for address in self.endpoints() if self._pools else ():
            pool = self._pools.get(address)
            conn = pool.take() if pool is not None else None
            if conn is not None:
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        pool = conn.pool
        if self.closed or (pool.host, pool.port) not in set(self.endpoints()):
            conn.close()  # that pod is no longer ready: keep nothing to it
            return
        pool.put(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold
        endpoints = self.endpoints() if self.hold > 0 else []
        if not endpoints and self.hold > 0:
            self.held += 1
            self.held_total += 1
            try:
                while not endpoints:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self.closed:
                        break
                    changed = self._changed
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), remaining)
                    endpoints = self.endpoints()
            finally:
                self.held -= 1
            if not endpoints:
                self.hold_expired_total += 1
        if not endpoints:
            raise ConnectionRefusedError(
                f"no ready pod behind the Service (held {self.hold:g}s)" if self.hold else "no local pod"
            )
        self._next = (self._next + 1) % len(endpoints)
        return await self._pool(endpoints[self._next]).connect(timeout)

    def sweep(self, now: float, idle_timeout: float) -> None:
        live = set(self.endpoints()) if self._pools else set()
        for address in list(self._pools):
            pool = self._pools[address]
            if address not in live:
                pool.close()
                del self._pools[address]
            else:
                pool.sweep(now, idle_timeout)

    def close(self) -> None:
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self.notify()


class ServiceEndpoints:
    """The EndpointSlices of one Service (all but the controller's stand-in slice), watched."""

    def __init__(
        self,
        client: Any,
        namespace: str,
        service: str,
        on_change: Callable[[], None],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.client = client
        self.namespace = namespace
        self.service = service
        self.on_change = on_change
        self.sleep = sleep  # between retries of the watch
        self.slices: dict[str, dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
        params = {
            "labelSelector": f"kubernetes.io/service-name={self.service},{MANAGED_BY_LABEL}!={STANDIN_MANAGER}"
        }
        async for change in list_and_watch(self.client, path, params, sleep=self.sleep):
            if isinstance(change, Listed):
                self.slices = {str(s["metadata"]["name"]): s for s in change.items}
            elif change.type == "DELETED":
                self.slices.pop(str(change.object["metadata"]["name"]), None)
            else:
                self.slices[str(change.object["metadata"]["name"])] = change.object
            self.on_change()
