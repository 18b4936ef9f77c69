"""The webhook's Prometheus metrics: one registry, served at ``/metrics`` on the HTTPS port.

Every label value is a stable code (a webhook path's name, a result, a reason code), never
a pod, namespace or message, so the number of series stays bounded whatever the cluster
holds. The module holds the metric objects; the code that knows the event increments them:

- ``webhook.app`` counts each review and times it (``admission_*``);
- ``webhook.mutating`` counts pods left without the sidecar (``injections_skipped``);
- ``webhook.tls`` sets the serving certificate's expiry on every (re)load;
- ``webhook.app`` reports readiness (``ready``, read at each scrape);
- the controller counts and times its reconciles, sets ``leader`` and counts the pods its
  ModelDeployments' workloads run without the sidecar, through ``ControllerMetrics``.

Its own registry (not prometheus_client's global one): importing the module twice in
tests or embedding the webhook never collides with other collectors; the process
collector (CPU, RSS, open fds) is registered on it explicitly.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# No *_created series: they double the exposition and nothing here needs counter start times.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
# generate_latest writes text format 0.0.4, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label values of admission_reviews_total{result}.
ALLOWED = "allowed"  # validate-modeldeployments: allowed
DENIED = "denied"  # validate-modeldeployments: denied (reason: the status reason, e.g. Invalid)
ERROR = "error"  # a request answered 4xx (reason: the HTTP status) or a handler's bug (InternalError)
INJECTED = "injected"  # mutate-pods: the sidecar was injected
SKIPPED = "skipped"  # mutate-pods: allowed without the sidecar (reason: the skip reason)

# Label values of reconcile_total{result}, set by the controller.
RECONCILE_RESULTS = ("success", "error", "requeue")

API_REQUESTS = Counter(
    "offload_webhook_api_requests",
    "Requests this process sent to the Kubernetes API server, by verb (get, list, watch, create, "
    "update, patch, delete) and resource (plural.group[/subresource]); watches count once each.",
    ("verb", "resource"),
    registry=REGISTRY,
)
ADMISSION_REVIEWS = Counter(
    "offload_webhook_admission_reviews",
    "Admission requests answered, by webhook (mutate-pods, validate-modeldeployments), "
    "result (allowed, denied, error, injected, skipped) and reason (a stable code).",
    ("webhook", "result", "reason"),
    registry=REGISTRY,
)
ADMISSION_DURATION = Histogram(
    "offload_webhook_admission_duration_seconds",
    "Time from the request's body read to the answer, by webhook.",
    ("webhook",),
    # The API server's default webhook timeout is 10 s; the chart sets 5 s.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
INJECTIONS_SKIPPED = Counter(
    "offload_webhook_injections_skipped",
    "Pods admitted without the sidecar, by reason (e.g. NoMatchingModelDeployment, WindowsPod).",
    ("reason",),
    registry=REGISTRY,
)
SERVING_CERTIFICATE_EXPIRY = Gauge(
    "offload_webhook_serving_certificate_expiry_timestamp_seconds",
    "notAfter of the serving certificate in use, in seconds since the Unix epoch.",
    registry=REGISTRY,
)
SERVING_CERTIFICATE_RELOADS = Counter(
    "offload_webhook_serving_certificate_reloads",
    "Reloads of the serving certificate and key after their files changed, by result (success, error).",
    ("result",),
    registry=REGISTRY,
)
RECONCILE = Counter(
    "offload_webhook_reconcile",
    "ModelDeployment reconciles by the controller, by result (success, error, requeue).",
    ("result",),
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "offload_webhook_reconcile_duration_seconds",
    "Time one reconcile of a ModelDeployment took.",
    registry=REGISTRY,
)
LEADER = Gauge(
    "offload_webhook_leader",
    "1 while this replica holds the controller's leader lease, else 0.",
    registry=REGISTRY,
)
READY = Gauge(
    "offload_webhook_ready",
    "1 while this replica's /readyz answers 200 (its cache synced, no watch failing too long), else 0.",
    registry=REGISTRY,
)
PODS_WITHOUT_SIDECAR = Gauge(
    "offload_webhook_pods_without_sidecar",
    "Ready pods of the workloads named by ModelDeployments that carry no sidecar, summed over "
    "the ModelDeployments (reported by the leader; 0 elsewhere).",
    registry=REGISTRY,
)


MUTATE_PODS = "mutate-pods"
VALIDATE_MODELDEPLOYMENTS = "validate-modeldeployments"

# Series that exist from the start (at 0), so that rate() and absent() work before the first event.
for _result in RECONCILE_RESULTS:
    RECONCILE.labels(_result)
for _webhook in (MUTATE_PODS, VALIDATE_MODELDEPLOYMENTS):
    ADMISSION_DURATION.labels(_webhook)
for _result in ("success", "error"):
    SERVING_CERTIFICATE_RELOADS.labels(_result)


class ControllerMetrics:
    """What the controller (webhook.controller) reports to: its leader state, each reconcile,
    and per ModelDeployment the ready pods without the sidecar (summed into one gauge)."""

    def __init__(self) -> None:
        self._without_sidecar: dict[tuple[str, str], int] = {}

    def leading(self, leads: bool) -> None:
        LEADER.set(1 if leads else 0)
        if not leads:  # only the leader's view is current
            self._without_sidecar.clear()
            PODS_WITHOUT_SIDECAR.set(0)

    def without_sidecar(self, key: tuple[str, str], pods: int) -> None:
        """``key``: (namespace, name) of a ModelDeployment; ``pods``: its workload's ready pods
        without the sidecar, 0 once it is gone."""
        if pods:
            self._without_sidecar[key] = pods
        else:
            self._without_sidecar.pop(key, None)
        PODS_WITHOUT_SIDECAR.set(sum(self._without_sidecar.values()))

    def reconciled(self, result: str, seconds: float) -> None:
        """``result``: success, error or requeue; ``seconds``: how long the reconcile took."""
        RECONCILE.labels(result).inc()
        RECONCILE_DURATION.observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its Content-Type."""
    return generate_latest(REGISTRY), CONTENT_TYPE
