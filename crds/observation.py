"""One evaluated metric: what the decision engine (crds/decision.py) reads.

Produced by the HPA arithmetic (crds/hpa.py) in the controller, and by the local
cgroup reader in the standalone sidecar; shared so that both feed one engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Unit = Literal["percent", "quantity"]  # percent of the request (Utilization), or the quantity itself


def unit_of(target_type: str) -> Unit:
    """The unit of a MetricTarget of this type (autoscaling/v2): a Utilization target is a
    percentage of the pods' request, AverageValue and Value are quantities.

    >>> unit_of("Utilization"), unit_of("AverageValue")
    ('percent', 'quantity')
    """
    return "percent" if target_type == "Utilization" else "quantity"


@dataclass(frozen=True)
class MetricObservation:
    """One metric of the offloadingConfig, evaluated once.

    ``current`` and ``target`` are in the metric's own unit (percent for
    Utilization, the quantity for AverageValue/Value). ``current`` is None when
    the metric could not be read; ``reason`` says why, or how it was computed.
    ``type`` is the MetricSpec's type (Resource, Pods, ...), empty when unknown;
    ``unit`` the unit of ``current`` and ``target`` (:func:`unit_of` the target's type).
    """

    metric: str  # display name, e.g. "resource cpu on pods (as a percentage of request)"
    current: float | None
    target: float
    reason: str = ""
    type: str = ""
    unit: Unit = "quantity"

    @property
    def percent(self) -> bool:
        return self.unit == "percent"

    @property
    def ratio(self) -> float | None:
        if self.current is None:
            return None
        return self.current / self.target

    def display(self) -> str:
        """Like the HPA's TARGETS column: ``73%/50%`` or ``<unknown>/50%``."""
        unit = "%" if self.percent else ""
        current = "<unknown>" if self.current is None else f"{self.current:g}{unit}"
        return f"{current}/{self.target:g}{unit}"
