"""offload-sidecar: the offloading reverse proxy in front of a model server.

Standalone (a VM, a laptop)::

    offload-sidecar --config modeldeployment.yaml --upstream 127.0.0.1:8000

Cluster mode is chosen when POD_NAMESPACE and MODELDEPLOYMENT_NAME are set (the
injector sets them) or with ``--mode cluster``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from crds.quantity import parse_quantity
from sidecar.app import Sidecar, SidecarSettings
from sidecar.cpu import DEFAULT_WINDOW, LocalMetricSource, ProcessTreeReader, detect_reader, parse_cores
from sidecar.proxy import ProxySettings

log = logging.getLogger("sidecar")

CLUSTER_POLL_INTERVAL = 15.0
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """``500ms``, ``1s``, ``2m``, ``1.5`` (seconds) -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 500ms, 1s, 2m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def address(default_host: str):
    def parse(text: str) -> tuple[str, int]:
        """``host:port``, ``[v6]:port`` or a bare ``port`` (on ``default_host``)."""
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = default_host, text
        host = host.strip("[]") or default_host
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"not host:port: {text!r}")
        return host, int(port)

    return parse


def cores(text: str) -> float:
    try:
        return parse_cores(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a CPU amount: {text!r} (examples: 500m, 2)") from exc


def memory_bytes(text: str) -> int:
    try:
        value = int(parse_quantity(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a memory amount: {text!r} (examples: 512Mi, 2Gi)") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the absent ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; in a pod the injector passes the addresses by environment
    (OFFLOAD_UPSTREAM, OFFLOAD_PROXY_PORT, OFFLOAD_ADMIN_PORT), which flags override."""
    env = os.environ if env is None else env
    upstream = env.get("OFFLOAD_UPSTREAM")
    listen = f"0.0.0.0:{env['OFFLOAD_PROXY_PORT']}" if env.get("OFFLOAD_PROXY_PORT") else "0.0.0.0:8080"
    admin = f"0.0.0.0:{env['OFFLOAD_ADMIN_PORT']}" if env.get("OFFLOAD_ADMIN_PORT") else "0.0.0.0:9090"
    p = argparse.ArgumentParser(
        prog="offload-sidecar",
        description="Reverse proxy in front of a model server that offloads a share of the "
        "requests to a remote backend while the model runs hot. Standalone mode reads the "
        "ModelDeployment from --config and CPU from the local cgroup (v2 or v1) or the host; "
        "cluster mode (POD_NAMESPACE and MODELDEPLOYMENT_NAME set, as the injector does) "
        "watches the API server.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--mode",
        choices=("auto", "standalone", "cluster"),
        default="auto",
        help="auto: cluster when POD_NAMESPACE and MODELDEPLOYMENT_NAME are set, else standalone",
    )
    p.add_argument(
        "--config", type=Path, help="standalone: the ModelDeployment YAML file (reloaded on change)"
    )
    p.add_argument(
        "--secrets-dir",
        type=Path,
        help="standalone: the Secrets the ModelDeployment references (headersFromSecrets), "
        "DIR/<secret name>/<key> holding each value, as a mounted Secret volume lays them out; "
        "re-read every second",
    )
    p.add_argument(
        "--upstream",
        type=address("127.0.0.1"),
        required=upstream is None,
        default=upstream,
        help="the local model server, host:port or a port on 127.0.0.1 (env OFFLOAD_UPSTREAM)",
    )
    p.add_argument(
        "--listen", type=address("0.0.0.0"), default=listen, help="the proxy port (env OFFLOAD_PROXY_PORT)"
    )
    p.add_argument(
        "--admin-listen",
        type=address("0.0.0.0"),
        default=admin,
        help="the admin port: /healthz /readyz /metrics /status (env OFFLOAD_ADMIN_PORT)",
    )
    p.add_argument(
        "--poll-interval",
        type=positive_duration,
        help="how often metrics are evaluated (default: 1s standalone; 15s in cluster mode, the "
        "HPA's sync period and metrics-server's resolution, so that sidecars do not load the API)",
    )
    g = p.add_argument_group("standalone metrics")
    g.add_argument(
        "--cpu-request",
        type=cores,
        help="CPU Utilization is measured against this (e.g. 500m); default: the cgroup's CPU "
        "quota, else the host's CPU count",
    )
    g.add_argument(
        "--memory-request", type=memory_bytes, help="memory Utilization reference (default: the memory limit)"
    )
    g.add_argument(
        "--cpu-window",
        type=positive_duration,
        default=f"{DEFAULT_WINDOW:g}s",
        help="CPU utilization is averaged over this much recent history",
    )
    g.add_argument("--cgroup-root", type=Path, default=Path("/sys/fs/cgroup"), help="the cgroup to measure")
    g.add_argument(
        "--cpu-pid",
        type=int,
        help="measure this process and its descendants from /proc instead of a cgroup",
    )
    p.add_argument(
        "--secret-refresh",
        type=positive_duration,
        default="60s",
        help="cluster: how often each Secret the remote's authentication references is read "
        "again (one GET per Secret per sidecar); a Secret that cannot be read is retried sooner",
    )
    g = p.add_argument_group("data path")
    defaults = ProxySettings()
    g.add_argument(
        "--connect-timeout",
        type=positive_duration,
        default=f"{defaults.connect_timeout:g}s",
        help="TCP connect and TLS handshake to an upstream; a remote that misses it is replaced by the local model",
    )
    g.add_argument(
        "--read-timeout",
        type=positive_duration,
        default=f"{defaults.read_timeout:g}s",
        help="a request in flight with neither side sending anything",
    )
    g.add_argument(
        "--client-idle-timeout",
        type=positive_duration,
        default=f"{defaults.client_idle_timeout:g}s",
        help="a client keep-alive connection with no request",
    )
    g.add_argument(
        "--ca-file",
        type=Path,
        help="CA bundle for an https remote and its OAuth token endpoint (default: the system's)",
    )
    g.add_argument(
        "--shutdown-deadline",
        type=duration,
        default="30s",
        help="on SIGTERM, in-flight requests and streams get this long to finish",
    )
    g.add_argument(
        "--shutdown-grace",
        type=duration,
        default=f"{defaults.shutdown_grace:g}s",
        help="on SIGTERM, new connections are still accepted this long (readiness fails at once)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def settings_from(args: argparse.Namespace, mode: str = "standalone") -> SidecarSettings:
    context = None
    if args.ca_file is not None:
        context = ssl.create_default_context(cafile=str(args.ca_file))
    proxy = ProxySettings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        client_idle_timeout=args.client_idle_timeout,
        shutdown_grace=args.shutdown_grace,
        remote_ssl_context=context,
    )
    return SidecarSettings(
        upstream=args.upstream,
        listen=args.listen,
        admin_listen=args.admin_listen,
        config_path=args.config,
        secrets_dir=args.secrets_dir,
        secret_refresh=args.secret_refresh,
        poll_interval=args.poll_interval or (CLUSTER_POLL_INTERVAL if mode == "cluster" else 1.0),
        cpu_request=args.cpu_request,
        memory_request=args.memory_request,
        cpu_window=args.cpu_window,
        cgroup_root=args.cgroup_root,
        cpu_pid=args.cpu_pid,
        shutdown_deadline=args.shutdown_deadline,
        proxy=proxy,
    )


def build_standalone(settings: SidecarSettings) -> Sidecar:
    from sidecar.filesource import FileConfigSource

    assert settings.config_path is not None
    source = FileConfigSource(settings.config_path, poll_interval=min(1.0, settings.poll_interval))
    if settings.cpu_pid is not None:
        reader = ProcessTreeReader(settings.cpu_pid)
    else:
        reader = detect_reader(settings.cgroup_root)
    metrics = LocalMetricSource(
        reader,
        time.monotonic,
        cpu_request=settings.cpu_request,
        memory_request=settings.memory_request,
        window=settings.cpu_window,
    )
    log.info("standalone mode: %s, cpu from %s", settings.config_path, reader.kind)
    return Sidecar(
        settings,
        source,
        metrics,
        mode="standalone",
        source=str(settings.config_path),
        config_errors=lambda: source.last.errors if source.last is not None else (),
    )


def build_cluster(settings: SidecarSettings, env: dict[str, str]) -> Sidecar | None:
    from sidecar.clustersource import cluster_mode_from_env

    cluster = cluster_mode_from_env(env, poll_period=settings.poll_interval)
    if cluster is None:
        return None
    source = f"{cluster.config.namespace}/{cluster.config.name}"
    log.info("cluster mode: ModelDeployment %s", source)
    return Sidecar(
        settings, cluster.config, cluster.metrics, mode="cluster", source=source, kube_client=cluster.client
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    env = dict(os.environ)
    cluster_env = bool(env.get("POD_NAMESPACE") and env.get("MODELDEPLOYMENT_NAME"))
    mode = args.mode if args.mode != "auto" else ("cluster" if cluster_env else "standalone")
    settings = settings_from(args, mode)

    if mode == "standalone":
        if args.config is None:
            parser.error("standalone mode needs --config FILE (the ModelDeployment to apply)")
        if not args.config.exists():
            parser.error(f"--config {args.config}: no such file")
        if args.secrets_dir is not None and not args.secrets_dir.is_dir():
            parser.error(f"--secrets-dir {args.secrets_dir}: no such directory")
        if args.cpu_pid is not None and not Path(f"/proc/{args.cpu_pid}").exists():
            parser.error(f"--cpu-pid {args.cpu_pid}: no such process")

    async def serve() -> int:
        if mode == "cluster":
            from sidecar.kube import ConfigError

            try:
                sidecar = build_cluster(settings, env)
            except ConfigError as exc:
                log.error("cluster mode: %s", exc)
                return 2
            if sidecar is None:
                log.error("cluster mode needs POD_NAMESPACE and MODELDEPLOYMENT_NAME in the environment")
                return 2
        else:
            sidecar = build_standalone(settings)
        sidecar.install_signal_handlers()

        def announce(s: Sidecar) -> None:
            listen, admin = settings.listen[0], settings.admin_listen[0]
            print(
                f"proxy listening on {listen}:{s.proxy_port}; admin listening on {admin}:{s.admin_port}",
                flush=True,
            )

        try:
            await sidecar.run(announce)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return 1
        return 0

    gc.freeze()  # what was imported stays out of the collector's scans
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(serve())
    return uvloop.run(serve())


if __name__ == "__main__":
    sys.exit(main())
