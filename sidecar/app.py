"""The sidecar process: sources -> decision -> RoutingTable -> proxy, plus the admin port.

    ConfigSource ---ModelDeployment|None---> OffloadingState.apply_config ---+
                                                                             |--> RoutingTable --> ProxyServer
    MetricSource --observations every poll--> OffloadingState.evaluate ------+
    (standalone)                              (crds.decision.step, pure)
    or the published status (cluster) ------> (control.published.follow_published, pure)

Standalone mode takes the ModelDeployment from a file and CPU from the local
machine, and decides itself (crds/decision.py). Cluster mode (chosen by the injector's
POD_NAMESPACE and MODELDEPLOYMENT_NAME, see
:func:`sidecar.cluster.config.cluster_mode_from_env`) watches its ModelDeployment and
follows the decision the controller publishes in its status
(:func:`sidecar.control.published.follow_published`):
one evaluation per ModelDeployment, not one per pod. Everything after the decision is
the same code.

A ModelDeployment that is absent, invalid, ``enabled: false`` or without a
remote backend means pass-through: every request goes to the local model.
SIGTERM (or SIGINT) drains: readiness fails at once, then the proxy finishes
what is in flight up to the shutdown deadline.

The process owns its loops and their clocks (``clock``, ``sleep``), and builds its
credential keepers through factories (``oauth_factory``, ``keeper_factory``): the
pure parts live in :mod:`sidecar.control`, the restart policy in :mod:`sidecar.supervise`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crds.model import HeaderFromSecret, ModelDeployment
from crds.status import PublishedDecision
from sidecar.admin.server import AdminServer
from sidecar.control.interfaces import ConfigSource, MetricSource
from sidecar.control.plan import passthrough_reason
from sidecar.control.state import OffloadingState
from sidecar.credentials.headers import SecretHeaderKeeper, SecretHeaders, keeper_for
from sidecar.credentials.oauth import OAuthClient, oauth_for
from sidecar.credentials.secrets import SecretKeyReader, follow_key
from sidecar.proxy.routing import RoutingTable
from sidecar.proxy.server import ProxyServer, ProxySettings
from sidecar.proxy.stats import ProxyStats
from sidecar.signals import (
    DEFAULT_WINDOW,
    ModelScraper,
    Sampler,
    SignalBoard,
    SignalMetricSource,
    scrape_target,
)
from sidecar.supervise import supervised

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


# What builds the OAuth client of a configuration (and the reader of its client secret):
# :func:`sidecar.credentials.oauth.oauth_for`, or a stand-in in a test.
OAuthFactory = Callable[
    [ModelDeployment, Any, ssl.SSLContext | None], tuple[OAuthClient, SecretKeyReader | None] | None
]
# What builds the keeper of a remote's headersFromSecrets: :func:`keeper_for`'s signature.
KeeperFactory = Callable[..., SecretHeaderKeeper | str]


def _fmt_addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Sidecar:
    """The running process: proxy, admin port, control loops. ``run`` until ``stop``.

    ``clock`` (monotonic seconds) and ``sleep`` drive its loops (the metric poll, the
    restarts of a dead source or refresher, the reads of the remote's Secrets);
    ``oauth_factory`` and ``keeper_factory`` build the remote's credential keepers when a
    configuration asks for them.
    """

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
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        oauth_factory: OAuthFactory = oauth_for,
        keeper_factory: KeeperFactory = keeper_for,
        auth_retry_min: float = 1.0,
    ):
        self.settings = settings
        self.config = config
        self.kube_client = kube_client
        self.clock = clock
        self.sleep = sleep
        self.oauth_factory = oauth_factory
        self.keeper_factory = keeper_factory
        self.auth_retry_min = auth_retry_min  # seconds before a crashed token refresher first restarts
        self.stats = ProxyStats()
        self.routing = RoutingTable()
        self.ready = False
        self.proxy = ProxyServer(
            self.routing, settings.upstream, settings.proxy, self.stats, on_ready_change=self._ready_changed
        )
        self.sampler = Sampler(self.stats, clock=clock)
        self.scraper = ModelScraper(clock, sleep)
        self.signals = SignalBoard(
            self.sampler, self.scraper, window=settings.signal_window, pod=settings.pod_name, clock=clock
        )
        if metrics is not None and mode == "standalone":
            # Pods metrics on the sidecar's signals and the model's gauges, from this pod's board.
            metrics = SignalMetricSource(metrics, self.signals)
        self.offloading = OffloadingState(
            self.routing,
            metrics,
            published=published,
            clock=clock,
            mode=mode,
            source=source,
            upstream=_fmt_addr(settings.upstream),
            listen=_fmt_addr(settings.listen),
            config_errors=config_errors,
        )
        self.admin = AdminServer(
            self.offloading.view, self.stats, lambda: self.ready, signals=self.signals.document
        )
        self.stop = asyncio.Event()
        self.proxy_port = 0
        self.admin_port = 0
        self._first_config = asyncio.Event()
        self._auth_task: asyncio.Task[None] | None = None
        self._auth_key: Any = None
        self._headers_task: asyncio.Task[None] | None = None
        self._headers_key: Any = None

    def _ready_changed(self, ready: bool) -> None:
        self.ready = ready

    async def _follow_config(self) -> None:
        async for model in self.config.updates():
            self.offloading.apply_config(model)
            self.scraper.configure(scrape_target(model, self.settings.upstream))
            self.configure_auth(model)
            self.configure_secret_headers(model)
            self._first_config.set()
            await self._evaluate()

    async def _evaluate(self) -> None:
        try:
            await self.offloading.evaluate()
        except Exception:  # a source's bug must not stop the control loop
            log.exception("metric evaluation failed; keeping the current decision")

    async def _poll(self) -> None:
        while True:
            await self.sleep(self.settings.poll_interval)
            await self._evaluate()

    def configure_auth(self, model: ModelDeployment | None) -> None:
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
        state = self.offloading
        state.needs_authorization = False
        state.authorization = None
        if model is None or auth is None or auth.oauth_config is None:
            state.set_authorization(None)
            return
        made = self.oauth_factory(model, self.kube_client, self.settings.proxy.remote_ssl_context)
        state.needs_authorization = True
        state.set_authorization(None)  # until the first token: the remote would answer 401
        if made is None:
            log.error("remoteBackend.authConfig is incomplete: requests stay local")
            return
        oauth, reader = made
        if reader is not None and self.kube_client is None:
            log.error(
                "remoteBackend.authConfig.oauthConfig.clientSecretRef needs cluster mode (a Secret); "
                "in standalone mode give clientSecret inline: requests stay local"
            )
            return

        async def keep() -> None:
            if reader is None:
                return await oauth.run_refresher(state.set_authorization)
            # A TaskGroup: when one of the two fails the other is cancelled, not left running twice.
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    follow_key(
                        reader, oauth.set_secret, period=self.settings.secret_refresh, sleep=self.sleep
                    )
                )
                group.create_task(oauth.run_refresher(state.set_authorization))

        self._auth_task = asyncio.create_task(
            supervised(
                "the OAuth token refresher (requests stay local meanwhile)",
                keep,
                lambda: state.set_authorization(None),
                retry_min=self.auth_retry_min,
                clock=self.clock,
                sleep=self.sleep,
            )
        )

    def configure_secret_headers(self, model: ModelDeployment | None) -> None:
        """Keep the remote's headersFromSecrets read while the configuration has any."""
        specs: Sequence[HeaderFromSecret] = ()
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
        if model is None or not specs:
            self.offloading.set_secret_headers(None)
            return
        keeper = self.keeper_factory(
            specs,
            self.offloading.set_secret_headers,
            kube_client=self.kube_client,
            namespace=model.namespace,
            secrets_dir=self.settings.secrets_dir,
            period=self.settings.secret_refresh,
            sleep=self.sleep,
        )
        if isinstance(keeper, str):
            log.error("%s: requests stay local", keeper)
            self.offloading.set_secret_headers(SecretHeaders(problem=keeper))
            return
        self.offloading.set_secret_headers(keeper.current)
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
                asyncio.create_task(
                    supervised(
                        "the configuration source",
                        self._follow_config,
                        lambda: None,
                        clock=self.clock,
                        sleep=self.sleep,
                    )
                )
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FIRST_CONFIG_WAIT):
                    await self._first_config.wait()
            if not self._first_config.is_set():
                log.warning("no configuration after %.0f s: pass-through meanwhile", FIRST_CONFIG_WAIT)
            tasks.append(asyncio.create_task(self._poll()))
            self.proxy_port = await self.proxy.start(*s.listen)
            started = True
            self.offloading.listen = _fmt_addr((s.listen[0], self.proxy_port))
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
