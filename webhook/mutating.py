"""The pod-mutating webhook: AdmissionReview in, AdmissionReview (with a JSONPatch) out.

Pure over a ``ClusterView`` (the watch-backed cache, or a fixed one in tests): no API
call is made here. Every answer allows the pod: failing to inject must never block a
workload; why a pod was left alone is a stable reason code in the log, in the metric
``offload_webhook_injections_skipped_total{reason}`` and, when the user should know, an
admission warning. Whatever the review's object holds, the answer is an allowed review:
wrong JSON types are ``MalformedPod`` (naming the field), and a bug here is
``InternalError`` (with the traceback in the log), the pod admitted without the sidecar.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from webhook import metrics
from webhook.admission import AdmissionRequest, Reviewed, allow
from webhook.injection import (
    Outcome,
    Reason,
    ServiceInfo,
    inject,
    labels_of,
    not_injected,
    shape_problem,
)
from webhook.injector_config import InjectorConfig
from webhook.selection import CachedModelDeployment, Workload, pod_controller, select

log = logging.getLogger("webhook.mutating")


class ClusterView(Protocol):
    """What the admission path reads: in memory, answered without I/O."""

    def synced(self) -> bool: ...

    def modeldeployments(self, namespace: str) -> Sequence[CachedModelDeployment]: ...

    def workload(self, kind: str, namespace: str, name: str) -> Workload | None: ...

    def service(self, namespace: str, name: str) -> ServiceInfo | None: ...


def pod_label(pod: Any, namespace: str) -> str:
    """namespace/name for logs; pods made from generateName have no name yet."""
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "<unnamed>")
    return f"{namespace}/{name}"


def decide(request: AdmissionRequest, view: ClusterView, config: InjectorConfig) -> Outcome:
    """What to do with the pod of this request."""
    if (
        request.resource.get("group", "") != ""
        or request.resource.get("resource") != "pods"
        or request.operation != "CREATE"
        or request.sub_resource
    ):
        what = f"{request.operation} of {request.resource.get('resource')}"
        message = f"this webhook injects pods on CREATE; {what} is left alone"
        outcome = not_injected(Reason.NOT_A_POD_CREATE, message)
        if request.resource.get("resource") != "pods":
            return Outcome(outcome.reason, message, warnings=(f"offload: {message}",))
        return outcome
    pod = request.object
    if not isinstance(pod, dict):
        return Outcome(
            Reason.NOT_A_POD_CREATE,
            "request.object: not a Pod",
            warnings=("offload: request.object is not a Pod",),
        )
    problem = shape_problem(pod)
    if problem is not None:
        return not_injected(Reason.MALFORMED_POD, problem)
    # On CREATE the pod may not carry its namespace yet; the request always does.
    namespace = request.namespace or str((pod.get("metadata") or {}).get("namespace") or "")
    if not view.synced():
        return not_injected(
            Reason.CACHE_NOT_SYNCED, "the webhook has not synced its view of ModelDeployments yet"
        )
    selection = select(
        namespace, labels_of(pod), pod_controller(pod), view.modeldeployments(namespace), view.workload
    )
    service = None
    if selection.chosen is not None:
        ref = selection.chosen.model.spec.service_ref
        if ref is not None:
            service = view.service(selection.chosen.model.service_namespace, ref.name)
    return inject(pod, selection, service, config)


def review_pod(request: AdmissionRequest, *, view: ClusterView, config: InjectorConfig) -> dict[str, Any]:
    """The AdmissionReview answering /mutate-pods: always allowed, patched when injected."""
    return answer_pod(request, view=view, config=config).review


def answer_pod(request: AdmissionRequest, *, view: ClusterView, config: InjectorConfig) -> Reviewed:
    """``review_pod`` with its result (injected or skipped), reason code and the decision
    in words for the log; counts a pod left without the sidecar."""
    try:
        outcome = decide(request, view, config)
    except Exception:  # a bug must never block a pod, nor go unanswered
        log.exception(
            "pod review uid=%s: injection failed; admitting the pod without the sidecar", request.uid
        )
        outcome = not_injected(Reason.INTERNAL_ERROR, "the webhook failed on this pod (see its log)")
    said = Reviewed(
        allow(request.uid, warnings=outcome.warnings, patch=outcome.patch),
        metrics.INJECTED if outcome.injected else metrics.SKIPPED,
        outcome.reason.value,
        subject=f"pod {pod_label(request.object, request.namespace)}",
        detail=outcome.message,
        fields=f" modeldeployment={outcome.modeldeployment}" if outcome.modeldeployment else "",
        routine=outcome.reason in (Reason.NO_MATCHING_MODELDEPLOYMENT, Reason.NOT_A_POD_CREATE),
    )
    if not outcome.injected and outcome.reason is not Reason.NOT_A_POD_CREATE:
        metrics.INJECTIONS_SKIPPED.labels(outcome.reason.value).inc()
    return said
