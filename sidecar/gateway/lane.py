"""One ModelDeployment's listener: the sidecar's own machinery with the gateway's plan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from sidecar.app import Sidecar, SidecarSettings
from sidecar.control.interfaces import NoMetrics, PassThroughSource
from sidecar.control.state import OffloadingState
from sidecar.gateway.listeners import Listener, ready_endpoints
from sidecar.gateway.local import LocalPods, ServiceEndpoints
from sidecar.proxy.routing import RoutePlan


class GatewayOffloading(OffloadingState):
    """The sidecar's offloading state, with the gateway's plan: the remote for every request
    (``hold`` 0), or first the local pods waited for (``hold`` > 0; the remote after)."""

    hold = 0

    def plan(self) -> RoutePlan:
        plan = super().plan()
        if self.hold:
            return replace(plan, percentage=0, offloading=False)
        return replace(plan, percentage=100, offloading=True)


class Lane(Sidecar):
    """One ModelDeployment's listener: the sidecar's routing, credentials and proxy."""

    def __init__(
        self,
        listener: Listener,
        settings: SidecarSettings,
        kube_client: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        namespace, name = listener.key
        super().__init__(
            settings,
            PassThroughSource(),
            NoMetrics(),
            mode="gateway",
            source=f"{namespace}/{name}",
            kube_client=kube_client,
            clock=clock,
            sleep=sleep,
        )
        self.offloading: GatewayOffloading = GatewayOffloading(
            self.routing,
            NoMetrics(),
            clock=clock,
            mode="gateway",
            source=f"{namespace}/{name}",
            upstream=f"{listener.service}.{namespace}.svc (its ready pods)",
            listen=f"{settings.listen[0]}:{listener.port}",
            config_errors=self._errors,
        )
        self.listener = listener
        self.local = LocalPods(self.proxy.clock, self.local_endpoints)
        self.proxy.local_pool = self.local  # type: ignore[assignment]
        self.endpoints: ServiceEndpoints | None = None
        self.problem: str | None = None  # why the port cannot be listened on, if so
        self.open = False

    def _errors(self) -> tuple[str, ...]:
        client = self.kube_client
        return (*(client.problems() if client is not None else ()), *([self.problem] if self.problem else ()))

    def local_endpoints(self) -> list[tuple[str, int]]:
        if self.endpoints is None:
            return []
        return ready_endpoints(self.endpoints.slices.values(), self.listener.port_name)

    def configure(self, listener: Listener) -> None:
        """Follow a changed ModelDeployment (same port)."""
        self.listener = listener
        model = listener.model
        self.offloading.hold = listener.hold
        self.local.hold = float(listener.hold)
        self.offloading.apply_config(model)
        self.configure_auth(model)
        self.configure_secret_headers(model)
        wanted = (
            (listener.key[0], listener.service) if listener.hold and self.kube_client is not None else None
        )
        have = (self.endpoints.namespace, self.endpoints.service) if self.endpoints is not None else None
        if wanted != have:
            if self.endpoints is not None:
                self.endpoints.stop()
                self.endpoints = None
            if wanted is not None:
                self.endpoints = ServiceEndpoints(
                    self.kube_client, *wanted, self.local.notify, sleep=self.sleep
                )
                self.endpoints.start()
        self.local.notify()

    async def listen(self) -> bool:
        """Open the port; False (and ``problem`` says why) when it cannot be."""
        try:
            await self.proxy.start(self.settings.listen[0], self.listener.port)
        except OSError as exc:
            self.problem = f"cannot listen on port {self.listener.port}: {exc.strerror or exc}"
            return False
        self.problem = None
        self.open = True
        return True

    async def close(self, deadline: float) -> None:
        """Drain (as the sidecar does on SIGTERM) and stop."""
        for task in (self._auth_task, self._headers_task):
            if task is not None:
                task.cancel()
        if self.endpoints is not None:
            self.endpoints.stop()
        if self.open:
            await self.proxy.shutdown(deadline)
        self.local.close()
        self.open = False
