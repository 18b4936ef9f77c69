"""The admin port: /healthz, /readyz, /metrics (Prometheus text), /status and /signals (JSON).

Separate from the proxy port, so that probes and scrapes never compete with
model traffic and the proxy port serves nothing but the model.

Rendering is pure (:func:`render_metrics`, :func:`status_document` over a
:class:`ControlView` and the data path's :class:`~sidecar.proxy.stats.ProxyStats`).
The server is a few dozen lines on asyncio streams rather than Starlette under
uvicorn: four GET endpoints need no framework, it saves ~6 MiB of RSS in a
process injected into every model pod, and uvicorn would install signal
handlers of its own where the sidecar's SIGTERM must drain the proxy.
Each connection carries one request (``Connection: close``); heads are
bounded in size and time, and connections in number.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crds.decision import NOT_EVALUATED, Decision
from crds.model import MetricSpec, ModelDeployment
from crds.observation import MetricObservation
from sidecar.proxy.routing import RoutePlan
from sidecar.proxy.stats import BACKENDS, Histogram, ProxyStats

log = logging.getLogger("sidecar.admin")

PREFIX = "offload_sidecar"
MAX_HEAD_BYTES = 8 * 1024
HEAD_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ControlView:
    """What the control side knows, at one moment, for /status and /metrics."""

    mode: str = "standalone"  # or "cluster"
    source: str = ""  # the config file, or namespace/name in the cluster
    model: ModelDeployment | None = None
    config_errors: tuple[str, ...] = ()
    observations: tuple[MetricObservation, ...] = ()
    decision: Decision | None = None
    plan: RoutePlan = field(default_factory=RoutePlan)
    reason: str = "starting"  # why the plan is what it is (the decision's, or pass-through's)
    remote_unavailable: str | None = None  # why the configured remote is not used (its credentials)
    offloading_since: float | None = None  # wall clock
    transitions: tuple[tuple[str, int], ...] = ()  # (("on", n), ("off", m))
    published: dict[str, Any] | None = None  # cluster mode: the controller's decision, and its age
    spillovers: int = 0  # requests sent to the remote by behavior.spilloverInFlight
    upstream: str = ""
    listen: str = ""


# --- Prometheus text exposition -----------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(self, name: str, labels: dict[str, str], histogram: Histogram) -> None:
        for bound, count in histogram.cumulative():
            self.sample(f"{name}_bucket", count, {**labels, "le": _number(bound)})
        self.sample(f"{name}_sum", histogram.sum, labels)
        self.sample(f"{name}_count", histogram.count, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _process_figures() -> dict[str, float]:
    """This process's CPU seconds, RSS and start time, from /proc (empty elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return {}
    tck = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": (int(fields[11]) + int(fields[12])) / tck,
        "start": boot + int(fields[19]) / tck,
        "rss": float(int(fields[21]) * page),
    }


# offload_sidecar_decision_reason{reason}: the decision engine's code (crds.decision.CODES,
# the Offloading condition's reasons), or this one for a sidecar with nothing to decide.
PASS_THROUGH = "PassThrough"  # no valid, enabled ModelDeployment with a remote backend


def modeldeployment_name(view: ControlView) -> str:
    """The ModelDeployment's name: from the configuration in force, else (cluster mode) the
    ``namespace/name`` the sidecar was injected for; "" when neither is known."""
    if view.model is not None:
        return view.model.name
    if view.mode == "cluster":
        name = view.source.rpartition("/")[2]
        return "" if name == "?" else name
    return ""


def decision_code(view: ControlView) -> str:
    """The current decision's reason code: the engine's (``NotEvaluated`` before its first
    step), or ``PassThrough`` when the configuration leaves nothing to decide. Pure."""
    model = view.model
    config = model.spec.offloading_config if model is not None else None
    if model is None or not model.spec.enabled or config is None or config.remote_backend is None:
        return PASS_THROUGH
    return view.decision.code if view.decision is not None else NOT_EVALUATED


def render_metrics(view: ControlView, stats: ProxyStats, *, ready: bool, process: bool = True) -> str:
    """Everything in Prometheus text format 0.0.4; pure but for ``process``'s /proc reads."""
    out = _Exposition()
    p = PREFIX

    out.family(f"{p}_requests_total", "counter", "Responses sent to clients, by backend and status class.")
    for backend in (*BACKENDS, "proxy"):
        for code in ("1xx", "2xx", "3xx", "4xx", "5xx"):
            n = stats.requests_total.get((backend, code), 0)
            if n or backend in BACKENDS and code in ("2xx", "5xx"):
                out.sample(f"{p}_requests_total", n, {"backend": backend, "code": code})

    out.family(
        f"{p}_request_duration_seconds", "histogram", "Time from the request head to the end of the response."
    )
    for backend in BACKENDS:
        out.histogram(f"{p}_request_duration_seconds", {"backend": backend}, stats.response_seconds[backend])
    out.family(
        f"{p}_response_head_duration_seconds",
        "histogram",
        "Time from the request head to the response head (time to first byte).",
    )
    for backend in BACKENDS:
        out.histogram(
            f"{p}_response_head_duration_seconds", {"backend": backend}, stats.response_head_seconds[backend]
        )

    out.family(f"{p}_fallbacks_total", "counter", "Requests retried on the other backend, by cause.")
    for (source, target, reason), n in sorted(stats.fallbacks_total.items()):
        out.sample(f"{p}_fallbacks_total", n, {"from": source, "to": target, "reason": reason})
    out.family(f"{p}_upstream_failures_total", "counter", "Failed upstream attempts, by backend and kind.")
    for (backend, kind), n in sorted(stats.upstream_failures_total.items()):
        out.sample(f"{p}_upstream_failures_total", n, {"backend": backend, "kind": kind})
    out.family(f"{p}_rejected_requests_total", "counter", "Requests refused by the proxy itself, by status.")
    for status, n in sorted(stats.rejected_total.items()):
        out.sample(f"{p}_rejected_requests_total", n, {"code": str(status)})
    out.one(
        f"{p}_client_aborts_total",
        "counter",
        "Clients gone before their response ended.",
        stats.client_aborts_total,
    )
    out.one(f"{p}_in_flight_requests", "gauge", "Requests being proxied now.", stats.in_flight)
    out.one(
        f"{p}_local_in_flight_requests",
        "gauge",
        "Requests sent to the local model whose response has not ended.",
        stats.local_in_flight,
    )
    out.one(
        f"{p}_local_waiting_requests",
        "gauge",
        "Requests sent to the local model without a byte of response body yet.",
        stats.local_waiting,
    )
    out.one(
        f"{p}_spillovers_total",
        "counter",
        "Requests sent to the remote because the local model had spilloverInFlight in flight.",
        view.spillovers,
    )
    out.one(f"{p}_open_connections", "gauge", "Client connections open now.", stats.open_connections)
    out.one(f"{p}_websocket_tunnels", "gauge", "WebSocket tunnels open now.", stats.tunnels)
    out.one(
        f"{p}_breaker_open",
        "gauge",
        "1 while the remote's circuit breaker is open or probing, else 0.",
        1 if stats.breaker_open else 0,
    )

    # Who this sidecar works for: dashboards and rules join it on (job, instance) to group
    # every series by ModelDeployment, whatever scrape configuration found the pod.
    out.family(f"{p}_info", "gauge", "Always 1; modeldeployment is the ModelDeployment this sidecar serves.")
    out.sample(f"{p}_info", 1, {"modeldeployment": modeldeployment_name(view)})
    out.family(f"{p}_decision_reason", "gauge", "1 for the stable code of the current decision's reason.")
    out.sample(f"{p}_decision_reason", 1, {"reason": decision_code(view)})

    out.one(f"{p}_ready", "gauge", "1 while the sidecar is ready for traffic.", 1 if ready else 0)
    out.one(
        f"{p}_config_loaded",
        "gauge",
        "1 while a valid, enabled ModelDeployment is in force, else 0 (pass-through).",
        1 if view.model is not None and view.model.spec.enabled else 0,
    )
    out.one(
        f"{p}_offloading", "gauge", "1 while offloading is active, else 0.", 1 if view.plan.offloading else 0
    )
    out.one(
        f"{p}_offload_share_ratio",
        "gauge",
        "Configured share of requests sent to the remote while offloading (percentage / 100).",
        view.plan.percentage / 100 if view.plan.remote is not None else 0,
    )
    out.family(f"{p}_offloading_transitions_total", "counter", "Times offloading turned on or off.")
    transitions = dict(view.transitions)
    for to in ("on", "off"):
        out.sample(f"{p}_offloading_transitions_total", transitions.get(to, 0), {"to": to})

    out.one(
        f"{p}_decision_stale",
        "gauge",
        "Cluster mode: 1 while the controller's published decision is stale (still followed), else 0.",
        1 if view.published is not None and view.published.get("stale") else 0,
    )

    names = {"ratio": "metric_ratio", "current": "observed_value", "target": "target_value"}
    helps = {
        "ratio": "Observed value over target, per metric of the offloadingConfig (absent while unknown).",
        "current": "Observed value per metric, in the metric's unit (percent for Utilization).",
        "target": "Target value per metric, in the metric's unit.",
    }
    for key in ("ratio", "current", "target"):
        out.family(f"{p}_{names[key]}", "gauge", helps[key])
        for obs in view.observations:
            value = {"ratio": obs.ratio, "current": obs.current, "target": obs.target}[key]
            if value is not None:
                out.sample(f"{p}_{names[key]}", value, {"metric": obs.metric})
    out.family(f"{p}_metric_available", "gauge", "1 when the metric could be read at the last evaluation.")
    for obs in view.observations:
        out.sample(f"{p}_metric_available", 0 if obs.current is None else 1, {"metric": obs.metric})

    if process:
        figures = _process_figures()
        if figures:
            out.one("process_cpu_seconds_total", "counter", "CPU time used by the sidecar.", figures["cpu"])
            out.one(
                "process_resident_memory_bytes", "gauge", "Resident memory of the sidecar.", figures["rss"]
            )
            out.one(
                "process_start_time_seconds", "gauge", "Start time since the Unix epoch.", figures["start"]
            )
    return out.text()


# --- /status --------------------------------------------------------------------------------------


def _redacted_headers(headers: dict[str, str]) -> dict[str, str]:
    # Values of added headers are often credentials (API keys): names only.
    return {name: "<redacted>" for name in headers}


def _metric_dict(metric: MetricSpec) -> dict[str, Any]:
    from dataclasses import asdict

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {_camel(k): clean(v) for k, v in value.items() if v not in (None, (), {})}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(asdict(metric))


def _camel(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(part.title() for part in rest)


def configuration_document(model: ModelDeployment | None) -> dict[str, Any] | None:
    """The configuration in effect, as the user wrote it, without any secret."""
    if model is None:
        return None
    spec = model.spec
    doc: dict[str, Any] = {
        "name": model.name,
        "namespace": model.namespace,
        "generation": model.generation,
        "model": spec.model,
        "enabled": spec.enabled,
        "environment": spec.environment,
    }
    config = spec.offloading_config
    if config is not None:
        offloading: dict[str, Any] = {
            "behavior": {
                "percentage": config.behavior.percentage,
                "sustainSeconds": config.behavior.sustain_seconds,
                "cooldownSeconds": config.behavior.cooldown_seconds,
                "tolerance": config.behavior.tolerance,
            },
            "metrics": [_metric_dict(m) for m in config.metrics],
        }
        backend = config.remote_backend
        if backend is not None:
            remote: dict[str, Any] = {"scheme": backend.scheme, "host": backend.host}
            if backend.path_prefix:
                remote["pathPrefix"] = backend.path_prefix
            if backend.headers_to_add:
                remote["headersToAdd"] = _redacted_headers(backend.headers_to_add)
            if backend.headers_from_secrets:
                remote["headersFromSecrets"] = [
                    {
                        "name": h.name,
                        "secretKeyRef": {"name": h.secret_key_ref.name, "key": h.secret_key_ref.key},
                    }
                    for h in backend.headers_from_secrets
                ]
            if backend.ca_bundle is not None:
                n = backend.ca_bundle.count("-----BEGIN CERTIFICATE-----")
                remote["caBundle"] = f"<{n} certificate{'' if n == 1 else 's'}>"
            if backend.auth_config is not None:
                auth: dict[str, Any] = {"type": backend.auth_config.type}
                oauth = backend.auth_config.oauth_config
                if oauth is not None:
                    auth["oauthConfig"] = {
                        "clientId": oauth.client_id,
                        "tokenUrl": oauth.token_url,
                        "clientSecret": "<redacted>" if oauth.client_secret else None,
                        "clientSecretRef": (
                            {"name": oauth.client_secret_ref.name, "key": oauth.client_secret_ref.key}
                            if oauth.client_secret_ref
                            else None
                        ),
                    }
                remote["authConfig"] = auth
            offloading["remoteBackend"] = remote
        doc["offloadingConfig"] = offloading
    return doc


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def status_document(view: ControlView, stats: ProxyStats, *, ready: bool) -> dict[str, Any]:
    plan = view.plan
    remote = plan.remote
    requests: dict[str, dict[str, int]] = {}
    for (backend, code), n in sorted(stats.requests_total.items()):
        requests.setdefault(backend, {})[code] = n
    return {
        "ready": ready,
        "mode": view.mode,
        "source": view.source,
        "listen": view.listen,
        "upstream": view.upstream,
        "configuration": configuration_document(view.model),
        "configurationErrors": list(view.config_errors),
        "observations": [
            {
                "metric": o.metric,
                "current": o.current,
                "target": o.target,
                "ratio": None if o.ratio is None else round(o.ratio, 4),
                "display": o.display(),
                "reason": o.reason,
            }
            for o in view.observations
        ],
        "decision": {
            "offloading": plan.offloading,
            "reason": view.reason,
            "code": view.decision.code if view.decision is not None else None,
            "stale": bool(view.published and view.published["stale"]),
            "controller": view.published,
            "offloadingSince": _iso(view.offloading_since),
            "transitions": dict(view.transitions),
        },
        "routing": {
            "remote": None if remote is None else f"{remote.scheme}://{remote.authority}{remote.path_prefix}",
            "percentage": plan.percentage,
            "activePercentage": plan.active_percentage,
            "remoteUnavailable": view.remote_unavailable,
        },
        "counters": {
            "requests": requests,
            "local": stats.total("local"),
            "remote": stats.total("remote"),
            "fallbacks": {"/".join(k): n for k, n in sorted(stats.fallbacks_total.items())},
            "upstreamFailures": {"/".join(k): n for k, n in sorted(stats.upstream_failures_total.items())},
            "rejected": {str(k): n for k, n in sorted(stats.rejected_total.items())},
            "clientAborts": stats.client_aborts_total,
            "inFlight": stats.in_flight,
            "localInFlight": stats.local_in_flight,
            "localWaiting": stats.local_waiting,
            "spillovers": view.spillovers,
            "openConnections": stats.open_connections,
            "breaker": stats.breaker_state,
        },
    }


# --- the server -----------------------------------------------------------------------------------


def _response(status: int, reason: str, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


def _text(status: int, reason: str, message: str, head_only: bool = False) -> bytes:
    return _response(status, reason, "text/plain; charset=utf-8", (message + "\n").encode(), head_only)


class AdminServer:
    """Serves the four endpoints from the given callables."""

    def __init__(
        self,
        view: Callable[[], ControlView],
        stats: ProxyStats,
        ready: Callable[[], bool],
        signals: Callable[[], dict[str, Any]] | None = None,
    ):
        self.view = view
        self.stats = stats
        self.ready = ready
        self.signals = signals
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, method: str, target: str) -> bytes:
        """The whole response to one request line; pure but for the callables."""
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", f"method {method} not allowed: use GET", head_only)
        path = target.split("?", 1)[0]
        if path == "/healthz":
            return _text(200, "OK", "ok", head_only)
        if path == "/readyz":
            if self.ready():
                return _text(200, "OK", "ready", head_only)
            return _text(503, "Service Unavailable", "not ready", head_only)
        if path == "/metrics":
            body = render_metrics(self.view(), self.stats, ready=self.ready()).encode()
            return _response(200, "OK", PROMETHEUS_TEXT, body, head_only)
        if path == "/status":
            doc = status_document(self.view(), self.stats, ready=self.ready())
            body = (json.dumps(doc, indent=2) + "\n").encode()
            return _response(200, "OK", "application/json", body, head_only)
        if path == "/signals" and self.signals is not None:
            # Read by the controller every second per pod: compact.
            body = json.dumps(self.signals(), separators=(",", ":")).encode()
            return _response(200, "OK", "application/json", body, head_only)
        return _text(
            404,
            "Not Found",
            f"no such endpoint {path!r}: /healthz /readyz /metrics /status /signals",
            head_only,
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                writer.write(_text(503, "Service Unavailable", "too many admin connections"))
                return
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(_text(431, "Request Header Fields Too Large", "request head over 8 KiB"))
                return
            except TimeoutError:
                writer.write(_text(408, "Request Timeout", "request head not received in time"))
                return
            except asyncio.IncompleteReadError:
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
                writer.write(_text(400, "Bad Request", "malformed request line"))
                return
            try:
                writer.write(self.respond(parts[0], parts[1]))
            except Exception:  # a bug in rendering must not kill the admin port
                log.exception("admin endpoint %s failed", parts[1])
                writer.write(_text(500, "Internal Server Error", "internal error; see the sidecar's log"))
        finally:
            self._connections -= 1
            try:
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
