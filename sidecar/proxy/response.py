"""Relaying an upstream's response to the client: the response half of an Exchange.

The Exchange is its response parser's protocol (httptools calls it back), and
this class holds those callbacks and what they need: the response head is read
from the raw bytes the UpstreamConnection keeps in ``head_buf`` (one regex over
the fields instead of one Python call per field), re-rendered for the client
(sidecar.proxy.http1), and body pieces are gathered in ``out`` and written once per
upstream read. Endings (finish, failure, abort) belong to the Exchange.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sidecar.proxy.http1 import FRAME_CHUNKED, render_interim, render_response_head, split_response_head

if TYPE_CHECKING:
    from sidecar.proxy.client import ClientConnection
    from sidecar.proxy.http1 import RequestHead
    from sidecar.proxy.server import ProxyServer
    from sidecar.proxy.routing import RemoteTarget
    from sidecar.proxy.upstream import UpstreamConnection

log = logging.getLogger("sidecar.proxy")


class BadUpstream(Exception):
    """Raised inside a response parser callback for a response we can't relay."""


class Retried(Exception):
    """Raised inside a response parser callback once the request went to the other
    backend (a 503/429 not relayed): the rest of this answer is not parsed."""


class ResponseRelay:
    """The response parser's callbacks; the Exchange that extends it supplies
    client, server, head, target, backend, upstream, keep_alive, request_complete,
    done, t_start, the endings (finish, failed, abort_client, respond_error) and
    busy_elsewhere (a 503/429 sent to the other backend instead)."""

    __slots__ = (
        "continue_sent",
        "eof_body",
        "final",
        "frame",
        "head_buf",
        "head_pos",
        "out",
        "parser",
        "status",
    )

    # Supplied by Exchange:
    client: ClientConnection
    server: ProxyServer
    head: RequestHead
    target: RemoteTarget | None
    backend: str
    upstream: UpstreamConnection | None
    keep_alive: bool
    request_complete: bool
    done: bool
    t_start: float
    on_local: bool
    waiting: bool  # a local request without a byte of response body yet

    def __init__(self) -> None:
        self.parser: Any = None
        self.status = 0
        self.head_buf = b""  # the response head's bytes until it is complete
        self.head_pos = 0  # where in head_buf the next head starts (after a 1xx)
        self.frame = -1
        self.final = False  # the final response head was received
        self.eof_body = False  # the upstream ends this response body by closing
        self.continue_sent = False
        # Bytes for the client, gathered while one upstream read is parsed and
        # written once after it: one send per read, not one per piece.
        self.out: list[bytes] = []

    def flush(self) -> None:
        """Write what this upstream read produced for the client, in one send."""
        out = self.out
        if len(out) == 1:
            self.client.transport.write(out[0])
        else:
            self.client.transport.writelines(out)
        out.clear()

    # --- response parser callbacks ---------------------------------------------
    # Only the head, body and end callbacks: the fields are read from the raw head
    # (head_buf, filled by UpstreamConnection), not one Python call per field.

    def on_headers_complete(self) -> None:
        buf = self.head_buf
        start = self.head_pos
        while buf.startswith(b"\r\n", start):  # llhttp skips blank lines before a head
            start += 2
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            raise BadUpstream("response head not found where the parser ended it")
        self.head_pos = end + 4
        status_text, block = split_response_head(buf[start:end])
        status = self.parser.get_status_code()
        head = self.head
        if status < 200:
            if status == 101:
                if not head.websocket:
                    raise BadUpstream("101 Switching Protocols to a request that asked for no upgrade")
                self.status = 101
                self.final = True
                self.head_buf = b""
                data, _, _, _ = render_response_head(
                    101,
                    status_text,
                    block,
                    has_body=False,
                    client_http11=True,
                    keep_alive=False,
                    websocket=True,
                )
                self.out.append(data)
                return
            if head.http11 and (status != 100 or (head.expect_continue and not self.continue_sent)):
                self.out.append(render_interim(status_text, block))
                self.continue_sent = self.continue_sent or status == 100
            return
        server = self.server
        if status >= 429 and (status == 503 or status == 429):
            if self.busy_elsewhere(status, block):
                raise Retried
        elif self.target is not None:
            server.remote_succeeded(self.target)
        self.status = status
        self.final = True
        self.head_buf = b""
        has_body = not (head.is_head or status == 204 or status == 304)
        keep = self.keep_alive and self.request_complete and not server.draining and not head.websocket
        data, self.frame, self.keep_alive, self.eof_body = render_response_head(
            status, status_text, block, has_body=has_body, client_http11=head.http11, keep_alive=keep
        )
        self.out.append(data)
        server.stats.response_head_seconds[self.backend].observe(server.loop.time() - self.t_start)
        if head.is_head:
            # llhttp would wait for the body a Content-Length announces; HEAD has none.
            self.finish(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.waiting:  # the local model's first body byte: no longer waiting
            self.waiting = False
            self.server.stats.local_waiting -= 1
        if self.frame == FRAME_CHUNKED:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        elif not self.done:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if not self.final or self.done or self.status == 101:
            return  # an interim 1xx, a HEAD answered already, or a WebSocket switching
        if self.frame == FRAME_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.finish(self.parser.should_keep_alive())

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed while carrying this exchange."""
        self.upstream = None
        if self.done:
            return
        if self.final and self.eof_body:
            if self.frame == FRAME_CHUNKED:
                self.out.append(b"0\r\n\r\n")
            self.finish(False)
        elif self.final:
            self.server.stats.count_failure(self.backend, "reset")
            self.abort_client()
        else:
            self.failed("reset")

    def upstream_broken(self, reason: str) -> None:
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
        if self.done:
            return
        self.server.stats.count_failure(self.backend, "protocol")
        log.warning("%s upstream: %s", self.backend, reason)
        if self.final:
            self.abort_client()
        else:
            self.respond_error(502, f"{self.backend} model sent an invalid response")

    def upstream_upgraded(self, rest: bytes) -> None:
        """A WebSocket 101 arrived: from now on both connections are one byte tunnel."""
        conn = self.upstream
        if self.status != 101 or conn is None:
            self.upstream_broken("upgrade without a 101 response")
            return
        self.done = True
        self.upstream = None
        conn.exchange = None
        stats = self.server.stats
        stats.in_flight -= 1
        if self.on_local:
            self.release_local()
        stats.count_response(self.backend, 101)
        stats.tunnels += 1
        client = self.client
        if rest:
            self.out.append(rest)
        if self.out:
            self.flush()
        client.open_tunnel(conn)

    # --- endings, supplied by Exchange ---------------------------------------------

    def finish(self, reusable: bool) -> None:
        raise NotImplementedError

    def release_local(self) -> None:
        raise NotImplementedError

    def failed(self, kind: str) -> None:
        raise NotImplementedError

    def abort_client(self) -> None:
        raise NotImplementedError

    def respond_error(self, status: int, reason: str, retry_after: int | None = None) -> None:
        raise NotImplementedError

    def busy_elsewhere(self, status: int, block: bytes) -> bool:
        raise NotImplementedError
