"""The controller's offloading decision: gather the metrics once per ModelDeployment per
period, decide (crds/decision.py) and publish the result in the status subresource.

    pods (the lead's cache) --> MetricsReader.observe --> observations
    state_from_status(status) --> DecisionState -----------+
                                                           v
                     decide(md, observations, state, now, ready_replicas) --> Decision
                                                           v
             decision_status(decision, observations, now=, previous=status, ...) --> status fields

``MetricsReader`` is the only I/O here (the ``kubernetes`` client, synchronous: call it
from the controller's worker thread). Per ModelDeployment and evaluation it makes, whatever
the number of pods:

- ``GET /apis/metrics.k8s.io/v1beta1/namespaces/NS/pods?labelSelector=<workload's>``, once
  for all Resource and ContainerResource metrics;
- one GET per Pods/Object metric on custom.metrics.k8s.io/v1beta2 and per External metric
  on external.metrics.k8s.io/v1beta1;
- a GET of the workload for its label selector only when the caller does not pass one, at
  most every ``selector_ttl`` seconds.

Pods metrics the sidecars serve themselves (crds/signals.py: their in-flight and waiting
counts, the model server's gauges) are not asked of any metrics API: ``signals``
(webhook/controller/podsignals.py) reads them from each ready pod's sidecar.

The pods themselves come from the caller (its watch cache): no pod list. A metric whose API
fails or is not served gets an observation with ``current`` None and the reason, so the
decision holds. Everything else in this module is pure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from crds.decision import INITIAL, Decision, DecisionState, step
from crds.hpa import (
    ExternalReading,
    HpaSettings,
    PodUsageReading,
    PodValuesReading,
    Reading,
    ScaleTargetPods,
    Unreadable,
    evaluate,
    object_reading,
    parse_external_value_list,
    parse_metric_value_list,
    parse_pod,
    parse_pod_metrics_list,
    resource_plural,
    selector_string,
    unknown_observations,
)
from crds.model import (
    LabelSelector,
    MetricSpec,
    ModelDeployment,
    OffloadingBehavior,
    OffloadingConfig,
    WorkloadReference,
)
from crds.observation import MetricObservation
from crds.signals import local_metric_name
from crds.status import PublishedDecision, format_time, observation_document, utilization
from webhook.controller.conditions import OFFLOADING, Condition
from webhook.controller.podsignals import LocalObservation, PodSignalsReader

log = logging.getLogger("webhook.controller.evaluation")

DEFAULT_PERIOD_SECONDS = 15.0  # the HPA's sync period and metrics-server's finest resolution
REQUEST_TIMEOUT = 10.0  # seconds, per metrics API request


class ApiError(Exception):
    """A metrics API answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if message else str(status))
        self.status = status


Get = Callable[[str, Mapping[str, str]], dict[str, Any]]


class ApiGet:
    """``GET path?query`` through a ``kubernetes.client.ApiClient`` (its host, TLS and
    credentials), answering the decoded JSON. Raises ApiError on an error status, and the
    client's own exceptions (urllib3 errors, OSError) when the server cannot be reached.

    Raw paths, because the metrics APIs are aggregated APIs the typed client does not
    model, and a custom-metrics path holds a literal ``*`` (``pods/*/<metric>``).
    """

    def __init__(self, api_client: Any, timeout: float = REQUEST_TIMEOUT):
        self.api_client = api_client
        self.timeout = timeout

    def __call__(self, path: str, query: Mapping[str, str]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        params = list(query.items())
        headers = {"Accept": "application/json"}
        try:
            if hasattr(self.api_client, "param_serialize"):  # kubernetes >= 36
                request = self.api_client.param_serialize(
                    "GET", path, query_params=params, header_params=headers, auth_settings=["BearerToken"]
                )
                response = self.api_client.call_api(*request, _request_timeout=self.timeout)
                status, body = response.status, response.read()
            else:  # kubernetes <= 35: raises ApiException on an error status
                raw = self.api_client.call_api(
                    path,
                    "GET",
                    query_params=params,
                    header_params=headers,
                    auth_settings=["BearerToken"],
                    _preload_content=False,
                    _return_http_data_only=True,
                    _request_timeout=self.timeout,
                )
                status, body = raw.status, raw.data
        except ApiException as exc:
            raise ApiError(int(exc.status or 0), _status_message(exc.body) or str(exc.reason or "")) from None
        if not 200 <= status <= 299:
            raise ApiError(status, _status_message(body))
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError(f"GET {path}: a JSON object was expected, got {type(doc).__name__}")
        return doc


def _status_message(body: Any) -> str:
    """The ``message`` of a metav1.Status body, else the body's start."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200]
    return str(doc.get("message") or "") if isinstance(doc, dict) else body[:200]


class MetricsReader:
    """Evaluates a ModelDeployment's metrics over its workload's pods, as the HPA does.

    ``get`` replaces the API client (tests); ``clock`` dates the evaluation (the HPA's
    cpu initialization rules compare it with the pods' start and readiness times).
    ``requests`` counts the API requests made, for load measurements.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        get: Get | None = None,
        settings: HpaSettings | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        selector_ttl: float = 300.0,
        signals: PodSignalsReader | None = None,
    ) -> None:
        self._get = get if get is not None else ApiGet(api_client)
        self.signals = signals if signals is not None else PodSignalsReader()
        self.settings = settings or HpaSettings()
        self._clock = clock
        self._monotonic = monotonic
        self.selector_ttl = selector_ttl
        self._selectors: dict[tuple[str, str, str, str], tuple[float, str]] = {}
        self.requests = 0

    def get(self, path: str, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        self.requests += 1
        return self._get(path, dict(query or {}))

    def observe(
        self,
        md: ModelDeployment,
        pods: Sequence[Mapping[str, Any]],
        *,
        selector: str | Mapping[str, Any] | LabelSelector | None = None,
        status_replicas: int | None = None,
    ) -> list[MetricObservation]:
        """One observation per metric of ``md``'s offloadingConfig, in order ([] without metrics).

        ``pods``: the workload's own pods as API JSON (already filtered by ownership).
        ``selector``: the workload's spec.selector (API JSON, typed, or a query string);
        read from the workload when None. ``status_replicas``: what Object/External
        AverageValue metrics divide by; default the pods that are neither deleted nor finished.
        Never raises: what cannot be read is an unknown observation saying why.
        """
        config = md.spec.offloading_config
        metrics = config.metrics if config is not None else ()
        if not metrics:
            return []
        local = {local.index: local for local in self.signals.observe(md, pods)}
        if len(local) == len(metrics):  # all served by the sidecars: no metrics API, no selector
            return [_from_local(local[i]) for i in range(len(metrics))]
        observations = self._observe_apis(md, pods, selector, status_replicas)
        return [_from_local(local[i]) if i in local else o for i, o in enumerate(observations)]

    def _observe_apis(
        self,
        md: ModelDeployment,
        pods: Sequence[Mapping[str, Any]],
        selector: str | Mapping[str, Any] | LabelSelector | None,
        status_replicas: int | None,
    ) -> list[MetricObservation]:
        config = md.spec.offloading_config
        metrics = config.metrics if config is not None else ()
        namespace = md.workload_namespace
        ref = md.spec.model_source_ref
        try:
            parsed = tuple(parse_pod(p) for p in pods)
        except (ValueError, TypeError, AttributeError) as exc:
            return unknown_observations(metrics, f"cannot read the workload's pods: {_describe(exc)}")
        try:
            query = self._selector(namespace, ref, selector)
        except Exception as exc:  # noqa: BLE001 - the API client raises several kinds; never fail the loop
            reason = f"cannot read the label selector of {ref.kind}/{ref.name}: {_describe(exc)}"
            log.warning("ModelDeployment %s/%s: %s", md.namespace, md.name, reason)
            return unknown_observations(metrics, reason)
        if status_replicas is None:
            status_replicas = sum(
                1 for p in parsed if not p.deleted and p.phase not in ("Failed", "Succeeded")
            )
        workload = ScaleTargetPods(pods=parsed, status_replicas=status_replicas)
        readings = self._readings(metrics, namespace, query, config)
        settings = self.settings
        if config is not None and config.behavior.tolerance != settings.tolerance:
            settings = HpaSettings(
                tolerance=config.behavior.tolerance,
                cpu_initialization_period=settings.cpu_initialization_period,
                initial_readiness_delay=settings.initial_readiness_delay,
            )
        return evaluate(metrics, workload, readings, self._clock(), settings)

    # -- the workload's selector ---------------------------------------------------------------

    def _selector(
        self, namespace: str, ref: WorkloadReference, given: str | Mapping[str, Any] | LabelSelector | None
    ) -> str:
        if isinstance(given, str):
            return given
        if given is not None:
            return selector_string(given)
        key = (namespace, ref.api_version, ref.kind, ref.name)
        now = self._monotonic()
        cached = self._selectors.get(key)
        if cached is not None and now - cached[0] < self.selector_ttl:
            return cached[1]
        group_version = ref.api_version or "apps/v1"
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        workload = self.get(f"{prefix}/namespaces/{namespace}/{resource_plural(ref.kind)}/{_seg(ref.name)}")
        spec_selector = (workload.get("spec") or {}).get("selector")
        if not spec_selector:
            raise ValueError(f"{ref.kind}/{ref.name} has no spec.selector")
        text = selector_string(spec_selector)
        self._selectors[key] = (now, text)
        return text

    # -- the metrics APIs ----------------------------------------------------------------------

    def _readings(
        self,
        metrics: Sequence[MetricSpec],
        namespace: str,
        selector: str,
        config: OffloadingConfig | None = None,
    ) -> list[Reading]:
        usage: Reading | None = None
        readings: list[Reading] = []
        for metric in metrics:
            if local_metric_name(metric, config) is not None:
                readings.append(Unreadable("served by the sidecars"))  # replaced by observe
            elif metric.type in ("Resource", "ContainerResource"):
                if usage is None:
                    usage = self._read(
                        "metrics.k8s.io",
                        f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods",
                        {"labelSelector": selector},
                        lambda doc: PodUsageReading(parse_pod_metrics_list(doc)),
                    )
                readings.append(usage)
            elif metric.type == "Pods" and metric.pods is not None:
                identifier = metric.pods.metric
                query = {"labelSelector": selector}
                if identifier.selector is not None:
                    query["metricLabelSelector"] = selector_string(identifier.selector)
                readings.append(
                    self._read(
                        "custom.metrics.k8s.io",
                        f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/pods/*/{_seg(identifier.name)}",
                        query,
                        lambda doc: PodValuesReading(parse_metric_value_list(doc)),
                    )
                )
            elif metric.type == "Object" and metric.object_ is not None:
                source = metric.object_
                obj = source.described_object
                query = {}
                if source.metric.selector is not None:
                    query["metricLabelSelector"] = selector_string(source.metric.selector)
                path = (
                    f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/"
                    f"{resource_plural(obj.kind)}/{_seg(obj.name)}/{_seg(source.metric.name)}"
                )
                readings.append(self._read("custom.metrics.k8s.io", path, query, object_reading))
            elif metric.type == "External" and metric.external is not None:
                identifier = metric.external.metric
                query = {}
                if identifier.selector is not None:
                    query["labelSelector"] = selector_string(identifier.selector)
                readings.append(
                    self._read(
                        "external.metrics.k8s.io",
                        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{_seg(identifier.name)}",
                        query,
                        lambda doc: ExternalReading(parse_external_value_list(doc)),
                    )
                )
            else:
                readings.append(Unreadable(f"metric type {metric.type!r} is not supported"))
        return readings

    def _read(
        self, api: str, path: str, query: Mapping[str, str], parse: Callable[[dict[str, Any]], Reading]
    ) -> Reading:
        try:
            return parse(self.get(path, query))
        except ApiError as exc:
            if exc.status == 404:
                return Unreadable(f"{api} is not served here, or has no such metric ({exc})")
            if exc.status == 403:
                return Unreadable(f"{api}: forbidden; the controller's ClusterRole must allow it ({exc})")
            return Unreadable(f"{api}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure of one API makes only its metrics unknown
            return Unreadable(f"{api}: {_describe(exc)}")


def _from_local(local: LocalObservation) -> MetricObservation:
    return MetricObservation(local.metric, local.current, local.target, local.reason, "Pods")


def _seg(text: str) -> str:
    return quote(text, safe="")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- the decision, pure ---------------------------------------------------------------------------


def ready_replicas(pods: Sequence[Mapping[str, Any]]) -> int:
    """How many of the pods (API JSON) are Running, Ready and not being deleted; a pod that
    cannot be parsed counts as not ready."""
    count = 0
    for pod in pods:
        try:
            info = parse_pod(pod)
        except (ValueError, TypeError, AttributeError):
            continue
        count += info.running_and_ready and not info.deleted
    return count


def decide(
    md: ModelDeployment,
    observations: list[MetricObservation],
    state: DecisionState,
    now: datetime,
    *,
    ready_replicas: int | None = None,
) -> Decision:
    """One step of the decision engine on Unix time (``now``, timezone-aware), so that the
    windows and ``since`` survive a change of leader through :func:`state_from_status`."""
    config = md.spec.offloading_config
    behavior = config.behavior if config is not None else OffloadingBehavior()
    return step(state, observations, now.timestamp(), behavior, ready_replicas=ready_replicas)


def state_from_status(status: Mapping[str, Any] | None) -> DecisionState:
    """Where a new leader (or a restarted controller) continues from: the published
    ``offloading`` since its ``lastTransitionTime``. A pending sustain or cooldown window is
    not published, so it starts over (a later change, never an early one)."""
    published = PublishedDecision.from_status(status)
    if published is None:
        return INITIAL
    since = published.last_transition.timestamp() if published.last_transition is not None else None
    return DecisionState(
        offloading=published.offloading,
        since=since,
        pending_since=None,
        reason=published.message or INITIAL.reason,
        code=published.code or INITIAL.code,
    )


def decision_status(
    decision: Decision,
    observations: Sequence[MetricObservation],
    *,
    now: datetime,
    previous: Mapping[str, Any] | None,
    generation: int,
    period_seconds: float,
) -> dict[str, Any]:
    """The status fields of one evaluation (to merge into ``status``)::

        {observedGeneration, offloading, offloadingStatus, utilization,
         decision: {reason, message, lastTransitionTime, lastEvaluationTime,
                    evaluationPeriodSeconds, metrics: [...]}}

    ``lastTransitionTime`` is kept from ``previous`` (the current status) unless
    ``offloading`` changes (or nothing was published). Equal inputs give equal output, key
    order included, whatever ``now`` but for ``lastEvaluationTime``: the caller compares the
    rest to know whether anything but the evaluation time changed.
    """
    before = PublishedDecision.from_status(previous)
    if before is not None and before.offloading == decision.offloading and before.last_transition is not None:
        transition = before.last_transition
    else:
        transition = now
    deciding = decision.deciding
    if deciding is None and observations:
        deciding = observations[0]
    return {
        "observedGeneration": generation,
        "offloading": decision.offloading,
        "offloadingStatus": decision.offloading,
        "utilization": utilization(deciding),
        "decision": {
            "reason": decision.code,
            "message": decision.reason,
            "lastTransitionTime": format_time(transition),
            "lastEvaluationTime": format_time(now),
            "evaluationPeriodSeconds": max(1, round(period_seconds)),
            "metrics": [observation_document(o) for o in observations],
        },
    }


@dataclass(frozen=True)
class Evaluation:
    """One ModelDeployment evaluated: what :func:`evaluate_modeldeployment` returns."""

    decision: Decision
    observations: tuple[MetricObservation, ...]
    status: dict[str, Any]


def evaluate_modeldeployment(
    reader: MetricsReader,
    md: ModelDeployment,
    pods: Sequence[Mapping[str, Any]],
    status: Mapping[str, Any] | None,
    *,
    now: datetime,
    period_seconds: float = DEFAULT_PERIOD_SECONDS,
    state: DecisionState | None = None,
    selector: str | Mapping[str, Any] | LabelSelector | None = None,
) -> Evaluation:
    """The whole evaluation of one ModelDeployment, for the reconcile loop: observe, decide
    from ``state`` (default: from the published ``status``, as a new leader does) and the
    status fields to write. Keep ``evaluation.decision.state`` for the next call: it holds
    the pending window the status does not."""
    observations = reader.observe(md, pods, selector=selector)
    decision = decide(
        md,
        observations,
        state if state is not None else state_from_status(status),
        now,
        ready_replicas=ready_replicas(pods),
    )
    fields = decision_status(
        decision,
        observations,
        now=now,
        previous=status,
        generation=md.generation,
        period_seconds=period_seconds,
    )
    return Evaluation(decision, tuple(observations), fields)


class ControllerEvaluation:
    """The controller's offloading decision (``webhook.controller.runner.Evaluation``): one
    per process, called by the leader once per ModelDeployment and period.

    Keeps each ModelDeployment's DecisionState between calls (it holds the pending sustain
    or cooldown window, which the status does not), and starts from the published status
    instead when it has none, when it is older than two periods (leadership came back after
    a while) or when it disagrees with the published ``offloading`` (another leader decided
    meanwhile).
    """

    def __init__(
        self,
        api_client: Any,
        *,
        period_seconds: float = DEFAULT_PERIOD_SECONDS,
        reader: MetricsReader | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.reader = reader if reader is not None else MetricsReader(api_client)
        self.period = period_seconds
        self._clock = clock
        self._states: dict[tuple[str, str], tuple[float, DecisionState]] = {}

    def evaluate(
        self,
        key: tuple[str, str],
        model: ModelDeployment,
        pods: list[Mapping[str, Any]],
        status: Mapping[str, Any],
        generation: int,
        *,
        workload: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], Any]:
        """(the status fields to write; the ``Offloading`` condition). ``workload``: the
        Deployment or StatefulSet from the controller's cache, for its label selector and
        status.replicas (read from the API when absent)."""
        now = self._clock()
        state = self._state(key, status, now)
        selector = replicas = None
        if isinstance(workload, Mapping):
            selector = (workload.get("spec") or {}).get("selector") or None
            count = (workload.get("status") or {}).get("replicas")
            replicas = count if isinstance(count, int) and not isinstance(count, bool) else None
        observations = self.reader.observe(model, pods, selector=selector, status_replicas=replicas)
        decision = decide(model, observations, state, now, ready_replicas=ready_replicas(pods))
        self._states[key] = (now.timestamp(), decision.state)
        fields = decision_status(
            decision,
            observations,
            now=now,
            previous=status,
            generation=generation,
            period_seconds=self.period,
        )
        return fields, Condition(OFFLOADING, decision.offloading, decision.code, decision.reason)

    def forget(self, key: tuple[str, str]) -> None:
        self._states.pop(key, None)

    def _state(self, key: tuple[str, str], status: Mapping[str, Any], now: datetime) -> DecisionState:
        published = state_from_status(status)
        kept = self._states.get(key)
        if kept is None:
            return published
        at, state = kept
        fresh = now.timestamp() - at <= 2 * self.period
        if fresh and (
            PublishedDecision.from_status(status) is None or state.offloading == published.offloading
        ):
            return state
        return published
