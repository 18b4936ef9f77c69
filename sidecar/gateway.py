"""``offload-sidecar --mode gateway``: the remote of each ModelDeployment whose workload has no ready pod.

A small Deployment (the chart's ``gateway``) runs this. It watches ModelDeployments and, for
each one whose status carries a gateway port (``status.standIn.port``, chosen by the
controller and the same for every gateway replica), listens on that port and sends every
request there to that ModelDeployment's remote (its own ``remoteBackend`` or the
installation's default) with the sidecar's data path, credentials (OAuth, headersFromSecrets,
caBundle), streaming and refusals. The port alone says which ModelDeployment a connection
is for: nothing the client sends is trusted for that. While the workload has no ready pod
the controller points the Service at these listeners with an EndpointSlice of its own
(``webhook/controller/standin.py``).

    ModelDeployments --watch--> listeners_from (pure) --> one Lane per ModelDeployment
                                                           RoutingTable -> ProxyServer :port
                                                           "local" = LocalPods (the hold)

Each Lane is the sidecar's own machinery (:class:`sidecar.app.Sidecar`: routing plan,
credential refreshers, ProxyServer) with two differences: every request goes to the remote
(the plan is 100%, always on), and the "local model" is :class:`LocalPods`: with no
cold-start hold, no backend at all (a request the remote cannot take gets the sidecar's 502);
with ``behavior.coldStartHoldSeconds`` N, the Service's own ready pods, waited for up to N
seconds, after which the request goes to the remote (the last backend left, as in the
sidecar). The pods are read from the Service's EndpointSlices (those of the EndpointSlice
controller, not the controller's stand-in slice), by the Service port's name
(``status.standIn.portName``).

Nothing is lost at a switch: when a local pod is ready again the controller removes its
slice and new connections go to the pods, while the listener stays open and finishes what
it has (it closes, draining as the sidecar does on SIGTERM, only when the ModelDeployment no
longer has a gateway port). On SIGTERM readiness fails at once (the controller takes this
pod out of every slice), new connections are accepted for the grace, and requests in
flight finish up to the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crds.model import GROUP, PLURAL, VERSION, ModelDeployment, RemoteBackend
from crds.validation import ValidationSettings, parse_remote_backend, validate_object
from sidecar.admin import AdminServer, ControlView, status_document
from sidecar.app import Controller, NoMetrics, PassThroughSource, Sidecar, SidecarSettings
from sidecar.proxy.server import ProxySettings
from sidecar.proxy.routing import RoutePlan
from sidecar.proxy.stats import ProxyStats
from sidecar.proxy.upstream import CoarseClock, UpstreamConnection, UpstreamPool

log = logging.getLogger("sidecar.gateway")

Key = tuple[str, str]
DEFAULT_REMOTE_BACKEND_ENV = "OFFLOAD_DEFAULT_REMOTE_BACKEND"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
STANDIN_MANAGER = "controller.offload.beamlit.com"  # the controller's own slices: never "local"
RETRY_LISTEN_SECONDS = 5.0


# --- what to listen for (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """One ModelDeployment as the gateway serves it."""

    key: Key  # (namespace, name)
    port: int  # status.standIn.port
    model: ModelDeployment  # with the installation's default remote when it has none of its own
    service: str  # serviceRef.name
    port_name: str | None  # status.standIn.portName: the Service port's name ("" unnamed; None unknown)
    hold: int  # behavior.coldStartHoldSeconds


def _created(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp") or "")


def listeners_from(
    objects: Iterable[Mapping[str, Any]], validation: ValidationSettings
) -> tuple[dict[Key, Listener], dict[Key, str]]:
    """The listeners the ModelDeployments ask for, and why others with a port get none.

    A ModelDeployment gets one when its status has a gateway port and it is valid, enabled
    and has a remote (its own, or ``validation``'s default remote backend, which validation
    puts in place). Two claiming one port (the controller never does that for long): the
    older keeps it.
    """
    wanted: dict[Key, Listener] = {}
    problems: dict[Key, str] = {}
    by_port: dict[int, Mapping[str, Any]] = {}
    for obj in sorted(objects, key=lambda o: (_created(o), _key(o))):
        key = _key(obj)
        stand_in = (obj.get("status") or {}).get("standIn")
        if not isinstance(stand_in, Mapping):
            continue
        port = stand_in.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems[key] = f"status.standIn.port: not a port number: {port!r}"
            continue
        result = validate_object(obj, validation)
        if result.model is None:
            problems[key] = f"invalid, not served: {result.message()}"
            continue
        model = result.model
        config = model.spec.offloading_config
        if not model.spec.enabled or config is None or config.remote_backend is None:
            problems[key] = "disabled or without a remote backend: not served"
            continue
        if port in by_port:
            problems[key] = f"port {port} is already ModelDeployment {'/'.join(_key(by_port[port]))}'s"
            continue
        by_port[port] = obj
        name = stand_in.get("portName")
        wanted[key] = Listener(
            key,
            port,
            model,
            model.spec.service_ref.name if model.spec.service_ref is not None else "",
            name if isinstance(name, str) else None,
            config.behavior.cold_start_hold_seconds,
        )
    return wanted, problems


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def ready_endpoints(slices: Iterable[Mapping[str, Any]], port_name: str | None) -> list[tuple[str, int]]:
    """(address, port) of the ready, not terminating endpoints of a Service's slices, on the
    port named ``port_name`` ("" for an unnamed port; None: the only port there is).
    A ``ready`` condition left out counts as ready, as the API documents."""
    found: set[tuple[str, int]] = set()
    for s in slices:
        ports = [p for p in s.get("ports") or [] if isinstance(p, Mapping) and isinstance(p.get("port"), int)]
        if port_name is None:
            names = {str(p.get("name") or "") for p in ports}
            chosen = ports[0]["port"] if len(names) == 1 else None
        else:
            chosen = next((p["port"] for p in ports if str(p.get("name") or "") == port_name), None)
        if chosen is None:
            continue
        for endpoint in s.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or []
            if addresses:
                found.add((str(addresses[0]), chosen))
    return sorted(found)


# --- the "local model" of a lane: the Service's own ready pods, waited for ------------------------


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

    def __init__(self, client: Any, namespace: str, service: str, on_change: Callable[[], None]):
        self.client = client
        self.namespace = namespace
        self.service = service
        self.on_change = on_change
        self.slices: dict[str, dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        from sidecar.cluster.kube import Listed, list_and_watch

        path = f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
        params = {
            "labelSelector": f"kubernetes.io/service-name={self.service},{MANAGED_BY_LABEL}!={STANDIN_MANAGER}"
        }
        async for change in list_and_watch(self.client, path, params):
            if isinstance(change, Listed):
                self.slices = {str(s["metadata"]["name"]): s for s in change.items}
            elif change.type == "DELETED":
                self.slices.pop(str(change.object["metadata"]["name"]), None)
            else:
                self.slices[str(change.object["metadata"]["name"])] = change.object
            self.on_change()


# --- one ModelDeployment's listener ----------------------------------------------------------------


class GatewayController(Controller):
    """The sidecar's control state, with the gateway's plan: the remote for every request
    (``hold`` 0), or first the local pods waited for (``hold`` > 0; the remote after)."""

    hold = 0

    def plan(self) -> RoutePlan:
        plan = super().plan()
        if self.hold:
            return replace(plan, percentage=0, offloading=False)
        return replace(plan, percentage=100, offloading=True)


class Lane(Sidecar):
    """One ModelDeployment's listener: the sidecar's routing, credentials and proxy."""

    def __init__(self, listener: Listener, settings: SidecarSettings, kube_client: Any):
        namespace, name = listener.key
        super().__init__(
            settings,
            PassThroughSource(),
            NoMetrics(),
            mode="gateway",
            source=f"{namespace}/{name}",
            kube_client=kube_client,
        )
        self.controller = GatewayController(
            self.routing,
            NoMetrics(),
            mode="gateway",
            source=f"{namespace}/{name}",
            upstream=f"{listener.service}.{namespace}.svc (its ready pods)",
            listen=f"{settings.listen[0]}:{listener.port}",
            config_errors=self._errors,
        )
        self.listener = listener
        self.local = LocalPods(self.proxy.clock, self._local_endpoints)
        self.proxy.local_pool = self.local  # type: ignore[assignment]
        self.endpoints: ServiceEndpoints | None = None
        self.problem: str | None = None  # why the port cannot be listened on, if so
        self.open = False

    def _errors(self) -> tuple[str, ...]:
        client = self.kube_client
        return (*(client.problems() if client is not None else ()), *([self.problem] if self.problem else ()))

    def _local_endpoints(self) -> list[tuple[str, int]]:
        if self.endpoints is None:
            return []
        return ready_endpoints(self.endpoints.slices.values(), self.listener.port_name)

    def configure(self, listener: Listener) -> None:
        """Follow a changed ModelDeployment (same port)."""
        self.listener = listener
        model = listener.model
        self.controller.hold = listener.hold
        self.local.hold = float(listener.hold)
        self.controller.apply_config(model)
        self._configure_auth(model)
        self._configure_secret_headers(model)
        wanted = (
            (listener.key[0], listener.service) if listener.hold and self.kube_client is not None else None
        )
        have = (self.endpoints.namespace, self.endpoints.service) if self.endpoints is not None else None
        if wanted != have:
            if self.endpoints is not None:
                self.endpoints.stop()
                self.endpoints = None
            if wanted is not None:
                self.endpoints = ServiceEndpoints(self.kube_client, *wanted, self.local.notify)
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


# --- the process ------------------------------------------------------------------------------------


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

    def __init__(self, settings: GatewaySettings, kube_client: Any = None):
        self.settings = settings
        self.kube_client = kube_client
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
                self.objects = {_key(o): dict(o) for o in objects}
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
                    lane = Lane(want, self.settings.lane_settings(want.port), self.kube_client)
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
        from sidecar.cluster.kube import Listed, list_and_watch

        assert self.kube_client is not None
        namespaces = self.settings.namespaces or ("",)
        seen: dict[str, dict[Key, dict[str, Any]]] = {ns: {} for ns in namespaces}
        listed: set[str] = set()

        async def one(namespace: str) -> None:
            where = f"/namespaces/{namespace}" if namespace else ""
            path = f"/apis/{GROUP}/{VERSION}{where}/{PLURAL}"
            async for change in list_and_watch(self.kube_client, path):
                if isinstance(change, Listed):
                    seen[namespace] = {_key(o): o for o in change.items}
                    listed.add(namespace)
                elif change.type == "DELETED":
                    seen[namespace].pop(_key(change.object), None)
                else:
                    seen[namespace][_key(change.object)] = change.object
                if len(listed) == len(namespaces):
                    await self.update([o for objs in seen.values() for o in objs.values()])
                    self.synced = True

        async with asyncio.TaskGroup() as group:
            for namespace in namespaces:
                group.create_task(one(namespace))

    async def _retry(self) -> None:
        """Ports that could not be opened (still in use by a lane draining) are tried again."""
        while True:
            await asyncio.sleep(RETRY_LISTEN_SECONDS)
            if any(not lane.open for lane in self.lanes.values()):
                await self.update()

    async def run(self, on_started: Callable[[Gateway], None] | None = None) -> None:
        from sidecar.app import supervised

        self.admin_port = await self.admin.start(*self.settings.admin_listen)
        tasks = [asyncio.create_task(self._retry())]
        if self.kube_client is not None:
            tasks.append(
                asyncio.create_task(supervised("the ModelDeployment watch", self.follow, lambda: None))
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
            view: ControlView = lane.controller.view()
            doc = status_document(view, lane.stats, ready=lane.open and not self.draining)
            doc["port"] = lane.listener.port
            doc["coldStartHoldSeconds"] = lane.listener.hold
            doc["localPods"] = {
                "ready": [f"{a}:{p}" for a, p in lane._local_endpoints()],
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
                    f'offload_gateway_requests_total{{namespace="{_esc(ns)}",modeldeployment="{_esc(n)}",'
                    f'backend="{backend}",code="{code}"}} {count}\n'
                )
        for metric, help_text, attr in (
            ("offload_gateway_in_flight_requests", "requests being served now", "in_flight"),
            ("offload_gateway_open_connections", "client connections open now", "open_connections"),
        ):
            family(metric, "gauge", help_text)
            for ns, n, stats, _ in rows:
                out.append(
                    f'{metric}{{namespace="{_esc(ns)}",modeldeployment="{_esc(n)}"}} {getattr(stats, attr)}\n'
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
                    f'{metric}{{namespace="{_esc(ns)}",modeldeployment="{_esc(n)}"}} {getattr(local, attr)}\n'
                )
        return "".join(out)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class GatewayAdmin(AdminServer):
    """/healthz, /readyz, /status (JSON per ModelDeployment) and /metrics of the gateway."""

    def __init__(self, gateway: Gateway):
        super().__init__(lambda: None, ProxyStats(), gateway.ready)  # type: ignore[arg-type,return-value]
        self.gateway = gateway

    def respond(self, method: str, target: str) -> bytes:
        from sidecar.admin import PROMETHEUS_TEXT, _response

        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if method in ("GET", "HEAD") and path == "/status":
            body = (json.dumps(self.gateway.status(), indent=2) + "\n").encode()
            return _response(200, "OK", "application/json", body, head_only)
        if method in ("GET", "HEAD") and path == "/metrics":
            return _response(200, "OK", PROMETHEUS_TEXT, self.gateway.metrics().encode(), head_only)
        return super().respond(method, target)


# --- the command line --------------------------------------------------------------------------------


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    from sidecar.options import HelpFormatter as _HelpFormatter, address, duration, positive_duration

    env = os.environ if env is None else env
    defaults = ProxySettings()
    p = argparse.ArgumentParser(
        prog="offload-sidecar --mode gateway",
        description="Serve the remote of each ModelDeployment whose status carries a gateway port "
        "(status.standIn.port, chosen by the controller), on that port: the controller points a "
        "Service at it while its workload has no ready pod.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--mode", choices=("gateway",), default="gateway", help=argparse.SUPPRESS)
    p.add_argument(
        "--listen-host", default="0.0.0.0", help="the address the ModelDeployments' ports listen on"
    )
    p.add_argument(
        "--admin-listen",
        type=address("0.0.0.0"),
        default="0.0.0.0:9090",
        help="the admin port: /healthz /readyz /metrics /status",
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="serve the ModelDeployments of this namespace (repeat for several; default: every namespace)",
    )
    p.add_argument(
        "--default-remote-backend",
        default=env.get(DEFAULT_REMOTE_BACKEND_ENV, ""),
        metavar="URL|JSON",
        help="the remote of ModelDeployments without remoteBackend: http(s)://host[:port][/pathPrefix] "
        f"or a RemoteBackend as JSON (env {DEFAULT_REMOTE_BACKEND_ENV})",
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        default=env.get("KUBECONFIG") or None,
        help="credentials (default: $KUBECONFIG, else the pod's service account)",
    )
    p.add_argument(
        "--secret-refresh",
        type=positive_duration,
        default="60s",
        help="how often each Secret a remote's authentication references is read again",
    )
    g = p.add_argument_group("data path")
    g.add_argument("--connect-timeout", type=positive_duration, default=f"{defaults.connect_timeout:g}s")
    g.add_argument("--read-timeout", type=positive_duration, default=f"{defaults.read_timeout:g}s")
    g.add_argument(
        "--client-idle-timeout", type=positive_duration, default=f"{defaults.client_idle_timeout:g}s"
    )
    g.add_argument("--ca-file", type=Path, help="CA bundle for https remotes (default: the system's)")
    g.add_argument(
        "--shutdown-deadline",
        type=duration,
        default="30s",
        help="on SIGTERM (or a port given up), requests and streams in flight get this long to finish",
    )
    g.add_argument(
        "--shutdown-grace",
        type=duration,
        default="5s",
        help="on SIGTERM, new connections are still accepted this long (readiness fails at once and "
        "the controller takes this pod out of every EndpointSlice meanwhile)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GatewaySettings:
    default = None
    if args.default_remote_backend.strip():
        try:
            default = parse_remote_backend(args.default_remote_backend, "--default-remote-backend")
        except ValueError as exc:
            parser.error(str(exc))
    context = None
    if args.ca_file is not None:
        try:
            context = ssl.create_default_context(cafile=str(args.ca_file))
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--ca-file {args.ca_file}: {exc}")
    return GatewaySettings(
        listen_host=args.listen_host,
        admin_listen=args.admin_listen,
        namespaces=tuple(args.namespace),
        default_backend=default,
        secret_refresh=args.secret_refresh,
        shutdown_deadline=args.shutdown_deadline,
        proxy=ProxySettings(
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
            client_idle_timeout=args.client_idle_timeout,
            shutdown_grace=args.shutdown_grace,
            remote_ssl_context=context,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    from sidecar.cluster.kube import ConfigError, KubeClient, in_cluster_config, load_kubeconfig

    env = dict(os.environ)
    parser = build_parser(env)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from(args, parser)
    try:
        credentials = load_kubeconfig(args.kubeconfig) if args.kubeconfig else in_cluster_config(env)
    except ConfigError as exc:
        # Unlike the sidecar, nothing depends on this process being up: say why and stop.
        print(f"offload-sidecar --mode gateway: no cluster credentials: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        gateway = Gateway(settings, KubeClient(credentials, user_agent="offload-gateway"))
        gateway.install_signal_handlers()

        def announce(g: Gateway) -> None:
            print(f"gateway admin listening on {settings.admin_listen[0]}:{g.admin_port}", flush=True)

        try:
            await gateway.run(announce)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return 1
        return 0

    started = time.monotonic()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        code = asyncio.run(serve())
    else:
        code = uvloop.run(serve())
    log.debug("ran %.1f s", time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
