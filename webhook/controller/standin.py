"""The remote standing in for a workload with no ready pod: which EndpointSlice should exist.

While no pod behind a ModelDeployment's Service is ready (scaled to zero, crash-looping, a
model still loading its weights) and the ModelDeployment has a remote (its own or the
installation's default), the controller adds an EndpointSlice to the Service that points
at the ready pods of the gateway (``offload-sidecar --mode gateway``) on this
ModelDeployment's own gateway port; kube-proxy then sends the Service's ClusterIP there,
and the gateway sends every request on to the remote. The slice goes as soon as one pod
behind the Service is ready *and has been for* :data:`HANDOVER_SECONDS`: the pod's
readiness reaches the EndpointSlice controller's slice and then kube-proxy's rules a moment
later, and until it has, removing the stand-in would leave the ClusterIP with no endpoint
(connection refused). Meanwhile both serve: make before break. The Service itself is never
changed for this.

The slice is labelled ``kubernetes.io/service-name: <service>`` (kube-proxy groups a
Service's slices by it) and ``endpointslice.kubernetes.io/managed-by:
controller.offload.beamlit.com`` (the EndpointSlice controller leaves slices it does not
manage alone; a label value, so no "/" as in ``endpointslice-controller.k8s.io``). Its one port carries the Service port's *name* (kube-proxy matches slice
ports to Service ports by name: the captured Service's targetPort, ``offload-proxy``, is
a name the gateway's pods do not declare) and the number of the gateway's listener.

Each ModelDeployment that could be stood in for gets a port (``status.standIn.port``)
from the configured range whether or not it is needed now, so every gateway replica
already listens on it when the last pod goes: the switch then costs one watch event, one
reconcile and one write. The port is stable: kept while it is in range and no older
ModelDeployment claims it; a new one starts at a hash of the name, so concurrent
assignments rarely collide.

Everything here is pure: ``plan`` over a ``StandInWorld``; ``runner`` carries it out.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crds.model import ModelDeployment, expand_path_prefix
from webhook.controller import capture
from webhook.controller import pods as podq
from webhook.controller.conditions import REMOTE_STANDING_IN, Condition

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "controller.offload.beamlit.com"  # a label value: no "/"
MODELDEPLOYMENT_LABEL = "offload.beamlit.com/modeldeployment"
SUFFIX = "-offload-standin"
DEFAULT_PORTS = (20000, 29999)
# How long a pod must have been Ready before the stand-in slice goes: the EndpointSlice
# controller and kube-proxy (its default minSyncPeriod is 1 s) must have it by then.
HANDOVER_SECONDS = 5.0
# Condition reasons worth a Warning Event: requests to the Service fail and nothing here helps.
WARNING_REASONS = frozenset({"NoRemote", "NoGatewayReady", "StandInConflict"})

Key = tuple[str, str]


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway's pods are, and the ports the controller hands out (inclusive)."""

    namespace: str
    selector: Mapping[str, str]  # equality labels of the gateway's pods
    ports: tuple[int, int] = DEFAULT_PORTS

    def __post_init__(self) -> None:
        low, high = self.ports
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"gateway ports: need 1 <= low <= high <= 65535, got {low}-{high}")
        if not self.selector:
            raise ValueError("gateway selector: must name at least one label")


def parse_selector(text: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}; ValueError naming the item at fault."""
    labels: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or value.startswith("="):
            raise ValueError(f"not key=value: {item!r}")
        labels[key] = value
    if not labels:
        raise ValueError("must name at least one label, as key=value[,key=value]")
    return labels


def parse_ports(text: str) -> tuple[int, int]:
    """``20000-29999`` -> (20000, 29999); ValueError naming what is wrong."""
    low, sep, high = text.partition("-")
    if not sep or not all(part.strip().isascii() and part.strip().isdigit() for part in (low, high)):
        raise ValueError(f"not a port range LOW-HIGH: {text!r}")
    ports = (int(low), int(high))
    if not 1 <= ports[0] <= ports[1] <= 65535:
        raise ValueError(f"need 1 <= LOW <= HIGH <= 65535, got {text!r}")
    return ports


def slice_name(service: str) -> str:
    return service[: 253 - len(SUFFIX)] + SUFFIX


# --- ports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """Another ModelDeployment's port, and what makes it older (creationTimestamp, then key)."""

    port: int
    created: str
    key: Key


def assign_port(
    key: Key, created: str, current: Any, claims: Sequence[Claim], ports: tuple[int, int]
) -> int | None:
    """This ModelDeployment's gateway port: ``current`` when it is in range and no older
    ModelDeployment claims it, else the first free port from a hash of ``key`` (wrapping
    around the range); None when every port is taken.

    ``created`` is the RFC 3339 creationTimestamp (strings of one format sort as times).
    """
    low, high = ports
    mine = (created, key)
    taken_by_older = {c.port for c in claims if c.key != key and (c.created, c.key) < mine}
    in_range = isinstance(current, int) and not isinstance(current, bool) and low <= current <= high
    if in_range and current not in taken_by_older:
        return current
    taken = {c.port for c in claims if c.key != key}
    size = high - low + 1
    start = zlib.crc32(f"{key[0]}/{key[1]}".encode()) % size
    for step in range(size):
        port = low + (start + step) % size
        if port not in taken:
            return port
    return None


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandInWorld:
    """What the store shows for one ModelDeployment (raw API objects)."""

    md: Mapping[str, Any]
    model: ModelDeployment | None  # None: invalid
    workload: Mapping[str, Any] | None = None
    workload_pods: Sequence[Mapping[str, Any]] = ()
    service: Mapping[str, Any] | None = None
    service_pods: Sequence[Mapping[str, Any]] = ()
    gateway_pods: Sequence[Mapping[str, Any]] = ()  # the pods the gateway selector matches
    slices: Sequence[Mapping[str, Any]] = ()  # our EndpointSlices in the namespace
    port: int | None = None  # from assign_port
    releasing: bool = False  # deleted, disabled controller, namespace terminating
    now: datetime | None = None  # the wall clock, for the handover; None: no handover


@dataclass(frozen=True)
class SliceAction:
    verb: str  # "create", "patch" (a JSON Patch tested against the resourceVersion), "delete"
    name: str
    body: Any = None  # the slice to create, or the JSON Patch


@dataclass(frozen=True)
class StandInPlan:
    condition: Condition | None = None  # None: no condition of this type
    status: dict[str, Any] | None = None  # status.standIn; None removes it
    actions: tuple[SliceAction, ...] = ()
    active: bool = False  # the slice exists once the actions are done
    event: tuple[str, str, str] | None = None  # (type, reason, message) once the actions are done
    recheck_after: float | None = None  # seconds: look again then (a handover in progress)


def _name(obj: Mapping[str, Any] | None) -> str:
    return podq.name_of(obj) if obj is not None else ""


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return podq.labels_of(obj)


def ours_for(slices: Sequence[Mapping[str, Any]], md_name: str) -> list[Mapping[str, Any]]:
    return [s for s in slices if _labels(s).get(MODELDEPLOYMENT_LABEL) == md_name]


def remote_of(model: ModelDeployment) -> str | None:
    """``scheme://host/prefix`` of the remote in force, or None. A validated model carries the
    installation's default remote backend when it has none of its own (crds.validation)."""
    config = model.spec.offloading_config
    backend = config.remote_backend if config is not None else None
    if backend is None:
        return None
    prefix = expand_path_prefix(backend.path_prefix or "", model.spec.model)
    return f"{backend.scheme}://{backend.host}{prefix}"


def wants_port(model: ModelDeployment | None) -> bool:
    """Whether this ModelDeployment could be stood in for, so needs a gateway port now."""
    return (
        model is not None
        and model.spec.enabled
        and model.spec.service_ref is not None
        and remote_of(model) is not None
    )


def _family(ip: str) -> str | None:
    try:
        return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
    except ValueError:
        return None


def _pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if isinstance(p, Mapping) and p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


def desired_slice(
    service: Mapping[str, Any],
    service_port: Mapping[str, Any],
    gateway_pods: Sequence[Mapping[str, Any]],
    port: int,
    md_name: str,
) -> dict[str, Any]:
    """The EndpointSlice: the ready gateway pods' addresses of the Service's primary IP
    family, on ``port``, under the Service port's name."""
    meta = service.get("metadata") or {}
    families = (service.get("spec") or {}).get("ipFamilies") or ["IPv4"]
    family = "IPv6" if families[0] == "IPv6" else "IPv4"
    endpoints = []
    for pod in sorted(gateway_pods, key=podq.name_of):
        addresses = [ip for ip in _pod_ips(pod) if _family(ip) == family][:1]
        if not addresses:
            continue
        pmeta = pod.get("metadata") or {}
        endpoint: dict[str, Any] = {
            "addresses": addresses,
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "targetRef": {
                "kind": "Pod",
                "namespace": pmeta.get("namespace"),
                "name": pmeta.get("name"),
                "uid": pmeta.get("uid"),
            },
        }
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            endpoint["nodeName"] = node
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(str(meta.get("name"))),
            "namespace": meta.get("namespace"),
            "labels": {
                SERVICE_NAME_LABEL: meta.get("name"),
                MANAGED_BY_LABEL: MANAGED_BY,
                MODELDEPLOYMENT_LABEL: md_name,
            },
            # Gone with the Service, as the EndpointSlice controller's own slices are.
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Service", "name": meta.get("name"), "uid": meta.get("uid")}
            ],
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": [
            {"name": str(service_port.get("name") or ""), "port": port, "protocol": "TCP"},
        ],
    }


def _projection(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a slice the plan decides (the API server adds the rest)."""
    endpoints = []
    for e in obj.get("endpoints") or []:
        conditions = e.get("conditions") or {}
        ref = e.get("targetRef") or {}
        endpoints.append(
            (
                tuple(e.get("addresses") or ()),
                conditions.get("ready"),
                conditions.get("serving"),
                conditions.get("terminating"),
                ref.get("name"),
                ref.get("uid"),
                e.get("nodeName"),
            )
        )
    ports = [
        (str(p.get("name") or ""), p.get("port"), p.get("protocol") or "TCP") for p in obj.get("ports") or []
    ]
    labels = _labels(obj)
    return (
        obj.get("addressType"),
        tuple(endpoints),
        tuple(ports),
        tuple(labels.get(k) for k in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL, MODELDEPLOYMENT_LABEL)),
    )


def _converge(current: Sequence[Mapping[str, Any]], wanted: dict[str, Any] | None) -> tuple[SliceAction, ...]:
    """Actions from this ModelDeployment's slices to ``wanted`` (None: none at all)."""
    actions: list[SliceAction] = []
    wanted_name = (wanted or {}).get("metadata", {}).get("name")
    for s in current:
        if _name(s) != wanted_name:
            actions.append(SliceAction("delete", _name(s)))
    if wanted is None:
        return tuple(actions)
    there = next((s for s in current if _name(s) == wanted_name), None)
    if there is None:
        actions.append(SliceAction("create", wanted_name, wanted))
    elif there.get("addressType") != wanted["addressType"]:  # immutable: delete and create
        actions += [SliceAction("delete", wanted_name), SliceAction("create", wanted_name, wanted)]
    elif _projection(there) != _projection(wanted):
        # A JSON Patch tested against the version read, as the Service's capture is: a
        # concurrent change fails it, and the next reconcile reads the new version.
        version = (there.get("metadata") or {}).get("resourceVersion")
        patch = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": version},
            {"op": "add", "path": "/metadata/labels", "value": wanted["metadata"]["labels"]},
            {"op": "add", "path": "/endpoints", "value": wanted["endpoints"]},
            {"op": "add", "path": "/ports", "value": wanted["ports"]},
        ]
        actions.append(SliceAction("patch", wanted_name, patch))
    return tuple(actions)


def _workload_words(world: StandInWorld, ready: int) -> str:
    model = world.model
    assert model is not None
    ref = model.spec.model_source_ref
    pods = len(world.workload_pods)
    replicas = ((world.workload or {}).get("spec") or {}).get("replicas")
    if replicas == 0 and not ready:  # its last pods may still be terminating
        return f"{ref.kind} {ref.name} is scaled to zero"
    return f"{ref.kind} {ref.name} has {ready} ready of {pods} pods"


def _service_port(service: Mapping[str, Any] | None, model: ModelDeployment) -> Mapping[str, Any] | None:
    """The Service port stood in for (the one capture would choose), if there is one."""
    if service is None or model.spec.service_ref is None:
        return None
    chosen = capture.choose_port(service, model.spec.service_ref.target_port)
    return None if isinstance(chosen, capture.Uncapturable) else chosen.port


def _handover_left(world: StandInWorld, ready_pods: set[str]) -> float:
    """Seconds until the longest-ready pod has been Ready for HANDOVER_SECONDS (0: done, or
    no clock or no time to go by)."""
    if world.now is None:
        return 0.0
    since = [
        t
        for p in (*world.workload_pods, *world.service_pods)
        if podq.name_of(p) in ready_pods and (t := podq.ready_since(p)) is not None
    ]
    if not since:
        return 0.0
    return max(0.0, HANDOVER_SECONDS - (world.now - min(since)).total_seconds())


def plan(world: StandInWorld, gateway: GatewaySettings | None) -> StandInPlan:
    """What to do for one ModelDeployment. ``gateway`` None: the installation has no gateway
    (no condition, no port, and any slice of ours goes)."""
    md_name = _name(world.md)
    mine = ours_for(world.slices, md_name)
    model = world.model
    if gateway is None or model is None or world.releasing:
        why = (
            "the controller runs without a gateway"
            if gateway is None
            else ("the ModelDeployment is invalid" if model is None else "the controller released it")
        )
        stopped = ("Normal", "RemoteStoodDown", f"the remote no longer stands in: {why}") if mine else None
        return StandInPlan(actions=_converge(mine, None), event=stopped)

    def status_of(active: bool) -> dict[str, Any]:
        status: dict[str, Any] = {"port": world.port, "active": active}
        service_port = _service_port(world.service, model)
        if service_port is not None:
            status["portName"] = str(service_port.get("name") or "")
        return status

    def off(reason: str, message: str, *, port: bool = True) -> StandInPlan:
        status = status_of(False) if port and world.port is not None else None
        stopped = (
            ("Normal", "RemoteStoodDown", f"the remote no longer stands in: {message}") if mine else None
        )
        return StandInPlan(
            Condition(REMOTE_STANDING_IN, False, reason, message),
            status,
            _converge(mine, None),
            False,
            stopped,
        )

    if not model.spec.enabled:
        return off("Disabled", "enabled: false: the remote never stands in", port=False)
    remote = remote_of(model)
    sref = model.spec.service_ref
    if sref is None:
        return off("NoServiceRef", "the ModelDeployment names no Service to stand in for", port=False)
    if world.workload is None:
        ref = model.spec.model_source_ref
        return off("WorkloadNotFound", f"{ref.kind} {ref.name} not found in namespace {model.namespace}")

    ready_pods = {podq.name_of(p) for p in (*world.workload_pods, *world.service_pods) if podq.is_ready(p)}
    ready = len(ready_pods)
    workload = _workload_words(world, ready)
    if remote is None:
        if ready:
            return off("LocalReplicasReady", f"{workload}; no remote backend could stand in", port=False)
        return off(
            "NoRemote",
            f"{workload} and there is no remote backend (remoteBackend, or the installation's "
            f"default) to stand in: Service {sref.name} has no endpoint",
            port=False,
        )
    if world.port is None:
        low, high = gateway.ports
        return off("NoGatewayPort", f"every gateway port from {low} to {high} is taken", port=False)
    if ready:
        settling = _handover_left(world, ready_pods)
        if mine and settling > 0:
            message = (
                f"{workload}: Service {sref.name} is taken over by its own pods; the remote keeps "
                f"standing in beside them for {settling:.0f}s more, until kube-proxy has them"
            )
            return StandInPlan(
                Condition(REMOTE_STANDING_IN, True, "HandingOver", message),
                status_of(True),
                (),
                True,
                None,
                settling,
            )
        return off("LocalReplicasReady", f"{workload}: Service {sref.name} is served by its own pods")

    service = world.service
    if service is None:
        return off("ServiceNotFound", f"Service {sref.name} not found in namespace {model.namespace}")
    chosen = capture.choose_port(service, sref.target_port)
    if isinstance(chosen, capture.Uncapturable):
        return off(chosen.reason, chosen.message)
    other = capture.captured_by(service)
    if other is not None and other != md_name:
        return off("CapturedByAnother", f"Service {sref.name} is captured by ModelDeployment {other}")
    name = slice_name(sref.name)
    foreign = next(
        (s for s in world.slices if _name(s) == name and _labels(s).get(MODELDEPLOYMENT_LABEL) != md_name),
        None,
    )
    if foreign is not None:
        holder = _labels(foreign).get(MODELDEPLOYMENT_LABEL)
        return off(
            "StandInConflict",
            f"EndpointSlice {name} stands in for Service {sref.name} on behalf of ModelDeployment {holder}",
        )

    gateways = [p for p in world.gateway_pods if podq.is_ready(p) and _pod_ips(p)]
    if not gateways:
        selector = ",".join(f"{k}={v}" for k, v in sorted(gateway.selector.items()))
        return off(
            "NoGatewayReady",
            f"{workload} and no gateway pod ({selector} in namespace {gateway.namespace}) is ready "
            "to stand in: the Service has no endpoint",
        )
    wanted = desired_slice(service, chosen.port, gateways, world.port, md_name)
    if not wanted["endpoints"]:
        family = wanted["addressType"]
        return off("NoGatewayReady", f"{workload} and no ready gateway pod has an {family} address")
    hold = (
        model.spec.offloading_config.behavior.cold_start_hold_seconds if model.spec.offloading_config else 0
    )
    held = f", after holding each request up to {hold}s for a local pod" if hold else ""
    message = (
        f"{workload}: Service {sref.name} port {chosen.port.get('port')} is served by "
        f"{len(wanted['endpoints'])} gateway pods on port {world.port}, which send requests to {remote}{held}"
    )
    reason = "ScaledToZero" if "scaled to zero" in workload else "NoReadyReplica"
    return StandInPlan(
        Condition(REMOTE_STANDING_IN, True, reason, message),
        status_of(True),
        _converge(mine, wanted),
        True,
        None if mine else ("Normal", "RemoteStandingIn", message),
    )
