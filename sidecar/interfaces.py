"""The seams between the sidecar's parts, as small typed protocols.

    ConfigSource  --ModelDeployment|None-->  the sidecar  <--observations--  MetricSource
                                                  |
                                   decision engine (pure) -> RoutingTable -> proxy

Standalone mode implements the sources with a file and the local cgroup; cluster
mode with the API server and metrics.k8s.io. The decision engine and the routing
policy never know which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from crds.model import MetricSpec, ModelDeployment


@dataclass(frozen=True)
class MetricObservation:
    """One metric of the offloadingConfig, evaluated once.

    ``current`` and ``target`` are in the metric's own unit (percent for
    Utilization, the quantity for AverageValue/Value). ``current`` is None when
    the metric could not be read; ``reason`` says why, or how it was computed.
    """

    metric: str  # display name, e.g. "resource cpu on pods (as a percentage of request)"
    current: float | None
    target: float
    reason: str = ""

    @property
    def ratio(self) -> float | None:
        if self.current is None:
            return None
        return self.current / self.target

    def display(self) -> str:
        """Like the HPA's TARGETS column: ``73%/50%`` or ``<unknown>/50%``."""
        unit = "%" if "percent" in self.metric else ""
        current = "<unknown>" if self.current is None else f"{self.current:g}{unit}"
        return f"{current}/{self.target:g}{unit}"


class ConfigSource(Protocol):
    """Yields the sidecar's ModelDeployment every time it changes.

    None means absent, deleted or invalid (pass-through to the local model).
    """

    def updates(self) -> AsyncIterator[ModelDeployment | None]: ...


class MetricSource(Protocol):
    """Evaluates the given metrics now; one observation per metric, in order."""

    async def observe(self, metrics: tuple[MetricSpec, ...]) -> list[MetricObservation]: ...
