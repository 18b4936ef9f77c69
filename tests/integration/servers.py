"""Real HTTP/1.1 servers on 127.0.0.1 standing for model servers, for tests and demos.

Written on plain asyncio streams with their own small HTTP parsing, so that the
proxy under test (httptools) is never checked against itself. Each server
records every request head it receives (``requests``) and answers by the last
segment of the path, so a remote path prefix doesn't change the behaviour:

    .../echo (default)  JSON of what arrived: method, target (exact bytes, latin-1),
                        header list in order, body size, the body (when <= 64 KiB)
                        and its first 64 KiB (body_head);
                        two Set-Cookie fields; ``?hop=1`` adds hop-by-hop fields
    .../sse?n=&interval_ms=&first_ms=   Server-Sent Events, chunked, one write per
                        event, the first ``first_ms`` after the head (an LLM's queue and
                        prefill); each event's data is ``{"i": i, "t": <sender's clock>}``
                        (``clock``: time.monotonic in-process, or time.time)
    .../download?bytes=&chunked=   that many bytes, streamed in 64 KiB pieces
    .../status?code=    that status (204/304 without a body)
    .../early           103 Early Hints, then 200
    .../eof?bytes=      a body without length, ended by closing the connection
    .../slow?delay_ms=  waits, then echoes
    .../ws              WebSocket handshake (101), then echoes raw bytes

A request with ``Expect: 100-continue`` gets ``100 Continue`` before its body is
read. ``answer`` set to ``(status, fields)`` answers every request so (a busy
model's 503 or 429). ``kill()`` aborts every connection at once, as a crashed
server would.

Use from synchronous tests through :class:`LoopThread`::

    with LoopThread() as lt:
        local = lt.run(Upstream.started("local"))
        ...
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

REPO = Path(__file__).resolve().parents[2]
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Seen:
    """A request head as it arrived at an upstream."""

    method: str
    target: bytes
    version: str
    headers: list[tuple[str, str]]
    body_size: int = 0

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class BadRequest(Exception):
    pass


async def read_head(reader: asyncio.StreamReader) -> tuple[str, bytes, str, list[tuple[str, str]]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise BadRequest("incomplete head") from exc
        return None
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return parts[0].decode(), parts[1], parts[2].decode(), headers


async def iter_body(reader: asyncio.StreamReader, seen: Seen):
    """Yield the request body in pieces as they arrive (never whole)."""
    te = seen.header("transfer-encoding")
    if te is not None:
        if te.lower() != "chunked":
            raise BadRequest("unsupported transfer-encoding")
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            left = size
            while left:
                piece = await reader.read(min(left, 1 << 16))
                if not piece:
                    raise BadRequest("eof in chunk")
                left -= len(piece)
                yield piece
            await reader.readexactly(2)
    else:
        lengths = seen.all("content-length")
        if len(lengths) > 1:
            raise BadRequest("several content-length")
        left = int(lengths[0]) if lengths else 0
        while left:
            piece = await reader.read(min(left, 1 << 16))
            if not piece:
                raise BadRequest("eof in body")
            left -= len(piece)
            yield piece


def _query(target: bytes) -> dict[str, str]:
    _, _, query = target.decode("latin-1").partition("?")
    return {k: v[0] for k, v in parse_qs(query).items()}


def _route(target: bytes) -> str:
    path = target.split(b"?", 1)[0]
    return path.rstrip(b"/").rsplit(b"/", 1)[-1].decode("latin-1")


class Upstream:
    """One model-server stand-in on 127.0.0.1."""

    def __init__(self, name: str = "local", *, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.clock = clock
        self.requests: list[Seen] = []
        self.port = 0
        self.connections_accepted = 0
        self.delay_s = 0.0  # added before every answer: a slow or overloaded model
        # (status, fields): every request gets this answer (a busy model: 503, 429), body read first.
        self.answer: tuple[int, list[tuple[str, str]]] | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    async def started(cls, name: str = "local", port: int = 0, **kwargs: Any) -> Upstream:
        server = cls(name, **kwargs)
        await server.start(port)
        return server

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> int:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", port, ssl=ssl_context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def kill(self) -> None:
        """Stop listening and abort every connection (RST), like a crash."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.kill()

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def count(self, route: str | None = None) -> int:
        return sum(1 for r in self.requests if route is None or _route(r.target) == route)

    # --- serving ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await read_head(reader)
                if head is None:
                    break
                method, target, version, headers = head
                seen = Seen(method, target, version, headers)
                self.requests.append(seen)
                keep_going = await self._answer(seen, reader, writer)
                await writer.drain()
                if not keep_going:
                    break
        except (BadRequest, ValueError) as exc:
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (len(str(exc)), str(exc).encode())
            )
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort() if writer.transport.is_closing() else writer.close()

    async def _consume(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: int = 65536
    ) -> bytes:
        if (seen.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        kept = bytearray()
        async for piece in iter_body(reader, seen):
            seen.body_size += len(piece)
            if len(kept) < keep:
                kept += piece[: keep - len(kept)]
        return bytes(kept)

    def _head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}", f"X-Upstream: {self.name}"]
        lines += [f"{n}: {v}" for n, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _answer(self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        route = _route(seen.target)
        query = _query(seen.target)
        close = (seen.header("connection") or "").lower() == "close"
        if route == "ws" and (seen.header("upgrade") or "").lower() == "websocket":
            key = (seen.header("sec-websocket-key") or "").encode()
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
            writer.write(
                self._head(
                    101,
                    "Switching Protocols",
                    [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)],
                )
            )
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            return False
        body = await self._consume(seen, reader, writer)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.answer is not None:
            status, fields = self.answer
            text = f"{self.name} busy\n".encode()
            writer.write(self._head(status, "Busy", [*fields, ("Content-Length", str(len(text)))]) + text)
            return not close
        if route == "sse":
            n, interval = int(query.get("n", "10")), float(query.get("interval_ms", "50")) / 1000
            writer.write(
                self._head(
                    200,
                    "OK",
                    [
                        ("Content-Type", "text/event-stream"),
                        ("Cache-Control", "no-cache"),
                        ("Transfer-Encoding", "chunked"),
                    ],
                )
            )
            await writer.drain()
            first = float(query.get("first_ms", "0")) / 1000
            for i in range(n):
                if i or first:
                    await asyncio.sleep(interval if i else first)
                event = f"data: {json.dumps({'i': i, 't': self.clock()})}\n\n".encode()
                writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            return not close
        if route == "download":
            size = int(query.get("bytes", "0"))
            chunked = query.get("chunked") == "1"
            framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))
            writer.write(self._head(200, "OK", [("Content-Type", "application/octet-stream"), framing]))
            piece = b"x" * 65536
            left = size
            while left:
                part = piece[: min(left, len(piece))]
                writer.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                left -= len(part)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            return not close
        if route == "status":
            code = int(query.get("code", "200"))
            if code in (204, 304):
                extra = [("ETag", '"v1"')] if code == 304 else []
                writer.write(self._head(code, "No Content" if code == 204 else "Not Modified", extra))
            else:
                text = f"status {code}\n".encode()
                writer.write(self._head(code, "Status", [("Content-Length", str(len(text)))]) + text)
            return not close
        if route == "early":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(self._head(200, "OK", [("Content-Length", "2")]) + b"ok")
            return not close
        if route == "eof":
            size = int(query.get("bytes", "1000"))
            writer.write(self._head(200, "OK", [("Content-Type", "application/octet-stream")]))
            writer.write(b"e" * size)
            return False
        if route == "slow":
            await asyncio.sleep(float(query.get("delay_ms", "100")) / 1000)
        payload = json.dumps(
            {
                "server": self.name,
                "method": seen.method,
                "target": seen.target.decode("latin-1"),
                "headers": seen.headers,
                "body_size": seen.body_size,
                "body": body.decode("latin-1") if seen.body_size <= len(body) else None,
                "body_head": body.decode("latin-1"),
            }
        ).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Path=/"),
        ]
        if query.get("hop") == "1":
            headers += [
                ("Connection", "X-Private"),
                ("X-Private", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("Trailer", "X-Checksum"),
                ("X-End-To-End", "kept"),
            ]
        # One write: a kill() lands before or after a response, never inside one.
        writer.write(self._head(200, "OK", headers) + (payload if seen.method != "HEAD" else b""))
        return not close


class LoopThread:
    """A uvloop event loop in a daemon thread, driven from synchronous tests."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapped() -> Any:
            return fn()

        return self.run(wrapped())


# --- clients speaking exact bytes ------------------------------------------------------


class ResponseReader:
    """Reads responses one after another from a blocking socket, keeping leftovers."""

    def __init__(self, sock: Any):
        self.sock = sock
        self.buf = b""

    def _more(self, what: str) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed {what}; have {self.buf[:200]!r}")
        self.buf += data

    def response(self, *, head_only: bool = False) -> tuple[int, dict[str, list[str]], bytes]:
        """Status, headers (lower-case names), body. Content-Length, chunked or
        read-until-close bodies; 1xx interim responses skipped."""
        while True:
            while b"\r\n\r\n" not in self.buf:
                self._more("before a response head")
            raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers: dict[str, list[str]] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers.setdefault(name.lower(), []).append(value.strip())
            if not (100 <= status < 200 and status != 101):
                break
        if head_only or status in (101, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            size = int(headers["content-length"][0])
            while len(self.buf) < size:
                self._more("in a body")
            body, self.buf = self.buf[:size], self.buf[size:]
            return status, headers, body
        if headers.get("transfer-encoding") == ["chunked"]:
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._more("in a chunk size")
                line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(line, 16)
                while len(self.buf) < size + 2:
                    self._more("in a chunk")
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    return status, headers, body
        while data := self.sock.recv(65536):
            self.buf += data
        body, self.buf = self.buf, b""
        return status, headers, body


def read_response(sock: Any, *, head_only: bool = False) -> tuple[int, dict[str, list[str]], bytes]:
    """One response from a blocking socket (see :class:`ResponseReader`); for a
    socket that carries one response, or whose responses were not sent at once."""
    if not isinstance(sock, ResponseReader):
        sock = ResponseReader(sock)
    return sock.response(head_only=head_only)


def _recv(sock: Any) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("closed in chunked body")
    return data


def wait_until(what: str, condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` (every 10 ms, the pace only) until it is true; AssertionError
    naming ``what`` after ``timeout`` seconds. For state another thread or process
    changes: the outcome is decided by the state, not by how long the wait took."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.01)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def exchange_raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send exact bytes, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


# --- the proxy as a subprocess -------------------------------------------------------


class ProxyProcess:
    """``python -m sidecar.proxy`` as a child process, for RSS and signal tests."""

    def __init__(self, *args: str):
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> ProxyProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.proxy", "--listen", "127.0.0.1:0", *self.args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on .*:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"proxy did not start: {line!r}")
        self.port = int(match.group(1))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


def proc_status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


# --- the proxy in-process between two upstreams ----------------------------------------


class ProxyHarness:
    """A local and a remote :class:`Upstream` and a ProxyServer between them, on a LoopThread.

    ``percentage`` of the requests go to the remote (offloading active when > 0).
    """

    def __init__(
        self,
        lt: LoopThread,
        *,
        percentage: int = 0,
        with_remote: bool = True,
        headers: tuple[tuple[str, str], ...] = (),
        path_prefix: str = "",
        settings: Any = None,
        remote_scheme: str = "http",
        remote_ssl: ssl.SSLContext | None = None,
        spillover: int | None = None,
    ):
        from sidecar.proxy.routing import RoutePlan, RoutingTable
        from sidecar.proxy.server import ProxyServer, ProxySettings

        self.lt = lt
        self.local = lt.run(Upstream.started("local"))
        self.remote = Upstream("remote")
        lt.run(self.remote.start(0, remote_ssl))
        self.target = None
        if with_remote:
            from sidecar.proxy.routing import RemoteTarget

            self.target = RemoteTarget(
                scheme=remote_scheme,
                host="127.0.0.1",
                port=self.remote.port,
                authority=f"127.0.0.1:{self.remote.port}",
                path_prefix=path_prefix,
                headers=headers,
            )
        self.spillover = spillover
        self.routing = RoutingTable(
            RoutePlan(
                remote=self.target, percentage=percentage, offloading=percentage > 0, spillover=spillover
            )
        )
        self.ready_changes: list[bool] = []
        self.proxy = ProxyServer(
            self.routing,
            self.local.address,
            settings or ProxySettings(),
            on_ready_change=self.ready_changes.append,
        )
        self.port = lt.run(self.proxy.start("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.port}"

    def set_percentage(self, percentage: int) -> None:
        from sidecar.proxy.routing import RoutePlan

        self.lt.call(
            lambda: self.routing.update(
                RoutePlan(
                    remote=self.target,
                    percentage=percentage,
                    offloading=percentage > 0,
                    spillover=self.spillover,
                )
            )
        )

    def close(self) -> None:
        if self.proxy.ready or not self.proxy.draining:
            self.lt.run(self.proxy.shutdown(0.5))
        self.lt.run(self.local.kill())
        self.lt.run(self.remote.kill())
