"""The seams between the sidecar's parts, as small typed protocols, and their null sources.

    ConfigSource  --ModelDeployment|None-->  the sidecar  <--observations--  MetricSource
                                                  |
                                   decision engine (pure) -> RoutingTable -> proxy

Standalone mode implements the sources with a file and the local cgroup and steps the
shared decision engine (crds/decision.py) itself; cluster mode watches its
ModelDeployment and follows the decision the controller publishes in its status, so it
has no MetricSource. The routing policy never knows which.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from crds.model import ModelDeployment, OffloadingConfig
from crds.observation import MetricObservation


class ConfigSource(Protocol):
    """Yields the sidecar's ModelDeployment every time it changes.

    None means absent, deleted or invalid (pass-through to the local model).
    """

    def updates(self) -> AsyncIterator[ModelDeployment | None]: ...


class MetricSource(Protocol):
    """Evaluates ``config.metrics`` now: one observation per metric, in order.

    The whole offloadingConfig is given, from the configuration the caller holds, because
    some metrics need more than their own spec (a model gauge's scrape settings in
    ``modelMetrics``); a source reads nothing of the configuration by any other route.
    """

    async def observe(self, config: OffloadingConfig) -> list[MetricObservation]: ...


class PassThroughSource:
    """A ConfigSource with nothing to follow: no configuration, ever (pure pass-through).

    The cluster-mode sidecar whose environment or credentials are unusable runs on it,
    up and ready, rather than exiting."""

    async def updates(self) -> AsyncIterator[ModelDeployment | None]:
        yield None
        await asyncio.Event().wait()  # until cancelled


class NoMetrics:
    """A MetricSource that can read nothing (each metric unknown)."""

    async def observe(self, config: OffloadingConfig) -> list[MetricObservation]:
        return [MetricObservation(str(m.type), None, 1.0, "no metrics source") for m in config.metrics]
