"""Pointing a Service port at the sidecars, and back: pure functions over Service JSON.

The captured port is the Service port named by ``serviceRef.targetPort`` (Beamlit's
meaning: the Service's ``port``; for compatibility a port whose ``targetPort`` equals it
is accepted too; none given: the first TCP port). Capture sets its ``targetPort`` to the
sidecar's named container port ``offload-proxy`` and records the original value in the
annotation ``offload.beamlit.com/original-target-port``; restore puts that value back,
a name as a name and a number as a number. Nothing else of any port changes.

Patches are JSON Patches (RFC 6902) that address the one port by its index and start with
a ``test`` of the Service's resourceVersion: Service ports merge on ``port`` alone in a
strategic-merge patch, so two ports with the same number (TCP and UDP) could collapse, and
a concurrent change (a ``kubectl apply`` of the old Service) makes the patch fail rather
than be overwritten; the next reconcile reads the new version.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.injection import ORIGINAL_TARGET_PORT_ANNOTATION, PREFIX
from webhook.injector_config import PROXY_PORT_NAME

CAPTURE_ANNOTATION = PREFIX + "capture"  # "false": the controller never changes this Service
CAPTURED_BY_ANNOTATION = PREFIX + "captured-by"  # the ModelDeployment that captured it


@dataclass(frozen=True)
class ChosenPort:
    index: int
    port: Mapping[str, Any]

    @property
    def target(self) -> int | str:
        value = self.port.get("targetPort")
        return self.port.get("port", 0) if value in (None, "") else value

    @property
    def captured(self) -> bool:
        return self.target == PROXY_PORT_NAME


@dataclass(frozen=True)
class Uncapturable:
    """Why a Service cannot be captured: a CamelCase reason and a sentence."""

    reason: str
    message: str


def annotations(service: Mapping[str, Any]) -> Mapping[str, str]:
    meta = service.get("metadata") or {}
    value = meta.get("annotations") if isinstance(meta, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def opted_out(service: Mapping[str, Any]) -> bool:
    return str(annotations(service).get(CAPTURE_ANNOTATION, "")).lower() == "false"


def _ports(service: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = service.get("spec") or {}
    ports = spec.get("ports") if isinstance(spec, Mapping) else None
    return [p for p in ports if isinstance(p, Mapping)] if isinstance(ports, list) else []


def choose_port(service: Mapping[str, Any], target_port: int | None) -> ChosenPort | Uncapturable:
    """The Service port to capture, or why there is none (headless, ExternalName, ...)."""
    spec = service.get("spec") or {}
    name = (service.get("metadata") or {}).get("name", "")
    if spec.get("type") == "ExternalName":
        return Uncapturable(
            "ExternalNameService", f"Service {name} is of type ExternalName: it has no endpoints"
        )
    if spec.get("clusterIP") == "None":
        return Uncapturable(
            "HeadlessService",
            f"Service {name} is headless (clusterIP: None): clients resolve pod addresses "
            "and bypass any targetPort",
        )
    if not spec.get("selector"):
        return Uncapturable(
            "ServiceWithoutSelector", f"Service {name} has no selector: its endpoints are not the workload's"
        )
    tcp = [(i, p) for i, p in enumerate(_ports(service)) if p.get("protocol", "TCP") == "TCP"]
    if not tcp:
        return Uncapturable("NoTCPPort", f"Service {name} has no TCP port")
    if target_port is None:
        return ChosenPort(*tcp[0])
    for i, port in tcp:
        if port.get("port") == target_port:
            return ChosenPort(i, port)
    for i, port in tcp:
        if ChosenPort(i, port).target == target_port:
            return ChosenPort(i, port)
    numbers = ", ".join(str(p.get("port")) for _, p in tcp)
    return Uncapturable(
        "ServicePortNotFound",
        f"Service {name} has no TCP port {target_port} (serviceRef.targetPort); its TCP ports: {numbers}",
    )


def original_target(service: Mapping[str, Any]) -> int | str | None:
    """The recorded original targetPort: an integer when it was one, else a name."""
    value = annotations(service).get(ORIGINAL_TARGET_PORT_ANNOTATION)
    if not isinstance(value, str) or not value:
        return None
    # Port names must contain a letter (IANA_SVC_NAME), so digits are a number.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 5 else value


def _escape(key: str) -> str:
    """A JSON Pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _version_test(service: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": (service.get("metadata") or {}).get("resourceVersion", ""),
    }


def capture_patch(service: Mapping[str, Any], chosen: ChosenPort, owner: str) -> list[dict[str, Any]]:
    """JSON Patch pointing the chosen port at the sidecar and recording the original."""
    ops: list[dict[str, Any]] = [_version_test(service)]
    if not annotations(service):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops += [
        {
            "op": "add",
            "path": f"/metadata/annotations/{_escape(ORIGINAL_TARGET_PORT_ANNOTATION)}",
            "value": str(chosen.target),
        },
        {"op": "add", "path": f"/metadata/annotations/{_escape(CAPTURED_BY_ANNOTATION)}", "value": owner},
        {"op": "replace", "path": f"/spec/ports/{chosen.index}/targetPort", "value": PROXY_PORT_NAME},
    ]
    return ops


def restore_patch(service: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """JSON Patch putting back every captured port's recorded target, and dropping the
    product's annotations; None when there is nothing to undo."""
    notes = annotations(service)
    original = original_target(service)
    ops: list[dict[str, Any]] = []
    for i, port in enumerate(_ports(service)):
        if port.get("targetPort") == PROXY_PORT_NAME and original is not None:
            ops.append({"op": "replace", "path": f"/spec/ports/{i}/targetPort", "value": original})
    for key in (ORIGINAL_TARGET_PORT_ANNOTATION, CAPTURED_BY_ANNOTATION):
        if key in notes:
            ops.append({"op": "remove", "path": f"/metadata/annotations/{_escape(key)}"})
    return [_version_test(service), *ops] if ops else None


def captured_by(service: Mapping[str, Any]) -> str | None:
    value = annotations(service).get(CAPTURED_BY_ANNOTATION)
    return value if isinstance(value, str) and value else None
