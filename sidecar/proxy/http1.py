"""HTTP/1.1 head rules for the proxy, as pure functions over parsed heads.

The socket code (sidecar/proxy/client.py, sidecar/proxy/exchange.py) parses with httptools (llhttp, strict mode:
it already refuses Content-Length together with Transfer-Encoding, duplicate
Content-Length, obs-fold, bare LF, NUL and invalid tokens). What llhttp lets
through but a reverse proxy must not forward anywhere is refused here:

- request targets other than origin-form (``/path?query``) and ``*``: absolute-form
  would make an open proxy, authority-form is CONNECT;
- a missing (HTTP/1.1), repeated or malformed Host;
- Transfer-Encoding other than exactly ``chunked``, and any Transfer-Encoding in an
  HTTP/1.0 request (RFC 9112 6.1: its framing is faulty);
- CONNECT.

A request the model itself would accept is refused nowhere else: what is only
dangerous on one route is noted on the head (``remote_limits``) and keeps it off
that route (sidecar.proxy.server), so it is served locally, byte for byte, instead:

- ``LIMIT_PREFIX``: dot segments (``/../``, also percent-encoded or with
  ``;params``: ``/..;x/``), separators a remote may decode or normalise into
  ``/`` (a backslash, ``%2F``, ``%5C``) and ``*``: under a remote's pathPrefix
  they could climb out of it while carrying its headersToAdd;
- ``LIMIT_TRACE``: TRACE would echo a remote's added credentials back to the client.

Then it renders the heads sent on: hop-by-hop fields dropped (Connection and the
fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade except for
WebSocket, Proxy-Authorization/-Authenticate), framing re-done by the proxy,
X-Forwarded-For appended, X-Forwarded-Proto/-Host kept as they arrived and set
only where absent, every other field kept in order, repeated fields included,
the target byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Fields the proxy sets itself on the way to an upstream (X-Forwarded-For: appended to).
_REPLACED = frozenset({b"host", b"content-length", b"x-forwarded-for"})
_REQUEST_DROP = HOP_BY_HOP | _REPLACED
# Kept fields the proxy looks at: Expect, and the forwarding fields it sets only where absent.
_NOTED = frozenset({b"expect", b"x-forwarded-proto", b"x-forwarded-host"})
# Fields re-done on the way back to the client.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}

# RFC 9112 3.2: uri-host [":" port], where uri-host is [IPv6], IPv4 or a reg-name, which
# may be empty (an empty Host is what a client sends for a target without authority).
# No userinfo, whitespace or path.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")
_DOT_SEGMENTS = frozenset({b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e."})

# Routes a request may not take (RequestHead.remote_limits, a bit mask).
LIMIT_PREFIX = 1  # not under a remote's pathPrefix: the path could climb out of it
LIMIT_TRACE = 2  # not to a remote adding headers: TRACE would echo them to the client

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class InvalidResponse(ValueError):
    """An upstream response head the proxy cannot relay (a 502); the message names
    the field at fault."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request the proxy answers itself, never forwarding it."""

    status: int
    reason: str  # short, names the field at fault; never echoes client bytes


class RequestHead:
    """A request head that passed :func:`inspect_request`, ready to render."""

    __slots__ = (
        "body",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "forwarded_host",
        "forwarded_proto",
        "host",
        "http11",
        "is_head",
        "keep_alive",
        "lines",
        "method",
        "names",
        "remote_limits",
        "target",
        "upgrade",
        "websocket",
    )

    def __init__(self, method: bytes, target: bytes, http11: bool):
        self.method = method
        self.target = target
        self.http11 = http11
        self.lines: list[bytes] = []  # end-to-end fields, b"Name: value\r\n", in order
        self.names: list[bytes] = []  # their lower-cased names, same order
        self.host: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.forwarded_proto = False  # an X-Forwarded-Proto arrived (and is kept)
        self.forwarded_host = False  # an X-Forwarded-Host arrived (and is kept)
        self.remote_limits = 0  # LIMIT_* bits: remotes this request may not go to
        self.body = BODY_NONE
        self.content_length = 0
        self.keep_alive = http11
        self.websocket = False  # a WebSocket upgrade: Upgrade/Connection forwarded
        self.upgrade: bytes | None = None  # the Upgrade value as sent
        self.expect_continue = False
        self.is_head = method == b"HEAD"


_CONNECTION_PLAIN = frozenset({b"close", b"keep-alive", b"upgrade"})


def _tokens(value: bytes) -> list[bytes]:
    lowered = value.lower()
    if lowered in _CONNECTION_PLAIN:  # the usual single token
        return [lowered]
    return [t.strip() for t in lowered.split(b",") if t.strip()]


def has_dot_segment(path: bytes) -> bool:
    """True for ``/a/../b``, ``/./x``, ``/%2E%2e/``, ``/..;x/`` and friends."""
    # find(), not `in`: bytes.__contains__ first tries the operand as an int and
    # pays for a TypeError, ten times the cost of the search itself.
    if path.find(b".") < 0 and path.find(b"%") < 0:
        return False
    for seg in path.split(b"/"):
        params = seg.find(b";")  # Tomcat/Spring drop ;params before resolving dots
        if params >= 0:
            seg = seg[:params]
        if seg.lower() in _DOT_SEGMENTS:
            return True
    return False


def has_ambiguous_separator(path: bytes) -> bool:
    """True for a backslash or an encoded ``/`` or ``\\`` (``%2F``, ``%5c``): some
    remotes (IIS, Tomcat, Spring) turn them into ``/`` before resolving dots."""
    if path.find(b"\\") >= 0:
        return True
    if path.find(b"%") < 0:
        return False
    lowered = path.lower()
    return lowered.find(b"%2f") >= 0 or lowered.find(b"%5c") >= 0


def inspect_request(
    method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
) -> RequestHead | Rejection:
    """Decide whether a parsed request head may be forwarded; gather its framing
    and the routes it may not take (``remote_limits``)."""
    if version == "1.1":
        http11 = True
    elif version == "1.0":
        http11 = False
    else:
        return Rejection(505, f"HTTP/{version} is not supported; use HTTP/1.1")
    if method == b"CONNECT":
        return Rejection(405, "CONNECT is not allowed: this is a reverse proxy")
    limits = 0
    if not target.startswith(b"/"):
        if b"://" in target:
            return Rejection(400, "absolute-form request target refused: this is not a forward proxy")
        if target != b"*" or method != b"OPTIONS":
            return Rejection(400, "request target must be origin-form: /path?query (or * for OPTIONS)")
        limits = LIMIT_PREFIX  # nothing to put a prefix in front of
    elif target.find(b".") >= 0 or target.find(b"%") >= 0 or target.find(b"\\") >= 0:
        path = target.split(b"?", 1)[0]
        if has_ambiguous_separator(path) or has_dot_segment(path):
            limits = LIMIT_PREFIX
    if method == b"TRACE":
        limits |= LIMIT_TRACE

    head = RequestHead(method, target, http11)
    if limits:
        head.remote_limits = limits
    lines, names = head.lines, head.names
    connection: list[bytes] = []
    hosts = 0
    forwarded: list[bytes] = []
    transfer_encoding: bytes | None = None
    expect: list[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname not in _REQUEST_DROP:
            if lname in _NOTED:
                if lname == b"expect":
                    expect = (expect or []) + _tokens(value)
                elif lname == b"x-forwarded-proto":
                    head.forwarded_proto = True
                else:
                    head.forwarded_host = True
            lines.append(b"".join((name, b": ", value, b"\r\n")))  # cheaper than bytes %
            names.append(lname)
        elif lname == b"host":
            hosts += 1
            head.host = value
        elif lname == b"content-length":
            head.body = BODY_LENGTH  # llhttp checked digits and duplicates
            head.content_length = int(value)
        elif lname == b"transfer-encoding":
            transfer_encoding = value
        elif lname == b"connection":
            connection.extend(_tokens(value))
        elif lname == b"upgrade":
            head.upgrade = value
        elif lname == b"x-forwarded-for":
            forwarded.append(value.strip())
        # Other hop-by-hop fields: dropped.

    if hosts > 1:
        return Rejection(400, "more than one Host header")
    if head.host is None:
        if http11:
            return Rejection(400, "missing Host header (required in HTTP/1.1)")
    elif not _HOST.fullmatch(head.host):
        return Rejection(400, "malformed Host header")
    if transfer_encoding is not None:
        if not http11:
            # RFC 9112 6.1: such framing is faulty and the connection must close after
            # this message; refusing it outright (400, then close) is the simplest safe way.
            return Rejection(
                400, "Transfer-Encoding is not allowed in an HTTP/1.0 request; use HTTP/1.1 or Content-Length"
            )
        if transfer_encoding.strip().lower() != b"chunked":
            return Rejection(501, "Transfer-Encoding other than chunked is not supported")
        head.body = BODY_CHUNKED
    # Other expectations go on as they are: the model decides (RFC 9110 10.1.1 lets it 417).
    if expect is not None and b"100-continue" in expect:
        head.expect_continue = head.http11
    if forwarded:
        head.forwarded_for = b", ".join(forwarded)

    if connection:
        if b"close" in connection:
            head.keep_alive = False
        elif b"keep-alive" in connection:
            head.keep_alive = True
        named = set(connection) - _REPLACED
        if named - {b"close", b"keep-alive", b"upgrade"}:
            keep = [i for i, n in enumerate(names) if n not in named]
            head.lines = [lines[i] for i in keep]
            head.names = [names[i] for i in keep]
            # A forwarding field named by Connection was meant for this hop only: set ours.
            head.forwarded_proto = b"x-forwarded-proto" in head.names
            head.forwarded_host = b"x-forwarded-host" in head.names
        if (
            head.upgrade is not None
            and b"upgrade" in connection
            and head.upgrade.strip().lower() == b"websocket"
        ):
            if method != b"GET" or head.body != BODY_NONE:
                return Rejection(400, "a WebSocket upgrade must be a GET without a body")
            head.websocket = True
    return head


def render_request_head(
    head: RequestHead,
    *,
    authority: bytes | None,
    client_ip: bytes,
    path_prefix: bytes = b"",
    extra: bytes = b"",
    extra_names: frozenset[bytes] = frozenset(),
) -> bytes:
    """The head sent upstream (always HTTP/1.1, keep-alive).

    ``authority`` replaces Host (the remote's, or the local model's address for an
    HTTP/1.0 request without one); None keeps the client's Host.
    ``extra`` is pre-rendered ``Name: value\\r\\n`` lines replacing same-name fields.

    Forwarding fields: X-Forwarded-For gets the client's address appended;
    X-Forwarded-Proto (``http``: the proxy port is plain HTTP) and X-Forwarded-Host
    (the client's Host) are added only when none arrived, so what a TLS-terminating
    ingress in front says reaches the model unchanged; X-Forwarded-Port is never
    added (a value arriving is kept). A name in ``extra`` is the remote's own setting.
    """
    host = authority if authority is not None else head.host
    parts = [head.method, b" ", path_prefix, head.target, b" HTTP/1.1\r\n"]
    if host is not None:
        parts += (b"Host: ", host, b"\r\n")
    if extra_names:
        parts += [line for line, n in zip(head.lines, head.names) if n not in extra_names]
        parts.append(extra)
    else:
        parts += head.lines
    if not extra_names or b"x-forwarded-for" not in extra_names:
        if head.forwarded_for:
            parts += (b"X-Forwarded-For: ", head.forwarded_for, b", ", client_ip, b"\r\n")
        else:
            parts += (b"X-Forwarded-For: ", client_ip, b"\r\n")
    if not head.forwarded_proto and (not extra_names or b"x-forwarded-proto" not in extra_names):
        parts.append(b"X-Forwarded-Proto: http\r\n")
    # None for a missing or empty Host.
    if head.host and not head.forwarded_host and (not extra_names or b"x-forwarded-host" not in extra_names):
        parts += (b"X-Forwarded-Host: ", head.host, b"\r\n")
    if head.body == BODY_LENGTH:
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    elif head.body == BODY_CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if head.websocket:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", head.upgrade or b"websocket", b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def render_extra(headers: tuple[tuple[str, str], ...]) -> tuple[bytes, frozenset[bytes]]:
    """headersToAdd as pre-rendered lines and the lower-cased names they replace."""
    lines = b"".join(b"%b: %b\r\n" % (n.encode("latin-1"), v.encode("latin-1")) for n, v in headers)
    return lines, frozenset(n.lower().encode("latin-1") for n, _ in headers)


# How the response body travels to the client.
FRAME_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAME_LENGTH = 1  # Content-Length, bytes as they come
FRAME_CHUNKED = 2  # re-chunked: each upstream piece becomes one chunk, sent at once
FRAME_CLOSE = 3  # raw until the connection closes (HTTP/1.0 client, unknown length)


def response_has_body(status: int, request_is_head: bool) -> bool:
    return not (request_is_head or status < 200 or status == 204 or status == 304)


# Response fields the proxy drops or re-does, found in the lower-cased raw field
# block (each line "\r\nName: value" exactly as llhttp accepted it: strict mode
# refuses bare CR or LF, obs-fold and whitespace before the colon, so a line is a
# line). One regex over the block costs less than a Python call per field.
_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(c(?:onnection|ontent-length)|keep-alive|proxy-(?:connection|authorization|authenticate)"
    rb"|t(?:e|railer|ransfer-encoding)|upgrade):[ \t]*([^\r]*)"
)
_FIELD = re.compile(rb"\r\n([^:\r]+):[ \t]*([^\r]*)")


def field_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``[(name, value), ...]`` as a raw field block: ``\r\nName: value`` per field."""
    return b"".join(b"\r\n%b: %b" % (n, v) for n, v in headers)


def split_response_head(head: bytes) -> tuple[bytes, bytes]:
    """A raw response head without its blank line -> (``200 OK``, the field block).

    >>> split_response_head(b"HTTP/1.0 200 OK\\r\\nA: b")
    (b'200 OK', b'\\r\\nA: b')
    """
    end = head.find(b"\r\n")
    if end < 0:
        end = len(head)
    status_text = head[9:end]  # after "HTTP/x.y "; llhttp checked the shape
    if len(status_text) == 3:
        status_text += b" "  # no reason phrase; the space before it is not optional
    return status_text, head[end:]


def render_response_head(
    status: int,
    status_text: bytes,
    block: bytes,
    *,
    has_body: bool,
    client_http11: bool,
    keep_alive: bool,
    websocket: bool = False,
) -> tuple[bytes, int, bool, bool]:
    """The head sent to the client: (bytes, body framing, connection stays open,
    the upstream's body ends with its connection).

    ``block`` is the upstream's raw field block (:func:`split_response_head`).
    Hop-by-hop fields are dropped (the Connection-named ones too); Set-Cookie and
    every other repeated field is kept, in order, byte for byte. A WebSocket 101
    keeps Connection: Upgrade and Upgrade.

    Raises :class:`InvalidResponse` for a body with a transfer coding other than
    ``chunked`` alone (``gzip, chunked``, ``gzip``): llhttp undoes only the chunking,
    and the proxy decodes no other coding, so the body would reach the client
    still encoded and unlabelled.
    """
    content_length: bytes | None = None
    chunked = False
    upgrade: bytes | None = None
    named: list[bytes] | None = None
    # Content-Length stays where it was when it still holds (a body of that
    # length, or a HEAD/304 answer), else it goes with the hop-by-hop fields.
    drop_length = status < 200 or status == 204 or websocket
    cuts: list[tuple[int, int]] = []
    for match in _RESPONSE_SPECIAL.finditer(block.lower()):  # usually Content-Length, Connection
        name = match[1]
        if name == b"content-length":
            content_length = match[2].rstrip(b" \t")
            if not drop_length:
                continue
        elif name == b"connection":
            tokens = _tokens(match[2].rstrip(b" \t"))
            if not _CONNECTION_PLAIN.issuperset(tokens):
                named = (named or []) + tokens
        elif name == b"transfer-encoding":
            # Exactly one field, exactly "chunked" (llhttp decodes it). Without a body
            # (HEAD, 304) it only says what a GET would have got: dropped, as it is.
            if has_body and (chunked or match[2].rstrip(b" \t") != b"chunked"):
                value = block[match.start(2) : match.end(2)].rstrip(b" \t")[:100].decode("latin-1")
                raise InvalidResponse(
                    f"Transfer-Encoding {value!r}: only chunked alone is relayed "
                    "(the proxy does not decode other transfer codings)"
                )
            chunked = True
        elif name == b"upgrade":
            upgrade = block[match.start(2) : match.end(2)].rstrip(b" \t")
        cuts.append(match.span())
    if named:
        drop = set(named) - _CONNECTION_PLAIN
        block = b"".join(
            b"\r\n%b: %b" % (n, v)
            for n, v in _FIELD.findall(block)
            if (ln := n.lower()) not in drop
            and (ln not in _RESPONSE_DROP or (ln == b"content-length" and not drop_length))
        )
    elif cuts:
        pieces = []
        pos = 0
        for cut_start, cut_end in cuts:
            pieces.append(block[pos:cut_start])
            pos = cut_end
        pieces.append(block[pos:])
        block = b"".join(pieces)
    if websocket:
        tail = (b"\r\nConnection: Upgrade\r\nUpgrade: ", upgrade or b"websocket", b"\r\n\r\n")
        return b"".join((b"HTTP/1.1 ", status_text, block, *tail)), FRAME_NONE, False, False
    close_delimited = False
    if not has_body:
        frame = FRAME_NONE
        framing = b""
    elif content_length is not None:
        frame = FRAME_LENGTH
        framing = b""
    elif client_http11:
        frame = FRAME_CHUNKED
        framing = b"\r\nTransfer-Encoding: chunked"
        close_delimited = not chunked
    else:
        frame = FRAME_CLOSE
        framing = b""
        keep_alive = False
        close_delimited = not chunked
    if not keep_alive:
        end = b"\r\nConnection: close\r\n\r\n"
    elif not client_http11:
        end = b"\r\nConnection: keep-alive\r\n\r\n"
    else:
        end = b"\r\n\r\n"
    return b"".join((b"HTTP/1.1 ", status_text, block, framing, end)), frame, keep_alive, close_delimited


_RETRY_AFTER = re.compile(rb"\r\nretry-after:[ \t]*([^\r]*)")


def retry_after_seconds(block: bytes, now: float) -> float | None:
    """The wait a Retry-After field asks for, in seconds, from a raw field block.

    Delta-seconds or an HTTP-date (``now``: the wall clock, epoch seconds; a date in
    the past is 0). None when there is no Retry-After or it is neither.

    >>> retry_after_seconds(b"\\r\\nRetry-After: 120", 0.0)
    120.0
    """
    match = _RETRY_AFTER.search(block.lower())
    if match is None:
        return None
    value = block[match.start(1) : match.end(1)].strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is refused
        return None
    return max(0.0, when.timestamp() - now)


def render_interim(status_text: bytes, block: bytes) -> bytes:
    """A 1xx (100 Continue, 103 Early Hints) relayed to an HTTP/1.1 client."""
    kept = [b"\r\n%b: %b" % (n, v) for n, v in _FIELD.findall(block) if n.lower() not in _RESPONSE_DROP]
    return b"".join((b"HTTP/1.1 ", status_text, *kept, b"\r\n\r\n"))


def render_error(status: int, reason: str, *, retry_after: int | None = None) -> bytes:
    """A short plain-text answer made by the proxy itself; always closes."""
    body = reason.encode("ascii", "replace") + b"\n"
    extra = b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b""
    return (
        b"HTTP/1.1 %d %b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%bConnection: close\r\n\r\n%b"
        % (
            status,
            REASONS.get(status, b"Error"),
            len(body),
            extra,
            body,
        )
    )
