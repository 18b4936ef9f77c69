"""The gateway process: lanes kept in line with the watched ModelDeployments, and its admin
port (/healthz, /readyz, /status per ModelDeployment, /metrics)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from crds.model import GROUP, PLURAL, VERSION, RemoteBackend
from crds.validation import ValidationSettings
from sidecar.admin.metrics import PROMETHEUS_TEXT, escape
from sidecar.admin.server import AdminServer, response
from sidecar.admin.status import status_document
from sidecar.app import SidecarSettings
from sidecar.cluster.informer import Listed, list_and_watch
from sidecar.control.view import ControlView
from sidecar.gateway.lane import Lane
from sidecar.gateway.listeners import Key, key_of, listeners_from
from sidecar.gateway.local import LocalPods
from sidecar.proxy.server import ProxySettings
from sidecar.proxy.stats import ProxyStats
from sidecar.supervise import supervised

log = logging.getLogger("sidecar.gateway")

RETRY_LISTEN_SECONDS = 5.0


@dataclass(frozen=True)
class GatewaySettings:
    listen_host: str = "0.0.0.0"
    admin_listen: tuple[str, int] = ("0.0.0.0", 9090)
    namespaces: tuple[str, ...] = ()  # () = every namespace
    default_backend: RemoteBackend | None = None
    secret_refresh: float = 60.0
    shutdown_deadline: float = 30.0
    proxy: ProxySettings = dataclasses.field(default_factory=ProxySettings)

    def lane_settings(self, port: int) -> SidecarSettings:
        return SidecarSettings(
            upstream=("127.0.0.1", 9),  # only for a Host header an HTTP/1.0 request lacks
            listen=(self.listen_host, port),
            admin_listen=self.admin_listen,
            secret_refresh=self.secret_refresh,
            shutdown_deadline=self.shutdown_deadline,
            proxy=self.proxy,
        )


class Gateway:
    """Lanes kept in line with the ModelDeployments (``update``), and the admin port."""

    def __init__(
        self,
        settings: GatewaySettings,
        kube_client: Any = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.settings = settings
        self.kube_client = kube_client
        self.clock = clock
        self.sleep = sleep
        self.validation = ValidationSettings(default_remote_backend=settings.default_backend)
        self.lanes: dict[Key, Lane] = {}
        self.problems: dict[Key, str] = {}
        self.objects: dict[Key, dict[str, Any]] = {}
        self.synced = False  # every watched namespace listed once
        self.draining = False
        self.stop = asyncio.Event()
        self.admin = GatewayAdmin(self)
        self.admin_port = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def ready(self) -> bool:
        """Listed and not shutting down. A port that cannot be opened is retried and shown in
        /status, not a reason to take this replica out of every ModelDeployment's slice."""
        return self.synced and not self.draining

    async def update(self, objects: Iterable[Mapping[str, Any]] | None = None) -> None:
        """Converge the lanes on ``objects`` (default: the last seen)."""
        async with self._lock:
            if objects is not None:
                self.objects = {key_of(o): dict(o) for o in objects}
            if self.draining:
                return
            wanted, self.problems = listeners_from(self.objects.values(), self.validation)
            for key, lane in list(self.lanes.items()):
                want = wanted.get(key)
                if want is None or want.port != lane.listener.port:
                    del self.lanes[key]
                    why = "no gateway port any more" if want is None else f"port now {want.port}"
                    log.info("%s/%s: closing port %d (%s), draining", *key, lane.listener.port, why)
                    self._close_later(lane)
            for key, want in wanted.items():
                lane = self.lanes.get(key)
                if lane is None:
                    lane = Lane(
                        want,
                        self.settings.lane_settings(want.port),
                        self.kube_client,
                        clock=self.clock,
                        sleep=self.sleep,
                    )
                    self.lanes[key] = lane
                    lane.configure(want)
                    if await lane.listen():
                        log.info("%s/%s: listening on port %d", *key, want.port)
                    else:
                        log.error("%s/%s: %s", *key, lane.problem)
                    continue
                if want != lane.listener:
                    lane.configure(want)
                if not lane.open and await lane.listen():
                    log.info("%s/%s: listening on port %d", *key, want.port)

    def _close_later(self, lane: Lane) -> None:
        task = asyncio.create_task(lane.close(self.settings.shutdown_deadline))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def follow(self) -> None:
        """Watch the ModelDeployments (cluster-wide or in ``namespaces``) and update on each change."""
        assert self.kube_client is not None
        namespaces = self.settings.namespaces or ("",)
        seen: dict[str, dict[Key, dict[str, Any]]] = {ns: {} for ns in namespaces}
        listed: set[str] = set()

        async def one(namespace: str) -> None:
            where = f"/namespaces/{namespace}" if namespace else ""
            path = f"/apis/{GROUP}/{VERSION}{where}/{PLURAL}"
            async for change in list_and_watch(self.kube_client, path, sleep=self.sleep):
                if isinstance(change, Listed):
                    seen[namespace] = {key_of(o): o for o in change.items}
                    listed.add(namespace)
                elif change.type == "DELETED":
                    seen[namespace].pop(key_of(change.object), None)
                else:
                    seen[namespace][key_of(change.object)] = change.object
                if len(listed) == len(namespaces):
                    await self.update([o for objs in seen.values() for o in objs.values()])
                    self.synced = True

        async with asyncio.TaskGroup() as group:
            for namespace in namespaces:
                group.create_task(one(namespace))

    async def _retry(self) -> None:
        """Ports that could not be opened (still in use by a lane draining) are tried again."""
        while True:
            await self.sleep(RETRY_LISTEN_SECONDS)
            if any(not lane.open for lane in self.lanes.values()):
                await self.update()

    async def run(self, on_started: Callable[[Gateway], None] | None = None) -> None:
        self.admin_port = await self.admin.start(*self.settings.admin_listen)
        tasks = [asyncio.create_task(self._retry())]
        if self.kube_client is not None:
            tasks.append(
                asyncio.create_task(
                    supervised(
                        "the ModelDeployment watch",
                        self.follow,
                        lambda: None,
                        clock=self.clock,
                        sleep=self.sleep,
                    )
                )
            )
        if on_started is not None:
            on_started(self)
        try:
            await self.stop.wait()
            log.info(
                "shutting down: draining %d ports for up to %.0f s",
                len(self.lanes),
                self.settings.shutdown_deadline,
            )
        finally:
            await self.shutdown()
            for task in tasks:
                task.cancel()
            await self.admin.close()
            if self.kube_client is not None:
                await self.kube_client.close()
            log.info("stopped")

    async def shutdown(self) -> None:
        """Readiness fails at once; every lane drains within the deadline."""
        self.draining = True
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(lane.close(self.settings.shutdown_deadline) for lane in lanes), *self._closing)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

    # -- what the admin port shows --

    def status(self) -> dict[str, Any]:
        lanes = {}
        for (namespace, name), lane in sorted(self.lanes.items()):
            view: ControlView = lane.offloading.view()
            doc = status_document(view, lane.stats, ready=lane.open and not self.draining)
            doc["port"] = lane.listener.port
            doc["coldStartHoldSeconds"] = lane.listener.hold
            doc["localPods"] = {
                "ready": [f"{a}:{p}" for a, p in lane.local_endpoints()],
                "held": lane.local.held,
                "heldTotal": lane.local.held_total,
                "holdExpiredTotal": lane.local.hold_expired_total,
            }
            lanes[f"{namespace}/{name}"] = doc
        return {
            "mode": "gateway",
            "ready": self.ready(),
            "synced": self.synced,
            "draining": self.draining,
            "modelDeployments": lanes,
            "notServed": {f"{ns}/{n}": why for (ns, n), why in sorted(self.problems.items())},
        }

    def metrics(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

        family("offload_gateway_ready", "gauge", "1 while this gateway replica is ready")
        out.append(f"offload_gateway_ready {int(self.ready())}\n")
        family("offload_gateway_listeners", "gauge", "ports open, one per ModelDeployment served")
        out.append(f"offload_gateway_listeners {sum(lane.open for lane in self.lanes.values())}\n")
        rows: list[tuple[str, str, ProxyStats, LocalPods]] = [
            (ns, n, lane.stats, lane.local) for (ns, n), lane in sorted(self.lanes.items())
        ]
        family("offload_gateway_requests_total", "counter", "responses by backend and status class")
        for ns, n, stats, _ in rows:
            for (backend, code), count in sorted(stats.requests_total.items()):
                out.append(
                    f'offload_gateway_requests_total{{namespace="{escape(ns)}",modeldeployment="{escape(n)}",'
                    f'backend="{backend}",code="{code}"}} {count}\n'
                )
        for metric, help_text, attr in (
            ("offload_gateway_in_flight_requests", "requests being served now", "in_flight"),
            ("offload_gateway_open_connections", "client connections open now", "open_connections"),
        ):
            family(metric, "gauge", help_text)
            for ns, n, stats, _ in rows:
                out.append(
                    f'{metric}{{namespace="{escape(ns)}",modeldeployment="{escape(n)}"}} {getattr(stats, attr)}\n'
                )
        for metric, help_text, attr in (
            (
                "offload_gateway_held_requests_total",
                "requests held for a local pod (coldStartHoldSeconds)",
                "held_total",
            ),
            (
                "offload_gateway_hold_expired_total",
                "held requests sent to the remote after the hold",
                "hold_expired_total",
            ),
        ):
            family(metric, "counter", help_text)
            for ns, n, _, local in rows:
                out.append(
                    f'{metric}{{namespace="{escape(ns)}",modeldeployment="{escape(n)}"}} {getattr(local, attr)}\n'
                )
        return "".join(out)


class GatewayAdmin(AdminServer):
    """/healthz, /readyz, /status (JSON per ModelDeployment) and /metrics of the gateway."""

    def __init__(self, gateway: Gateway):
        super().__init__(lambda: None, ProxyStats(), gateway.ready)  # type: ignore[arg-type,return-value]
        self.gateway = gateway

    def respond(self, method: str, target: str) -> bytes:
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if method in ("GET", "HEAD") and path == "/status":
            body = (json.dumps(self.gateway.status(), indent=2) + "\n").encode()
            return response(200, "OK", "application/json", body, head_only)
        if method in ("GET", "HEAD") and path == "/metrics":
            return response(200, "OK", PROMETHEUS_TEXT, self.gateway.metrics().encode(), head_only)
        return super().respond(method, target)
