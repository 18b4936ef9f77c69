"""A small asyncio client for the few Kubernetes API calls the sidecar makes.

Why not the ``kubernetes`` package: importing it alone costs about 70 MiB of RSS and the
sidecar must idle within 40 MiB. The sidecar needs GET (one object or a list) and watch,
over HTTPS with the service account's credentials (sidecar/cluster/credentials.py); this
module does exactly that over sidecar/httpclient.py:

- :meth:`KubeClient.get` with one kept-alive connection for the polls;
- :meth:`KubeClient.watch` yielding watch events, bookmarks included; a 410 Gone (as a
  status or as an ERROR event) raises :class:`ApiGone`.

Every failure the API server causes is a :class:`KubeError` (or a connection error:
OSError, TimeoutError, ssl.SSLError).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from sidecar.cluster.credentials import ClusterConfig
from sidecar.httpclient import Connection, HttpError, ResponseStream, open_connection

log = logging.getLogger("sidecar.cluster.client")

TOKEN_REREAD_SECONDS = 60.0  # client-go re-reads a projected token every minute too
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # one list response
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one watch event line


class KubeError(Exception):
    """The API server could not be reached or answered something unusable."""


class ApiError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")


class ApiGone(ApiError):
    """410 Gone: the resourceVersion is too old to watch from; list again."""


def describe_error(exc: BaseException) -> str:
    """One line for a log or /status: the type and message, "timed out" for a timeout."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error_of(status: int, reason: str, body: bytes) -> ApiError:
    message = ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            message = str(doc.get("message") or "")
            reason = str(doc.get("reason") or reason)
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    return (ApiGone if status == 410 else ApiError)(status, reason, message)


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


class KubeClient:
    """GET and watch against one API server. Close it with :meth:`close`."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        user_agent: str = "offload-sidecar",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.user_agent = user_agent
        self._clock = clock
        url = urlsplit(config.server)
        self._host = url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._authority = url.netloc
        self._idle: Connection | None = None
        self._token: str | None = config.token
        self._token_read_at = -float("inf")
        self.requests = 0  # requests sent, for the API-load figure
        # API path -> why its last request failed; a success on the path clears it.
        self.failures: dict[str, str] = {}

    def problems(self) -> tuple[str, ...]:
        """Why requests are failing now, one line per API path, for /status."""
        return tuple(f"API server: {path}: {why}" for path, why in sorted(self.failures.items()))

    def _failed(self, path: str, exc: BaseException) -> None:
        if not isinstance(exc, ApiGone):  # an expired watch is routine: a relist follows
            self.failures[path] = describe_error(exc)

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.close()
            self._idle = None

    # -- auth -----------------------------------------------------------------------------------

    def _bearer(self) -> str | None:
        file = self.config.token_file
        if file is not None and self._clock() - self._token_read_at >= TOKEN_REREAD_SECONDS:
            try:
                self._token = file.read_text().strip() or None
                self._token_read_at = self._clock()
            except OSError as exc:
                log.warning("cannot read the service account token %s: %s", file, exc.strerror)
        return self._token

    # -- transport -------------------------------------------------------------------------------

    async def _connect(self) -> Connection:
        return await asyncio.wait_for(
            open_connection(self._host, self._port, ssl_context=self.config.ssl_context),
            self.connect_timeout,
        )

    async def _send(
        self, conn: Connection, target: str, token: str | None, keep_alive: bool, max_body: int | None
    ) -> ResponseStream:
        headers = [
            ("Host", self._authority),
            ("Accept", "application/json"),
            ("User-Agent", self.user_agent),
            ("Connection", "keep-alive" if keep_alive else "close"),
        ]
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        self.requests += 1
        try:
            return await conn.send("GET", target, headers, max_body=max_body)
        except HttpError as exc:
            raise KubeError(f"the API server's answer: {exc}") from exc

    # -- GET --------------------------------------------------------------------------------------

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET ``path`` (an object or a list); raises ApiError for error statuses."""
        try:
            doc = await self._get(path, params)
        except Exception as exc:
            self._failed(path, exc)
            raise
        self.failures.pop(path, None)
        return doc

    async def _get(self, path: str, params: Mapping[str, str] | None) -> dict[str, Any]:
        target = _target(path, params)
        status, reason, body = await asyncio.wait_for(self._get_once(target), self.request_timeout)
        if status == 401 and self.config.token_file is not None:
            self._token_read_at = -float("inf")  # the token may just have rotated: read it again
            status, reason, body = await asyncio.wait_for(self._get_once(target), self.request_timeout)
        if status >= 400:
            raise _error_of(status, reason, body)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise KubeError(f"GET {path}: the response is not JSON") from exc
        if not isinstance(doc, dict):
            raise KubeError(f"GET {path}: the response is not a JSON object")
        return doc

    async def _get_once(self, target: str) -> tuple[int, str, bytes]:
        token = self._bearer()
        conn, self._idle = self._idle, None
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            try:
                response = await self._send(conn, target, token, True, MAX_RESPONSE_BYTES)
            except ConnectionError:
                if not reused:
                    raise
                conn.close()  # a kept-alive connection the server had closed: once more, fresh
                conn = await self._connect()
                response = await self._send(conn, target, token, True, MAX_RESPONSE_BYTES)
            body = await _read(response)
        except BaseException:
            conn.close()
            raise
        if conn.reusable:
            self._idle = conn
        else:
            conn.close()
        return response.status, response.reason, body

    # -- watch -------------------------------------------------------------------------------------

    async def watch(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        resource_version: str,
        timeout_seconds: int = 300,
        bookmarks: bool = True,
    ) -> AsyncIterator[WatchEvent]:
        """Watch events from ``resource_version`` until the server ends the watch."""
        query = dict(params or {})
        query.update(watch="true", resourceVersion=resource_version, timeoutSeconds=str(timeout_seconds))
        if bookmarks:
            query["allowWatchBookmarks"] = "true"
        target = _target(path, query)
        try:
            conn = await self._connect()
        except Exception as exc:
            self._failed(path, exc)
            raise
        try:
            try:
                # A watch's body is bounded per event (MAX_EVENT_BYTES), not as a whole.
                response = await asyncio.wait_for(
                    self._send(conn, target, self._bearer(), False, None), self.request_timeout
                )
                if response.status >= 400:
                    if response.status == 401:
                        self._token_read_at = -float("inf")
                    body = await asyncio.wait_for(_read(response, MAX_RESPONSE_BYTES), self.request_timeout)
                    raise _error_of(response.status, response.reason, body)
            except Exception as exc:
                self._failed(path, exc)
                raise
            self.failures.pop(path, None)
            # The server ends the watch after timeout_seconds; a silent connection
            # for longer than that (plus slack) is a dead one.
            async for line in _lines(response, timeout_seconds + 30):
                event = _parse_event(line)
                if event is not None:
                    yield event
        finally:
            conn.close()


async def _read(response: ResponseStream, limit: int | None = None) -> bytes:
    parts, total = [], 0
    try:
        async for piece in response.pieces():
            total += len(piece)
            if limit is not None and total > limit:
                raise KubeError(f"response larger than {limit} bytes")
            parts.append(piece)
    except HttpError as exc:
        raise KubeError(f"the API server's answer: {exc}") from exc
    return b"".join(parts)


async def _lines(response: ResponseStream, idle_limit: float) -> AsyncIterator[bytes]:
    """The watch stream's lines (one JSON event each), however the pieces split them."""
    buffer = b""
    try:
        async for piece in response.pieces(idle_timeout=idle_limit):
            buffer += piece
            *complete, buffer = buffer.split(b"\n")
            if len(buffer) > MAX_EVENT_BYTES:
                raise KubeError(f"a watch event larger than {MAX_EVENT_BYTES} bytes")
            for line in complete:
                if line.strip():
                    yield line
    except HttpError as exc:
        raise KubeError(f"the API server's answer: {exc}") from exc
    if buffer.strip():
        yield buffer


def _parse_event(line: bytes) -> WatchEvent | None:
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise KubeError("a watch event is not JSON") from exc
    kind, obj = doc.get("type"), doc.get("object")
    if not isinstance(obj, dict) or not isinstance(kind, str):
        raise KubeError("a watch event without type or object")
    if kind == "ERROR":
        code = int(obj.get("code") or 500)
        raise (ApiGone if code == 410 else ApiError)(
            code, str(obj.get("reason") or ""), str(obj.get("message") or "")
        )
    return WatchEvent(kind, obj)


def _target(path: str, params: Mapping[str, str] | None) -> str:
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/': {path!r}")
    quoted = quote(path, safe="/:@-._~")
    return f"{quoted}?{urlencode(params)}" if params else quoted
