"""``python -m sidecar.proxy``: the data path alone, for tests and benchmarks.

The product's command line is ``offload-sidecar`` (sidecar.cli); this one serves
a fixed route plan: a local model, optionally a remote and a percentage.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import ssl
from urllib.parse import urlsplit

from crds.validation import check_header
from sidecar.options import HelpFormatter, add_data_path_timeouts, address, data_path_settings, duration
from sidecar.proxy.routing import RemoteTarget, RoutePlan, RoutingTable
from sidecar.proxy.server import ProxyServer
from sidecar.proxy.settings import ProxySettings


def header(text: str) -> tuple[str, str]:
    """``Name=Value`` -> (name, value), for ``--header``.

    >>> header("X-Api-Key=abc=")
    ('X-Api-Key', 'abc=')
    """
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"not Name=Value: {text!r}")
    problems = [finding.message for finding in check_header("--header", name, value)]
    if problems:
        raise argparse.ArgumentTypeError("; ".join(problems))
    return name, value


def percentage(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 3) or not 0 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"not a whole number from 0 to 100: {text!r}")
    return int(text)


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
        prog="python -m sidecar.proxy",
        description="The sidecar's data path alone. Durations are Go durations (500ms, 1m30s) or seconds.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--listen", type=address("127.0.0.1"), default="127.0.0.1:8080", help="host:port to serve on"
    )
    parser.add_argument(
        "--local", type=address("127.0.0.1"), required=True, help="host:port of the local model"
    )
    parser.add_argument("--remote", help="http(s)://host[:port][/prefix] of the remote backend")
    parser.add_argument(
        "--percentage", type=percentage, default=0, help="share of requests offloaded to the remote"
    )
    parser.add_argument(
        "--header", type=header, action="append", default=[], help="Name=Value added to remote requests"
    )
    parser.add_argument("--ca-file", help="CA bundle for an https remote (default: the system's)")
    add_data_path_timeouts(parser, connect="a backend")
    parser.add_argument(
        "--shutdown-deadline",
        type=duration,
        default="30s",
        help="on SIGTERM, in-flight requests and streams get this long to finish",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=duration,
        default=f"{ProxySettings.shutdown_grace:g}s",
        help="on SIGTERM, new connections are still accepted this long",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    try:
        remote = remote_target_from_url(args.remote, tuple(args.header)) if args.remote else None
    except ValueError as exc:
        parser.error(f"--remote: {exc}")
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    settings = data_path_settings(args, context)
    routing = RoutingTable(
        RoutePlan(remote=remote, percentage=args.percentage, offloading=remote is not None)
    )

    async def serve() -> None:
        server = ProxyServer(routing, args.local, settings)
        host, port = args.listen
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
