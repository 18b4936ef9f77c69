"""The admission path's view of the cluster, in memory (no I/O: webhook/watches.py keeps it
current).

``ClusterCache`` holds what injection needs, compacted from the API objects: valid
ModelDeployments indexed by namespace (a pod's lookup costs its namespace's count, not
the cluster's), the label selectors of Deployments and StatefulSets, and the ports of
Services. Writers (one watch thread per resource) replace per-namespace maps rather than
mutating them, so a reader on the event loop always sees a consistent map without a lock.
A fresh list replaces a resource's state wholesale (no stale entries survive a missed
deletion). ``ready()`` is true once every resource has been listed and none has been
failing for longer than ``stale_after`` seconds: a webhook that cannot see the cluster
leaves the Service's endpoints rather than answering from an old picture forever.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from crds.validation import ValidationSettings, validate_object
from webhook.injection import ORIGINAL_TARGET_PORT_ANNOTATION, ServiceInfo, ServicePort
from webhook.selection import CachedModelDeployment, Workload, parse_label_selector

log = logging.getLogger("webhook.cache")

MODELDEPLOYMENTS = "modeldeployments"
DEPLOYMENTS = "deployments"
STATEFULSETS = "statefulsets"
SERVICES = "services"
RESOURCES = (MODELDEPLOYMENTS, DEPLOYMENTS, STATEFULSETS, SERVICES)
# Watched for the controller only (webhook.controller.store).
PODS = "pods"
REPLICASETS = "replicasets"
ROLEBINDINGS = "rolebindings"
# Only the controller's own (webhook.controller.standin): the remote standing in for a workload.
ENDPOINTSLICES = "endpointslices"
STANDIN_SLICES_SELECTOR = "endpointslice.kubernetes.io/managed-by=controller.offload.beamlit.com"
CONTROLLER_RESOURCES = (*RESOURCES, PODS, REPLICASETS, ROLEBINDINGS, ENDPOINTSLICES)
WORKLOAD_KINDS = {DEPLOYMENTS: "Deployment", STATEFULSETS: "StatefulSet"}


# --- compacting API objects ------------------------------------------------------------------------


def meta_of(obj: Any) -> dict[str, Any]:
    """An API object's metadata, {} when it has none usable."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def modeldeployment_from(obj: Any, settings: ValidationSettings) -> CachedModelDeployment | None:
    """The cached form of a ModelDeployment; None when invalid (treated as absent).

    Never raises: a stored object may predate the validating webhook, and a validator bug it
    trips must cost that one object, not the list it came in (the cache would stop syncing)."""
    meta = meta_of(obj)
    try:
        result = validate_object(obj, settings)
    except Exception:
        log.exception(
            "ModelDeployment %r/%r could not be validated (a bug), ignored as invalid",
            meta.get("namespace"),
            meta.get("name"),
        )
        return None
    if result.model is None:
        log.warning(
            "ModelDeployment %s/%s is invalid, ignored: %s",
            meta.get("namespace"),
            meta.get("name"),
            result.message(),
        )
        return None
    return CachedModelDeployment(result.model, str(meta.get("creationTimestamp") or ""))


def workload_from(kind: str, obj: Any) -> Workload:
    meta = meta_of(obj)
    spec = obj.get("spec") if isinstance(obj, dict) else None
    try:
        selector = parse_label_selector((spec or {}).get("selector"), "spec.selector")
    except ValueError as exc:
        log.warning(
            "%s %s/%s has an unusable selector: %s", kind, meta.get("namespace"), meta.get("name"), exc
        )
        selector = None
    return Workload(kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""), selector)


def _port_value(value: Any) -> int | str | None:
    """A targetPort (or the original-target-port annotation): a number, a port name, or None.
    Only ASCII digits make a number ('²'.isdigit() is true, and int() refuses it); more than
    five of them are no port, and are kept as a name no container port has."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        return int(value) if _PORT_DIGITS.fullmatch(value) else value
    return None


_PORT_DIGITS = re.compile(r"[0-9]{1,5}")


def service_from(obj: Any) -> ServiceInfo:
    meta = meta_of(obj)
    spec = obj.get("spec") if isinstance(obj, dict) else None
    ports = []
    for port in (spec or {}).get("ports") or []:
        if isinstance(port, dict) and isinstance(port.get("port"), int):
            ports.append(
                ServicePort(port["port"], _port_value(port.get("targetPort")), str(port.get("name") or ""))
            )
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    return ServiceInfo(
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
        tuple(ports),
        _port_value(annotations.get(ORIGINAL_TARGET_PORT_ANNOTATION)),
    )


# --- the state -------------------------------------------------------------------------------------


class ClusterCache:
    """The in-memory view; implements ``webhook.mutating.ClusterView``."""

    def __init__(
        self,
        settings: ValidationSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        stale_after: float = 60.0,
    ) -> None:
        self._settings = settings or ValidationSettings()
        self._clock = clock
        self._stale_after = stale_after
        self._write = threading.Lock()
        # namespace -> name -> entry; each inner map is replaced, never mutated, once published.
        self._mds: dict[str, dict[str, CachedModelDeployment]] = {}
        self._workloads: dict[tuple[str, str, str], Workload] = {}
        self._services: dict[tuple[str, str], ServiceInfo] = {}
        self._listed: set[str] = set()
        self._failing_since: dict[str, float] = {}

    # -- reads (the admission path) --

    def modeldeployments(self, namespace: str) -> Sequence[CachedModelDeployment]:
        return tuple(self._mds.get(namespace, {}).values())

    def workload(self, kind: str, namespace: str, name: str) -> Workload | None:
        return self._workloads.get((kind, namespace, name))

    def service(self, namespace: str, name: str) -> ServiceInfo | None:
        return self._services.get((namespace, name))

    def synced(self) -> bool:
        """Every resource listed, none failing for longer than ``stale_after``."""
        if not self._listed.issuperset(RESOURCES):
            return False
        now = self._clock()
        return all(now - since <= self._stale_after for since in self._failing_since.values())

    ready = synced

    def counts(self) -> dict[str, int]:
        return {
            MODELDEPLOYMENTS: sum(len(m) for m in self._mds.values()),
            "workloads": len(self._workloads),
            SERVICES: len(self._services),
        }

    # -- health of the watches --

    def mark_listed(self, resource: str) -> None:
        with self._write:
            self._listed.add(resource)
            self._failing_since.pop(resource, None)

    def mark_failing(self, resource: str) -> None:
        with self._write:
            self._failing_since.setdefault(resource, self._clock())

    # -- writes (the watch threads) --

    def replace(self, resource: str, objects: Iterable[Any]) -> None:
        """A fresh list: the resource's whole state, replacing what was there."""
        if resource == MODELDEPLOYMENTS:
            by_ns: dict[str, dict[str, CachedModelDeployment]] = {}
            for obj in objects:
                entry = modeldeployment_from(obj, self._settings)
                if entry is not None:
                    by_ns.setdefault(entry.model.namespace, {})[entry.model.name] = entry
            with self._write:
                self._mds = by_ns
        elif resource in WORKLOAD_KINDS:
            kind = WORKLOAD_KINDS[resource]
            fresh = {(kind, w.namespace, w.name): w for w in (workload_from(kind, o) for o in objects)}
            with self._write:
                kept = {k: v for k, v in self._workloads.items() if k[0] != kind}
                self._workloads = {**kept, **fresh}
        elif resource == SERVICES:
            services = {(s.namespace, s.name): s for s in (service_from(o) for o in objects)}
            with self._write:
                self._services = services
        else:
            raise ValueError(f"unknown resource {resource!r}")

    def apply(self, resource: str, event_type: str, obj: Any) -> None:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        meta = meta_of(obj)
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        deleted = event_type == "DELETED"
        with self._write:
            if resource == MODELDEPLOYMENTS:
                entry = None if deleted else modeldeployment_from(obj, self._settings)
                current = dict(self._mds.get(namespace, {}))
                current.pop(name, None)
                if entry is not None:
                    current[name] = entry
                mds = dict(self._mds)
                if current:
                    mds[namespace] = current
                else:
                    mds.pop(namespace, None)
                self._mds = mds
            elif resource in WORKLOAD_KINDS:
                kind = WORKLOAD_KINDS[resource]
                workloads = dict(self._workloads)
                if deleted:
                    workloads.pop((kind, namespace, name), None)
                else:
                    workloads[(kind, namespace, name)] = workload_from(kind, obj)
                self._workloads = workloads
            elif resource == SERVICES:
                services = dict(self._services)
                if deleted:
                    services.pop((namespace, name), None)
                else:
                    services[(namespace, name)] = service_from(obj)
                self._services = services
            else:
                raise ValueError(f"unknown resource {resource!r}")
