"""The controller's view of the cluster: raw API objects kept current by the watches.

``Store`` holds every watched object as the API server sent it (less
``metadata.managedFields``), indexed by resource, namespace and name, and calls
``on_change(resource, namespace)`` after each change so the controller can enqueue the
ModelDeployments of that namespace (level-triggered: what changed does not matter, only
that something in the namespace may now differ from what a ModelDeployment wants).

Writers (one watch thread per resource) replace per-namespace maps rather than mutating
them, so the reconcile thread reads a consistent map without a lock, as in
``webhook.cache.ClusterCache``.

``Fanout`` lets one set of watches feed both the admission cache and this store: each
resource goes to the sinks that asked for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from webhook.watches import WatchSink

OnChange = Callable[[str, str], None]


def _meta(obj: Any) -> Mapping[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def _slim(obj: Any) -> dict[str, Any]:
    """The object without managedFields (often half its size; nothing here reads them)."""
    if not isinstance(obj, dict):
        return {}
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


class Store:
    """Raw objects by resource -> namespace -> name; implements ``WatchSink``."""

    def __init__(self, resources: Sequence[str], on_change: OnChange | None = None) -> None:
        self.resources = tuple(resources)
        self._on_change = on_change
        self._write = threading.Lock()
        self._objects: dict[str, dict[str, dict[str, dict[str, Any]]]] = {r: {} for r in self.resources}
        self._listed: set[str] = set()
        self._failing: set[str] = set()

    def set_on_change(self, on_change: OnChange) -> None:
        self._on_change = on_change

    # -- reads --

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects[resource].get(namespace, {}).get(name)

    def list(self, resource: str, namespace: str) -> list[dict[str, Any]]:
        return list(self._objects[resource].get(namespace, {}).values())

    def namespaces(self, resource: str) -> list[str]:
        return list(self._objects[resource])

    def synced(self) -> bool:
        return self._listed.issuperset(self.resources) and not self._failing

    # -- health --

    def mark_listed(self, resource: str) -> None:
        with self._write:
            self._listed.add(resource)
            self._failing.discard(resource)

    def mark_failing(self, resource: str) -> None:
        with self._write:
            self._failing.add(resource)

    # -- writes --

    def replace(self, resource: str, objects: Iterable[Any]) -> None:
        fresh: dict[str, dict[str, dict[str, Any]]] = {}
        for obj in objects:
            meta = _meta(obj)
            fresh.setdefault(str(meta.get("namespace") or ""), {})[str(meta.get("name") or "")] = _slim(obj)
        with self._write:
            old = self._objects[resource]
            self._objects[resource] = fresh
        for namespace in set(old) | set(fresh):
            self._notify(resource, namespace)

    def apply(self, resource: str, event_type: str, obj: Any) -> None:
        meta = _meta(obj)
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        with self._write:
            current = dict(self._objects[resource].get(namespace, {}))
            if event_type == "DELETED":
                current.pop(name, None)
            else:
                current[name] = _slim(obj)
            objects = dict(self._objects[resource])
            if current:
                objects[namespace] = current
            else:
                objects.pop(namespace, None)
            self._objects[resource] = objects
        self._notify(resource, namespace)

    def _notify(self, resource: str, namespace: str) -> None:
        if self._on_change is not None:
            self._on_change(resource, namespace)


class Fanout:
    """One ``WatchSink`` feeding several: each resource goes to the sinks that take it."""

    def __init__(self, sinks: Mapping[WatchSink, Sequence[str]]) -> None:
        self._routes: dict[str, list[WatchSink]] = {}
        for sink, resources in sinks.items():
            for resource in resources:
                self._routes.setdefault(resource, []).append(sink)
        self._sinks = list(sinks)

    def _to(self, resource: str) -> list[WatchSink]:
        return self._routes.get(resource, [])

    def replace(self, resource: str, objects: Iterable[Any]) -> None:
        items = list(objects)
        for sink in self._to(resource):
            sink.replace(resource, items)

    def apply(self, resource: str, event_type: str, obj: Any) -> None:
        for sink in self._to(resource):
            sink.apply(resource, event_type, obj)

    def mark_listed(self, resource: str) -> None:
        for sink in self._to(resource):
            sink.mark_listed(resource)

    def mark_failing(self, resource: str) -> None:
        for sink in self._to(resource):
            sink.mark_failing(resource)

    def synced(self) -> bool:
        return all(sink.synced() for sink in self._sinks)
