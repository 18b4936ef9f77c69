"""Which ModelDeployment, if any, selects a pod (pure).

A pod is selected when an enabled ModelDeployment of its namespace names a workload
(Deployment or StatefulSet) whose label selector matches the pod's labels. Labels alone
can overlap between workloads, so a pod whose controller is plainly something else (a
Job, a DaemonSet, the ReplicaSet of another Deployment) is not the workload's pod even
when its labels match: that is reported, not injected.

A workload's label selector is read into ``crds.model.LabelSelector`` (metav1.LabelSelector:
matchLabels and matchExpressions are ANDed; In, NotIn, Exists, DoesNotExist); an empty
selector matches every pod (apps/v1 refuses empty selectors on workloads, so that case only
arises from hand-made data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from crds.model import LabelSelector, LabelSelectorRequirement, ModelDeployment
from webhook.reasons import Reason

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


# --- label selectors ---------------------------------------------------------------------------


def parse_label_selector(data: Any, path: str = "selector") -> LabelSelector:
    """A metav1.LabelSelector from JSON data; ValueError naming the field at fault."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be an object")
    labels = data.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{path}.matchLabels: must be an object")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}.matchLabels[{key}]: must be a string")
    expressions = data.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise ValueError(f"{path}.matchExpressions: must be a list")
    requirements = []
    for i, expr in enumerate(expressions):
        where = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, dict) or not isinstance(expr.get("key"), str):
            raise ValueError(f"{where}.key: required string")
        operator = expr.get("operator")
        if operator not in OPERATORS:
            raise ValueError(f"{where}.operator: must be one of {', '.join(OPERATORS)}, got {operator!r}")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}.values: must be a list of strings")
        if operator in ("In", "NotIn") and not values:
            raise ValueError(f"{where}.values: must be non-empty for {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"{where}.values: must be empty for {operator}")
        requirements.append(LabelSelectorRequirement(expr["key"], operator, tuple(values)))
    return LabelSelector(dict(labels), tuple(requirements))


# --- workloads and candidates ------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What selection needs of a Deployment or StatefulSet."""

    kind: str
    namespace: str
    name: str
    selector: LabelSelector | None  # None: the object's selector is unusable, matches nothing


@dataclass(frozen=True)
class CachedModelDeployment:
    """A valid ModelDeployment as the cache holds it."""

    model: ModelDeployment
    creation_timestamp: str = ""  # RFC 3339 in UTC: sorts as time does

    @property
    def order(self) -> tuple[str, str]:
        return (self.creation_timestamp, self.model.name)


@dataclass(frozen=True)
class Owner:
    """The pod's controller ownerReference, if any."""

    kind: str
    name: str


def pod_controller(pod: Mapping[str, Any]) -> Owner | None:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs:
        if isinstance(ref, dict) and ref.get("controller") is True:
            return Owner(str(ref.get("kind") or ""), str(ref.get("name") or ""))
    return None


def controlled_by_workload(owner: Owner | None, workload: Workload) -> bool:
    """Could this controller be the workload's? A bare pod (no controller) could be adopted."""
    if owner is None:
        return True
    if workload.kind == "Deployment":
        # The Deployment's ReplicaSets are named <deployment>-<pod-template-hash>, the hash
        # without dashes (so ReplicaSet "llm-twin-5d4c" is not Deployment "llm"'s).
        prefix = workload.name + "-"
        suffix = owner.name[len(prefix) :]
        return (
            owner.kind == "ReplicaSet"
            and owner.name.startswith(prefix)
            and bool(suffix)
            and "-" not in suffix
        )
    return owner.kind == workload.kind and owner.name == workload.name


# --- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The ModelDeployment ``chosen`` for a pod, or ``reason`` (NoMatchingModelDeployment,
    ModelDeploymentDisabled, OwnedByAnotherController) why none was, and a sentence."""

    reason: Reason | None  # None when one was chosen
    chosen: CachedModelDeployment | None = None
    workload: Workload | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def selected(self) -> bool:
        return self.chosen is not None


WorkloadLookup = Callable[[str, str, str], "Workload | None"]  # (kind, namespace, name)


def select(
    namespace: str,
    labels: Mapping[str, str],
    owner: Owner | None,
    candidates: Iterable[CachedModelDeployment],
    workload_of: WorkloadLookup,
) -> Selection:
    """Pick the ModelDeployment that selects a pod of ``namespace`` with these labels.

    ``candidates`` are the ModelDeployments of the pod's namespace (the cache's index), so
    the cost is that namespace's count, not the cluster's. Several enabled matches: the
    oldest (creationTimestamp, then name) wins and a warning names the others.
    """
    enabled: list[tuple[CachedModelDeployment, Workload]] = []
    disabled: list[CachedModelDeployment] = []
    other_controller: list[tuple[CachedModelDeployment, Workload]] = []
    for cand in candidates:
        md = cand.model
        if md.namespace != namespace or md.workload_namespace != namespace:
            continue  # a workload's pods live in the workload's namespace
        ref = md.spec.model_source_ref
        workload = workload_of(ref.kind, namespace, ref.name)
        if workload is None or workload.selector is None or not workload.selector.matches(labels):
            continue
        if not controlled_by_workload(owner, workload):
            other_controller.append((cand, workload))
        elif md.spec.enabled:
            enabled.append((cand, workload))
        else:
            disabled.append(cand)
    if enabled:
        enabled.sort(key=lambda pair: pair[0].order)
        chosen, workload = enabled[0]
        warnings: tuple[str, ...] = ()
        if len(enabled) > 1:
            others = ", ".join(c.model.name for c, _ in enabled[1:])
            warnings = (
                (
                    f"offload: several ModelDeployments select this pod; using the oldest, "
                    f"{chosen.model.name!r} (also: {others})"
                ),
            )
        return Selection(None, chosen, workload, f"selected by ModelDeployment {chosen.model.name}", warnings)
    if disabled:
        names = ", ".join(sorted(c.model.name for c in disabled))
        return Selection(
            Reason.MODELDEPLOYMENT_DISABLED,
            message=f"ModelDeployment {names} selects this pod but is disabled",
        )
    if other_controller:
        cand, workload = min(other_controller, key=lambda pair: pair[0].order)
        assert owner is not None
        message = (
            f"labels match {workload.kind} {workload.name!r} of ModelDeployment {cand.model.name!r}, "
            f"but the pod is controlled by {owner.kind} {owner.name!r}"
        )
        return Selection(Reason.OWNED_BY_ANOTHER_CONTROLLER, message=message)
    return Selection(
        Reason.NO_MATCHING_MODELDEPLOYMENT, message="no enabled ModelDeployment selects this pod"
    )
