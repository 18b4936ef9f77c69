"""Pure questions about pods: ready, injected, owned by a workload, selected by a Service."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from crds.status import parse_time
from webhook.injector_config import PROXY_PORT_NAME


def name_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def uid_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = (obj.get("metadata") or {}).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def is_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True and it is not being deleted (as EndpointSlices count it)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def ready_since(pod: Mapping[str, Any]) -> datetime | None:
    """When a ready pod's Ready condition last turned True (``lastTransitionTime``, to the
    second); None when it is not ready or the time is missing."""
    if not is_ready(pod):
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return parse_time(cond.get("lastTransitionTime"))
    return None


def has_sidecar(pod: Mapping[str, Any]) -> bool:
    """A container of the pod declares the ``offload-proxy`` port: the named targetPort resolves."""
    spec = pod.get("spec") or {}
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            for port in (container or {}).get("ports") or []:
                if isinstance(port, Mapping) and port.get("name") == PROXY_PORT_NAME:
                    return True
    return False


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return str(ref.get("uid") or "")
    return None


def owned_pods(
    workload: Mapping[str, Any],
    kind: str,
    replicasets: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    """The workload's own pods: a Deployment's through its ReplicaSets, a StatefulSet's directly.

    Pods that merely carry the same labels (a canary's, a Job's) are not the workload's.
    """
    uid = uid_of(workload)
    if kind == "Deployment":
        owners = {uid_of(rs) for rs in replicasets if _controller_uid(rs) == uid}
    else:
        owners = {uid}
    return [p for p in pods if _controller_uid(p) in owners]


def selected_by(
    selector: Mapping[str, str] | None, pods: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Pods a Service's equality selector matches (an empty selector matches none)."""
    if not selector:
        return []
    return [p for p in pods if all(labels_of(p).get(k) == v for k, v in selector.items())]


def names(pods: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c and 4 more``: bounded, for a condition message."""
    shown = sorted(name_of(p) for p in pods)
    if len(shown) <= limit:
        return ", ".join(shown)
    return ", ".join(shown[:limit]) + f" and {len(shown) - limit} more"
