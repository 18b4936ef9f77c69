"""The sidecar process: sources -> decision -> RoutingTable -> proxy, plus the admin port.

    ConfigSource ---ModelDeployment|None---> Controller.apply_config ---+
                                                                        |--> RoutingTable --> ProxyServer
    MetricSource --observations every poll--> Controller.evaluate ------+
    (standalone)                              (crds.decision.step, pure)
    or the published status (cluster) ------> (follow_published, pure)

Standalone mode takes the ModelDeployment from a file and CPU from the local
machine, and decides itself (crds/decision.py). Cluster mode (chosen by the injector's
POD_NAMESPACE and MODELDEPLOYMENT_NAME, see
:func:`sidecar.cluster.config.cluster_mode_from_env`) watches its ModelDeployment and
follows the decision the controller publishes in its status (:func:`follow_published`):
one evaluation per ModelDeployment, not one per pod. Everything after the decision is
the same code.

A ModelDeployment that is absent, invalid, ``enabled: false`` or without a
remote backend means pass-through: every request goes to the local model.
SIGTERM (or SIGINT) drains: readiness fails at once, then the proxy finishes
what is in flight up to the shutdown deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crds.decision import INITIAL, NOT_EVALUATED, Decision, DecisionState, step
from crds.model import MetricSpec, ModelDeployment
from crds.observation import MetricObservation
from crds.status import PublishedDecision, format_time
from sidecar.admin import AdminServer, ControlView
from sidecar.control.interfaces import ConfigSource, MetricSource
from sidecar.proxy.server import ProxyServer, ProxySettings
from sidecar.proxy.routing import CaBundleContexts, RemoteTarget, RoutePlan, RoutingTable
from sidecar.credentials.headers import SecretHeaders, with_secret_headers
from sidecar.signals import (
    DEFAULT_WINDOW,
    ModelScraper,
    Sampler,
    SignalBoard,
    SignalMetricSource,
    scrape_target,
)
from sidecar.proxy.stats import ProxyStats

log = logging.getLogger("sidecar")

FIRST_CONFIG_WAIT = 5.0  # seconds the proxy waits for the first configuration before serving


@dataclass(frozen=True)
class SidecarSettings:
    """Everything the process needs, as parsed from the command line."""

    upstream: tuple[str, int]
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    admin_listen: tuple[str, int] = ("0.0.0.0", 9090)
    config_path: Path | None = None  # standalone mode's ModelDeployment file
    secrets_dir: Path | None = None  # standalone mode's Secrets: DIR/<secret name>/<key>
    secret_refresh: float = 60.0  # cluster mode: seconds between reads of a referenced Secret
    poll_interval: float = 1.0  # seconds between metric evaluations (and file checks)
    cpu_request: float | None = None  # cores; the utilization reference
    memory_request: int | None = None  # bytes
    cpu_window: float = 10.0  # seconds of CPU history behind each utilization figure
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cpu_pid: int | None = None  # measure this process tree instead of the cgroup
    shutdown_deadline: float = 30.0
    signal_window: float = DEFAULT_WINDOW  # seconds behind each value of /signals
    pod_name: str = ""  # named in /signals (POD_NAME in a cluster)
    proxy: ProxySettings = field(default_factory=ProxySettings)


class PassThroughSource:
    """A ConfigSource with nothing to follow: no configuration, ever (pure pass-through).

    The cluster-mode sidecar whose environment or credentials are unusable runs on it,
    up and ready, rather than exiting."""

    async def updates(self) -> AsyncIterator[ModelDeployment | None]:
        yield None
        await asyncio.Event().wait()  # until cancelled


class NoMetrics:
    """A MetricSource that can read nothing (each metric unknown)."""

    async def observe(self, metrics: tuple[MetricSpec, ...]) -> list[MetricObservation]:
        return [MetricObservation(str(m.type), None, 1.0, "no metrics source") for m in metrics]


# --- the pure part of the wiring ---------------------------------------------------------------


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


def follow_published(
    state: DecisionState, published: PublishedDecision | None, now: datetime
) -> tuple[Decision, dict[str, Any] | None]:
    """Cluster mode's decision: the controller's, as published in the ModelDeployment's
    status, and what /status shows of it (None when nothing is published). Pure.

    Nothing published yet keeps the current state (off at start). A stale decision
    (not re-evaluated for max(4 periods, 60 s): the controller is down) still stands:
    nothing proves the load changed; the reason and /status say it is stale.
    """
    if published is None:
        what = "offloading continues" if state.offloading else "not offloading"
        reason = f"no decision published in the ModelDeployment's status yet: {what}"
        new = DecisionState(state.offloading, state.since, None, reason, NOT_EVALUATED)
        return Decision(new, state.offloading, reason, False, None, NOT_EVALUATED), None
    age = published.age(now)
    stale = published.stale(now)
    message = published.message or ("offloading" if published.offloading else "not offloading")
    if stale:
        when = "never dated" if age is None else f"evaluated {age:.0f}s ago"
        reason = (
            f"the controller's decision is stale ({when}, bound {published.stale_after:.0f}s) "
            f"and stays in force: {message}"
        )
    else:
        reason = f"controller: {message}"
    readable = [o for o in published.observations if o.ratio is not None]
    deciding = max(readable, key=lambda o: o.ratio or 0.0, default=None)
    since = published.last_transition.timestamp() if published.last_transition is not None else state.since
    new = DecisionState(published.offloading, since, None, reason, published.code or NOT_EVALUATED)
    decision = Decision(
        new,
        published.offloading,
        reason,
        published.offloading != state.offloading,
        deciding.ratio if deciding is not None else None,
        published.code or NOT_EVALUATED,
        deciding,
    )
    view = {
        "observedGeneration": published.observed_generation,
        "reason": published.code,
        "lastTransitionTime": format_time(published.last_transition) if published.last_transition else None,
        "lastEvaluationTime": format_time(published.last_evaluation) if published.last_evaluation else None,
        "ageSeconds": None if age is None else round(age, 1),
        "staleAfterSeconds": published.stale_after,
        "stale": stale,
        "utilization": published.utilization,
    }
    return decision, view


async def supervised(
    what: str,
    run: Callable[[], Awaitable[None]],
    on_failure: Callable[[], None],
    *,
    retry_min: float = 1.0,
    retry_max: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Runs ``run()`` for ever: whenever it ends (a bug, an unexpected error), logs it,
    calls ``on_failure`` (which withdraws what it published) and starts it again,
    backing off from ``retry_min`` to ``retry_max``; a run that lasted longer than
    ``retry_max`` starts the backoff afresh. Cancelling stops it.

    Only the exception's type and where it was raised are logged: its message may
    quote what a remote sent, a token for instance.
    """
    failures = 0
    while True:
        started = clock()
        try:
            await run()
            why = "it ended"
        except Exception as exc:  # noqa: BLE001 - a dead task must not leave its last output published
            why = _where_raised(exc)
        if clock() - started > retry_max:
            failures = 0
        delay = min(retry_max, retry_min * 2**failures)
        failures += 1
        log.error("%s stopped (%s): restarting in %.1f s", what, why, delay)
        on_failure()
        await sleep(delay)


def _where_raised(exc: BaseException) -> str:
    """``Type at file:line in function`` of the innermost cause, without the message."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    return (
        f"{type(exc).__name__} at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"
    )


class Controller:
    """The control state of one sidecar; ``apply_config`` and ``evaluate`` move it.

    Owns the RoutingTable's plan. Decides locally from ``metrics`` (standalone), or
    follows the controller's decision that ``published`` returns (cluster mode).
    Clocks are passed in: ``clock`` (monotonic) drives the local decision windows,
    ``wall`` dates the transitions shown and ages the published decision.
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
                observations = await self.metrics.observe(config.metrics) if config.metrics else []
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
            plan = plan_for(self.model, True)
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

    @staticmethod
    def _describe_target(model: ModelDeployment | None) -> str:
        plan = plan_for(model, False)
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
            from sidecar.credentials.oauth import with_authorization

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


# --- the process ------------------------------------------------------------------------------------


def _fmt_addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Sidecar:
    """The running process: proxy, admin port, control loops. ``run`` until ``stop``."""

    def __init__(
        self,
        settings: SidecarSettings,
        config: ConfigSource,
        metrics: MetricSource | None,
        *,
        published: Callable[[], PublishedDecision | None] | None = None,
        mode: str = "standalone",
        source: str = "",
        kube_client: Any = None,
        config_errors: Callable[[], tuple[str, ...]] = tuple,
    ):
        self.settings = settings
        self.config = config
        self.kube_client = kube_client
        self.stats = ProxyStats()
        self.routing = RoutingTable()
        self.ready = False
        self.proxy = ProxyServer(
            self.routing, settings.upstream, settings.proxy, self.stats, on_ready_change=self._ready_changed
        )
        self.sampler = Sampler(self.stats)
        self.scraper = ModelScraper()
        self.signals = SignalBoard(
            self.sampler, self.scraper, window=settings.signal_window, pod=settings.pod_name
        )
        if metrics is not None and mode == "standalone":
            # Pods metrics on the sidecar's signals and the model's gauges, from this pod's board.
            metrics = SignalMetricSource(metrics, self.signals, self._offloading_config)
        self.controller = Controller(
            self.routing,
            metrics,
            published=published,
            mode=mode,
            source=source,
            upstream=_fmt_addr(settings.upstream),
            listen=_fmt_addr(settings.listen),
            config_errors=config_errors,
        )
        self.admin = AdminServer(
            self.controller.view, self.stats, lambda: self.ready, signals=self.signals.document
        )
        self.stop = asyncio.Event()
        self.proxy_port = 0
        self.admin_port = 0
        self._first_config = asyncio.Event()
        self._auth_task: asyncio.Task[None] | None = None
        self._auth_key: Any = None
        self.auth_retry_min = 1.0  # seconds before a crashed token refresher first restarts
        self._headers_task: asyncio.Task[None] | None = None
        self._headers_key: Any = None

    def _ready_changed(self, ready: bool) -> None:
        self.ready = ready

    def _offloading_config(self) -> Any:
        model = self.controller.model
        return model.spec.offloading_config if model is not None else None

    async def _follow_config(self) -> None:
        async for model in self.config.updates():
            self.controller.apply_config(model)
            self.scraper.configure(scrape_target(model, self.settings.upstream))
            self._configure_auth(model)
            self._configure_secret_headers(model)
            self._first_config.set()
            await self._evaluate()

    async def _evaluate(self) -> None:
        try:
            await self.controller.evaluate()
        except Exception:  # a source's bug must not stop the control loop
            log.exception("metric evaluation failed; keeping the current decision")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            await self._evaluate()

    def _configure_auth(self, model: ModelDeployment | None) -> None:
        """Keep an OAuth token for the remote when its authConfig asks for one."""
        backend = None
        if passthrough_reason(model) is None:
            assert model is not None and model.spec.offloading_config is not None
            backend = model.spec.offloading_config.remote_backend
        auth = backend.auth_config if backend is not None else None
        key = (model.namespace if model else None, auth)
        if key == self._auth_key:
            return
        self._auth_key = key
        if self._auth_task is not None:
            self._auth_task.cancel()
            self._auth_task = None
        self.controller.needs_authorization = False
        self.controller.authorization = None
        if auth is None or auth.oauth_config is None:
            self.controller.set_authorization(None)
            return
        from sidecar.credentials.oauth import oauth_for

        made = oauth_for(model, self.kube_client, self.settings.proxy.remote_ssl_context)
        self.controller.needs_authorization = True
        if made is None:
            log.error("remoteBackend.authConfig is incomplete: requests stay local")
            self.controller.set_authorization(None)
            return
        oauth, reader = made
        if reader is not None and self.kube_client is None:
            log.error(
                "remoteBackend.authConfig.oauthConfig.clientSecretRef needs cluster mode (a Secret); "
                "in standalone mode give clientSecret inline: requests stay local"
            )
            self.controller.set_authorization(None)
            return

        async def keep() -> None:
            if reader is None:
                return await oauth.run_refresher(self.controller.set_authorization)
            # A TaskGroup: when one of the two fails the other is cancelled, not left running twice.
            async with asyncio.TaskGroup() as group:
                group.create_task(reader.follow(oauth.set_secret, self.settings.secret_refresh))
                group.create_task(oauth.run_refresher(self.controller.set_authorization))

        self._auth_task = asyncio.create_task(
            supervised(
                "the OAuth token refresher (requests stay local meanwhile)",
                keep,
                lambda: self.controller.set_authorization(None),
                retry_min=self.auth_retry_min,
            )
        )

    def _configure_secret_headers(self, model: ModelDeployment | None) -> None:
        """Keep the remote's headersFromSecrets read while the configuration has any."""
        specs: tuple[Any, ...] = ()
        if passthrough_reason(model) is None:
            assert model is not None and model.spec.offloading_config is not None
            assert model.spec.offloading_config.remote_backend is not None
            specs = model.spec.offloading_config.remote_backend.headers_from_secrets
        key = (model.namespace if model else None, specs)
        if key == self._headers_key:
            return
        self._headers_key = key
        if self._headers_task is not None:
            self._headers_task.cancel()
            self._headers_task = None
        if not specs:
            self.controller.set_secret_headers(None)
            return
        from sidecar.credentials.headers import keeper_for

        assert model is not None
        keeper = keeper_for(
            specs,
            self.controller.set_secret_headers,
            kube_client=self.kube_client,
            namespace=model.namespace,
            secrets_dir=self.settings.secrets_dir,
            period=self.settings.secret_refresh,
        )
        if isinstance(keeper, str):
            log.error("%s: requests stay local", keeper)
            self.controller.set_secret_headers(SecretHeaders(problem=keeper))
            return
        self.controller.set_secret_headers(keeper.current)
        self._headers_task = asyncio.create_task(keeper.run())

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

    async def run(self, on_started: Callable[[Sidecar], None] | None = None) -> None:
        s = self.settings
        tasks: list[asyncio.Task[None]] = []
        started = False
        try:
            self.admin_port = await self.admin.start(*s.admin_listen)
            self.sampler.start()
            # A source that dies (a bug) is restarted: the configuration in force stays meanwhile.
            tasks.append(
                asyncio.create_task(supervised("the configuration source", self._follow_config, lambda: None))
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FIRST_CONFIG_WAIT):
                    await self._first_config.wait()
            if not self._first_config.is_set():
                log.warning("no configuration after %.0f s: pass-through meanwhile", FIRST_CONFIG_WAIT)
            tasks.append(asyncio.create_task(self._poll()))
            self.proxy_port = await self.proxy.start(*s.listen)
            started = True
            self.controller.listen = _fmt_addr((s.listen[0], self.proxy_port))
            log.info(
                "proxy on %s -> local model %s; admin on %s",
                _fmt_addr((s.listen[0], self.proxy_port)),
                _fmt_addr(s.upstream),
                _fmt_addr((s.admin_listen[0], self.admin_port)),
            )
            if on_started is not None:
                on_started(self)
            await self.stop.wait()
            log.info("shutting down: draining for up to %.0f s", s.shutdown_deadline)
        finally:
            self.ready = False
            self.sampler.stop()
            self.scraper.stop()
            for task in (*tasks, self._auth_task, self._headers_task):
                if task is not None:
                    task.cancel()
            if started:
                await self.proxy.shutdown(s.shutdown_deadline)
            await self.admin.close()
            if self.kube_client is not None:
                await self.kube_client.close()
            log.info("stopped")
