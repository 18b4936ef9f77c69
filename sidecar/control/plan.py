"""How a configuration and a decision become the data path's RoutePlan. Pure.

A ModelDeployment that is absent, invalid, ``enabled: false`` or without a remote
backend means pass-through (:func:`passthrough_reason`): every request goes to the local
model, whatever was decided.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from crds.model import ModelDeployment
from sidecar.proxy.routing import RemoteTarget, RoutePlan


def passthrough_reason(model: ModelDeployment | None) -> str | None:
    """Why this configuration means pure pass-through, or None when it can offload."""
    if model is None:
        return "no valid ModelDeployment: every request goes to the local model"
    if not model.spec.enabled:
        return "the ModelDeployment is disabled (enabled: false): every request goes to the local model"
    config = model.spec.offloading_config
    if config is None or config.remote_backend is None:
        return "no remoteBackend configured: every request goes to the local model"
    return None


def plan_for(
    model: ModelDeployment | None,
    offloading: bool,
    ssl_context_for: Callable[[str], ssl.SSLContext] | None = None,
) -> RoutePlan:
    """The RoutePlan of a configuration and a decision.

    ``ssl_context_for`` gives the context of the remote's caBundle; pass one
    :class:`~sidecar.proxy.routing.CaBundleContexts` to share contexts between plans.
    """
    if passthrough_reason(model) is not None:
        return RoutePlan()
    assert model is not None and model.spec.offloading_config is not None
    config = model.spec.offloading_config
    assert config.remote_backend is not None
    return RoutePlan(
        remote=RemoteTarget.from_backend(config.remote_backend, ssl_context_for, model=model.spec.model),
        percentage=config.behavior.percentage,
        offloading=offloading,
        spillover=config.behavior.spillover_in_flight,
    )
