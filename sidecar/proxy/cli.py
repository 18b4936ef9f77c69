"""``python -m sidecar.proxy``: the data path alone, for tests and benchmarks.

The product's command line is ``offload-sidecar`` (sidecar.cli); this one serves
a fixed route plan: a local model, optionally a remote and a percentage.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import ssl
from urllib.parse import urlsplit

from sidecar.proxy.routing import RemoteTarget, RoutePlan, RoutingTable
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.settings import ProxySettings


def host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); an empty host is 127.0.0.1.

    >>> host_port("[::1]:8080"), host_port(":9000")
    (('::1', 8080), ('127.0.0.1', 9000))
    """
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def remote_target_from_url(url: str, headers: tuple[tuple[str, str], ...] = ()) -> RemoteTarget:
    """``https://host:port/prefix`` -> RemoteTarget; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"remote must be http(s)://host[:port][/prefix], got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return RemoteTarget(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        authority=parts.netloc,
        path_prefix=parts.path.rstrip("/"),
        headers=headers,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.proxy", description="The sidecar's data path alone."
    )
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve on")
    parser.add_argument("--local", required=True, help="host:port of the local model")
    parser.add_argument("--remote", help="http(s)://host[:port][/prefix] of the remote backend")
    parser.add_argument("--percentage", type=int, default=0, help="share of requests offloaded to the remote")
    parser.add_argument("--header", action="append", default=[], help="Name=Value added to remote requests")
    parser.add_argument("--ca-file", help="CA bundle for an https remote (default: the system's)")
    parser.add_argument("--connect-timeout", type=float, default=ProxySettings.connect_timeout)
    parser.add_argument("--read-timeout", type=float, default=ProxySettings.read_timeout)
    parser.add_argument("--shutdown-deadline", type=float, default=30.0)
    parser.add_argument("--shutdown-grace", type=float, default=ProxySettings.shutdown_grace)
    args = parser.parse_args(argv)

    headers = tuple(tuple(h.split("=", 1)) for h in args.header)  # type: ignore[misc]
    remote = remote_target_from_url(args.remote, headers) if args.remote else None  # type: ignore[arg-type]
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    settings = ProxySettings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        shutdown_grace=args.shutdown_grace,
        remote_ssl_context=context,
    )
    routing = RoutingTable(
        RoutePlan(remote=remote, percentage=args.percentage, offloading=remote is not None)
    )

    async def serve() -> None:
        server = ProxyServer(routing, host_port(args.local), settings)
        host, port = host_port(args.listen)
        port = await server.start(host, port)
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.shutdown(args.shutdown_deadline)

    gc.freeze()  # what was imported stays out of the collector's scans
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0
