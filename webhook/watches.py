"""The watches that keep the webhook's caches current, with the ``kubernetes`` client.

``CacheSync`` runs one thread per resource: list (paginated), then watch from the list's
resourceVersion with bookmarks, writing into a ``WatchSink`` (``webhook.cache.ClusterCache``,
the controller's store, or both). A watch that expires (410 Gone) is resumed by a fresh
list, which the sink applies wholesale; other failures mark the resource failing and are
retried after a delay from ``crds.backoff.Backoff``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from crds.backoff import Backoff
from crds.model import GROUP, PLURAL, VERSION
from webhook.cache import (
    DEPLOYMENTS,
    ENDPOINTSLICES,
    MODELDEPLOYMENTS,
    PODS,
    REPLICASETS,
    RESOURCES,
    ROLEBINDINGS,
    SERVICES,
    STANDIN_SLICES_SELECTOR,
    STATEFULSETS,
    meta_of,
)

log = logging.getLogger("webhook.watches")

RETRY = Backoff(base=0.5, cap=30.0)


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 Gone): list again."""


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
        backoff: Backoff = RETRY,
        list_functions_: dict[str, Callable[..., Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.cache = cache
        self._functions = list_functions_ or list_functions(api_client)
        self._watch_timeout = watch_timeout
        self._page_size = page_size
        self._backoff = backoff
        self._clock = clock
        self._rand = rand
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
        """Whether the sink synced within ``timeout`` seconds (False at once if stopped)."""
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            if self.cache.synced():
                return True
            if self._stop.wait(0.05):
                return False
        return self.cache.synced()

    # -- one resource --

    def _run(self, resource: str) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                version = self._list(resource)
                self.relists[resource] += 1
                self.cache.mark_listed(resource)
                failures = 0
                self._watch(resource, version)
            except WatchExpired:
                log.info("watch of %s expired (410 Gone): listing again", resource)
                continue
            except Exception as exc:  # noqa: BLE001 - the API server is unreachable, refuses us, or sends junk
                if self._stop.is_set():
                    return  # stop() cut the watch's connection
                self.cache.mark_failing(resource)
                delay = self._backoff.delay(failures, self._rand)
                failures += 1
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
                    version = str(meta_of(obj).get("resourceVersion") or version)
                    if self._stop.is_set():
                        return
            except kubernetes.client.ApiException as exc:
                if exc.status == 410:
                    raise WatchExpired from None
                raise
            finally:
                self._watches.pop(resource, None)


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text[:200]
