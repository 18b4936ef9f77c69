"""One request through the proxy: routing, attempts and fallback, the request sent on.

An Exchange asks the RoutingTable for a target, takes a pooled keep-alive
connection to it (or opens one: the only Task on the path, and the request
body is held back meanwhile), renders the request head and streams the body.
Failure rules: a remote that cannot be connected (refused, TLS, timeout), that
drops the request before answering, or that answers 503 or 429 is replaced by
the local model for that request (the body sent is kept for this retry while
under ``replay_buffer_bytes``); repeated remote failures open a circuit breaker,
and a Retry-After opens it for that long. A local model that is down or answers
503 sends the request to the remote when one is configured and the request may
go there; as the last backend left, an open breaker does not stop it. Else the
client gets a clear 502 (503 with Retry-After while shutting down, or the busy
answer's status and Retry-After). Once any byte of a final response reached the
client nothing is retried: a broken upstream then breaks the client's response.

The response comes back through the same object: it is its response parser's
protocol (httptools calls it back). The response head is read from the raw
bytes of the upstream's reads (one regex over the fields instead of one Python
call per field; at most MAX_RESPONSE_HEAD_BYTES, else 502), re-rendered for the
client (sidecar.proxy.http1), and body pieces are gathered in ``out`` and written
once per upstream read.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from typing import TYPE_CHECKING, Any

import httptools

from sidecar.proxy.flow import PAUSE_CONNECTING, PAUSE_UPSTREAM_FULL
from sidecar.proxy.http1 import (
    BODY_CHUNKED,
    FRAME_CHUNKED,
    InvalidResponse,
    Rejection,
    RequestHead,
    render_error,
    render_interim,
    render_request_head,
    render_response_head,
    retry_after_seconds,
    split_response_head,
)
from sidecar.proxy.remote import RemoteRoute
from sidecar.proxy.upstream import UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    import asyncio

    from sidecar.proxy.types import Client

log = logging.getLogger("sidecar.proxy")

MAX_ATTEMPTS = 4  # per request: stale keep-alive retry + fallback to the other side
MAX_RESPONSE_HEAD_BYTES = 64 * 1024  # an upstream's status line and fields, else 502


class BadUpstream(InvalidResponse):
    """Raised inside a response parser callback for a response we can't relay;
    the message says why (it goes to the log and the client's 502)."""


class Retried(Exception):
    """Raised inside a response parser callback once the request went to the other
    backend (a 503/429 not relayed): the rest of this answer is not parsed."""


class Exchange:
    """One request: where it goes, its head and body on the way there, retries,
    the response relayed back, endings."""

    __slots__ = (
        "attempts",
        "backend",
        "busy",
        "client",
        "connect_task",
        "continue_sent",
        "done",
        "eof_body",
        "final",
        "frame",
        "head",
        "head_buf",
        "head_pos",
        "keep_alive",
        "on_local",
        "out",
        "parser",
        "pending",
        "pool",
        "request_complete",
        "reused",
        "route",
        "sent",
        "sent_size",
        "server",
        "status",
        "t_start",
        "tried_local",
        "tried_remote",
        "up_out",
        "upstream",
        "waiting",
    )

    def __init__(self, client: Client, head: RequestHead):
        self.client = client
        self.server = client.server
        self.head = head
        self.route: RemoteRoute | None = None  # None: the local model
        self.backend = "local"
        self.pool: UpstreamPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task | None = None
        self.pending: list[bytes] | None = None  # body read from the client, not yet sent on
        self.sent: list[bytes] | None = []  # body sent on, kept for a retry (None: too big)
        self.sent_size = 0
        self.request_complete = False
        self.reused = False
        self.done = False
        self.keep_alive = head.keep_alive and not self.server.draining  # draining: close after it
        self.t_start = 0.0
        self.attempts = 0
        self.tried_local = False
        self.tried_remote = False
        # Counted in stats.local_in_flight / local_waiting (see release_local).
        self.on_local = False
        self.waiting = False
        # (status, Retry-After seconds) of a 503/429 answer not relayed, for the end answer.
        self.busy: tuple[int, float | None] | None = None
        # Bytes for the upstream, gathered while one client read is parsed and
        # written once after it: one send per read, like a C proxy.
        self.up_out: list[bytes] = []
        # The response. Set per attempt by bind: parser, head_buf (the response
        # head's bytes until it is complete), head_pos (where in head_buf the next
        # head starts, after a 1xx), frame (how the body travels, FRAME_*).
        self.parser: Any = None
        self.head_buf: bytes
        self.head_pos: int
        self.frame: int
        self.status = 0
        self.final = False  # the final response head was received
        self.eof_body = False  # the upstream ends this response body by closing
        self.continue_sent = False
        # Bytes for the client, gathered while one upstream read is parsed and
        # written once after it: one send per read, not one per piece.
        self.out: list[bytes] = []

    # --- routing and attempts ---------------------------------------------------

    def start(self) -> None:
        server = self.server
        self.t_start = server.loop.time()
        stats = server.stats
        stats.in_flight += 1
        target = server.routing.choose(stats.local_in_flight)
        route = None
        if target is not None:
            route = server.remotes.route(target)  # resolved once: kept for every attempt there
            refusal = "bad-remote-config" if route is None else route.refusal(self.head)
            if refusal is not None:
                stats.count_fallback("remote", "local", refusal)
                route = None
        self.attempt(route, fresh=False)

    def attempt(self, route: RemoteRoute | None, *, fresh: bool) -> None:
        self.attempts += 1
        self.route = route
        if self.on_local:  # a retry: the last attempt no longer counts
            self.release_local()
        if route is None:
            self.backend = "local"
            self.tried_local = True
            stats = self.server.stats
            stats.local_in_flight += 1
            stats.local_waiting += 1
            self.on_local = self.waiting = True
            pool = self.server.local_pool
        else:
            self.backend = "remote"
            self.tried_remote = True
            pool = route.pool
        self.pool = pool
        conn = None if fresh else pool.take()
        if conn is not None:
            self.bind(conn, reused=True)
        else:
            # Hold the request body back until the upstream is there: a failed
            # connect can still go to the other side with nothing consumed.
            self.client.reading.pause(PAUSE_CONNECTING)
            self.connect_task = self.server.loop.create_task(self.connect(pool))

    async def connect(self, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect(self.server.settings.connect_timeout)
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            kind, detail = "tls", exc
        except TimeoutError as exc:
            kind, detail = "timeout", exc
        except OSError as exc:
            kind, detail = "connect", exc
        else:
            self.connect_task = None
            if self.done:
                pool.put(conn)
            else:
                self.bind(conn, reused=False)
            return
        self.connect_task = None
        log.debug("connecting to %s %s:%s failed: %s", pool.label, pool.host, pool.port, detail)
        if not self.done:
            self.failed(kind)

    def bind(self, conn: UpstreamConnection, *, reused: bool) -> None:
        client = self.client
        reading = client.reading
        self.upstream = conn
        conn.carry(self)
        self.reused = reused
        self.parser = httptools.HttpResponseParser(self)
        self.final = False
        self.frame = -1
        self.head_buf = b""
        self.head_pos = 0
        head = self.head
        route = self.route
        if route is None:
            authority = None if head.host is not None else self.server.local_authority
            data = render_request_head(head, authority=authority, client_ip=client.ip)
        else:
            data = render_request_head(
                head,
                authority=route.authority,
                client_ip=client.ip,
                path_prefix=route.prefix,
                extra=route.extra,
                extra_names=route.extra_names,
            )
        if client.write_paused:
            conn.pause_reading()
        up_out = self.up_out
        up_out.clear()
        up_out.append(data)
        pending = self.pending
        if self.sent:  # a retry: what the last attempt sent goes first
            pending = self.sent + pending if pending else self.sent
            self.sent = []
            self.sent_size = 0
        if pending:
            self.pending = None
            for chunk in pending:
                self.send_body(chunk)
        if self.request_complete and head.body == BODY_CHUNKED:
            up_out.append(b"0\r\n\r\n")
        if not client.feeding:  # else the client's read ends with a flush
            self.flush_up()
        if reading.reasons:
            reading.unpause(PAUSE_CONNECTING)

    def flush_up(self) -> None:
        up_out = self.up_out
        conn = self.upstream
        if conn is not None and not conn.closed:
            if len(up_out) == 1:
                conn.transport.write(up_out[0])
            else:
                conn.transport.writelines(up_out)
        up_out.clear()

    def send_body(self, chunk: bytes) -> None:
        if self.head.body == BODY_CHUNKED:
            self.up_out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        else:
            self.up_out.append(chunk)
        sent = self.sent
        if sent is not None:
            self.sent_size += len(chunk)
            if self.sent_size > self.server.settings.replay_buffer_bytes:
                self.sent = None
            else:
                sent.append(chunk)

    def failed(self, kind: str) -> None:
        """The upstream failed before any of its response reached the client."""
        server = self.server
        self.drop_upstream()
        server.stats.count_failure(self.backend, kind)
        if self.final:
            self.abort_client()
            return
        stale = kind == "reset" and self.reused  # the upstream closed an idle keep-alive
        if self.route is not None and not stale:
            self.route.failed()
        why = ""
        if self.sent is not None and self.attempts < MAX_ATTEMPTS:
            if stale:
                self.attempt(self.route, fresh=True)
                return
            found, remote, why = self.other_side()
            if found:
                self.fall_back(remote, kind)
                return
        self.give_up(kind, why)

    def drop_upstream(self) -> None:
        """Close the upstream connection for good; what was for it stays in self.sent."""
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
            self.client.reading.unpause(PAUSE_UPSTREAM_FULL)  # its full buffer held the client back
        self.up_out.clear()

    def other_side(self) -> tuple[bool, RemoteRoute | None, str]:
        """The backend this request can go to now that its own one failed it:
        (True, None) for the local model, (True, route) for the remote, or
        (False, None, why) when there is none (why: a fallback reason, or "")."""
        if self.route is not None:
            return not self.tried_local, None, ""
        remote = self.server.routing.plan.remote
        if remote is None or self.tried_remote:
            return False, None, ""
        route = self.server.remotes.route(remote)
        if route is None:
            return False, None, "bad-remote-config"
        # The last backend left: an open breaker doesn't stop it (this becomes its probe).
        refusal = route.refusal(self.head, last_resort=True)
        return refusal is None, route, refusal or ""

    def fall_back(self, remote: RemoteRoute | None, kind: str) -> None:
        if remote is None:
            self.server.stats.count_fallback("remote", "local", kind)
        else:
            self.server.stats.count_fallback("local", "remote", kind)
        self.attempt(remote, fresh=False)

    def give_up(self, kind: str, why: str = "") -> None:
        """No backend is left to try: the client gets the proxy's own answer."""
        server = self.server
        note = f"; the remote cannot take this request ({why})" if why.startswith(("path", "trace")) else ""
        if server.draining:
            self.respond_error(
                503, f"{self.backend} model unavailable ({kind}); shutting down", retry_after=5
            )
        elif self.busy is not None:
            status, retry_after = self.busy
            other = "remote" if self.backend == "local" else "local"
            self.respond_error(
                status,
                f"{other} model busy ({status}), {self.backend} model unavailable ({kind}){note}",
                retry_after=None if retry_after is None else math.ceil(retry_after),
            )
        elif kind == "timeout":
            self.respond_error(504, f"{self.backend} model did not answer in time{note}")
        else:
            self.respond_error(502, f"{self.backend} model unavailable ({kind}){note}")

    def busy_elsewhere(self, status: int, block: bytes) -> bool:
        """A final 503 or 429 arrived and none of it was relayed yet. The remote's
        breaker learns of it (its Retry-After holds the remote off). Then, when the
        request is replayable and the other backend can take it (a remote 503 or
        429, a local 503: a local 429 is about this client, not capacity), it goes
        there and this returns True; else False: the answer is relayed as it is."""
        server = self.server
        retry_after = retry_after_seconds(block, time.time())
        if self.route is not None:
            self.route.busy(retry_after)
        elif status != 503:
            return False
        if self.sent is None or self.attempts >= MAX_ATTEMPTS:
            return False  # the body sent on is no longer held: it can't be sent again
        found, remote, _ = self.other_side()
        if not found:
            return False
        kind = f"http_{status}"
        if self.out:
            self.flush()  # interim answers (100 Continue) read along with this head
        self.drop_upstream()  # its answer is not read to the end: the connection goes
        server.stats.count_failure(self.backend, kind)
        self.busy = (status, retry_after)
        self.fall_back(remote, kind)
        return True

    # --- the response from the upstream ---------------------------------------------

    def response_data(self, data: bytes) -> None:
        """Bytes from the upstream carrying this request: parsed, relayed to the client."""
        conn = self.upstream
        head_due = not self.final
        if head_due:  # (part of) a response head: kept for its fields
            buf = self.head_buf
            self.head_buf = buf + data if buf else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upstream_upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            if (
                conn is not None and not conn.closed
            ):  # closed: the request went to the other backend (Retried)
                if head_due and self.final and not self.done:
                    # The head and a broken body came in one read: none of it has reached the
                    # client, which can still get a clear 502 instead of a cut connection.
                    self.out.clear()
                    self.final = False
                # A callback's InvalidResponse arrives as httptools' "User callback error",
                # with the real reason as its context.
                cause = exc.__context__
                self.upstream_broken(str(cause) if isinstance(cause, InvalidResponse) else str(exc))
            return
        if self.out:
            self.flush()
        if not self.final and self.upstream is conn:
            if self.head_pos:  # past a 1xx: drop what was relayed
                self.head_buf = self.head_buf[self.head_pos :]
                self.head_pos = 0
            if len(self.head_buf) > MAX_RESPONSE_HEAD_BYTES:
                self.upstream_broken(f"response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")

    def flush(self) -> None:
        """Write what this upstream read produced for the client, in one send."""
        out = self.out
        if len(out) == 1:
            self.client.transport.write(out[0])
        else:
            self.client.transport.writelines(out)
        out.clear()

    # Response parser callbacks: only the head, body and end ones. The fields are
    # read from the raw head (head_buf), not one Python call per field.

    def on_headers_complete(self) -> None:
        buf = self.head_buf
        start = self.head_pos
        while buf.startswith(b"\r\n", start):  # llhttp skips blank lines before a head
            start += 2
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            raise BadUpstream("response head not found where the parser ended it")
        self.head_pos = end + 4
        # Checked here, once per head, where its length is known: response_data
        # checks only heads still incomplete after a read, not one read whole.
        if end + 4 - start > MAX_RESPONSE_HEAD_BYTES:
            raise BadUpstream(f"response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")
        status_text, block = split_response_head(buf[start:end])
        status = self.parser.get_status_code()
        head = self.head
        if status < 200:
            if status < 100:  # RFC 9110 15: three digits, 100-599; llhttp takes any three
                raise BadUpstream(f"status {status:03d} outside 100-599")
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
        elif status > 599:
            raise BadUpstream(f"status {status} outside 100-599")
        elif self.route is not None:
            self.route.succeeded()
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

    def upstream_lost(self) -> None:
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
            self.respond_error(502, f"{self.backend} model sent an invalid response: {reason}")

    def upstream_upgraded(self, rest: bytes) -> None:
        """A WebSocket 101 arrived: from now on both connections are one byte tunnel."""
        conn = self.upstream
        if self.status != 101 or conn is None:
            self.upstream_broken("upgrade without a 101 response")
            return
        self.done = True
        self.upstream = None
        conn.release()
        stats = self.server.stats
        stats.in_flight -= 1
        if self.on_local:
            self.release_local()
        stats.count_response(self.backend, 101)
        stats.tunnels += 1
        if rest:
            self.out.append(rest)
        if self.out:
            self.flush()
        self.client.open_tunnel(conn)

    # --- flow control and timeouts ------------------------------------------------------

    def upstream_full(self) -> None:
        """The upstream isn't taking bytes as fast as the client sends: stop reading the client."""
        self.client.reading.pause(PAUSE_UPSTREAM_FULL)

    def upstream_drained(self) -> None:
        self.client.reading.unpause(PAUSE_UPSTREAM_FULL)

    def pause_response(self) -> None:
        """The client isn't taking bytes: stop reading the upstream's response."""
        conn = self.upstream
        if conn is not None:
            conn.pause_reading()

    def resume_response(self) -> None:
        conn = self.upstream
        if conn is not None:
            conn.resume_reading()

    def check_read_timeout(self, now: float, client_activity: float, timeout: float) -> None:
        """The client's timer: with neither side sending anything for ``timeout``
        seconds (the read timeout; a connect has its own timeout), the request
        times out, and :meth:`timed_out` decides whose fault that is."""
        if self.connect_task is not None or self.done:
            return
        up = self.upstream
        last = client_activity if up is None else max(client_activity, up.last_activity)
        if now - last > timeout:
            self.timed_out()

    # --- request body from the client ------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        if self.upstream is not None:
            self.send_body(chunk)
            if not self.client.feeding:
                self.flush_up()
        elif not self.done:
            if self.pending is None:
                self.pending = [chunk]
            else:
                self.pending.append(chunk)

    def request_done(self) -> None:
        self.request_complete = True
        if self.upstream is not None and self.head.body == BODY_CHUNKED:
            self.up_out.append(b"0\r\n\r\n")

    # --- the local model's signals ---------------------------------------------------

    def release_local(self) -> None:
        """This request no longer counts as in flight (or waiting) at the local model."""
        stats = self.server.stats
        if self.waiting:
            self.waiting = False
            stats.local_waiting -= 1
        self.on_local = False
        stats.local_in_flight -= 1

    # --- endings -------------------------------------------------------------------

    def finish(self, reusable: bool) -> None:
        self.done = True
        self.parser = None  # no reference cycle: freed by refcount, not by the GC
        out = self.out
        if out:  # flush(), inlined: once per request
            if len(out) == 1:
                self.client.transport.write(out[0])
            else:
                self.client.transport.writelines(out)
            out.clear()
        server = self.server
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            # Never after an upgrade attempt: what the upstream did with it is unknown.
            # (Either way the connection carries nothing any more.)
            if reusable and self.request_complete and not self.head.websocket:
                self.pool.put(conn)  # type: ignore[union-attr]
            else:
                conn.close()
        stats = server.stats
        stats.in_flight -= 1
        if self.on_local:  # release_local, inlined: once per request
            self.on_local = False
            stats.local_in_flight -= 1
            if self.waiting:
                self.waiting = False
                stats.local_waiting -= 1
        stats.count_response(self.backend, self.status)
        stats.response_seconds[self.backend].observe(server.loop.time() - self.t_start)
        self.client.exchange_finished(self)

    def timed_out(self) -> None:
        """Neither side sent anything for the read timeout: blame who owes the next byte.

        The timer is the read timeout for both (once a request is in flight the
        client idle timeout no longer runs: it covers only the time between
        requests and a request head). While the client has not sent its whole
        request, and is being read (not held back by a full upstream buffer, which
        is the upstream's doing), the client owes the next byte: the timeout is the
        client's (:meth:`client_stalled`). So it is while the client does not read
        the response (its send buffer full: the upstream is not read meanwhile).
        Otherwise the upstream owes the answer: a failure of that backend
        (fallback, breaker), or a cut response.
        """
        if not self.request_complete and not self.client.reading.reasons & PAUSE_UPSTREAM_FULL:
            self.client_stalled()
        elif self.final:
            if not self.client.write_paused:
                self.server.stats.count_failure(self.backend, "timeout")
            conn = self.upstream
            if conn is not None:
                self.upstream = None
                conn.close()
            self.abort_client()
        else:
            self.failed("timeout")

    def client_stalled(self) -> None:
        """The client stopped sending its request body: a 408 while no final response
        has begun (after an interim 1xx too), else the client is cut. No backend is
        blamed: no upstream failure is counted, nothing falls back and the breaker
        is not told. The upstream connection holds half a request: it is closed."""
        self.drop_upstream()
        log.debug("client %s stopped sending its request body", self.client.ip.decode("ascii"))
        if self.final:
            self.abort_client()
        else:
            self.respond_error(408, "request body not received in time (the client stopped sending it)")

    def respond_error(self, status: int, reason: str, retry_after: int | None = None) -> None:
        self.done = True
        self.parser = None
        self.keep_alive = False
        stats = self.server.stats
        stats.in_flight -= 1
        if self.on_local:
            self.release_local()
        stats.count_rejection(status)
        self.client.transport.write(render_error(status, reason, retry_after=retry_after))
        self.client.exchange_finished(self)

    def request_broken(self, rejection: Rejection) -> None:
        """The client's body turned out malformed: cancel upstream, answer or cut."""
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
        if self.done:
            self.client.close()
        elif self.final:
            self.abort_client()
        else:
            self.respond_error(rejection.status, rejection.reason)

    def abort_client(self) -> None:
        """Part of the response is out: the client must see it cut, not complete."""
        if not self.done:
            self.done = True
            self.server.stats.in_flight -= 1
        if self.on_local:
            self.release_local()
        self.client.abort()

    def client_gone(self) -> None:
        if self.done:
            return
        self.done = True
        self.parser = None
        stats = self.server.stats
        stats.in_flight -= 1
        if self.on_local:
            self.release_local()
        stats.client_aborts_total += 1
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.upstream
        if conn is not None:  # cancel the upstream request: it has no one to answer to
            self.upstream = None
            conn.close()
