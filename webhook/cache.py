"""The admission path's view of the cluster, kept current by watches.

``ClusterCache`` holds what injection needs, compacted from the API objects: valid
ModelDeployments indexed by namespace (a pod's lookup costs its namespace's count, not
the cluster's), the label selectors of Deployments and StatefulSets, and the ports of
Services. Writers (one watch thread per resource) replace per-namespace maps rather than
mutating them, so a reader on the event loop always sees a consistent map without a lock.

``CacheSync`` runs the watches with the ``kubernetes`` client: list (paginated), then
watch from the list's resourceVersion with bookmarks; a watch that expires (410 Gone)
is resumed by a fresh list, which replaces the resource's state wholesale (no stale
entries survive a missed deletion); other failures are retried with jittered exponential
backoff. ``ready()`` is true once every resource has been listed and none has been
failing for longer than ``stale_after`` seconds: a webhook that cannot see the cluster
leaves the Service's endpoints rather than answering from an old picture forever.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crds.model import GROUP, PLURAL, VERSION
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


def _meta(obj: Any) -> dict[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def modeldeployment_from(obj: Any, settings: ValidationSettings) -> CachedModelDeployment | None:
    """The cached form of a ModelDeployment; None when invalid (treated as absent)."""
    result = validate_object(obj, settings)
    if result.model is None:
        meta = _meta(obj)
        log.warning(
            "ModelDeployment %s/%s is invalid, ignored: %s",
            meta.get("namespace"),
            meta.get("name"),
            result.message(),
        )
        return None
    return CachedModelDeployment(result.model, str(_meta(obj).get("creationTimestamp") or ""))


def workload_from(kind: str, obj: Any) -> Workload:
    meta = _meta(obj)
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
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        return int(value) if value.isdigit() else value
    return None


def service_from(obj: Any) -> ServiceInfo:
    meta = _meta(obj)
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
        meta = _meta(obj)
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


# --- the watches -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: base * 2^attempt, capped, times a factor in [0.5, 1]."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return min(self.cap, self.base * (2 ** min(attempt, 16))) * (0.5 + rand() / 2)


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def list_functions(api_client: Any) -> dict[str, Callable[..., Any]]:
    """The kubernetes client's list calls of each resource, cluster-wide."""
    import kubernetes

    apps = kubernetes.client.AppsV1Api(api_client)
    core = kubernetes.client.CoreV1Api(api_client)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
    discovery = kubernetes.client.DiscoveryV1Api(api_client)

    def list_modeldeployments(**kwargs: Any) -> Any:
        return custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)

    def list_standin_slices(**kwargs: Any) -> Any:
        return discovery.list_endpoint_slice_for_all_namespaces(
            label_selector=STANDIN_SLICES_SELECTOR, **kwargs
        )

    # The Watch helper reads the list call's docstring for its return type; a plain
    # function has none and we ask for raw objects anyway.
    return {
        MODELDEPLOYMENTS: list_modeldeployments,
        DEPLOYMENTS: apps.list_deployment_for_all_namespaces,
        STATEFULSETS: apps.list_stateful_set_for_all_namespaces,
        SERVICES: core.list_service_for_all_namespaces,
        PODS: core.list_pod_for_all_namespaces,
        REPLICASETS: apps.list_replica_set_for_all_namespaces,
        ROLEBINDINGS: rbac.list_role_binding_for_all_namespaces,
        ENDPOINTSLICES: list_standin_slices,
    }


class WatchSink(Protocol):
    """What the watches write into: ``ClusterCache``, the controller's store, or both."""

    def replace(self, resource: str, objects: Iterable[Any]) -> None: ...
    def apply(self, resource: str, event_type: str, obj: Any) -> None: ...
    def mark_listed(self, resource: str) -> None: ...
    def mark_failing(self, resource: str) -> None: ...
    def synced(self) -> bool: ...


class CacheSync:
    """One thread per resource: list, watch, relist on 410, back off on errors."""

    def __init__(
        self,
        cache: WatchSink,
        api_client: Any,
        *,
        resources: Sequence[str] = RESOURCES,
        watch_timeout: int = 300,
        page_size: int = 500,
        backoff: Backoff = Backoff(),
        list_functions_: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.cache = cache
        self._functions = list_functions_ or list_functions(api_client)
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._backoff = backoff
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, Any] = {}
        self._resources = tuple(resources)
        self.relists: dict[str, int] = {r: 0 for r in self._resources}

    def start(self) -> None:
        for resource in self._resources:
            thread = threading.Thread(
                target=self._run, args=(resource,), name=f"watch-{resource}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for watch in list(self._watches.values()):
            watch.stop()
        for thread in self._threads:
            thread.join(timeout)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cache.synced():
                return True
            if self._stop.wait(0.05):
                return False
        return self.cache.synced()

    # -- one resource --

    def _run(self, resource: str) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                version = self._list(resource)
                self.relists[resource] += 1
                self.cache.mark_listed(resource)
                attempt = 0
                self._watch(resource, version)
            except Gone:
                log.info("watch of %s expired (410 Gone): listing again", resource)
                continue
            except Exception as exc:  # noqa: BLE001 - the API server is unreachable, refuses us, or sends junk
                if self._stop.is_set():
                    return  # stop() cut the watch's connection
                self.cache.mark_failing(resource)
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.warning(
                    "watch of %s failed (%s: %s); retrying in %.1fs",
                    resource,
                    type(exc).__name__,
                    _short(exc),
                    delay,
                )
                self._stop.wait(delay)

    def _list(self, resource: str) -> str:
        function = self._functions[resource]
        items: list[Any] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": self._page_size, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            response = function(**kwargs)
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                self.cache.replace(resource, items)
                log.info(
                    "listed %d %s (resourceVersion %s)", len(items), resource, meta.get("resourceVersion")
                )
                return str(meta.get("resourceVersion") or "")

    def _watch(self, resource: str, version: str) -> None:
        import kubernetes

        while not self._stop.is_set():
            # return_type=object: events stay plain dicts (no model classes built per event).
            watch = kubernetes.watch.Watch(return_type=object)
            self._watches[resource] = watch
            try:
                for event in watch.stream(
                    self._functions[resource],
                    resource_version=version,
                    timeout_seconds=self._watch_timeout,
                    allow_watch_bookmarks=True,
                ):
                    kind, obj = event.get("type"), event.get("raw_object")
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.cache.apply(resource, kind, obj)
                    version = str(_meta(obj).get("resourceVersion") or version)
                    if self._stop.is_set():
                        return
            except kubernetes.client.ApiException as exc:
                if exc.status == 410:
                    raise Gone from None
                raise
            finally:
                self._watches.pop(resource, None)


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text[:200]
