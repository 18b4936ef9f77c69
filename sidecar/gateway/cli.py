"""``offload-sidecar --mode gateway``: the gateway's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from crds.validation import parse_remote_backend
from sidecar.cluster.client import KubeClient
from sidecar.cluster.credentials import CredentialsError, in_cluster_config, load_kubeconfig
from sidecar.gateway.process import Gateway, GatewaySettings
from sidecar.options import (
    HelpFormatter,
    add_data_path_timeouts,
    address,
    data_path_settings,
    duration,
    positive_duration,
)

log = logging.getLogger("sidecar.gateway")

DEFAULT_REMOTE_BACKEND_ENV = "OFFLOAD_DEFAULT_REMOTE_BACKEND"


def build_parser(
    env: Mapping[str, str] | None = None, prog: str = "offload-sidecar --mode gateway"
) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve the remote of each ModelDeployment whose status carries a gateway port "
        "(status.standIn.port, chosen by the controller), on that port: the controller points a "
        "Service at it while its workload has no ready pod.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--mode", choices=("gateway",), default="gateway", help=argparse.SUPPRESS)
    p.add_argument(
        "--listen-host", default="0.0.0.0", help="the address the ModelDeployments' ports listen on"
    )
    p.add_argument(
        "--admin-listen",
        type=address("0.0.0.0"),
        default="0.0.0.0:9090",
        help="the admin port: /healthz /readyz /metrics /status",
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="serve the ModelDeployments of this namespace (repeat for several; default: every namespace)",
    )
    p.add_argument(
        "--default-remote-backend",
        default=env.get(DEFAULT_REMOTE_BACKEND_ENV, ""),
        metavar="URL|JSON",
        help="the remote of ModelDeployments without remoteBackend: http(s)://host[:port][/pathPrefix] "
        f"or a RemoteBackend as JSON (env {DEFAULT_REMOTE_BACKEND_ENV})",
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        default=env.get("KUBECONFIG") or None,
        help="credentials (default: $KUBECONFIG, else the pod's service account)",
    )
    p.add_argument(
        "--secret-refresh",
        type=positive_duration,
        default="60s",
        help="how often each Secret a remote's authentication references is read again",
    )
    g = p.add_argument_group("data path")
    add_data_path_timeouts(g, connect="a remote")
    g.add_argument("--ca-file", type=Path, help="CA bundle for https remotes (default: the system's)")
    g.add_argument(
        "--shutdown-deadline",
        type=duration,
        default="30s",
        help="on SIGTERM (or a port given up), requests and streams in flight get this long to finish",
    )
    g.add_argument(
        "--shutdown-grace",
        type=duration,
        default="5s",
        help="on SIGTERM, new connections are still accepted this long (readiness fails at once and "
        "the controller takes this pod out of every EndpointSlice meanwhile)",
    )
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level"
    )
    return p


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GatewaySettings:
    default = None
    if args.default_remote_backend.strip():
        try:
            default = parse_remote_backend(args.default_remote_backend, "--default-remote-backend")
        except ValueError as exc:
            parser.error(str(exc))
    context = None
    if args.ca_file is not None:
        try:
            context = ssl.create_default_context(cafile=str(args.ca_file))
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--ca-file {args.ca_file}: {exc}")
    return GatewaySettings(
        listen_host=args.listen_host,
        admin_listen=args.admin_listen,
        namespaces=tuple(args.namespace),
        default_backend=default,
        secret_refresh=args.secret_refresh,
        shutdown_deadline=args.shutdown_deadline,
        proxy=data_path_settings(args, context),
    )


def main(argv: list[str] | None = None, prog: str = "offload-sidecar --mode gateway") -> int:
    env = dict(os.environ)
    parser = build_parser(env, prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from(args, parser)
    try:
        credentials = load_kubeconfig(args.kubeconfig) if args.kubeconfig else in_cluster_config(env)
    except CredentialsError as exc:
        # Unlike the sidecar, nothing depends on this process being up: say why and stop.
        print(f"{prog}: no cluster credentials: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        gateway = Gateway(settings, KubeClient(credentials, user_agent="offload-gateway"))
        gateway.install_signal_handlers()

        def announce(g: Gateway) -> None:
            print(f"gateway admin listening on {settings.admin_listen[0]}:{g.admin_port}", flush=True)

        try:
            await gateway.run(announce)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return 1
        return 0

    started = time.monotonic()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        code = asyncio.run(serve())
    else:
        code = uvloop.run(serve())
    log.debug("ran %.1f s", time.monotonic() - started)
    return code
