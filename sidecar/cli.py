"""offload-sidecar: the offloading reverse proxy in front of a model server.

Standalone (a VM, a laptop)::

    offload-sidecar --config modeldeployment.yaml --upstream 127.0.0.1:8000

Cluster mode is chosen when POD_NAMESPACE and MODELDEPLOYMENT_NAME are set (the
injector sets them) or with ``--mode cluster``.

In cluster mode nothing about the configuration or the credentials stops the process: a
missing token or CA, an unusable kubeconfig, incomplete or malformed environment
variables, an unreachable API server or an RBAC refusal all leave the sidecar up as pure
pass-through to the local model, with ``/status`` (``configurationErrors``) saying why. A
sidecar that exited would, as a native sidecar, keep its pod from ever becoming Ready: it
must never make a pod worse than it is without it. The exceptions are command-line
mistakes the injector never makes: no model address at all (OFFLOAD_UPSTREAM and
OFFLOAD_MODEL_PORT both unusable and no ``--upstream``: nothing to pass through to) and an
explicit ``--mode cluster`` without POD_NAMESPACE and MODELDEPLOYMENT_NAME.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import logging
import os
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from crds.quantity import parse_quantity
from sidecar.app import Sidecar, SidecarSettings
from sidecar.cluster.credentials import SERVICE_ACCOUNT_DIR_ENV
from sidecar.control.interfaces import NoMetrics, PassThroughSource
from sidecar.options import (
    HelpFormatter,
    add_data_path_timeouts,
    address,
    data_path_settings,
    duration,
    positive_duration,
)
from sidecar.proxy.server import ProxySettings
from sidecar.signals import DEFAULT_WINDOW as SIGNAL_WINDOW
from sidecar.standalone.config import FileConfigSource
from sidecar.standalone.metrics import (
    DEFAULT_WINDOW,
    LocalMetricSource,
    ProcessTreeReader,
    detect_reader,
    parse_cores,
)

log = logging.getLogger("sidecar")

# The injector's default ports: what a pod's malformed OFFLOAD_*_PORT most likely meant.
INJECTED_PROXY_PORT = 15080
INJECTED_ADMIN_PORT = 15090


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


@dataclass(frozen=True)
class EnvDefaults:
    """The addresses the injector passes by environment, parsed; ``problems`` says which
    variables were unusable and what was used instead (shown in /status)."""

    upstream: tuple[str, int] | None
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    problems: tuple[str, ...] = field(default=())


def env_defaults(env: Mapping[str, str]) -> EnvDefaults:
    """OFFLOAD_UPSTREAM (else 127.0.0.1:OFFLOAD_MODEL_PORT), OFFLOAD_PROXY_PORT and
    OFFLOAD_ADMIN_PORT. A malformed value is never fatal: the upstream falls back to
    OFFLOAD_MODEL_PORT, a port to the injector's default, and the problem is reported."""
    problems: list[str] = []

    def parsed(name: str, parse, fallback):
        text = env.get(name)
        if not text:
            return fallback
        try:
            return parse(text)
        except argparse.ArgumentTypeError as exc:
            problems.append(f"{name}: {exc}")
            return None

    model_port = parsed("OFFLOAD_MODEL_PORT", address("127.0.0.1"), None)
    upstream = parsed("OFFLOAD_UPSTREAM", address("127.0.0.1"), model_port)
    if upstream is None and model_port is not None:
        upstream = model_port
        problems[-1] += f"; using OFFLOAD_MODEL_PORT: {_fmt(model_port)}"
    listen = parsed("OFFLOAD_PROXY_PORT", address("0.0.0.0"), ("0.0.0.0", 8080))
    if listen is None:
        listen = ("0.0.0.0", INJECTED_PROXY_PORT)
        problems[-1] += f"; using {INJECTED_PROXY_PORT}"
    admin = parsed("OFFLOAD_ADMIN_PORT", address("0.0.0.0"), ("0.0.0.0", 9090))
    if admin is None:
        admin = ("0.0.0.0", INJECTED_ADMIN_PORT)
        problems[-1] += f"; using {INJECTED_ADMIN_PORT}"
    return EnvDefaults(upstream, listen, admin, tuple(problems))


def _fmt(addr: tuple[str, int]) -> str:
    """host:port, as ``address`` parses it back (argparse parses string defaults)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; in a pod the injector passes the addresses by environment
    (OFFLOAD_UPSTREAM, OFFLOAD_PROXY_PORT, OFFLOAD_ADMIN_PORT), which flags override.
    Environment values are parsed by :func:`env_defaults`, never a usage error."""
    env = os.environ if env is None else env
    defaults = env_defaults(env)
    p = argparse.ArgumentParser(
        prog="offload-sidecar",
        description="Reverse proxy in front of a model server that offloads a share of the "
        "requests to a remote backend while the model runs hot. Standalone mode reads the "
        "ModelDeployment from --config and CPU from the local cgroup (v2 or v1) or the host; "
        "cluster mode (POD_NAMESPACE and MODELDEPLOYMENT_NAME set, as the injector does) "
        "watches the API server.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--mode",
        choices=("auto", "standalone", "cluster", "gateway"),
        default="auto",
        help="auto: cluster when POD_NAMESPACE and MODELDEPLOYMENT_NAME are set, else standalone; "
        "gateway: no local model, serve the remote of each ModelDeployment with a gateway port "
        "(see --mode gateway --help)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="standalone (required there): the ModelDeployment YAML file (reloaded on change)",
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
        required=defaults.upstream is None,
        default=None if defaults.upstream is None else _fmt(defaults.upstream),
        help="the local model server, host:port or a port on 127.0.0.1 (env OFFLOAD_UPSTREAM, "
        "else OFFLOAD_MODEL_PORT)",
    )
    p.add_argument(
        "--listen",
        type=address("0.0.0.0"),
        default=_fmt(defaults.listen),
        help="the proxy port (env OFFLOAD_PROXY_PORT)",
    )
    p.add_argument(
        "--admin-listen",
        type=address("0.0.0.0"),
        default=_fmt(defaults.admin_listen),
        help="the admin port: /healthz /readyz /metrics /status /signals (env OFFLOAD_ADMIN_PORT)",
    )
    p.add_argument(
        "--poll-interval",
        type=positive_duration,
        default="1s",
        help="standalone: how often metrics are evaluated; cluster mode: how often the age of the "
        "controller's published decision is checked (no API request either way)",
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
    g = p.add_argument_group("signals (GET /signals on the admin port)")
    g.add_argument(
        "--signal-window",
        type=positive_duration,
        default=f"{SIGNAL_WINDOW:g}s",
        help="requests in flight and waiting at the local model are sampled every 100 ms and "
        "averaged over this much recent history",
    )
    g = p.add_argument_group("data path")
    add_data_path_timeouts(g, connect="an upstream; a remote that misses it is replaced by the local model")
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
        default=f"{ProxySettings.shutdown_grace:g}s",
        help="on SIGTERM, new connections are still accepted this long (readiness fails at once)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def settings_from(args: argparse.Namespace) -> SidecarSettings:
    context = None
    if args.ca_file is not None:
        context = ssl.create_default_context(cafile=str(args.ca_file))
    proxy = data_path_settings(args, context)
    return SidecarSettings(
        upstream=args.upstream,
        listen=args.listen,
        admin_listen=args.admin_listen,
        config_path=args.config,
        secrets_dir=args.secrets_dir,
        secret_refresh=args.secret_refresh,
        poll_interval=args.poll_interval,
        cpu_request=args.cpu_request,
        memory_request=args.memory_request,
        cpu_window=args.cpu_window,
        cgroup_root=args.cgroup_root,
        cpu_pid=args.cpu_pid,
        shutdown_deadline=args.shutdown_deadline,
        signal_window=args.signal_window,
        pod_name=os.environ.get("POD_NAME", ""),
        proxy=proxy,
    )


def build_standalone(settings: SidecarSettings) -> Sidecar:
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


def choose_mode(requested: str, env: Mapping[str, str], has_config: bool) -> str:
    """``--mode``, or for auto: cluster when the injector's environment is there, even in
    part (an injected pod with a broken environment degrades to pass-through, never exits)."""
    if requested != "auto":
        return requested
    if env.get("POD_NAMESPACE") and env.get("MODELDEPLOYMENT_NAME"):
        return "cluster"
    injected = ("POD_NAMESPACE", "MODELDEPLOYMENT_NAME", SERVICE_ACCOUNT_DIR_ENV)
    if not has_config and any(env.get(name) for name in injected):
        return "cluster"
    return "standalone"


def build_cluster(
    settings: SidecarSettings, env: Mapping[str, str], problems: tuple[str, ...] = ()
) -> Sidecar:
    """The cluster-mode sidecar; when its environment or credentials are unusable, one that
    passes everything through to the local model and says why in /status. Never raises."""
    from sidecar.cluster.config import cluster_mode_from_env
    from sidecar.cluster.credentials import CredentialsError

    source = f"{env.get('POD_NAMESPACE') or '?'}/{env.get('MODELDEPLOYMENT_NAME') or '?'}"
    why = None
    try:
        cluster = cluster_mode_from_env(env)
    except CredentialsError as exc:
        cluster, why = None, str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. an unusable client certificate: never fatal
        cluster, why = None, f"credentials: {type(exc).__name__}: {exc}"
    if cluster is None:
        why = why or "POD_NAMESPACE and MODELDEPLOYMENT_NAME must both be set (the injector sets them)"
        log.error("cluster mode: %s: every request goes to the local model", why)
        errors = (*problems, why)
        return Sidecar(
            settings,
            PassThroughSource(),
            NoMetrics(),
            mode="cluster",
            source=source,
            config_errors=lambda: errors,
        )
    log.info("cluster mode: ModelDeployment %s, following the controller's decision in its status", source)
    client = cluster.client
    config = cluster.config
    return Sidecar(
        settings,
        config,
        None,
        published=lambda: config.published,
        mode="cluster",
        source=source,
        kube_client=client,
        # The API server's refusals (RBAC 403, 401) and outages, as they happen.
        config_errors=lambda: (*problems, *client.problems()),
    )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "--mode=gateway" in given or ("--mode", "gateway") in itertools.pairwise(given):
        # Its own flags (no local model, no upstream); the sidecar never loads the gateway.
        from sidecar.gateway import cli as gateway_cli

        return gateway_cli.main([a for a in given if a != "--mode=gateway"])
    env = dict(os.environ)
    parser = build_parser(env)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    mode = choose_mode(args.mode, env, args.config is not None)
    settings = settings_from(args)
    env_problems = env_defaults(env).problems
    for problem in env_problems:
        log.error("environment: %s", problem)

    if args.mode == "cluster" and not (env.get("POD_NAMESPACE") and env.get("MODELDEPLOYMENT_NAME")):
        # Asked for on a command line (the injector never does): a usage error, told at once.
        parser.error("cluster mode needs POD_NAMESPACE and MODELDEPLOYMENT_NAME in the environment")
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
            sidecar = build_cluster(settings, env, env_problems)
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
