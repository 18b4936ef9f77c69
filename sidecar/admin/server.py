"""The admin port's server: /healthz, /readyz, /metrics (Prometheus text), /status and
/signals (JSON).

Separate from the proxy port, so that probes and scrapes never compete with
model traffic and the proxy port serves nothing but the model.

The server is a few dozen lines on asyncio streams rather than Starlette under
uvicorn: four GET endpoints need no framework, it saves ~6 MiB of RSS in a
process injected into every model pod, and uvicorn would install signal
handlers of its own where the sidecar's SIGTERM must drain the proxy.
Each connection carries one request (``Connection: close``); heads are
bounded in size and time, and connections in number. What it serves is rendered
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
HEAD_TIMEOUT = 5.0
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
    """Serves the four endpoints from the given callables."""

    def __init__(
        self,
        view: Callable[[], ControlView],
        stats: ProxyStats,
        ready: Callable[[], bool],
        signals: Callable[[], dict[str, Any]] | None = None,
    ):
        self.view = view
        self.stats = stats
        self.ready = ready
        self.signals = signals
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections = 0

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                writer.write(text(503, "Service Unavailable", "too many admin connections"))
                return
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(text(431, "Request Header Fields Too Large", "request head over 8 KiB"))
                return
            except TimeoutError:
                writer.write(text(408, "Request Timeout", "request head not received in time"))
                return
            except asyncio.IncompleteReadError:
                return
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
            self._connections -= 1
            try:
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
