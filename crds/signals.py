"""Signals the product serves itself, with no custom-metrics adapter: which ``Pods`` metric
names they are, and what each sidecar has to measure or scrape for them. Pure.

A ``Pods`` metric of ``offloadingConfig.metrics`` is *served locally* when its
``metric.name`` is

- one of the sidecar's own measurements (:data:`SIDECAR_SIGNALS`, under the
  ``offload.beamlit.com/`` prefix, which no custom-metrics API can serve: a name there is
  one path segment), or
- a gauge of the model server: a well-known one (:data:`KNOWN_MODEL_GAUGES`) or one
  listed in ``offloadingConfig.modelMetrics.gauges``. Each sidecar scrapes it from the
  model's Prometheus endpoint on localhost (``modelMetrics``: port, path, interval).

Every other name is read from custom.metrics.k8s.io, as the HPA reads it.

>>> served_locally("vllm:num_requests_waiting", None)
'model'
>>> served_locally("offload.beamlit.com/in-flight", None)
'sidecar'
>>> served_locally("requests_per_second", None) is None
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crds.model import LabelSelector, MetricSpec, MetricTarget, OffloadingConfig
from crds.quantity import parse_quantity

SIGNAL_PREFIX = "offload.beamlit.com/"
IN_FLIGHT = SIGNAL_PREFIX + "in-flight"
WAITING = SIGNAL_PREFIX + "waiting"

# The sidecar's own measurements, per pod, averaged over the last second (sampled every 100 ms).
SIDECAR_SIGNALS: dict[str, str] = {
    IN_FLIGHT: "requests sent to the local model and not yet answered to the end",
    WAITING: "requests sent to the local model that have no byte of their response body yet",
}

# Gauges of the common LLM servers, served without being listed in modelMetrics.gauges.
KNOWN_MODEL_GAUGES: dict[str, str] = {
    "vllm:num_requests_waiting": "vLLM: requests queued",
    "vllm:num_requests_running": "vLLM: requests being generated",
    "vllm:gpu_cache_usage_perc": "vLLM (v0): KV-cache use, 0 to 1",
    "vllm:kv_cache_usage_perc": "vLLM: KV-cache use, 0 to 1",
    "tgi_queue_size": "TGI: requests queued",
    "tgi_batch_current_size": "TGI: requests in the current batch",
    "nv_inference_pending_request_count": "Triton: requests pending, per model",
    "sglang:num_queue_reqs": "SGLang: requests queued",
    "sglang:num_running_reqs": "SGLang: requests running",
    "sglang:token_usage": "SGLang: KV-cache token use, 0 to 1",
    "llamacpp:requests_processing": "llama.cpp server: requests being processed",
    "llamacpp:requests_deferred": "llama.cpp server: requests deferred (queued)",
    "llamacpp:kv_cache_usage_ratio": "llama.cpp server: KV-cache use, 0 to 1",
}

# A Prometheus metric name (the text format's own rule).
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def served_locally(name: str, config: OffloadingConfig | None) -> str | None:
    """``"sidecar"`` (the sidecar's own measurement), ``"model"`` (a model gauge the
    sidecar scrapes) or None (read from the custom metrics API) for a Pods metric name."""
    if name in SIDECAR_SIGNALS:
        return "sidecar"
    if name in KNOWN_MODEL_GAUGES:
        return "model"
    model_metrics = config.model_metrics if config is not None else None
    if model_metrics is not None and name in model_metrics.gauges:
        return "model"
    return None


def local_metric_name(metric: MetricSpec, config: OffloadingConfig | None) -> str | None:
    """The name of ``metric`` when it is a Pods metric served locally, else None."""
    if metric.type != "Pods" or metric.pods is None:
        return None
    name = metric.pods.metric.name
    return name if served_locally(name, config) is not None else None


def has_local_metrics(config: OffloadingConfig | None) -> bool:
    """Whether any metric of ``config`` is served by the sidecars."""
    if config is None:
        return False
    return any(local_metric_name(m, config) is not None for m in config.metrics)


def scraped_gauges(config: OffloadingConfig | None) -> tuple[str, ...]:
    """The model gauges the sidecars must scrape for ``config``'s metrics, sorted, unique."""
    if config is None:
        return ()
    names = {
        m.pods.metric.name
        for m in config.metrics
        if m.pods is not None and m.type == "Pods" and served_locally(m.pods.metric.name, config) == "model"
    }
    return tuple(sorted(names))


def describe_local_names(extra: Iterable[str] = ()) -> str:
    """One line naming what is served locally, for validation messages."""
    listed = ", ".join(sorted(SIDECAR_SIGNALS))
    gauges = ", ".join(sorted({*KNOWN_MODEL_GAUGES, *extra}))
    return f"{listed}, and the model gauges {gauges} (more in modelMetrics.gauges)"


# --- one pod's value, from the document its sidecar serves at /signals -----------------------------


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Whether a series' labels satisfy a metric's label selector (None matches all)."""
    return selector is None or selector.matches(labels)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def signal_value(doc: Any, name: str, selector: LabelSelector | None = None) -> tuple[float | None, str]:
    """One pod's value of the signal ``name`` from its sidecar's ``/signals`` document
    (shape: :func:`sidecar.signals.SignalBoard.document`), or (None, why not).

    Model gauges: the sum of the series whose labels ``selector`` matches (Triton reports
    one series per model; a selector picks one). Never raises, whatever ``doc`` holds.
    """
    if not isinstance(doc, dict):
        return None, "the sidecar's /signals answer is not a JSON object"
    if name in SIDECAR_SIGNALS:
        entry = (doc.get("signals") or {}).get(name) if isinstance(doc.get("signals"), dict) else None
        value = _number(entry.get("value")) if isinstance(entry, dict) else None
        if value is None:
            return None, f"the sidecar did not report {name}"
        return value, ""
    gauges = doc.get("gauges")
    entry = gauges.get(name) if isinstance(gauges, dict) else None
    if not isinstance(entry, dict):
        return None, f"the sidecar does not scrape {name} (yet)"
    if entry.get("error"):
        return None, str(entry["error"])[:300]
    series = entry.get("series")
    if not isinstance(series, list):
        return None, f"the sidecar reported no series of {name}"
    total, matched = 0.0, 0
    for item in series:
        if not isinstance(item, dict) or not isinstance(item.get("labels"), dict):
            continue
        value = _number(item.get("value"))
        if value is None:
            continue
        if selector_matches(selector, {str(k): str(v) for k, v in item["labels"].items()}):
            total += value
            matched += 1
    if not matched:
        what = "matches the metric's selector" if selector is not None else "has a value"
        return None, f"no series of {name} {what}"
    return total, ""


# --- over the workload's ready pods, as the HPA does for a Pods metric --------------------------


@dataclass(frozen=True)
class Aggregate:
    """A metric over the workload's ready pods: ``current`` (None: unknown) against
    ``target``, both in the metric's unit, and how it was computed (or why unknown)."""

    current: float | None
    target: float
    reason: str


def display_name(name: str, target_type: str) -> str:
    """As ``kubectl describe hpa`` names a Pods metric; a Value target is the pods' total."""
    return f'"{name}" on pods' + (" (total)" if target_type == "Value" else "")


def aggregate(
    target: MetricTarget,
    ready: Sequence[str],
    values: Mapping[str, float],
    missing: Mapping[str, str],
) -> Aggregate:
    """The metric over the ready pods ``ready`` from the pods' own values.

    ``values``: pod -> its value (pods of ``ready`` that answered); ``missing``: pod -> why
    it has none. AverageValue is the average per ready pod, Value their sum. As in the HPA,
    pods without a value count as 0 when the others are over target and as the target
    when they are under; if counting them flips the direction, the metric is held at its
    target (no change). Pods that are not ready are not passed: they take no traffic.
    """
    goal = float(parse_quantity(target.value if target.type == "Value" else target.average_value or 0))
    if not ready:
        return Aggregate(None, goal, "no ready pod")
    answered = {pod: values[pod] for pod in ready if pod in values}
    absent = [pod for pod in ready if pod not in answered]
    if not answered:
        return Aggregate(None, goal, f"no value from any ready pod ({_why(absent, missing)})")
    n = len(ready)
    scale = n if target.type == "Value" else 1  # a Value is the average per pod times the pods
    per_pod_goal = goal / scale
    first = sum(answered.values()) / len(answered)
    how = "sum" if target.type == "Value" else "average"
    what = f"{how} over {n} ready pod{'s' if n != 1 else ''}"
    if not absent:
        return Aggregate(first * scale, goal, what)
    ratio = first / per_pod_goal if per_pod_goal else math.inf
    filler = 0.0 if ratio > 1 else per_pod_goal if ratio < 1 else None
    if filler is None:
        return Aggregate(first * scale, goal, f"{what}; {_why(absent, missing)}: not counted")
    second = (sum(answered.values()) + filler * len(absent)) / n
    counted = "0" if filler == 0 else "the target"
    note = f"{what}; {_why(absent, missing)}: counted as {counted}"
    if (ratio < 1 < second / per_pod_goal) or (ratio > 1 > second / per_pod_goal):
        return Aggregate(goal, goal, f"{note}, which flips the direction: held at target")
    return Aggregate(second * scale, goal, note)


def _why(pods: Sequence[str], missing: Mapping[str, str]) -> str:
    shown = [f"{pod}: {missing.get(pod, 'no value')}" for pod in list(pods)[:3]]
    more = f" and {len(pods) - 3} more" if len(pods) > 3 else ""
    return f"{len(pods)} without a value ({'; '.join(shown)}{more})"
