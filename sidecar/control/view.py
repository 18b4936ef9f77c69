"""What the control side knows at one moment: the input of /status and /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crds.decision import Decision
from crds.model import ModelDeployment
from crds.observation import MetricObservation
from sidecar.proxy.routing import RoutePlan


@dataclass(frozen=True)
class ControlView:
    """A snapshot of the sidecar's offloading state. The renderers (sidecar/admin) keep
    every secret it reaches (header values, client secrets) out of what they serve."""

    mode: str = "standalone"  # or "cluster", "gateway"
    source: str = ""  # the config file, or namespace/name in the cluster
    model: ModelDeployment | None = None
    config_errors: tuple[str, ...] = ()
    observations: tuple[MetricObservation, ...] = ()
    decision: Decision | None = None
    plan: RoutePlan = field(default_factory=RoutePlan)
    reason: str = "starting"  # why the plan is what it is (the decision's, or pass-through's)
    remote_unavailable: str | None = None  # why the configured remote is not used (its credentials)
    offloading_since: float | None = None  # wall clock, seconds since the epoch
    transitions: tuple[tuple[str, int], ...] = ()  # (("on", n), ("off", m))
    published: dict[str, Any] | None = None  # cluster mode: the controller's decision, and its age
    spillovers: int = 0  # requests sent to the remote by behavior.spilloverInFlight
    upstream: str = ""
    listen: str = ""
