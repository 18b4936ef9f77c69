"""An HTTP/1.1 client for the control side: the Kubernetes API, OAuth token endpoints, the demo.

Off the data path (one request per poll, per watch or per token), so it is written for
clarity: a request goes out whole, and the response is parsed by ``httptools`` (llhttp, the
parser the proxy already ships), over asyncio streams with or without TLS.

- :func:`open_connection` then :meth:`Connection.send` gives a :class:`ResponseStream` as
  soon as the head has arrived; its body is read whole (:meth:`ResponseStream.read`,
  bounded) or piece by piece as it arrives (:meth:`ResponseStream.pieces`, for watches).
  A connection whose response was read to its end may carry the next request
  (:attr:`Connection.reusable`).
- :func:`fetch` is one request on a fresh connection (``Connection: close``), body whole.

The body's end is found as RFC 9112 6.3 says: chunked, Content-Length, or (neither) the
server closing the connection. A head over ``max_head`` bytes or a body over ``max_body``
raises :class:`ResponseTooLarge`; a response cut short :class:`IncompleteResponse`; bytes
llhttp refuses :class:`MalformedResponse`; a connection closed before any byte of the
answer ``ConnectionResetError`` (a kept-alive connection the server had closed: send
again on a fresh one). Error messages never quote the server's bytes: a token endpoint's
answer may hold a secret.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

from crds.addresses import ForbiddenAddressError, host_refusal, parse_ip, screen_addresses

MAX_HEAD_BYTES = 64 * 1024  # status line and header fields
READ_SIZE = 64 * 1024

# loop.getaddrinfo's shape: (host, port, *, type=...) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[..., Awaitable[list[tuple[Any, ...]]]]


class HttpError(Exception):
    """The server's answer is not a usable HTTP/1.1 response; the message says why."""


class MalformedResponse(HttpError):
    """llhttp refused the bytes: not HTTP/1.x, or a framing error."""


class IncompleteResponse(HttpError):
    """The connection ended before the response did."""


class ResponseTooLarge(HttpError):
    """The head or the body is over its limit; nothing more is read."""


@dataclass(frozen=True)
class Response:
    """A whole response: status, reason phrase, header fields (lower-case names, repeated
    fields joined with ", "), body (de-chunked)."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


def render_request(method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    """The request's bytes; Content-Length is added when there is a body, or for POST.

    ``target`` is in origin-form (``/path?query``) and ``headers`` must carry ``Host``.
    A CR, LF or NUL in a name, value or target raises ValueError (they would split the head).

    >>> render_request("GET", "/healthz", [("Host", "a:1")])
    b'GET /healthz HTTP/1.1\\r\\nHost: a:1\\r\\n\\r\\n'
    >>> render_request("POST", "/t", [("Host", "a")], b"x=1")
    b'POST /t HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 3\\r\\n\\r\\nx=1'
    """
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    if any(c in line for line in lines for c in "\r\n\0"):
        raise ValueError("a request line or header field holds CR, LF or NUL")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Message:
    """httptools' callback target for one response: what the head said, body pieces not
    yet handed out, and whether the message has ended."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reason = bytearray()
        self.headers: dict[str, str] = {}
        self.head_complete = False
        self.complete = False
        self.keep_alive = False  # llhttp forgets it once the message ends: kept here
        self.pieces: list[bytes] = []

    def on_message_begin(self) -> None:
        # Also after an interim (1xx) response, whose head is dropped.
        self.reason.clear()
        self.headers = {}

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1").strip()
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not (100 <= status < 200 and status != 101):  # 1xx but 101: another head follows
            self.head_complete = True

    def on_body(self, data: bytes) -> None:
        self.pieces.append(bytes(data))

    def on_message_complete(self) -> None:
        if self.head_complete:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise MalformedResponse("the server switched protocols") from None
        except httptools.HttpParserError as exc:
            # llhttp's message names the rule broken, never the bytes.
            raise MalformedResponse(f"not a valid HTTP/1.1 response ({exc})") from None

    @property
    def close_delimited(self) -> bool:
        """No Content-Length and not chunked: the body ends when the connection does."""
        codings = self.headers.get("transfer-encoding", "")
        chunked = codings.rsplit(",", 1)[-1].strip().lower() == "chunked"
        return not chunked and "content-length" not in self.headers


class ResponseStream:
    """A response whose head has arrived; the body is read from the connection on demand."""

    def __init__(self, reader: asyncio.StreamReader, message: _Message, max_body: int | None):
        self._reader = reader
        self._message = message
        self._max_body = max_body
        self._body_bytes = 0
        self.status = message.parser.get_status_code()
        self.reason = message.reason.decode("latin-1")
        self.headers: Mapping[str, str] = message.headers

    @property
    def complete(self) -> bool:
        """The body has been read to its end."""
        return self._message.complete

    @property
    def keep_alive(self) -> bool:
        """Read to its end, and neither side asked to close (HTTP/1.1 keep-alive rules)."""
        message = self._message
        return message.complete and not message.pieces and message.keep_alive

    async def pieces(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives (chunk framing removed), until its end. TimeoutError when
        nothing arrives for ``idle_timeout`` seconds; the ``max_body`` limit applies."""
        message = self._message
        while True:
            while message.pieces:
                piece = message.pieces.pop(0)
                self._body_bytes += len(piece)
                if self._max_body is not None and self._body_bytes > self._max_body:
                    raise ResponseTooLarge(f"the response body is larger than {self._max_body} bytes")
                yield piece
            if message.complete:
                return
            data = await asyncio.wait_for(self._reader.read(READ_SIZE), idle_timeout)
            if not data:
                if not message.close_delimited:
                    raise IncompleteResponse("the connection closed before the response body ended")
                message.complete = True
                continue
            message.feed(data)

    async def read(self) -> bytes:
        """The whole body (at most ``max_body`` bytes, else ResponseTooLarge)."""
        if self._max_body is None:
            raise ValueError("read() needs a max_body: only pieces() may stream without one")
        return b"".join([piece async for piece in self.pieces()])


class Connection:
    """One HTTP/1.1 connection; one request at a time. :meth:`close` it when done."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._last: ResponseStream | None = None

    @property
    def reusable(self) -> bool:
        """The last response was read to its end and allows the connection to stay open."""
        return self._last is not None and self._last.keep_alive and not self._reader.at_eof()

    async def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        *,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int | None,
    ) -> ResponseStream:
        """Writes the request and reads the response's head (see :func:`render_request`).

        ``max_body`` None: the body is unbounded as a whole, for a stream its reader bounds
        piece by piece (a watch)."""
        self._writer.write(render_request(method, target, headers, body))
        await self._writer.drain()
        message = _Message()
        received = 0
        while not message.head_complete:
            data = await self._reader.read(READ_SIZE)
            if not data:
                if received == 0:
                    raise ConnectionResetError("the server closed the connection before answering")
                raise IncompleteResponse("the connection closed before the response head ended")
            received += len(data)
            message.feed(data)
            if not message.head_complete and received > max_head:
                raise ResponseTooLarge(f"the response head is larger than {max_head} bytes")
        length = message.headers.get("content-length", "")
        if max_body is not None and length.isascii() and length.isdigit() and int(length) > max_body:
            raise ResponseTooLarge(f"the response body is larger than {max_body} bytes")
        self._last = ResponseStream(self._reader, message, max_body)
        return self._last

    def close(self) -> None:
        # No TLS close_notify exchange: nothing more is read, and a graceful close would
        # outlive an event loop that is shutting down.
        self._writer.transport.abort()


async def open_connection(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limit: int = READ_SIZE,
    refuse_link_local: str | None = None,
    resolve: Resolver | None = None,
) -> Connection:
    """A connection to ``host:port``, TLS when ``ssl_context`` is given (the server's name
    checked against ``host``). Wrap in a timeout: connecting has none of its own.

    ``refuse_link_local``: what the host is for (e.g. ``"tokenUrl"``), to never connect to
    a link-local or cloud metadata address (crds.addresses): a host that is such an
    address or name raises ForbiddenAddressError (an OSError) saying why; a DNS name is
    resolved (``resolve``, None: the loop's getaddrinfo), its forbidden addresses dropped
    and the others tried in order, ForbiddenAddressError when none is left."""
    tls_name = host if ssl_context is not None else None
    if refuse_link_local is not None:
        reason = host_refusal(host)
        if reason is not None:
            raise ForbiddenAddressError(f"{refuse_link_local} host {host} is refused: {reason}")
        if parse_ip(host) is None:  # a name: what it resolves to is judged
            return await _open_screened(
                host, port, ssl_context, limit, f"{refuse_link_local} host {host}", resolve
            )
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_context, server_hostname=tls_name, limit=limit
    )
    return Connection(reader, writer)


async def _open_screened(
    host: str, port: int, ssl_context: ssl.SSLContext | None, limit: int, what: str, resolve: Resolver | None
) -> Connection:
    """Resolve ``host``, drop the link-local and metadata addresses, try the others in order
    (as asyncio.open_connection does); TLS names the host, whatever address it reached."""
    infos = await (resolve or asyncio.get_running_loop().getaddrinfo)(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, _, proto, _, address in screen_addresses(what, infos):
        try:
            reader, writer = await asyncio.open_connection(
                address[0],
                port,
                family=family,
                proto=proto,
                ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None,
                limit=limit,
            )
        except ssl.SSLError:  # the address answered: TLS failing is not the address's fault
            raise
        except OSError as exc:
            errors.append(exc)
        else:
            return Connection(reader, writer)
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"cannot connect to {host}: {'; '.join(str(e) for e in errors) or 'no address'}")


async def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    ssl_context: ssl.SSLContext | None = None,
    timeout: float,
    max_body: int,
    refuse_link_local: str | None = None,
    resolve: Resolver | None = None,
) -> Response:
    """One request on a fresh connection, closed after it; the whole response.

    ``url`` is ``http://`` or ``https://`` (TLS with ``ssl_context``, else the system's
    CAs). ``Host`` and ``Connection: close`` are added. TimeoutError after ``timeout``
    seconds in all (resolution included); ValueError for a URL of another scheme.
    ``refuse_link_local`` and ``resolve``: see :func:`open_connection`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
    port = parts.port or (443 if tls is not None else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    async with asyncio.timeout(timeout):
        connection = await open_connection(
            parts.hostname, port, ssl_context=tls, refuse_link_local=refuse_link_local, resolve=resolve
        )
        try:
            head = [("Host", authority), *headers, ("Connection", "close")]
            stream = await connection.send(method, target, head, body, max_body=max_body)
            data = await stream.read()
        finally:
            connection.close()
    return Response(stream.status, stream.reason, stream.headers, data)
