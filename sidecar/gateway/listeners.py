"""What the gateway listens for: one port per served ModelDeployment, from their statuses,
and the ready endpoints of a Service's EndpointSlices. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from crds.model import ModelDeployment
from crds.validation import ValidationSettings, validate_object

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Listener:
    """One ModelDeployment as the gateway serves it."""

    key: Key  # (namespace, name)
    port: int  # status.standIn.port
    model: ModelDeployment  # with the installation's default remote when it has none of its own
    service: str  # serviceRef.name
    port_name: str | None  # status.standIn.portName: the Service port's name ("" unnamed; None unknown)
    hold: int  # behavior.coldStartHoldSeconds


def _created(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp") or "")


def listeners_from(
    objects: Iterable[Mapping[str, Any]], validation: ValidationSettings
) -> tuple[dict[Key, Listener], dict[Key, str]]:
    """The listeners the ModelDeployments ask for, and why others with a port get none.

    A ModelDeployment gets one when its status has a gateway port and it is valid, enabled
    and has a remote (its own, or ``validation``'s default remote backend, which validation
    puts in place). Two claiming one port (the controller never does that for long): the
    older keeps it.
    """
    wanted: dict[Key, Listener] = {}
    problems: dict[Key, str] = {}
    by_port: dict[int, Mapping[str, Any]] = {}
    for obj in sorted(objects, key=lambda o: (_created(o), key_of(o))):
        key = key_of(obj)
        stand_in = (obj.get("status") or {}).get("standIn")
        if not isinstance(stand_in, Mapping):
            continue
        port = stand_in.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems[key] = f"status.standIn.port: not a port number: {port!r}"
            continue
        result = validate_object(obj, validation)
        if result.model is None:
            problems[key] = f"invalid, not served: {result.message()}"
            continue
        model = result.model
        config = model.spec.offloading_config
        if not model.spec.enabled or config is None or config.remote_backend is None:
            problems[key] = "disabled or without a remote backend: not served"
            continue
        if port in by_port:
            problems[key] = f"port {port} is already ModelDeployment {'/'.join(key_of(by_port[port]))}'s"
            continue
        by_port[port] = obj
        name = stand_in.get("portName")
        wanted[key] = Listener(
            key,
            port,
            model,
            model.spec.service_ref.name if model.spec.service_ref is not None else "",
            name if isinstance(name, str) else None,
            config.behavior.cold_start_hold_seconds,
        )
    return wanted, problems


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def ready_endpoints(slices: Iterable[Mapping[str, Any]], port_name: str | None) -> list[tuple[str, int]]:
    """(address, port) of the ready, not terminating endpoints of a Service's slices, on the
    port named ``port_name`` ("" for an unnamed port; None: the only port there is).
    A ``ready`` condition left out counts as ready, as the API documents."""
    found: set[tuple[str, int]] = set()
    for s in slices:
        ports = [p for p in s.get("ports") or [] if isinstance(p, Mapping) and isinstance(p.get("port"), int)]
        if port_name is None:
            names = {str(p.get("name") or "") for p in ports}
            chosen = ports[0]["port"] if len(names) == 1 else None
        else:
            chosen = next((p["port"] for p in ports if str(p.get("name") or "") == port_name), None)
        if chosen is None:
            continue
        for endpoint in s.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or []
            if addresses:
                found.add((str(addresses[0]), chosen))
    return sorted(found)
