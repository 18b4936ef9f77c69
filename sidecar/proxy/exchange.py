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
The response half lives in sidecar.proxy.response.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from typing import TYPE_CHECKING

import httptools

from sidecar.proxy.http1 import (
    BODY_CHUNKED,
    Rejection,
    RequestHead,
    render_error,
    render_request_head,
    retry_after_seconds,
)
from sidecar.proxy.response import ResponseRelay
from sidecar.proxy.upstream import PAUSE_CONNECTING, PAUSE_UPSTREAM_FULL, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    import asyncio

    from sidecar.proxy.client import ClientConnection
    from sidecar.proxy.routing import RemoteTarget

log = logging.getLogger("sidecar.proxy")

MAX_ATTEMPTS = 4  # per request: stale keep-alive retry + fallback to the other side


class Exchange(ResponseRelay):
    """One request: where it goes, its head and body on the way there, retries, endings."""

    __slots__ = (
        "attempts",
        "backend",
        "busy",
        "client",
        "connect_task",
        "done",
        "head",
        "keep_alive",
        "on_local",
        "pending",
        "pool",
        "request_complete",
        "reused",
        "sent",
        "sent_size",
        "server",
        "t_start",
        "target",
        "tried_local",
        "tried_remote",
        "up_out",
        "upstream",
        "waiting",
    )

    def __init__(self, client: ClientConnection, head: RequestHead):
        ResponseRelay.__init__(self)
        self.client = client
        self.server = client.server
        self.head = head
        self.target: RemoteTarget | None = None
        self.backend = "local"
        self.pool: UpstreamPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task | None = None
        self.pending: list[bytes] = []  # body read from the client, not yet sent on
        self.sent: list[bytes] | None = []  # body sent on, kept for a retry (None: too big)
        self.sent_size = 0
        self.request_complete = False
        self.reused = False
        self.done = False
        self.keep_alive = head.keep_alive
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

    # --- routing and attempts ---------------------------------------------------

    def start(self) -> None:
        server = self.server
        self.t_start = server.loop.time()
        stats = server.stats
        stats.in_flight += 1
        target = server.routing.choose(stats.local_in_flight)
        if target is not None:
            refusal = server.remote_refusal(target, self.head)
            if refusal is not None:
                server.stats.count_fallback("remote", "local", refusal)
                target = None
        self.attempt(target, fresh=False)

    def attempt(self, target: RemoteTarget | None, *, fresh: bool) -> None:
        self.attempts += 1
        self.target = target
        if self.on_local:  # a retry: the last attempt no longer counts
            self.release_local()
        if target is None:
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
            pool = self.server.remote_route(target).pool  # type: ignore[union-attr]
        self.pool = pool
        conn = None if fresh else pool.take()
        if conn is not None:
            self.bind(conn, reused=True)
        else:
            # Hold the request body back until the upstream is there: a failed
            # connect can still go to the other side with nothing consumed.
            self.client.pause(PAUSE_CONNECTING)
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
        server = self.server
        self.upstream = conn
        conn.exchange = self
        conn.last_activity = server.clock.now
        self.reused = reused
        self.parser = httptools.HttpResponseParser(self)
        self.final = False
        self.frame = -1
        self.head_buf = b""
        self.head_pos = 0
        head = self.head
        target = self.target
        if target is None:
            authority = None if head.host is not None else server.local_authority
            data = render_request_head(head, authority=authority, client_ip=client.ip)
        else:
            route = server.remote_route(target)
            assert route is not None  # checked by remote_refusal before this attempt
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
            pending = self.sent + pending
            self.sent = []
            self.sent_size = 0
        if pending:
            self.pending = []
            for chunk in pending:
                self.send_body(chunk)
        if self.request_complete and head.body == BODY_CHUNKED:
            up_out.append(b"0\r\n\r\n")
        if not client.feeding:  # else the client's read ends with a flush
            self.flush_up()
        if client.paused:
            client.unpause(PAUSE_CONNECTING)

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
        if self.target is not None and not stale:
            server.remote_failed(self.target)
        why = ""
        if self.sent is not None and self.attempts < MAX_ATTEMPTS:
            if stale:
                self.attempt(self.target, fresh=True)
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
            self.client.unpause(PAUSE_UPSTREAM_FULL)  # its full buffer held the client back
        self.up_out.clear()

    def other_side(self) -> tuple[bool, RemoteTarget | None, str]:
        """The backend this request can go to now that its own one failed it:
        (True, None) for the local model, (True, target) for the remote, or
        (False, None, why) when there is none (why: a fallback reason, or "")."""
        if self.target is not None:
            return not self.tried_local, None, ""
        remote = self.server.routing.plan.remote
        if remote is None or self.tried_remote:
            return False, None, ""
        # The last backend left: an open breaker doesn't stop it (this becomes its probe).
        refusal = self.server.remote_refusal(remote, self.head, last_resort=True)
        return refusal is None, remote, refusal or ""

    def fall_back(self, remote: RemoteTarget | None, kind: str) -> None:
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
        if self.target is not None:
            server.remote_busy(self.target, retry_after)
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

    # --- request body from the client ------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        if self.upstream is not None:
            self.send_body(chunk)
            if not self.client.feeding:
                self.flush_up()
        elif not self.done:
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
        if self.out:
            self.flush()
        server = self.server
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.exchange = None
            # Never after an upgrade attempt: what the upstream did with it is unknown.
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
        if self.final:
            self.server.stats.count_failure(self.backend, "timeout")
            conn = self.upstream
            if conn is not None:
                self.upstream = None
                conn.close()
            self.abort_client()
        else:
            self.failed("timeout")

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
