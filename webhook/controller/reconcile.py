"""What one ModelDeployment wants done, as a pure function of what the cache shows.

``plan(world, settings)`` looks at the ModelDeployment, its workload, Service, pods and
RoleBinding and returns a ``Plan``: the finalizer to add or remove, the JSON Patch for the
Service (capture or restore), the RoleBinding action, and the conditions. The shell
(``runner``) carries it out in that order and writes the status; running it twice, after a
crash or on a stale cache converges, because every action is derived from the objects, not
from memory (controller-runtime's level-triggered reconcile).

The rules (README, "The controller"):

- The finalizer is added before the first side effect and removed after the last cleanup.
  A ModelDeployment being deleted, disabled (``enabled: false``), in a namespace being
  deleted, or released (the controller turned off) gets its Service restored; deleted or
  released ones also lose their RoleBinding and finalizer. Nothing is created in a
  namespace being deleted.
- Capture only while every ready pod the Service selects carries the sidecar (a named
  targetPort resolves only in pods that declare it) and at least one selected pod does.
  When that stops holding, restore until it holds again: a captured Service never has fewer
  ready endpoints than without the product.
- A Service annotated ``offload.beamlit.com/capture: "false"`` is never changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crds.model import ModelDeployment
from webhook.controller import capture, rbac
from webhook.controller import pods as podq
from webhook.controller.conditions import (
    INJECTED,
    OFFLOADING,
    READY,
    SIDECAR_RBAC,
    TRAFFIC_CAPTURED,
    VALID,
    Condition,
)

FINALIZER = "offload.beamlit.com/controller"


@dataclass(frozen=True)
class Settings:
    sidecar_cluster_role: str
    release: bool = False  # the controller is turned off: undo everything, create nothing


@dataclass(frozen=True)
class World:
    """What the cache shows for one ModelDeployment (raw API objects)."""

    md: Mapping[str, Any]
    model: ModelDeployment | None  # None: invalid
    invalid_message: str = ""
    workload: Mapping[str, Any] | None = None
    workload_pods: Sequence[Mapping[str, Any]] = ()
    service: Mapping[str, Any] | None = None
    service_pods: Sequence[Mapping[str, Any]] = ()  # pods the Service selects
    rolebinding: Mapping[str, Any] | None = None  # the one with our name, if any
    namespace_terminating: bool = False
    offloading: Condition | None = None  # from the decision, when there is one


@dataclass(frozen=True)
class Plan:
    add_finalizer: bool = False
    remove_finalizer: bool = False
    service_patch: list[dict[str, Any]] | None = None
    service_patch_why: str = ""  # "capture" or "restore"
    rolebinding: rbac.Action | None = None
    conditions: list[Condition] = field(default_factory=list)
    injected: str = ""  # "2/3": ready workload pods with the sidecar / ready workload pods
    without_sidecar: int = 0  # ready workload pods without the sidecar
    captured: bool = False


def _meta(md: Mapping[str, Any]) -> Mapping[str, Any]:
    return md.get("metadata") or {}


def _spec_enabled(md: Mapping[str, Any]) -> bool:
    return (md.get("spec") or {}).get("enabled", True) is not False


def plan(world: World, settings: Settings) -> Plan:
    md = world.md
    meta = _meta(md)
    name = str(meta.get("name"))
    has_finalizer = FINALIZER in (meta.get("finalizers") or [])
    deleting = bool(meta.get("deletionTimestamp"))
    ours = world.service is not None and capture.captured_by(world.service) == name
    restore = capture.restore_patch(world.service) if ours and world.service is not None else None

    if deleting or settings.release or world.namespace_terminating:
        binding = world.rolebinding
        action = rbac.plan(binding, None, md) if binding is not None else None
        why = "deleted" if deleting else ("released" if settings.release else "namespace terminating")
        return Plan(
            remove_finalizer=has_finalizer,
            service_patch=restore,
            service_patch_why="restore" if restore else "",
            rolebinding=action,
            conditions=[
                Condition(READY, False, _camel(why), f"the controller released this ModelDeployment ({why})")
            ]
            if settings.release and not deleting
            else [],
        )

    conditions: list[Condition] = []
    add_finalizer = not has_finalizer

    if world.model is None:
        conditions += [
            Condition(VALID, False, "Invalid", world.invalid_message or "the ModelDeployment is invalid"),
            Condition(READY, False, "Invalid", "the sidecars pass every request to the local model"),
        ]
        return Plan(add_finalizer=add_finalizer, conditions=conditions)
    conditions.append(Condition(VALID, True, "Valid", "the ModelDeployment is valid"))
    model = world.model

    # -- the workload and its pods --
    ref = model.spec.model_source_ref
    if world.workload is None:
        message = f"{ref.kind} {ref.name} not found in namespace {model.namespace}"
        conditions += [
            Condition(INJECTED, False, "WorkloadNotFound", message),
            Condition(READY, False, "WorkloadNotFound", message),
        ]
        return Plan(add_finalizer=add_finalizer, conditions=conditions, service_patch=None)
    ready = [p for p in world.workload_pods if podq.is_ready(p)]
    bare = [p for p in ready if not podq.has_sidecar(p)]
    injected = f"{len(ready) - len(bare)}/{len(ready)}"
    if bare:
        conditions.append(
            Condition(
                INJECTED,
                False,
                "PodsWithoutSidecar",
                f"{len(bare)} of {len(ready)} ready pods carry no sidecar: {podq.names(bare)} "
                "(created while the webhook was down or opted out; restart them to inject)",
            )
        )
    else:
        conditions.append(
            Condition(INJECTED, True, "AllPodsInjected", f"{injected} ready pods carry the sidecar")
        )

    # -- the RoleBinding --
    want = rbac.desired(md, settings.sidecar_cluster_role, rbac.service_account_of(world.workload))
    binding_action = rbac.plan(world.rolebinding, want, md)
    if binding_action is not None and binding_action.verb == "conflict":
        conditions.append(
            Condition(
                SIDECAR_RBAC,
                False,
                "RoleBindingConflict",
                f"RoleBinding {rbac.binding_name(name)} exists and is not this ModelDeployment's; "
                "the sidecars may be unable to read their ModelDeployment",
            )
        )
        binding_action = None
    else:
        sa = want["subjects"][0]["name"]
        conditions.append(
            Condition(
                SIDECAR_RBAC, True, "Bound", f"{settings.sidecar_cluster_role} bound to ServiceAccount {sa}"
            )
        )

    # -- the Service --
    patch, why, capture_cond, captured = _service(
        world, model, name, ours, restore, enabled=_spec_enabled(md)
    )
    conditions.append(capture_cond)

    if world.offloading is not None:
        conditions.append(world.offloading)
    problems = [c for c in conditions if c.status is False and c.type not in (OFFLOADING,)]
    if not _spec_enabled(md):
        conditions.append(
            Condition(READY, False, "Disabled", "enabled: false; the sidecars pass every request through")
        )
    elif problems:
        conditions.append(Condition(READY, False, problems[0].reason, problems[0].message))
    else:
        conditions.append(Condition(READY, True, "Ready", "traffic passes through the sidecars"))
    return Plan(
        add_finalizer=add_finalizer,
        service_patch=patch,
        service_patch_why=why,
        rolebinding=binding_action,
        conditions=conditions,
        injected=injected,
        without_sidecar=len(bare),
        captured=captured,
    )


def _service(
    world: World,
    model: ModelDeployment,
    name: str,
    ours: bool,
    restore: list[dict[str, Any]] | None,
    *,
    enabled: bool,
) -> tuple[list[dict[str, Any]] | None, str, Condition, bool]:
    """(patch, "capture"/"restore"/"", the TrafficCaptured condition, captured after the patch)."""
    ref = model.spec.service_ref
    if ref is None:
        return (
            None,
            "",
            Condition(TRAFFIC_CAPTURED, False, "NoServiceRef", "the ModelDeployment names no Service"),
            False,
        )
    if ref.namespace not in (None, "", model.namespace):
        message = f"Service {ref.namespace}/{ref.name} is in another namespace than the ModelDeployment ({model.namespace})"
        return None, "", Condition(TRAFFIC_CAPTURED, False, "ServiceInOtherNamespace", message), False
    service = world.service
    if service is None:
        message = f"Service {ref.name} not found in namespace {model.namespace}"
        return None, "", Condition(TRAFFIC_CAPTURED, False, "ServiceNotFound", message), False
    chosen = capture.choose_port(service, ref.target_port)
    if isinstance(chosen, capture.Uncapturable):
        return None, "", Condition(TRAFFIC_CAPTURED, False, chosen.reason, chosen.message), False
    port = chosen.port.get("port")
    if capture.opted_out(service):
        state = "points at" if chosen.captured else "does not point at"
        message = (
            f'Service {ref.name} is annotated {capture.CAPTURE_ANNOTATION}: "false"; its port {port} '
            f"{state} offload-proxy (managed outside the controller)"
        )
        return (
            None,
            "",
            Condition(TRAFFIC_CAPTURED, chosen.captured, "CaptureOptedOut", message),
            chosen.captured,
        )
    other = capture.captured_by(service)
    if other is not None and other != name:
        message = f"Service {ref.name} is captured by ModelDeployment {other}"
        return None, "", Condition(TRAFFIC_CAPTURED, False, "CapturedByAnother", message), False

    if not enabled:
        message = f"enabled: false; Service {ref.name} port {port} points at the model"
        if restore:
            return restore, "restore", Condition(TRAFFIC_CAPTURED, False, "Disabled", message), False
        return None, "", Condition(TRAFFIC_CAPTURED, False, "Disabled", message), chosen.captured

    ready = [p for p in world.service_pods if podq.is_ready(p)]
    bare = [p for p in ready if not podq.has_sidecar(p)]
    injected_any = any(podq.has_sidecar(p) for p in world.service_pods)
    if bare:
        message = (
            f"{len(bare)} ready pods selected by Service {ref.name} carry no sidecar ({podq.names(bare)}); "
            "capturing would take them out of the Service"
        )
        if ours and chosen.captured and restore:
            return (
                restore,
                "restore",
                Condition(TRAFFIC_CAPTURED, False, "PodsWithoutSidecar", message),
                False,
            )
        return None, "", Condition(TRAFFIC_CAPTURED, False, "PodsWithoutSidecar", message), chosen.captured
    if not injected_any:
        message = (
            f"no pod selected by Service {ref.name} carries the sidecar yet (restart the workload to inject)"
        )
        return None, "", Condition(TRAFFIC_CAPTURED, False, "WaitingForInjection", message), chosen.captured
    original = capture.original_target(service) if chosen.captured else chosen.target
    message = f"Service {ref.name} port {port} points at offload-proxy (originally {original})"
    condition = Condition(TRAFFIC_CAPTURED, True, "Captured", message)
    if chosen.captured:
        return None, "", condition, True
    return capture.capture_patch(service, chosen, name), "capture", condition, True


def _camel(text: str) -> str:
    return "".join(word.capitalize() for word in text.split())
