"""/metrics: the sidecar's counters and its offloading state in the Prometheus text format
(0.0.4). Pure, but for the process figures read from /proc when asked for.

Series are prefixed ``offload_sidecar_``; the ``process_*`` series follow the Prometheus
client libraries' names so that the usual dashboards find them.
"""

from __future__ import annotations

import math
import os

from crds.decision import NOT_EVALUATED
from sidecar.control.view import ControlView
from sidecar.proxy.stats import BACKENDS, Histogram, ProxyStats

PREFIX = "offload_sidecar"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


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
