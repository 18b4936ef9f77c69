"""offload-webhook: serve the admission webhooks over HTTPS."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from functools import partial
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from crds.validation import ValidationSettings, parse_remote_backend
from webhook import apicalls, metrics
from webhook.app import BODY_TIMEOUT, build_app
from webhook.cache import ClusterCache
from webhook.controller import main as controller_main
from webhook.controller.evaluation import ControllerEvaluation, MetricsReader
from webhook.controller.podsignals import signals_reader
from webhook.controller.store import Store
from webhook.injector_config import ConfigError, load_config
from webhook.mutating import answer_pod
from webhook.tls import DEFAULT_INTERVAL, CertificateError, ReloadingCertificate
from webhook.validating import answer_modeldeployment
from webhook.watches import CacheSync

log = logging.getLogger("webhook")

# uvicorn answers 503 to a request arriving while this many connections (its own included)
# are open or this many requests are in flight: a flood is refused instead of exhausting the
# process's memory and files. The API servers' keep-alive pools and the probes need far fewer.
MAX_CONNECTIONS = 256
# Seconds an idle keep-alive connection is kept after a response (uvicorn's default, pinned).
KEEP_ALIVE_TIMEOUT = 5
# Seconds a request head may take to arrive after the TLS handshake or the previous
# response; the API server sends it at once. Without it, idle connections would hold
# MAX_CONNECTIONS slots for as long as they like and every request would get 503.
HEAD_TIMEOUT = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-webhook",
        description="Serve the ModelDeployment validating webhook (/validate-modeldeployments) "
        "and the sidecar-injecting webhook over HTTPS, with /healthz, /readyz and /metrics.",
    )
    parser.add_argument(
        "--tls-cert-file",
        help="PEM serving certificate (chain), reloaded with the key when the files change; "
        "required unless --release-all",
    )
    parser.add_argument(
        "--tls-private-key-file", help="PEM private key of the certificate; required unless --release-all"
    )
    parser.add_argument(
        "--tls-reload-interval",
        type=controller_main.positive_seconds,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help="how often the certificate and key files are checked for a change (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=9443, help="HTTPS port (default: %(default)s)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="serve only ModelDeployment validation; needs no cluster credentials",
    )
    parser.add_argument(
        "--default-remote-backend",
        metavar="URL|JSON",
        default="",
        help="the remote backend of ModelDeployments without remoteBackend (the Beamlit controller's "
        "default): http(s)://host[:port][/pathPrefix], or a RemoteBackend as JSON "
        '(\'{"host": "...", "scheme": "https", "headersToAdd": {...}}\'); validation allows such '
        "objects and injected sidecars get it (env OFFLOAD_DEFAULT_REMOTE_BACKEND)",
    )
    parser.add_argument(
        "--injector-config",
        metavar="PATH",
        help="the injector's configuration (YAML: image, ports, resources, nativeSidecar, configVersion); "
        "serves /mutate-pods, which needs cluster credentials to watch ModelDeployments, "
        "Deployments, StatefulSets and Services",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig for the watches behind /mutate-pods (default: $KUBECONFIG, else the "
        "in-cluster service account)",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="report not ready once a watch has been failing this long (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help="a request gets 503 while this many connections (its own included) are open or this many "
        "requests are in flight (default: %(default)s)",
    )
    parser.add_argument(
        "--head-timeout",
        type=controller_main.positive_seconds,
        default=HEAD_TIMEOUT,
        metavar="SECONDS",
        help="a connection whose request head has not arrived this long after the TLS handshake or "
        "the previous response is closed (default: %(default)s)",
    )
    parser.add_argument(
        "--body-timeout",
        type=controller_main.positive_seconds,
        default=BODY_TIMEOUT,
        metavar="SECONDS",
        help="a review's body must arrive within this time after its head, else 408 (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    controller_main.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.release_all and not (args.tls_cert_file and args.tls_private_key_file):
        parser.error("--tls-cert-file and --tls-private-key-file are required")
    try:
        controller_main.gateway_settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        default_backend = (
            parse_remote_backend(args.default_remote_backend, "--default-remote-backend")
            if args.default_remote_backend.strip()
            else None
        )
    except ValueError as exc:
        print(f"offload-webhook: {exc}", file=sys.stderr)
        return 2
    settings = ValidationSettings(default_remote_backend=default_backend)
    if args.release_all:
        return controller_main.release_all(args, _api_client(args), settings)
    try:
        certificate = ReloadingCertificate(
            args.tls_cert_file, args.tls_private_key_file, interval=args.tls_reload_interval
        )
    except CertificateError as exc:
        print(f"offload-webhook: --tls-cert-file/--tls-private-key-file: {exc}", file=sys.stderr)
        return 2
    reviews = {"/validate-modeldeployments": partial(answer_modeldeployment, settings=settings)}
    ready = _always_ready
    sync = None
    controller = None
    if args.injector_config and not args.validation_only:
        try:
            config = load_config(args.injector_config)
        except ConfigError as exc:
            print(f"offload-webhook: --injector-config: {exc}", file=sys.stderr)
            return 2
        if default_backend is not None:
            config = replace(config, default_remote_backend=args.default_remote_backend.strip())
        try:
            api_client = _api_client(args)
        except Exception as exc:  # noqa: BLE001 - kubernetes.config raises several kinds
            print(f"offload-webhook: no cluster credentials for /mutate-pods: {exc}", file=sys.stderr)
            return 2
        cache = ClusterCache(settings, stale_after=args.stale_after)
        store = Store(controller_main.CONTROLLER_RESOURCES)
        sink, resources = controller_main.watch_sink(cache, store)
        sync = CacheSync(sink, api_client, resources=resources)
        sync.start()
        controller = controller_main.start(
            args,
            api_client,
            store,
            settings,
            evaluation=ControllerEvaluation(
                api_client,
                period_seconds=args.evaluation_period,
                reader=MetricsReader(api_client, signals=signals_reader(args.signals_period)),
            ),
            metrics=metrics.ControllerMetrics(),
        )
        reviews["/mutate-pods"] = partial(answer_pod, view=cache, config=config)
        ready = cache.synced  # admission readiness: the controller's resources do not gate it
        log.info("serving /mutate-pods (injector config version %r)", config.config_version)
    app = build_app(reviews, ready=ready, body_timeout=args.body_timeout)
    serve_tls(
        app,
        certificate,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        max_connections=args.max_connections,
        head_timeout=args.head_timeout,
    )
    if sync is not None:
        sync.stop()
    if controller is not None:
        controller.stop()
    return 0


def tls_server(
    app: Any,
    certificate: ReloadingCertificate,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    max_connections: int = MAX_CONNECTIONS,
    head_timeout: float = HEAD_TIMEOUT,
) -> uvicorn.Server:
    """uvicorn serving ``app`` with the reloading certificate's context.

    uvicorn builds its SSLContext from files once; the loaded config's context is replaced
    by ours (whose SNI callback serves the current certificate) before the server starts.
    The TLS handshake is bounded by asyncio's default (60 s), which uvicorn does not expose;
    such connections do not count towards ``max_connections``."""
    config = uvicorn.Config(
        app,
        http=head_deadline_protocol(head_timeout, max_connections),
        host=host,
        port=port,
        ssl_certfile=str(certificate.cert_file),
        ssl_keyfile=str(certificate.key_file),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        limit_concurrency=max_connections,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
    )
    config.load()
    config.ssl = certificate.context
    return uvicorn.Server(config)


def serve_tls(
    app: Any,
    certificate: ReloadingCertificate,
    *,
    host: str,
    port: int,
    log_level: str,
    max_connections: int = MAX_CONNECTIONS,
    head_timeout: float = HEAD_TIMEOUT,
) -> None:
    """Serve until SIGTERM, polling the certificate's files meanwhile."""
    server = tls_server(
        app,
        certificate,
        host=host,
        port=port,
        log_level=log_level,
        max_connections=max_connections,
        head_timeout=head_timeout,
    )
    certificate.start()
    try:
        server.run()
    finally:
        certificate.stop()


def head_deadline_protocol(seconds: float, max_connections: int | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, aborting a connection whose request head is not complete
    ``seconds`` after the TLS handshake or the previous response; and, when a new connection
    makes ``max_connections``, the one that has waited longest for its head makes room.

    uvicorn has no such deadline: its keep-alive timer starts only after a response and any
    byte received cancels it, so a silent client or half a head would hold the connection
    (and a ``max_connections`` slot) forever. With the deadline alone, idle connections
    opened faster than they expire would still keep every slot and get the API server's
    reviews (and the kubelet's probes) a 503; so, as the sidecar's admin port does, a
    newcomer evicts an idle one, and uvicorn's 503 is left for when every connection is
    busy. Only arms and cancels a timer around uvicorn's callbacks; a pipelined head that
    arrives during a response is not timed."""

    class HeadDeadlineProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _waiting_since = 0.0

        def _arm(self) -> None:
            self._waiting_since = self.loop.time()
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            self.transport.abort()  # not close(): a TLS close waits up to 30 s for the peer

        def _make_room(self) -> None:
            waiting = [
                c
                for c in self.connections
                if c is not self and isinstance(c, HeadDeadlineProtocol) and c._head_timer is not None
            ]
            if waiting:
                oldest = min(waiting, key=lambda c: c._waiting_since)
                oldest._disarm()
                self.connections.discard(oldest)  # the slot is free now, not at connection_lost
                oldest.transport.abort()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()
            if max_connections is not None and len(self.connections) >= max_connections:
                self._make_room()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle again unless a pipelined request has just started.
            if self.cycle.response_complete and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadDeadlineProtocol


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _always_ready() -> bool:
    return True


def _api_client(args: argparse.Namespace) -> Any:
    """Credentials from --kubeconfig, $KUBECONFIG or the service account.

    The watches connect in the background: the server starts at once and reports ready
    when they have synced; failing to reach the API server is retried, never fatal.
    """
    import os

    import kubernetes

    configuration = kubernetes.client.Configuration()
    if args.kubeconfig or os.environ.get("KUBECONFIG"):
        kubernetes.config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    else:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    # The watches retry with their own backoff; urllib3's silent retries would only add noise.
    configuration.retries = 0
    client = kubernetes.client.ApiClient(configuration)
    return apicalls.count(client, lambda verb, resource: metrics.API_REQUESTS.labels(verb, resource).inc())


if __name__ == "__main__":
    sys.exit(main())
