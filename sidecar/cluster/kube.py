"""A small asyncio client for the few Kubernetes API calls the sidecar makes.

Why not the ``kubernetes`` package: importing it alone costs about 70 MiB of
RSS and the sidecar must idle within 40 MiB. The sidecar needs GET (one object
or a list) and watch, over HTTPS with the service account's credentials; this
module does exactly that with asyncio streams, ``ssl`` and ``json``:

- credentials from the pod (:func:`in_cluster_config`: the service-account
  token, re-read every minute because it rotates, and the cluster CA, from the
  sidecar's own projected volume named by ``OFFLOAD_SERVICEACCOUNT_DIR``, else
  the pod's default token) or from a kubeconfig file (:func:`load_kubeconfig`:
  CA, client certificate or token) for tests and development;
- :meth:`KubeClient.get` with one kept-alive connection for the polls;
- :meth:`KubeClient.watch` yielding watch events, bookmarks included; a 410
  Gone (as a status or as an ERROR event) raises :class:`Gone`;
- :func:`list_and_watch`, the informer loop: list, watch from the list's
  resourceVersion, relist on 410, reconnect with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

log = logging.getLogger("sidecar.cluster.kube")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Set by the injector: the sidecar's own projected token, CA and namespace, mounted into the
# sidecar alone, present even when the pod sets automountServiceAccountToken: false.
SERVICE_ACCOUNT_DIR_ENV = "OFFLOAD_SERVICEACCOUNT_DIR"
TOKEN_REREAD_SECONDS = 60.0  # client-go re-reads a projected token every minute too
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # one list response; a watch event line: 16 MiB
MAX_EVENT_BYTES = 16 * 1024 * 1024


class KubeError(Exception):
    """The API server could not be reached or answered something unusable."""


class ApiError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")


class Gone(ApiError):
    """410: the resourceVersion is too old to watch from; list again."""


class ConfigError(ValueError):
    """The credentials are missing or unusable; the message names the file or field."""


# --- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """Where the API server is and how to authenticate to it."""

    server: str  # https://host:port
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # None for http://
    token: str | None = field(default=None, repr=False)  # a static bearer token
    token_file: Path | None = None  # a rotating one, re-read every TOKEN_REREAD_SECONDS

    def __post_init__(self) -> None:
        url = urlsplit(self.server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ConfigError(f"server: must be an https:// URL, got {self.server!r}")


def in_cluster_config(env: Mapping[str, str] | None = None, account_dir: Path | None = None) -> ClusterConfig:
    """The pod's service account, as client-go's InClusterConfig reads it: from
    ``account_dir``, else ``$OFFLOAD_SERVICEACCOUNT_DIR`` (the injector's volume), else the
    default token's directory. ConfigError names the variable or file at fault."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set in a pod")
    if account_dir is None:
        own = env.get(SERVICE_ACCOUNT_DIR_ENV)
        account_dir = Path(own) if own else SERVICE_ACCOUNT_DIR
        hint = (
            f"is the volume at {SERVICE_ACCOUNT_DIR_ENV} mounted?"
            if own
            else "is automountServiceAccountToken false? the injector mounts a token of the sidecar's own"
        )
    else:
        hint = "the service account's files"
    token_file, ca_file = account_dir / "token", account_dir / "ca.crt"
    for path in (token_file, ca_file):
        if not path.is_file():
            raise ConfigError(f"{path}: missing ({hint})")
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{ca_file}: not a usable CA bundle: {_describe(exc)}") from None
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ClusterConfig(server=f"https://{netloc}", ssl_context=context, token_file=token_file)


def load_kubeconfig(path: Path, context: str | None = None) -> ClusterConfig:
    """A kubeconfig's current (or named) context: server, CA, client cert/key or token."""
    import yaml  # only here: in-cluster mode never pays for it

    where = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: cannot read kubeconfig: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: not a kubeconfig")
    base = Path(path).parent
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"{where}: current-context: not set")
    ctx = _named(doc, "contexts", "context", name, where)
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), where)
    user = _named(doc, "users", "user", ctx.get("user"), where) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str):
        raise ConfigError(f"{where}: clusters[{ctx.get('cluster')}].cluster.server: required")
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigError(f"{where}: insecure-skip-tls-verify is not supported: give certificate-authority")
    if "exec" in user or "auth-provider" in user:
        raise ConfigError(
            f"{where}: users[{ctx.get('user')}]: exec and auth-provider plugins are not supported"
        )
    context_ssl = None
    if server.startswith("https://"):
        cadata = _data_or_file(cluster, "certificate-authority", base, where)
        context_ssl = ssl.create_default_context(cadata=cadata.decode() if cadata else None)
        cert = _data_or_file(user, "client-certificate", base, where)
        key = _data_or_file(user, "client-key", base, where)
        if cert and key:
            _load_cert_chain(context_ssl, cert, key)
    token = user.get("token")
    token_file = user.get("tokenFile")
    return ClusterConfig(
        server=server.rstrip("/"),
        ssl_context=context_ssl,
        token=token if isinstance(token, str) else None,
        token_file=(base / token_file) if isinstance(token_file, str) else None,
    )


def _named(doc: dict[str, Any], section: str, member: str, name: Any, where: str) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(member) or {}
            if isinstance(value, dict):
                return value
    raise ConfigError(f"{where}: {section}: no entry named {name!r}")


def _data_or_file(section: dict[str, Any], key: str, base: Path, where: str) -> bytes | None:
    data = section.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}-data: not base64") from exc
    filename = section.get(key)
    if filename:
        try:
            return (base / filename).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from exc
    return None


def _load_cert_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # ssl wants files: write them where only we can read, load, remove.
    with tempfile.TemporaryDirectory(prefix="kube-") as tmp:
        cert_path, key_path = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(str(cert_path), str(key_path))


# --- HTTP/1.1 over asyncio streams -------------------------------------------------------------


@dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        # No TLS close_notify dance: nothing more is read, and a graceful close
        # would outlive an event loop that is being shut down.
        self.writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("the API server closed the connection")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise KubeError(f"not an HTTP response: {line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), (parts[2] if len(parts) > 2 else ""), headers


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise ConnectionResetError("the API server closed the connection mid-response")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise KubeError(f"bad chunk size {size_line[:40]!r}") from exc
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def _read_body(response: _Response) -> bytes:
    if response.chunked:
        parts, total = [], 0
        async for chunk in _chunks(response.reader):
            total += len(chunk)
            if total > MAX_RESPONSE_BYTES:
                raise KubeError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
            parts.append(chunk)
        return b"".join(parts)
    length = response.headers.get("content-length")
    if length is not None:
        if int(length) > MAX_RESPONSE_BYTES:
            raise KubeError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        return await response.reader.readexactly(int(length))
    return await response.reader.read(MAX_RESPONSE_BYTES)


def _error_of(status: int, reason: str, body: bytes) -> ApiError:
    message = ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            message = str(doc.get("message") or "")
            reason = str(doc.get("reason") or reason)
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    return (Gone if status == 410 else ApiError)(status, reason, message)


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
        self._idle: _Connection | None = None
        self._token: str | None = config.token
        self._token_read_at = -float("inf")
        self.requests = 0  # requests sent, for the API-load figure
        # API path -> why its last request failed; a success on the path clears it.
        self.failures: dict[str, str] = {}

    def problems(self) -> tuple[str, ...]:
        """Why requests are failing now, one line per API path, for /status."""
        return tuple(f"API server: {path}: {why}" for path, why in sorted(self.failures.items()))

    def _failed(self, path: str, exc: BaseException) -> None:
        if not isinstance(exc, Gone):  # an expired watch is routine: a relist follows
            self.failures[path] = _describe(exc)

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

    async def _connect(self) -> _Connection:
        ctx = self.config.ssl_context
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self._host,
                self._port,
                ssl=ctx,
                server_hostname=self._host if ctx is not None else None,
                limit=MAX_EVENT_BYTES,
            ),
            self.connect_timeout,
        )
        return _Connection(reader, writer)

    def _request_bytes(self, target: str, token: str | None, keep_alive: bool) -> bytes:
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {self._authority}",
            "Accept: application/json",
            f"User-Agent: {self.user_agent}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(self, conn: _Connection, target: str, token: str | None, keep_alive: bool) -> _Response:
        conn.writer.write(self._request_bytes(target, token, keep_alive))
        await conn.writer.drain()
        self.requests += 1
        status, reason, headers = await _read_head(conn.reader)
        return _Response(status, reason, headers, conn.reader, conn.writer)

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
                response = await self._send(conn, target, token, keep_alive=True)
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                conn.close()  # a kept-alive connection the server had closed: once more, fresh
                conn = await self._connect()
                response = await self._send(conn, target, token, keep_alive=True)
            body = await _read_body(response)
        except BaseException:
            conn.close()
            raise
        if response.headers.get("connection", "").lower() == "close":
            conn.close()
        else:
            self._idle = conn
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
                response = await asyncio.wait_for(
                    self._send(conn, target, self._bearer(), keep_alive=False), self.request_timeout
                )
                if response.status >= 400:
                    if response.status == 401:
                        self._token_read_at = -float("inf")
                    body = await asyncio.wait_for(_read_body(response), self.request_timeout)
                    raise _error_of(response.status, response.reason, body)
            except Exception as exc:
                self._failed(path, exc)
                raise
            self.failures.pop(path, None)
            # The server ends the watch after timeout_seconds; a silent connection
            # for longer than that (plus slack) is a dead one.
            idle_limit = timeout_seconds + 30
            async for line in _lines(response, idle_limit):
                event = _parse_event(line)
                if event is not None:
                    yield event
        finally:
            conn.close()


async def _lines(response: _Response, idle_limit: float) -> AsyncIterator[bytes]:
    buffer = b""
    if response.chunked:
        chunks = _chunks(response.reader).__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle_limit)
            except StopAsyncIteration:
                break
            buffer += chunk
            if len(buffer) > MAX_EVENT_BYTES:
                raise KubeError(f"a watch event larger than {MAX_EVENT_BYTES} bytes")
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                if line.strip():
                    yield line
    else:
        while True:
            line = await asyncio.wait_for(response.reader.readline(), idle_limit)
            if not line:
                break
            if line.strip():
                yield line
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
        raise (Gone if code == 410 else ApiError)(
            code, str(obj.get("reason") or ""), str(obj.get("message") or "")
        )
    return WatchEvent(kind, obj)


def _target(path: str, params: Mapping[str, str] | None) -> str:
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/': {path!r}")
    quoted = quote(path, safe="/:@-._~")
    return f"{quoted}?{urlencode(params)}" if params else quoted


# --- the informer loop ----------------------------------------------------------------------------


class Backoff:
    """Exponential backoff with full jitter: sleep uniform(0, min(cap, base * 2**n))."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, min(self.cap, self.base * 2**self.failures))
        self.failures += 1
        return max(delay, self.base / 10)

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Listed:
    """The full state after a (re)list: every item."""

    items: tuple[dict[str, Any], ...]
    resource_version: str


async def list_and_watch(
    client: KubeClient,
    path: str,
    params: Mapping[str, str] | None = None,
    *,
    backoff: Backoff | None = None,
    watch_timeout: Callable[[], int] | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> AsyncIterator[Listed | WatchEvent]:
    """Yields a :class:`Listed` snapshot, then every change, forever.

    A watch that ends is resumed from the last resourceVersion seen (bookmarks
    keep it fresh); 410 Gone means relist (another Listed follows); an error or a
    lost connection waits a jittered, growing delay and tries again.
    """
    backoff = backoff or Backoff()
    # Like client-go: a watch lasts 5-10 minutes so that many clients' watches
    # do not all end at once.
    watch_timeout = watch_timeout or (lambda: random.randint(300, 600))
    version: str | None = None
    while True:
        try:
            if version is None:
                listing = await client.get(path, params)
                version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                yield Listed(tuple(listing.get("items") or ()), version)
                backoff.reset()
            async for event in client.watch(
                path, params, resource_version=version, timeout_seconds=watch_timeout()
            ):
                version = event.resource_version or version
                backoff.reset()
                if event.type != "BOOKMARK":
                    yield event
        except Gone:
            log.info("watch of %s expired (410 Gone): listing again", path)
            version = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError, KubeError) as exc:
            delay = backoff.next_delay()
            log.warning("API server %s: %s; retrying in %.1f s", path, _describe(exc), delay)
            await sleep(delay)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
