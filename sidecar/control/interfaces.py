"""The seams between the sidecar's parts, as small typed protocols.

    ConfigSource  --ModelDeployment|None-->  the sidecar  <--observations--  MetricSource
                                                  |
                                   decision engine (pure) -> RoutingTable -> proxy

Standalone mode implements the sources with a file and the local cgroup and steps the
shared decision engine (crds/decision.py) itself; cluster mode watches its
ModelDeployment and follows the decision the controller publishes in its status, so it
has no MetricSource. The routing policy never knows which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from crds.model import MetricSpec, ModelDeployment
from crds.observation import MetricObservation


class ConfigSource(Protocol):
    """Yields the sidecar's ModelDeployment every time it changes.

    None means absent, deleted or invalid (pass-through to the local model).
    """

    def updates(self) -> AsyncIterator[ModelDeployment | None]: ...


class MetricSource(Protocol):
    """Evaluates the given metrics now; one observation per metric, in order."""

    async def observe(self, metrics: tuple[MetricSpec, ...]) -> list[MetricObservation]: ...
