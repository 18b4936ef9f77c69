"""Status conditions as the Kubernetes API conventions describe them.

A condition is ``{type, status, reason, message, lastTransitionTime, observedGeneration}``;
``status`` is "True", "False" or "Unknown", ``reason`` a CamelCase code. As apimachinery's
``meta.SetStatusCondition`` does, ``lastTransitionTime`` moves only when ``status``
changes, so re-deriving the same conditions every reconcile writes nothing new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Condition types, in the order they are written.
READY = "Ready"
VALID = "Valid"
INJECTED = "Injected"
TRAFFIC_CAPTURED = "TrafficCaptured"
OFFLOADING = "Offloading"
SIDECAR_RBAC = "SidecarRBACReady"
REMOTE_STANDING_IN = "RemoteStandingIn"  # webhook.controller.standin
TYPES = (READY, VALID, INJECTED, TRAFFIC_CAPTURED, OFFLOADING, SIDECAR_RBAC, REMOTE_STANDING_IN)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def merge(
    previous: Sequence[Mapping[str, Any]] | None,
    current: Sequence[Condition],
    *,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """The conditions to write: ``current`` in TYPES order, keeping each previous
    ``lastTransitionTime`` whose status did not change. Types not in ``current`` are dropped."""
    before = {c.get("type"): c for c in previous or () if isinstance(c, Mapping)}
    out = []
    for cond in sorted(current, key=lambda c: TYPES.index(c.type) if c.type in TYPES else len(TYPES)):
        old = before.get(cond.type)
        same = old is not None and old.get("status") == cond.status_text and old.get("lastTransitionTime")
        out.append(
            {
                "type": cond.type,
                "status": cond.status_text,
                "reason": cond.reason,
                "message": cond.message,
                "lastTransitionTime": old["lastTransitionTime"] if same and old else now,
                "observedGeneration": generation,
            }
        )
    return out


def transitions(
    previous: Sequence[Mapping[str, Any]] | None, current: Sequence[Condition]
) -> list[Condition]:
    """Conditions whose status or reason differs from before: what deserves an Event."""
    before = {c.get("type"): c for c in previous or () if isinstance(c, Mapping)}
    changed = []
    for cond in current:
        old = before.get(cond.type)
        if old is None or old.get("status") != cond.status_text or old.get("reason") != cond.reason:
            changed.append(cond)
    return changed
