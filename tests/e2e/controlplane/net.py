"""Loopback ports and plain HTTP(S) probes."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, ssl_ctx: ssl.SSLContext | None = None, timeout: float = 5) -> int:
    """The status code of a GET; connection errors propagate. Closes the response either way."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ssl_ctx) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code
