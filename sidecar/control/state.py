"""The offloading state of one sidecar: the configuration, the decision and the credentials
in force, and the RoutePlan they make.

    ConfigSource --ModelDeployment|None--> apply_config ---+
    MetricSource --observations-----------> evaluate ------+--> plan() --> RoutingTable
    (standalone: crds.decision.step)                       |
    published decision (cluster: follow_published) --------+
    credentials (OAuth header, headersFromSecrets) --------+

Standalone mode decides locally from its MetricSource; cluster mode follows the decision
the controller publishes in the ModelDeployment's status. Everything after the decision
is the same code. Clocks are passed in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from crds.decision import INITIAL, Decision, DecisionState, step
from crds.model import ModelDeployment
from crds.observation import MetricObservation
from crds.status import PublishedDecision
from sidecar.control.interfaces import MetricSource
from sidecar.control.plan import passthrough_reason, plan_for
from sidecar.control.published import follow_published
from sidecar.control.view import ControlView
from sidecar.credentials.headers import SecretHeaders, with_secret_headers
from sidecar.credentials.oauth import with_authorization
from sidecar.proxy.routing import CaBundleContexts, RoutePlan, RoutingTable

log = logging.getLogger("sidecar.control.state")


class OffloadingState:
    """The offloading state of one sidecar; ``apply_config`` and ``evaluate`` move it.

    Owns the RoutingTable's plan. Decides locally from ``metrics`` (standalone), or
    follows the controller's decision that ``published`` returns (cluster mode).
    Clocks are passed in: ``clock`` (monotonic seconds) drives the local decision
    windows, ``wall`` (seconds since the epoch) dates the transitions shown and ages
    the published decision.
    """

    def __init__(
        self,
        routing: RoutingTable,
        metrics: MetricSource | None,
        *,
        published: Callable[[], PublishedDecision | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        mode: str = "standalone",
        source: str = "",
        upstream: str = "",
        listen: str = "",
        config_errors: Callable[[], tuple[str, ...]] = tuple,
    ):
        self.routing = routing
        self.metrics = metrics
        self.published = published
        self.published_view: dict[str, Any] | None = None
        self.clock = clock
        self.wall = wall
        self.mode = mode
        self.source = source
        self.upstream = upstream
        self.listen = listen
        self.config_errors = config_errors
        self.model: ModelDeployment | None = None
        self.state: DecisionState = INITIAL
        self.decision: Decision | None = None
        self.observations: tuple[MetricObservation, ...] = ()
        self.offloading_since: float | None = None
        self.transitions = {"on": 0, "off": 0}
        self.authorization: str | None = None  # the remote's Authorization header, when it needs one
        self.needs_authorization = False
        self.secret_headers: SecretHeaders | None = None  # headersFromSecrets, when the remote has any
        self.ssl_contexts = CaBundleContexts()
        self._reason = "starting"
        self._lock = asyncio.Lock()

    # -- inputs ---------------------------------------------------------------------------------

    def apply_config(self, model: ModelDeployment | None) -> None:
        previous = self.model
        self.model = model
        why_not = passthrough_reason(model)
        if why_not is not None:
            if self.state.offloading:
                self._transition(False, why_not)
            self.state = INITIAL
            self.decision = None
            self.observations = ()
            self.published_view = None
            if why_not != self._reason:
                log.info("pass-through: %s", why_not.split(":")[0])
            self._reason = why_not
        elif previous is None or passthrough_reason(previous) is not None:
            log.info("offloading configured: %s", self._describe_target(model))
        self._publish()

    def set_authorization(self, header: str | None) -> None:
        """The remote's current Authorization header (None: no token: serve locally)."""
        self.authorization = header
        self._publish()

    def set_secret_headers(self, headers: SecretHeaders | None) -> None:
        """The remote's headersFromSecrets as last read (None: it has none)."""
        self.secret_headers = headers
        self._publish()

    async def evaluate(self) -> Decision | None:
        """Decide once (observe and step, or follow the published decision), publish the plan."""
        async with self._lock:
            model = self.model
            if passthrough_reason(model) is not None:
                return None
            assert model is not None and model.spec.offloading_config is not None
            config = model.spec.offloading_config
            if self.published is not None:
                published = self.published()
                now = datetime.fromtimestamp(self.wall(), UTC)
                decision, self.published_view = follow_published(self.state, published, now)
                observations = list(published.observations) if published is not None else []
            else:
                assert self.metrics is not None
                observations = await self.metrics.observe(config) if config.metrics else []
                if model is not self.model:
                    return None  # the configuration changed while observing: the next poll decides
                decision = step(self.state, observations, self.clock(), config.behavior)
            self.observations = tuple(observations)
            self.decision = decision
            self.state = decision.state
            self._reason = decision.reason
            if decision.changed:
                self._transition(decision.offloading, decision.reason)
            self._publish()
            return decision

    # -- outputs --------------------------------------------------------------------------------

    def _transition(self, offloading: bool, reason: str) -> None:
        if offloading:
            self.transitions["on"] += 1
            self.offloading_since = self.wall()
            plan = plan_for(self.model, True, self.ssl_contexts)
            log.info(
                "offloading started: %d%% of requests to %s: %s",
                plan.percentage,
                self._describe_target(self.model),
                reason,
            )
        else:
            self.transitions["off"] += 1
            self.offloading_since = None
            log.info("offloading stopped: every request to the local model: %s", reason)

    def _describe_target(self, model: ModelDeployment | None) -> str:
        plan = plan_for(model, False, self.ssl_contexts)  # the shared contexts: no new SSLContext
        if plan.remote is None:
            return "nowhere"
        r = plan.remote
        return f"{r.scheme}://{r.authority}{r.path_prefix}"

    def remote_unavailable(self) -> str | None:
        """Why the configured remote cannot be used now (its credentials), or None."""
        if passthrough_reason(self.model) is not None:
            return None
        if self.secret_headers is not None and self.secret_headers.problem is not None:
            return self.secret_headers.problem
        if self.needs_authorization and self.authorization is None:
            return "no OAuth access token for the remote (see the sidecar's log)"
        return None

    def plan(self) -> RoutePlan:
        plan = plan_for(self.model, self.state.offloading, self.ssl_contexts)
        if plan.remote is None:
            return plan
        if self.remote_unavailable() is not None:
            return replace(plan, remote=None)  # without its credentials the remote would refuse
        remote = plan.remote
        if self.secret_headers is not None:
            remote = replace(remote, headers=with_secret_headers(remote.headers, self.secret_headers.headers))
        if self.needs_authorization:
            remote = with_authorization(remote, self.authorization)
        return replace(plan, remote=remote)

    def _publish(self) -> None:
        plan = self.plan()
        if plan != self.routing.plan:
            self.routing.update(plan)

    def view(self) -> ControlView:
        return ControlView(
            mode=self.mode,
            source=self.source,
            model=self.model,
            config_errors=self.config_errors(),
            observations=self.observations,
            decision=self.decision,
            plan=self.routing.plan,
            reason=self._reason,
            remote_unavailable=self.remote_unavailable(),
            offloading_since=self.offloading_since,
            transitions=tuple(self.transitions.items()),
            published=self.published_view,
            spillovers=self.routing.spillovers,
            upstream=self.upstream,
            listen=self.listen,
        )
