"""MetricSource of cluster mode: the workload's pods and their metrics, fed to sidecar/hpa.py.

Per evaluation (at most once per ``period``, 15 s by default: metrics-server's
finest resolution, so polling faster reads the same samples again):

- the workload's label selector is read from its Deployment/StatefulSet once
  per workload reference (``spec.selector`` is immutable), and its
  ``status.replicas`` only when an Object/External AverageValue metric needs it;
- ``GET /api/v1/namespaces/NS/pods?labelSelector=...&resourceVersion=0``
  (served from the API server's watch cache, not etcd);
- ``GET /apis/metrics.k8s.io/v1beta1/namespaces/NS/pods?labelSelector=...``
  once for all Resource and ContainerResource metrics;
- one GET per Pods/Object metric on custom.metrics.k8s.io/v1beta2 and per
  External metric on external.metrics.k8s.io/v1beta1.

A metric whose API fails or is not served gets an observation with current
None and the reason, so the decision stays where it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from crds.model import LabelSelector, MetricSpec, ModelDeployment, ObjectReference
from sidecar.hpa import (
    ExternalReading,
    HpaSettings,
    ObjectReading,
    PodUsageReading,
    PodValuesReading,
    Reading,
    Unreadable,
    Workload,
    evaluate,
    metric_display_name,
    milli,
    parse_external_value_list,
    parse_metric_value_list,
    parse_pod_list,
    parse_pod_metrics_list,
    spec_target,
)
from sidecar.interfaces import MetricObservation
from sidecar.kube import ApiError, KubeClient, KubeError

log = logging.getLogger("sidecar.podmetrics")

DEFAULT_PERIOD_SECONDS = 15.0
_FETCH_ERRORS = (KubeError, OSError, TimeoutError, ValueError, KeyError, TypeError)


def selector_string(selector: Mapping[str, Any] | LabelSelector | None) -> str:
    """A LabelSelector (API JSON or typed) as a ``labelSelector`` query value."""
    if selector is None:
        return ""
    if isinstance(selector, LabelSelector):
        labels = dict(selector.match_labels)
        expressions = [(e.key, e.operator, list(e.values)) for e in selector.match_expressions]
    else:
        labels = dict(selector.get("matchLabels") or {})
        expressions = [
            (e["key"], e["operator"], list(e.get("values") or []))
            for e in selector.get("matchExpressions") or []
        ]
    parts = [f"{k}={v}" for k, v in sorted(labels.items())]
    for key, operator, values in expressions:
        if operator == "In":
            parts.append(f"{key} in ({','.join(sorted(values))})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({','.join(sorted(values))})")
        elif operator == "Exists":
            parts.append(key)
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise ValueError(f"unknown label selector operator {operator!r}")
    return ",".join(parts)


def resource_plural(kind: str) -> str:
    """Kind -> resource name as the API server's default RESTMapper guesses it."""
    lower = kind.lower()
    if lower.endswith(("s", "x", "z", "ch", "sh")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):
        return lower[:-1] + "ies"
    return lower + "s"


class PodMetricSource:
    """Observes the current ModelDeployment's metrics over its workload's pods."""

    def __init__(
        self,
        client: KubeClient,
        model: Callable[[], ModelDeployment | None],
        *,
        period: float = DEFAULT_PERIOD_SECONDS,
        settings: HpaSettings | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.model = model
        self.period = period
        self.settings = settings or HpaSettings()
        self._clock = clock
        self._monotonic = monotonic
        self._selectors: dict[tuple[str, str, str, str], str] = {}
        self._cached: tuple[Any, float, list[MetricObservation]] | None = None

    async def observe(self, metrics: tuple[MetricSpec, ...]) -> list[MetricObservation]:
        model = self.model()
        key = (metrics, model)
        now = self._monotonic()
        if self._cached is not None and self._cached[0] == key and now - self._cached[1] < self.period:
            return self._cached[2]
        observations = await self._observe(metrics, model)
        self._cached = (key, now, observations)
        return observations

    async def _observe(
        self, metrics: tuple[MetricSpec, ...], model: ModelDeployment | None
    ) -> list[MetricObservation]:
        if not metrics:
            return []
        if model is None:
            return _all_unknown(metrics, "no ModelDeployment in force")
        namespace = model.workload_namespace
        ref = model.spec.model_source_ref
        try:
            selector = await self._selector(namespace, ref)
            needs_replicas = any(_averages_over_replicas(m) for m in metrics)
            replicas = await self._status_replicas(namespace, ref) if needs_replicas else 0
            pods_doc = await self.client.get(
                f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": selector, "resourceVersion": "0"}
            )
            pods = parse_pod_list(pods_doc)
        except _FETCH_ERRORS as exc:
            reason = f"cannot read the workload {ref.kind}/{ref.name} or its pods: {_describe(exc)}"
            log.warning("%s", reason)
            return _all_unknown(metrics, reason)
        workload = Workload(pods=pods, status_replicas=replicas or len(pods))
        readings = await self._readings(metrics, namespace, selector)
        settings = self.settings
        config = model.spec.offloading_config
        if config is not None and config.behavior.tolerance != settings.tolerance:
            settings = HpaSettings(
                tolerance=config.behavior.tolerance,
                cpu_initialization_period=settings.cpu_initialization_period,
                initial_readiness_delay=settings.initial_readiness_delay,
            )
        return evaluate(metrics, workload, readings, self._clock(), settings)

    # -- the workload --------------------------------------------------------------------------

    def _workload_path(self, namespace: str, ref: ObjectReference) -> str:
        group_version = ref.api_version or "apps/v1"
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return f"{prefix}/namespaces/{namespace}/{resource_plural(ref.kind)}/{ref.name}"

    async def _selector(self, namespace: str, ref: ObjectReference) -> str:
        key = (namespace, ref.api_version, ref.kind, ref.name)
        if key not in self._selectors:
            workload = await self.client.get(self._workload_path(namespace, ref))
            selector = (workload.get("spec") or {}).get("selector")
            if not selector:
                raise KubeError(f"{ref.kind}/{ref.name} has no spec.selector")
            self._selectors = {key: selector_string(selector)}  # one workload at a time
        return self._selectors[key]

    async def _status_replicas(self, namespace: str, ref: ObjectReference) -> int:
        workload = await self.client.get(self._workload_path(namespace, ref))
        return int((workload.get("status") or {}).get("replicas") or 0)

    # -- the metrics APIs -------------------------------------------------------------------------

    async def _readings(
        self, metrics: tuple[MetricSpec, ...], namespace: str, selector: str
    ) -> list[Reading]:
        usage: Reading | None = None
        readings: list[Reading] = []
        for metric in metrics:
            if metric.type in ("Resource", "ContainerResource"):
                if usage is None:
                    usage = await self._read(
                        "metrics.k8s.io",
                        lambda: self.client.get(
                            f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods",
                            {"labelSelector": selector},
                        ),
                        lambda doc: PodUsageReading(parse_pod_metrics_list(doc)),
                    )
                readings.append(usage)
            elif metric.type == "Pods" and metric.pods is not None:
                identifier = metric.pods.metric
                params = {"labelSelector": selector}
                if identifier.selector is not None:
                    params["metricLabelSelector"] = selector_string(identifier.selector)
                path = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/pods/*/{_seg(identifier.name)}"
                readings.append(
                    await self._read(
                        "custom.metrics.k8s.io",
                        lambda p=path, q=params: self.client.get(p, q),
                        lambda doc: PodValuesReading(parse_metric_value_list(doc)),
                    )
                )
            elif metric.type == "Object" and metric.object_ is not None:
                source = metric.object_
                obj = source.described_object
                params = {}
                if source.metric.selector is not None:
                    params["metricLabelSelector"] = selector_string(source.metric.selector)
                path = (
                    f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/"
                    f"{resource_plural(obj.kind)}/{_seg(obj.name)}/{_seg(source.metric.name)}"
                )
                readings.append(
                    await self._read(
                        "custom.metrics.k8s.io",
                        lambda p=path, q=params: self.client.get(p, q),
                        _object_reading,
                    )
                )
            elif metric.type == "External" and metric.external is not None:
                identifier = metric.external.metric
                params = {}
                if identifier.selector is not None:
                    params["labelSelector"] = selector_string(identifier.selector)
                path = f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{_seg(identifier.name)}"
                readings.append(
                    await self._read(
                        "external.metrics.k8s.io",
                        lambda p=path, q=params: self.client.get(p, q),
                        lambda doc: ExternalReading(parse_external_value_list(doc)),
                    )
                )
            else:
                readings.append(Unreadable(f"metric type {metric.type!r} is not supported"))
        return readings

    async def _read(
        self, api: str, fetch: Callable[[], Any], parse: Callable[[dict[str, Any]], Reading]
    ) -> Reading:
        try:
            doc = await fetch()
            return parse(doc)
        except ApiError as exc:
            if exc.status == 404:
                return Unreadable(f"{api} is not served here, or has no such metric ({exc})")
            if exc.status == 403:
                return Unreadable(f"{api}: forbidden; the sidecar's Role must allow it ({exc})")
            return Unreadable(f"{api}: {exc}")
        except _FETCH_ERRORS as exc:
            return Unreadable(f"{api}: {_describe(exc)}")


def _object_reading(doc: dict[str, Any]) -> Reading:
    samples = parse_metric_value_list(doc)
    if not samples:
        return Unreadable("custom.metrics.k8s.io returned no value for the object")
    return ObjectReading(next(iter(samples.values())).value)


def _averages_over_replicas(metric: MetricSpec) -> bool:
    return metric.type in ("Object", "External") and spec_target(metric).type == "AverageValue"


def _all_unknown(metrics: tuple[MetricSpec, ...], reason: str) -> list[MetricObservation]:
    observations = []
    for metric in metrics:
        target = spec_target(metric)
        raw = {
            "Utilization": target.average_utilization,
            "AverageValue": target.average_value,
            "Value": target.value,
        }.get(target.type)
        number = float(raw) if target.type == "Utilization" else milli(raw or 0) / 1000
        observations.append(MetricObservation(metric_display_name(metric), None, number, reason))
    return observations


def _seg(text: str) -> str:
    return quote(text, safe="")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def sidecar_rules_for(model: ModelDeployment) -> list[dict[str, Any]]:
    """The RBAC rules one ModelDeployment adds to the static sidecar Role
    (charts/offload/files/sidecar-role.yaml): its custom/external metrics and the
    Secrets its remote's authentication reads (OAuth client secret,
    headersFromSecrets), each by name, never by wildcard."""
    rules: list[dict[str, Any]] = []
    config = model.spec.offloading_config
    for metric in config.metrics if config else ():
        if metric.type == "Pods" and metric.pods is not None:
            rules.append(
                {
                    "apiGroups": ["custom.metrics.k8s.io"],
                    "resources": [f"pods/{metric.pods.metric.name}"],
                    "verbs": ["get"],
                }
            )
        elif metric.type == "Object" and metric.object_ is not None:
            obj = metric.object_.described_object
            rules.append(
                {
                    "apiGroups": ["custom.metrics.k8s.io"],
                    "resources": [f"{resource_plural(obj.kind)}/{metric.object_.metric.name}"],
                    "resourceNames": [obj.name],
                    "verbs": ["get"],
                }
            )
        elif metric.type == "External" and metric.external is not None:
            rules.append(
                {
                    "apiGroups": ["external.metrics.k8s.io"],
                    "resources": [metric.external.metric.name],
                    "verbs": ["list"],
                }
            )
    secrets = secret_names_for(model)
    if secrets:
        rules.append(
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets, "verbs": ["get"]}
        )
    return rules


def secret_names_for(model: ModelDeployment) -> list[str]:
    """The Secrets the remote's authentication reads (OAuth client secret, headersFromSecrets),
    each once, in order of first reference."""
    config = model.spec.offloading_config
    backend = config.remote_backend if config else None
    if backend is None:
        return []
    names = []
    auth = backend.auth_config
    if auth is not None and auth.oauth_config is not None and auth.oauth_config.client_secret_ref is not None:
        names.append(auth.oauth_config.client_secret_ref.name)
    names.extend(h.secret_key_ref.name for h in backend.headers_from_secrets)
    return list(dict.fromkeys(names))
