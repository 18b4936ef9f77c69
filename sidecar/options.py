"""Command-line value types shared by ``offload-sidecar`` and its gateway mode.

Durations are Go durations, as Kubernetes users write them (``1m30s``, ``500ms``), parsed
by :func:`crds.hpa.parse_go_duration`; a bare number is seconds.
"""

from __future__ import annotations

import argparse
import re
import ssl
from collections.abc import Callable

from crds.hpa import parse_go_duration
from sidecar.proxy.settings import ProxySettings

_SECONDS = re.compile(r"\d+(?:\.\d+)?")  # a bare number of seconds


def duration(text: str) -> float:
    """``500ms``, ``1s``, ``2m``, ``1m30s``, ``1.5`` (seconds) -> seconds.

    >>> duration("1m30s"), duration("500ms"), duration("1.5")
    (90.0, 0.5, 1.5)
    """
    text = text.strip()
    if _SECONDS.fullmatch(text):
        return float(text)
    try:
        if not text:
            raise ValueError(text)
        return parse_go_duration(text).total_seconds()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (examples: 500ms, 1s, 2m, 1m30s)"
        ) from None


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def address(default_host: str) -> Callable[[str], tuple[str, int]]:
    """The parser of ``host:port``, ``[v6]:port`` or a bare ``port`` (on ``default_host``)."""

    def parse(text: str) -> tuple[str, int]:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = default_host, text
        host = host.strip("[]") or default_host
        if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"not host:port: {text!r}")
        return host, int(port)

    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the absent ones (None, empty) and those the help says itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        absent = action.default is None or (isinstance(action.default, (str, list)) and not action.default)
        if absent or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def data_path_settings(args: argparse.Namespace, remote_ssl_context: ssl.SSLContext | None) -> ProxySettings:
    """The data path's settings from the flags of :func:`add_data_path_timeouts` and
    ``--shutdown-grace``, which every command defines with its own help."""
    return ProxySettings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        client_idle_timeout=args.client_idle_timeout,
        shutdown_grace=args.shutdown_grace,
        remote_ssl_context=remote_ssl_context,
    )


def add_data_path_timeouts(group: argparse._ArgumentGroup | argparse.ArgumentParser, connect: str) -> None:
    """``--connect-timeout``, ``--read-timeout`` and ``--client-idle-timeout``, with the
    data path's defaults shown as Go durations; ``connect`` says what a missed connect does."""
    defaults = ProxySettings()
    group.add_argument(
        "--connect-timeout",
        type=positive_duration,
        default=f"{defaults.connect_timeout:g}s",
        help=f"TCP connect and TLS handshake to {connect}",
    )
    group.add_argument(
        "--read-timeout",
        type=positive_duration,
        default=f"{defaults.read_timeout:g}s",
        help="a request in flight with neither side sending anything",
    )
    group.add_argument(
        "--client-idle-timeout",
        type=positive_duration,
        default=f"{defaults.client_idle_timeout:g}s",
        help="a client keep-alive connection with no request; also the time a request head may take in all",
    )
