"""The HorizontalPodAutoscaler's metric arithmetic, as pure functions.

``evaluate(metrics, workload, readings, now, settings)`` turns the
offloadingConfig's autoscaling/v2 MetricSpecs, the workload's pods and what the
metrics APIs returned into one :class:`MetricObservation` per metric, in order,
with the same arithmetic as the HPA's replica calculator (Kubernetes 1.34), so
that a metric the HPA would call "over target" is over target here too:

- Utilization = Σusage / Σrequests over the pods that have samples, as an
  integer percentage (the HPA truncates the same way). Requests count regular
  containers and restartable init containers (native sidecars); a counted
  container without a request makes the metric invalid, never a silent 0.
- Deleted, failed and succeeded pods are left out. Pending pods, and for cpu
  pods that are unready or still in their initialization period, are
  "unready": left out, unless the samples say "over target", when they count
  as using 0 (they will take load soon).
- Pods without samples ("missing") count as 0 when the samples say over
  target, and as using their request (or the target, if higher) when they say
  under. If that recount flips the direction, the HPA makes no change: the
  observation then reports current == target, which every tolerance holds.
- AverageValue compares the average per pod with the target (over target =
  current > target). Object and External AverageValue divide by the
  workload's status.replicas, as the HPA divides by its scale's.

The tolerance band itself is applied by the decision engine to
``current / target``; within it the HPA makes no change either. Nothing here
reads a clock or a socket: the controller's ``webhook/controller/evaluation.py``
fetches, this computes, and crds/decision.py decides; the standalone sidecar
feeds the same engine from its local cgroup.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from crds.model import LabelSelector, MetricSpec, MetricTarget
from crds.observation import MetricObservation, unit_of
from crds.quantity import parse_quantity

# --- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class HpaSettings:
    """The kube-controller-manager flags the HPA's arithmetic depends on."""

    # --horizontal-pod-autoscaler-tolerance; the MD's behavior.tolerance overrides it.
    tolerance: float = 0.1
    # --horizontal-pod-autoscaler-cpu-initialization-period
    cpu_initialization_period: timedelta = timedelta(minutes=5)
    # --horizontal-pod-autoscaler-initial-readiness-delay
    initial_readiness_delay: timedelta = timedelta(seconds=30)


# --- inputs, parsed from the API's JSON ----------------------------------------------


@dataclass(frozen=True)
class ContainerRequests:
    name: str
    requests: Mapping[str, int]  # resource name -> milli-units, as the HPA counts them


@dataclass(frozen=True)
class PodInfo:
    """What the HPA looks at in a pod."""

    name: str
    phase: str = "Running"
    deleted: bool = False
    ready_status: str | None = "True"  # the Ready condition's status; None: no such condition
    ready_since: datetime | None = None  # its lastTransitionTime
    start_time: datetime | None = None
    # Regular containers and restartable init containers, in spec order.
    containers: tuple[ContainerRequests, ...] = ()
    # spec.resources.requests (pod-level resources), milli-units.
    pod_requests: Mapping[str, int] = field(default_factory=dict)

    @property
    def running_and_ready(self) -> bool:
        return self.phase == "Running" and self.ready_status == "True"


@dataclass(frozen=True)
class PodSample:
    """One pod's value of one metric (milli-units) and when it was measured."""

    value: int
    timestamp: datetime | None = None
    window: timedelta = timedelta(0)


@dataclass(frozen=True)
class PodUsage:
    """One item of a metrics.k8s.io PodMetricsList."""

    name: str
    timestamp: datetime | None
    window: timedelta
    containers: Mapping[str, Mapping[str, int]]  # container -> resource -> milli-units


@dataclass(frozen=True)
class ScaleTargetPods:
    """The scale target's pods (by its label selector) and its status.replicas: what the
    replica calculator counts (webhook.selection.Workload is the workload as selection sees it)."""

    pods: tuple[PodInfo, ...]
    status_replicas: int

    @property
    def ready_replicas(self) -> int:
        return sum(1 for p in self.pods if p.running_and_ready and not p.deleted)


# What the metrics APIs returned for one metric.
@dataclass(frozen=True)
class PodUsageReading:
    """metrics.k8s.io PodMetrics of the workload's pods (Resource, ContainerResource)."""

    items: tuple[PodUsage, ...]


@dataclass(frozen=True)
class PodValuesReading:
    """custom.metrics.k8s.io values per pod (Pods metrics)."""

    samples: Mapping[str, PodSample]


@dataclass(frozen=True)
class ObjectReading:
    """custom.metrics.k8s.io value of one object (Object metrics), milli-units."""

    value: int


@dataclass(frozen=True)
class ExternalReading:
    """external.metrics.k8s.io values (External metrics: summed), milli-units."""

    values: tuple[int, ...]


@dataclass(frozen=True)
class Unreadable:
    """The metric could not be read; ``reason`` says why."""

    reason: str


Reading = PodUsageReading | PodValuesReading | ObjectReading | ExternalReading | Unreadable


# --- parsing ----------------------------------------------------------------------------


def milli(quantity: str | int | Decimal) -> int:
    """A quantity in milli-units, rounded up (Kubernetes' MilliValue)."""
    value = quantity if isinstance(quantity, Decimal) else parse_quantity(quantity)
    return math.ceil(value * 1000)


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    return datetime.fromisoformat(text)


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: Any) -> timedelta:
    """``"1m30.5s"`` (a Go duration, as metrics.k8s.io writes ``window``)."""
    if not isinstance(text, str) or not text or text == "0":
        return timedelta(0)
    pos, seconds = 0, 0.0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"not a duration: {text!r}")
    return timedelta(seconds=seconds)


def _requests(resources: Any) -> dict[str, int]:
    requests = (resources or {}).get("requests") or {}
    return {name: milli(value) for name, value in requests.items()}


def parse_pod(obj: Mapping[str, Any]) -> PodInfo:
    """A v1 Pod (as JSON) -> what the HPA needs of it. Raises ValueError on nonsense."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("pod without metadata.name")
    containers = [c for c in spec.get("containers") or []]
    # Native sidecars (restartable init containers) run beside the regular ones
    # and the HPA counts their requests (Kubernetes >= 1.29).
    containers += [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    return PodInfo(
        name=name,
        phase=status.get("phase") or "Pending",
        deleted=bool(meta.get("deletionTimestamp")),
        ready_status=ready.get("status") if ready else None,
        ready_since=parse_time(ready.get("lastTransitionTime")) if ready else None,
        start_time=parse_time(status.get("startTime")),
        containers=tuple(
            ContainerRequests(c.get("name", ""), _requests(c.get("resources"))) for c in containers
        ),
        pod_requests=_requests(spec.get("resources")),
    )


def parse_pod_list(obj: Mapping[str, Any]) -> tuple[PodInfo, ...]:
    return tuple(parse_pod(item) for item in obj.get("items") or [])


def parse_pod_metrics_list(obj: Mapping[str, Any]) -> tuple[PodUsage, ...]:
    """A metrics.k8s.io/v1beta1 PodMetricsList -> usage per pod and container."""
    items = []
    for item in obj.get("items") or []:
        name = (item.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("PodMetrics without metadata.name")
        items.append(
            PodUsage(
                name=name,
                timestamp=parse_time(item.get("timestamp")),
                window=parse_go_duration(item.get("window")),
                containers={
                    c.get("name", ""): {r: milli(v) for r, v in (c.get("usage") or {}).items()}
                    for c in item.get("containers") or []
                },
            )
        )
    return tuple(items)


def parse_metric_value_list(obj: Mapping[str, Any]) -> dict[str, PodSample]:
    """A custom.metrics.k8s.io/v1beta2 MetricValueList -> sample per described object name."""
    samples = {}
    for item in obj.get("items") or []:
        described = item.get("describedObject") or {}
        window = item.get("windowSeconds")
        samples[str(described.get("name", ""))] = PodSample(
            value=milli(item["value"]),
            timestamp=parse_time(item.get("timestamp")),
            window=timedelta(seconds=window) if isinstance(window, int) else timedelta(0),
        )
    return samples


def parse_external_value_list(obj: Mapping[str, Any]) -> tuple[int, ...]:
    """An external.metrics.k8s.io/v1beta1 ExternalMetricValueList -> its values."""
    return tuple(milli(item["value"]) for item in obj.get("items") or [])


# --- evaluation ---------------------------------------------------------------------------


def evaluate(
    metrics: Sequence[MetricSpec],
    workload: ScaleTargetPods,
    readings: Sequence[Reading],
    now: datetime,
    settings: HpaSettings = HpaSettings(),
) -> list[MetricObservation]:
    """One observation per metric, in order; ``readings[i]`` is what was read for ``metrics[i]``."""
    if len(metrics) != len(readings):
        raise ValueError(f"{len(metrics)} metrics but {len(readings)} readings")
    return [evaluate_metric(m, workload, r, now, settings) for m, r in zip(metrics, readings)]


def evaluate_metric(
    spec: MetricSpec, workload: ScaleTargetPods, reading: Reading, now: datetime, settings: HpaSettings
) -> MetricObservation:
    observation = _evaluate_metric(spec, workload, reading, now, settings)
    return dataclasses.replace(observation, type=spec.type, unit=unit_of(spec_target(spec).type))


def _evaluate_metric(
    spec: MetricSpec, workload: ScaleTargetPods, reading: Reading, now: datetime, settings: HpaSettings
) -> MetricObservation:
    name = metric_display_name(spec)
    target = spec_target(spec)
    target_value = _target_number(target)
    if isinstance(reading, Unreadable):
        return MetricObservation(name, None, target_value, reading.reason)
    if spec.type in ("Resource", "ContainerResource"):
        resource, container = _resource_of(spec)
        if not isinstance(reading, PodUsageReading):
            return _wrong_reading(name, target_value, reading)
        samples = _usage_samples(reading.items, resource, container)
        if target.type == "Utilization":
            return _utilization(name, target, workload, samples, resource, container, now, settings)
        return _pod_average(name, target, workload, samples, resource, now, settings)
    if spec.type == "Pods":
        if not isinstance(reading, PodValuesReading):
            return _wrong_reading(name, target_value, reading)
        return _pod_average(name, target, workload, dict(reading.samples), "", now, settings)
    if spec.type == "Object":
        if not isinstance(reading, ObjectReading):
            return _wrong_reading(name, target_value, reading)
        return _whole_value(name, target, workload, reading.value, "the object's value")
    if spec.type == "External":
        if not isinstance(reading, ExternalReading):
            return _wrong_reading(name, target_value, reading)
        if not reading.values:
            return MetricObservation(name, None, target_value, "the external metric returned no values")
        what = f"the sum of {len(reading.values)} values" if len(reading.values) > 1 else "the value"
        return _whole_value(name, target, workload, sum(reading.values), what)
    return MetricObservation(name, None, target_value, f"metric type {spec.type!r} is not supported")


def _wrong_reading(name: str, target: float, reading: Reading) -> MetricObservation:
    return MetricObservation(name, None, target, f"internal: unexpected {type(reading).__name__}")


# --- naming and targets ---------------------------------------------------------------------


def spec_target(spec: MetricSpec) -> MetricTarget:
    source = {
        "Resource": spec.resource,
        "ContainerResource": spec.container_resource,
        "Pods": spec.pods,
        "Object": spec.object_,
        "External": spec.external,
    }.get(spec.type)
    if source is None:
        return MetricTarget(type="Unknown")
    return source.target


def _target_number(target: MetricTarget) -> float:
    """The target in the metric's unit: percent for Utilization, else the quantity."""
    if target.type == "Utilization":
        return float(target.average_utilization or 0)
    raw = target.average_value if target.type == "AverageValue" else target.value
    if raw is None:
        return 0.0
    return float(parse_quantity(raw))


def _target_milli(target: MetricTarget) -> int:
    raw = target.average_value if target.type == "AverageValue" else target.value
    return milli(raw if raw is not None else 0)


def _resource_of(spec: MetricSpec) -> tuple[str, str | None]:
    if spec.container_resource is not None:
        return spec.container_resource.name, spec.container_resource.container
    assert spec.resource is not None
    return spec.resource.name, None


def metric_display_name(spec: MetricSpec) -> str:
    """Named as ``kubectl describe hpa`` names metrics."""
    target = spec_target(spec)
    percent = " (as a percentage of request)" if target.type == "Utilization" else ""
    if spec.type == "Resource" and spec.resource is not None:
        return f"resource {spec.resource.name} on pods{percent}"
    if spec.type == "ContainerResource" and spec.container_resource is not None:
        cr = spec.container_resource
        return f'resource {cr.name} of container "{cr.container}" on pods{percent}'
    if spec.type == "Pods" and spec.pods is not None:
        return f'"{spec.pods.metric.name}" on pods'
    kind = "average value" if target.type == "AverageValue" else "value"
    if spec.type == "Object" and spec.object_ is not None:
        obj = spec.object_.described_object
        return f'"{spec.object_.metric.name}" on {obj.kind}/{obj.name} (target {kind})'
    if spec.type == "External" and spec.external is not None:
        return f'"{spec.external.metric.name}" (external metric, target {kind})'
    return f"{spec.type} metric"


# --- samples and pod groups ------------------------------------------------------------------


def _usage_samples(items: Iterable[PodUsage], resource: str, container: str | None) -> dict[str, PodSample]:
    """Per pod: the usage summed over its containers (or one named container).

    A pod whose PodMetrics lack the resource in any container (or, for one
    container, lack that container) has no sample, as in the HPA's metrics client.
    """
    samples = {}
    for item in items:
        if container is not None:
            usage = item.containers.get(container)
            if usage is None or resource not in usage:
                continue
            total = usage[resource]
        else:
            if not item.containers or any(resource not in u for u in item.containers.values()):
                continue
            total = sum(u[resource] for u in item.containers.values())
        samples[item.name] = PodSample(total, item.timestamp, item.window)
    return samples


@dataclass
class _Groups:
    counted: list[str] = field(default_factory=list)  # ready, with a sample
    unready: list[str] = field(default_factory=list)  # pending, or (cpu) unready / initializing
    missing: list[str] = field(default_factory=list)  # no sample
    ignored: list[str] = field(default_factory=list)  # deleted, failed, succeeded

    def describe(self, total: int, missing_as: str | None, unready_as: str | None) -> str:
        parts = [f"{total} pod{'s' if total != 1 else ''}"]
        if self.ignored:
            parts.append(f"{len(self.ignored)} deleted or finished ignored")
        if self.unready:
            how = f"counted as {unready_as}" if unready_as else "ignored"
            parts.append(f"{len(self.unready)} pending or unready {how}")
        if self.missing:
            how = f"counted as {missing_as}" if missing_as else "ignored"
            parts.append(f"{len(self.missing)} missing metrics {how}")
        return ", ".join(parts)


def _group_pods(
    pods: Iterable[PodInfo], samples: Mapping[str, PodSample], cpu: bool, now: datetime, settings: HpaSettings
) -> _Groups:
    groups = _Groups()
    for pod in pods:
        if pod.deleted or pod.phase in ("Failed", "Succeeded"):
            groups.ignored.append(pod.name)
        elif pod.phase == "Pending":
            groups.unready.append(pod.name)
        elif pod.name not in samples:
            groups.missing.append(pod.name)
        elif cpu and _cpu_sample_unusable(pod, samples[pod.name], now, settings):
            groups.unready.append(pod.name)
        else:
            groups.counted.append(pod.name)
    return groups


def _cpu_sample_unusable(pod: PodInfo, sample: PodSample, now: datetime, settings: HpaSettings) -> bool:
    """The HPA's rule for cpu: a starting pod's cpu burst is not load."""
    if pod.ready_status is None or pod.start_time is None:
        return True
    if pod.start_time + settings.cpu_initialization_period > now:
        # Still initializing: unready, or no full sample window since it became ready.
        if pod.ready_status == "False":
            return True
        if sample.timestamp is None or pod.ready_since is None:
            return False
        return sample.timestamp < pod.ready_since + sample.window
    # Past initialization: ignored only while unready and never ready yet.
    return (
        pod.ready_status == "False"
        and pod.ready_since is not None
        and pod.start_time + settings.initial_readiness_delay > pod.ready_since
    )


# --- Utilization ---------------------------------------------------------------------------------


class _MissingRequest(Exception):
    pass


def _pod_request(pod: PodInfo, resource: str, container: str | None) -> int:
    if container is None and resource in pod.pod_requests:
        return pod.pod_requests[resource]
    total = 0
    for c in pod.containers:
        if container is not None and c.name != container:
            continue
        if resource not in c.requests:
            raise _MissingRequest(f'container "{c.name}" of pod "{pod.name}" has no {resource} request')
        total += c.requests[resource]
    return total


def _utilization_of(values: Mapping[str, int], requests: Mapping[str, int]) -> int | None:
    """Σusage*100 // Σrequests over pods with a request, or None when no requests."""
    used = sum(v for name, v in values.items() if name in requests)
    requested = sum(requests[name] for name in values if name in requests)
    if requested == 0:
        return None
    return used * 100 // requested


def _utilization(
    name: str,
    target: MetricTarget,
    workload: ScaleTargetPods,
    samples: dict[str, PodSample],
    resource: str,
    container: str | None,
    now: datetime,
    settings: HpaSettings,
) -> MetricObservation:
    goal = target.average_utilization or 0
    groups = _group_pods(workload.pods, samples, resource == "cpu", now, settings)
    if not workload.pods:
        return MetricObservation(name, None, goal, "no pods match the workload's selector")
    requests: dict[str, int] = {}
    try:
        for pod in workload.pods:
            if pod.name not in groups.ignored:
                requests[pod.name] = _pod_request(pod, resource, container)
    except _MissingRequest as exc:
        return MetricObservation(
            name, None, goal, f"invalid: {exc}; a Utilization target needs a request in every container"
        )
    values = {p: samples[p].value for p in groups.counted}
    if not values:
        return MetricObservation(
            name,
            None,
            goal,
            f"no metrics for any ready pod ({groups.describe(len(workload.pods), None, None)})",
        )
    utilization = _utilization_of(values, requests)
    if utilization is None:
        return MetricObservation(name, None, goal, "the pods with metrics request none of this resource")

    def with_missing(ratio: float) -> tuple[dict[str, int], str | None]:
        fallback = max(100, goal)
        filled = dict(values)
        if ratio < 1:
            filled.update({p: requests[p] * fallback // 100 for p in groups.missing})
            return filled, f"{fallback}%"
        if ratio > 1:
            filled.update({p: 0 for p in groups.missing})
            return filled, "0%"
        return filled, None

    return _recount(
        name,
        goal,
        float(utilization),
        f"{utilization}%",
        groups,
        len(workload.pods),
        with_missing,
        lambda filled: _utilization_of(filled, requests),
        "%",
        settings,
    )


# --- AverageValue over pods (Resource, ContainerResource, Pods) -----------------------------------


def _pod_average(
    name: str,
    target: MetricTarget,
    workload: ScaleTargetPods,
    samples: dict[str, PodSample],
    resource: str,
    now: datetime,
    settings: HpaSettings,
) -> MetricObservation:
    goal = _target_milli(target)
    goal_number = goal / 1000
    if not workload.pods:
        return MetricObservation(name, None, goal_number, "no pods match the workload's selector")
    groups = _group_pods(workload.pods, samples, resource == "cpu", now, settings)
    values = {p: samples[p].value for p in groups.counted}
    if not values:
        return MetricObservation(
            name,
            None,
            goal_number,
            f"no metrics for any ready pod ({groups.describe(len(workload.pods), None, None)})",
        )

    def average(filled: Mapping[str, int]) -> int:
        return sum(filled.values()) // len(filled)

    first = average(values)

    def with_missing(ratio: float) -> tuple[dict[str, int], str | None]:
        filled = dict(values)
        if ratio < 1:
            filled.update({p: goal for p in groups.missing})
            return filled, "the target"
        filled.update({p: 0 for p in groups.missing})
        return filled, "0"

    return _recount(
        name,
        goal,
        float(first),
        _fmt(first / 1000),
        groups,
        len(workload.pods),
        with_missing,
        average,
        "",
        settings,
        scale=1000,
    )


# --- the recount, shared by Utilization and AverageValue ------------------------------------------


def _recount(
    name: str,
    goal: float,
    first: float,
    first_text: str,
    groups: _Groups,
    total: int,
    with_missing: Any,
    measure: Any,
    unit: str,
    settings: HpaSettings,
    scale: int = 1,
) -> MetricObservation:
    """The HPA's second pass when some pods are missing metrics or unready.

    ``first`` (and ``goal``) are in the computation's unit (percent, or
    milli-units when ``scale`` is 1000); the observation is in the metric's.
    """
    ratio = first / goal
    rebalance_unready = bool(groups.unready) and ratio > 1
    if not rebalance_unready and not groups.missing:
        return MetricObservation(name, first / scale, goal / scale, groups.describe(total, None, None))
    base, missing_as = with_missing(ratio)
    if not groups.missing:
        missing_as = None
    unready_as = None
    if rebalance_unready:
        base.update({p: 0 for p in groups.unready})
        unready_as = f"0{unit}"
    second = measure(base)
    described = groups.describe(total, missing_as, unready_as)
    if second is None:  # pragma: no cover - requests exist for every pod counted here
        return MetricObservation(name, None, goal / scale, f"{described}: no requests to divide by")
    new_ratio = second / goal
    second_text = f"{second}%" if unit == "%" else _fmt(second / scale)
    if (ratio < 1 < new_ratio) or (ratio > 1 > new_ratio):
        return MetricObservation(
            name,
            goal / scale,
            goal / scale,
            f"{described}: {first_text} from samples alone but {second_text} with the rest counted; "
            "the direction flips, so the HPA makes no change (held at target)",
        )
    if abs(1 - new_ratio) <= settings.tolerance:
        described += " (within tolerance after the recount: no change)"
    return MetricObservation(
        name, second / scale, goal / scale, f"{described}; {first_text} from samples alone"
    )


# --- Object and External --------------------------------------------------------------------------


def _whole_value(
    name: str, target: MetricTarget, workload: ScaleTargetPods, value: int, what: str
) -> MetricObservation:
    goal = _target_milli(target) / 1000
    if target.type == "AverageValue":
        replicas = workload.status_replicas
        if replicas <= 0:
            return MetricObservation(name, None, goal, "the workload has no replicas to average over")
        per_pod = math.ceil(value / replicas)
        return MetricObservation(
            name, per_pod / 1000, goal, f"{what} {_fmt(value / 1000)} over {replicas} replicas"
        )
    return MetricObservation(name, value / 1000, goal, what)


def _fmt(number: float) -> str:
    return f"{number:g}"


# --- what to ask the metrics APIs ---------------------------------------------------------------


def selector_string(selector: Mapping[str, Any] | LabelSelector | None) -> str:
    """A LabelSelector (API JSON or typed) as a ``labelSelector`` query value.

    Raises ValueError on an operator other than In, NotIn, Exists, DoesNotExist.
    """
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


def averages_over_replicas(metric: MetricSpec) -> bool:
    """Object/External AverageValue: divided by the workload's status.replicas."""
    return metric.type in ("Object", "External") and spec_target(metric).type == "AverageValue"


def object_reading(doc: Mapping[str, Any]) -> Reading:
    """A custom.metrics.k8s.io MetricValueList for one object -> its value."""
    samples = parse_metric_value_list(doc)
    if not samples:
        return Unreadable("custom.metrics.k8s.io returned no value for the object")
    return ObjectReading(next(iter(samples.values())).value)


def unknown_observations(metrics: Sequence[MetricSpec], reason: str) -> list[MetricObservation]:
    """One unreadable observation per metric, each with its target and ``reason``."""
    return [
        MetricObservation(
            metric_display_name(m),
            None,
            _target_number(spec_target(m)),
            reason,
            m.type,
            unit_of(spec_target(m).type),
        )
        for m in metrics
    ]
