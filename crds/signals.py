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

import re
from collections.abc import Iterable

from crds.model import MetricSpec, OffloadingConfig

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
