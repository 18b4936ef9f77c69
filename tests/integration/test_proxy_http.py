"""The proxy speaks HTTP/1.1 right: streaming, framing, headers, keep-alive, upgrades.

Real servers on 127.0.0.1 (tests/integration/servers.py) on both sides; clients
are raw sockets where exact bytes matter, httpx elsewhere.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from sidecar.proxy.server import ProxySettings
from tests.integration.servers import LoopThread, ProxyHarness, ResponseReader, exchange_raw, read_response


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture
def h(lt):
    harness = ProxyHarness(lt, headers=(("X-Api-Key", "remote-secret"),), path_prefix="/prefix")
    yield harness
    harness.close()


def connect(h) -> socket.socket:
    return socket.create_connection(("127.0.0.1", h.port), timeout=10)


def get_json(h, target: str, **kw):
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get(target, **kw)
        return r, r.json()


# --- streaming -------------------------------------------------------------------------


def read_sse(sock: socket.socket, n: int) -> list[tuple[dict, float]]:
    """Events with their arrival time, parsed off the wire as bytes arrive."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    events = []
    while len(events) < n:
        while b"\n\n" not in buf:
            data = sock.recv(65536)
            assert data, "stream ended early"
            buf += data
        arrived = time.monotonic()
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            payload = raw.split(b"data: ", 1)[1]
            events.append((json.loads(payload), arrived))
    return events


@pytest.mark.parametrize("percentage", [0, 100], ids=["local", "remote"])
def test_sse_events_are_forwarded_one_by_one_as_they_are_sent(h, percentage):
    h.set_percentage(percentage)
    with connect(h) as sock:
        sock.sendall(
            b"GET /v1/sse?n=10&interval_ms=50 HTTP/1.1\r\nHost: svc\r\nAccept: text/event-stream\r\n\r\n"
        )
        events = read_sse(sock, 10)
    assert [e["i"] for e, _ in events] == list(range(10))
    # Each event arrives soon after it was sent (the servers share this clock),
    # far less than the 50 ms between events: nothing is held back and batched.
    lags = [arrived - event["t"] for event, arrived in events]
    assert max(lags) < 0.025, lags
    gaps = [b - a for (_, a), (_, b) in zip(events, events[1:])]
    assert min(gaps) > 0.025, gaps
    assert (h.remote if percentage else h.local).count("sse") == 1


def test_a_large_download_streams_through_intact(h):
    size = 64 * 1024 * 1024 + 7
    with httpx.Client(base_url=h.url, timeout=30) as c:
        with c.stream("GET", f"/download?bytes={size}&chunked=1") as r:
            total = sum(len(piece) for piece in r.iter_raw())
    assert r.status_code == 200 and total == size


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_request_bodies_arrive_whole(h, chunked):
    body = bytes(range(256)) * 1000
    content = iter([body[:1000], body[1000:]]) if chunked else body
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.post("/echo", content=content)
    sent = r.json()
    assert sent["body_size"] == len(body)
    assert sent["body_head"].encode("latin-1") == body[:65536]
    framing = [n.lower() for n, _ in sent["headers"]]
    assert ("transfer-encoding" in framing) == chunked and ("content-length" in framing) != chunked


def test_a_client_that_disconnects_cancels_its_upstream_request(h, lt):
    with connect(h) as sock:
        sock.sendall(b"GET /sse?n=1000&interval_ms=10 HTTP/1.1\r\nHost: svc\r\n\r\n")
        read_sse(sock, 1)
        assert h.local.open_connections == 1
    deadline = time.monotonic() + 5
    while h.local.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert h.local.open_connections == 0
    assert h.proxy.stats.client_aborts_total == 1
    assert h.proxy.stats.in_flight == 0


# --- connections ----------------------------------------------------------------------


def test_keep_alive_reuses_one_upstream_connection_for_many_requests(h):
    with httpx.Client(base_url=h.url, timeout=10) as c:
        for _ in range(20):
            assert c.get("/echo").status_code == 200
    assert h.local.count() == 20
    assert h.local.connections_accepted == 1


def test_pipelined_requests_are_answered_in_order(h):
    with connect(h) as sock:
        sock.sendall(b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in range(5)))
        reader = ResponseReader(sock)
        targets = [json.loads(reader.response()[2])["target"] for _ in range(5)]
    assert targets == [f"/echo?n={i}" for i in range(5)]


def test_http10_client_without_host_is_served_and_closed(h):
    with connect(h) as sock:
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 200 and json.loads(body)["server"] == "local"
        assert sock.recv(10) == b""  # closed after the response


def test_response_without_length_is_rechunked_for_http11_and_streamed_until_close_for_http10(h):
    with connect(h) as sock:
        sock.sendall(b"GET /eof?bytes=3000 HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, headers, body = read_response(sock)
        assert headers["transfer-encoding"] == ["chunked"] and body == b"e" * 3000
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: svc\r\n\r\n")  # still usable
        assert read_response(sock)[0] == 200
    with connect(h) as sock:
        sock.sendall(b"GET /eof?bytes=3000 HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(sock)
        assert "transfer-encoding" not in headers and body == b"e" * 3000


# --- headers ---------------------------------------------------------------------------


def test_hop_by_hop_fields_are_dropped_both_ways(h):
    with connect(h) as sock:
        sock.sendall(
            b"GET /echo?hop=1 HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Conn-Named\r\n"
            b"X-Conn-Named: 1\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
            b"Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eDp5\r\nX-Kept: yes\r\n\r\n"
        )
        status, headers, body = read_response(sock)
    sent = {n.lower() for n, _ in json.loads(body)["headers"]}
    assert sent.isdisjoint(
        {
            "connection",
            "x-conn-named",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
        }
    )
    assert "x-kept" in sent
    assert set(headers).isdisjoint({"connection", "x-private", "keep-alive", "proxy-connection", "trailer"})
    assert headers["x-end-to-end"] == ["kept"]


INGRESS = {  # what a TLS-terminating ingress in front of the Service sends
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "api.public.example",
    "X-Forwarded-Port": "443",
}


@pytest.mark.parametrize("percentage", [0, 100], ids=["local", "remote"])
def test_forwarding_fields_from_an_ingress_reach_the_model_as_they_arrived(h, percentage):
    """The model builds URLs and redirects from these: it must see what it would
    see without the sidecar (https, the public host and port), on either route."""
    h.set_percentage(percentage)
    r, sent = get_json(h, "/echo", headers={**INGRESS, "Host": "svc.ns:8080"})
    assert sent["server"] == ("remote" if percentage else "local")
    forwarding = [[n, v] for n, v in sent["headers"] if n.lower().startswith("x-forwarded-")]
    assert forwarding == [
        ["X-Forwarded-Proto", "https"],
        ["X-Forwarded-Host", "api.public.example"],
        ["X-Forwarded-Port", "443"],
        ["X-Forwarded-For", "203.0.113.7, 127.0.0.1"],  # appended to: the sidecar's peer
    ]
    host = f"127.0.0.1:{h.remote.port}" if percentage else "svc.ns:8080"
    assert ["Host", host] in sent["headers"]
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


@pytest.mark.parametrize("percentage", [0, 100], ids=["local", "remote"])
def test_forwarding_fields_absent_are_set_from_what_the_sidecar_saw(h, percentage):
    h.set_percentage(percentage)
    _, sent = get_json(h, "/echo", headers={"Host": "svc.ns:8080"})
    forwarding = [[n, v] for n, v in sent["headers"] if n.lower().startswith("x-forwarded-")]
    assert forwarding == [
        ["X-Forwarded-For", "127.0.0.1"],
        ["X-Forwarded-Proto", "http"],  # the proxy port is plain HTTP
        ["X-Forwarded-Host", "svc.ns:8080"],
    ]


def test_remote_requests_get_the_prefix_the_remote_host_and_headers_to_add(h):
    h.set_percentage(100)
    r, sent = get_json(h, "/v1/echo", headers={"X-Api-Key": "client-value", "Host": "svc"})
    assert sent["server"] == "remote" and sent["target"] == "/prefix/v1/echo"
    fields = sent["headers"]
    assert ["Host", f"127.0.0.1:{h.remote.port}"] in fields
    assert [v for n, v in fields if n.lower() == "x-api-key"] == ["remote-secret"]
    assert ["X-Forwarded-Host", "svc"] in fields


@pytest.mark.parametrize("percentage", [0, 100], ids=["local", "remote"])
def test_path_and_query_are_forwarded_byte_for_byte(h, percentage):
    h.set_percentage(percentage)
    target = (
        b"/v1/a%20b/%2e%41x/caf%C3%A9/echo?q=%E2%9C%93&a=1&a=2&empty=&plus=a+b&sl=/x?y&pct=%25&enc=%2F%5c"
    )
    with connect(h) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n")
        seen = json.loads(read_response(sock)[2])["target"].encode("latin-1")
    assert seen == (b"/prefix" if percentage else b"") + target


# --- bodiless responses, 1xx ----------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "status"),
    [(b"HEAD /echo", 200), (b"GET /status?code=204", 204), (b"GET /status?code=304", 304)],
)
def test_bodiless_responses_leave_the_connection_clean(h, request_line, status):
    with connect(h) as sock:
        sock.sendall(request_line + b" HTTP/1.1\r\nHost: svc\r\n\r\n")
        got, headers, rest = read_response(sock, head_only=True)
        assert got == status and rest == b""
        if request_line.startswith(b"HEAD"):
            assert int(headers["content-length"][0]) > 0  # the GET's length, no body
        assert "transfer-encoding" not in headers
        sock.sendall(b"GET /echo?after HTTP/1.1\r\nHost: svc\r\n\r\n")
        status2, _, body = read_response(sock)  # a stray body byte would break this parse
        assert status2 == 200 and json.loads(body)["target"] == "/echo?after"


def test_expect_100_continue_is_relayed_before_the_body_is_sent(h):
    with connect(h) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["body"] == "hello"


def test_early_hints_reach_the_client_before_the_response(h):
    with connect(h) as sock:
        sock.sendall(b"GET /early HTTP/1.1\r\nHost: svc\r\n\r\n")
        data = b""
        while b"ok" not in data:
            data += sock.recv(65536)
    assert data.startswith(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n"
    )


# --- upgrades --------------------------------------------------------------------------


@pytest.mark.parametrize("percentage", [0, 100], ids=["local", "remote"])
def test_websocket_upgrade_becomes_a_byte_tunnel(h, percentage):
    h.set_percentage(percentage)
    with connect(h) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        status, headers, rest = read_response(sock)
        assert status == 101
        assert headers["sec-websocket-accept"] == ["s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
        assert headers["upgrade"] == ["websocket"] and headers["connection"] == ["Upgrade"]
        for payload in (b"\x81\x05hello", bytes(range(256)) * 300):
            sock.sendall(payload)
            got = rest
            rest = b""
            while len(got) < len(payload):
                got += sock.recv(65536)
            assert got == payload
    assert (h.remote if percentage else h.local).count("ws") == 1


@pytest.mark.parametrize("percentage", [0, 100], ids=["local", "remote"])
def test_bytes_after_a_refused_websocket_upgrade_reach_no_upstream(h, percentage):
    """A request smuggled behind an upgrade the upstream refuses (no 101) is dropped,
    and the upstream connection used for the attempt is not reused for anyone."""
    h.set_percentage(percentage)
    upstream = h.remote if percentage else h.local
    before = upstream.count()
    answer = exchange_raw(
        h.port,
        b"GET /echo HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /../secret HTTP/1.1\r\nHost: evil\r\n\r\n"
        b"GET /slow?delay_ms=300&smuggled HTTP/1.1\r\nHost: evil\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer, then the proxy closed
    # A following client on a new connection gets its own response.
    with connect(h) as sock:
        sock.sendall(b"GET /echo?mine HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["target"].endswith("/echo?mine")
    targets = [r.target for r in upstream.requests[before:]]
    assert len(targets) == 2, targets
    assert not any(b"secret" in t or b"smuggled" in t for t in targets)


def test_an_upgrade_to_anything_else_is_served_as_plain_http_with_its_body(h):
    with connect(h) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /echo?second HTTP/1.1\r\nHost: svc\r\n\r\n"
        )
        reader = ResponseReader(sock)
        status, headers, body = reader.response()
        sent = json.loads(body)
        assert status == 200 and sent["body"] == "hello" and "upgrade" not in headers
        assert {n.lower() for n, _ in sent["headers"]}.isdisjoint({"upgrade", "http2-settings", "connection"})
        assert json.loads(reader.response()[2])["target"] == "/echo?second"


def test_timeouts_are_configurable(lt):
    h = ProxyHarness(lt, with_remote=False, settings=ProxySettings(read_timeout=0.3, tick=0.05))
    try:
        with httpx.Client(base_url=h.url, timeout=10) as c:
            r = c.get("/slow?delay_ms=1500")
        assert r.status_code == 504 and "in time" in r.text
        with httpx.Client(base_url=h.url, timeout=10) as c:
            assert c.get("/slow?delay_ms=50").status_code == 200
    finally:
        h.close()
