"""The admin port's server: /healthz, /readyz, /metrics (Prometheus text), /status and
/signals (JSON).

Separate from the proxy port, so that probes and scrapes never compete with
model traffic and the proxy port serves nothing but the model.

The server is a few dozen lines on asyncio streams rather than Starlette under
uvicorn: four GET endpoints need no framework, it saves ~6 MiB of RSS in a
process injected into every model pod, and uvicorn would install signal
handlers of its own where the sidecar's SIGTERM must drain the proxy.
Each connection carries one request (``Connection: close``); heads are
bounded in size and time, and connections in number. Anonymous connections must
never starve the kubelet's probes (/healthz is the liveness probe, /readyz the
readiness one): when every slot is taken, the oldest connection still waiting for
its request head (idle or slow) is closed to make room, and a newcomer is refused
only while every slot is busy answering a request, which takes at most
``SEND_TIMEOUT``. What it serves is rendered
by :mod:`sidecar.admin.metrics` and :mod:`sidecar.admin.status`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from sidecar.admin.metrics import PROMETHEUS_TEXT, render_metrics
from sidecar.admin.status import status_document
from sidecar.control.view import ControlView
from sidecar.proxy.stats import ProxyStats

log = logging.getLogger("sidecar.admin")

MAX_HEAD_BYTES = 8 * 1024
# Seconds a connection may take to send its request head. A probe or scraper sends it at
# once; anything slower is idle or a slowloris, and is also the first evicted when full.
HEAD_TIMEOUT = 2.0
# Seconds to hand a response to the kernel and close: bounds a client that stops reading.
SEND_TIMEOUT = 5.0
MAX_CONNECTIONS = 64


def response(status: int, reason: str, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


def text(status: int, reason: str, message: str, head_only: bool = False) -> bytes:
    return response(status, reason, "text/plain; charset=utf-8", (message + "\n").encode(), head_only)


class AdminServer:
    """Serves the endpoints from the given callables.

    ``max_connections``, ``head_timeout`` and ``send_timeout`` (seconds) default to the
    module's constants; tests shrink them."""

    def __init__(
        self,
        view: Callable[[], ControlView],
        stats: ProxyStats,
        ready: Callable[[], bool],
        signals: Callable[[], dict[str, Any]] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ):
        self.view = view
        self.stats = stats
        self.ready = ready
        self.signals = signals
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        # Open connections in arrival order -> True while still waiting for the request head.
        self._open: dict[asyncio.StreamWriter, bool] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, method: str, target: str) -> bytes:
        """The whole response to one request line; pure but for the callables."""
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return text(405, "Method Not Allowed", f"method {method} not allowed: use GET", head_only)
        path = target.split("?", 1)[0]
        if path == "/healthz":
            return text(200, "OK", "ok", head_only)
        if path == "/readyz":
            if self.ready():
                return text(200, "OK", "ready", head_only)
            return text(503, "Service Unavailable", "not ready", head_only)
        if path == "/metrics":
            body = render_metrics(self.view(), self.stats, ready=self.ready()).encode()
            return response(200, "OK", PROMETHEUS_TEXT, body, head_only)
        if path == "/status":
            doc = status_document(self.view(), self.stats, ready=self.ready())
            body = (json.dumps(doc, indent=2) + "\n").encode()
            return response(200, "OK", "application/json", body, head_only)
        if path == "/signals" and self.signals is not None:
            # Read by the controller every second per pod: compact.
            body = json.dumps(self.signals(), separators=(",", ":")).encode()
            return response(200, "OK", "application/json", body, head_only)
        return text(
            404,
            "Not Found",
            f"no such endpoint {path!r}: /healthz /readyz /metrics /status /signals",
            head_only,
        )

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Takes a slot for a new connection, closing the oldest one still waiting for its
        head if every slot is taken; False (refuse it) only if every slot is busy answering."""
        if len(self._open) >= self.max_connections:
            victim = next((w for w, waiting in self._open.items() if waiting), None)
            if victim is None:
                return False
            del self._open[victim]
            victim.transport.abort()  # its reader sees EOF; its task ends quietly
        self._open[writer] = True
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            writer.write(text(503, "Service Unavailable", "too many admin connections"))
            await self._finish(writer)
            return
        try:
            try:
                async with asyncio.timeout(self.head_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(text(431, "Request Header Fields Too Large", "request head over 8 KiB"))
                return
            except TimeoutError:
                writer.write(text(408, "Request Timeout", "request head not received in time"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if writer not in self._open:  # evicted just as its head arrived
                return
            self._open[writer] = False
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
                writer.write(text(400, "Bad Request", "malformed request line"))
                return
            try:
                writer.write(self.respond(parts[0], parts[1]))
            except Exception:  # a bug in rendering must not kill the admin port
                log.exception("admin endpoint %s failed", parts[1])
                writer.write(text(500, "Internal Server Error", "internal error; see the sidecar's log"))
        finally:
            await self._finish(writer)
            self._open.pop(writer, None)

    async def _finish(self, writer: asyncio.StreamWriter) -> None:
        """Sends what was written and closes, within ``send_timeout``; then aborts."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except (ConnectionError, OSError):
            pass
