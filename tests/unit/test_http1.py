"""The proxy's HTTP/1.1 head rules, without sockets."""

from __future__ import annotations

import pytest

from sidecar.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    FRAME_CHUNKED,
    FRAME_CLOSE,
    FRAME_LENGTH,
    FRAME_NONE,
    Rejection,
    RequestHead,
    has_ambiguous_separator,
    has_dot_segment,
    inspect_request,
    render_error,
    render_extra,
    render_interim,
    render_request_head,
    render_response_head,
    split_response_head,
)
from sidecar.stats import Histogram, ProxyStats, status_class


def inspect(headers, method=b"GET", target=b"/x", version="1.1"):
    return inspect_request(method, target, version, [(n.encode(), v.encode()) for n, v in headers])


def ok(headers, **kw) -> RequestHead:
    head = inspect(headers, **kw)
    assert isinstance(head, RequestHead), head
    return head


@pytest.mark.parametrize(
    ("headers", "kw", "status", "fragment"),
    [
        ([("Host", "a")], {"target": b"http://evil/"}, 400, "absolute-form"),
        ([("Host", "a")], {"target": b"https://evil:443/x"}, 400, "absolute-form"),
        ([("Host", "evil:443")], {"method": b"CONNECT", "target": b"evil:443"}, 405, "CONNECT"),
        ([("Host", "a")], {"method": b"TRACE"}, 405, "TRACE"),
        ([("Host", "a")], {"target": b"*", "method": b"OPTIONS"}, 400, "origin-form"),
        ([("Host", "a")], {"target": b"/v1/../admin"}, 400, "dot segments"),
        ([("Host", "a")], {"target": b"/v1/%2E%2e/admin?x"}, 400, "dot segments"),
        ([("Host", "a")], {"target": b"/v1/."}, 400, "dot segments"),
        ([("Host", "a")], {"target": b"/v1/..;/admin"}, 400, "dot segments"),
        ([("Host", "a")], {"target": b"/v1/..;x=1/admin"}, 400, "dot segments"),
        ([("Host", "a")], {"target": b"/v1/%2e%2E;/admin"}, 400, "dot segments"),
        ([("Host", "a")], {"target": b"/v1/..%2Fadmin"}, 400, "encoded /"),
        ([("Host", "a")], {"target": b"/v1/%2e%2e%2fadmin"}, 400, "encoded /"),
        ([("Host", "a")], {"target": b"/v1/..%5cadmin"}, 400, "encoded /"),
        ([("Host", "a")], {"target": b"/v1/..\\admin"}, 400, "backslash"),
        ([("Host", "a")], {"target": b"/v1/models%2Fx?q=1"}, 400, "encoded /"),
        ([], {}, 400, "missing Host"),
        ([("Host", "a"), ("Host", "b")], {}, 400, "more than one Host"),
        ([("Host", "a b")], {}, 400, "malformed Host"),
        ([("Host", "user@evil")], {}, 400, "malformed Host"),
        ([("Host", "evil/path")], {}, 400, "malformed Host"),
        ([("Host", "")], {}, 400, "malformed Host"),
        ([("Host", "a:99999999")], {}, 400, "malformed Host"),
        ([("Host", "a"), ("Transfer-Encoding", "gzip, chunked")], {}, 501, "Transfer-Encoding"),
        ([("Host", "a"), ("Transfer-Encoding", "identity")], {}, 501, "Transfer-Encoding"),
        ([("Host", "a"), ("Expect", "200-ok")], {}, 417, "Expect"),
        (
            [("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Content-Length", "3")],
            {},
            400,
            "WebSocket",
        ),
        ([("Host", "a")], {"version": "0.9"}, 505, "HTTP/0.9"),
    ],
)
def test_refused_heads(headers, kw, status, fragment):
    result = inspect(headers, **kw)
    assert isinstance(result, Rejection)
    assert result.status == status
    assert fragment in result.reason


@pytest.mark.parametrize(
    "host", ["example.com", "example.com:8080", "10.0.0.1:80", "[::1]:8080", "[fe80::1]", "a-b.c_d"]
)
def test_well_formed_hosts_pass(host):
    assert ok([("Host", host)]).host == host.encode()


def test_http10_without_host_passes_and_does_not_keep_alive_by_default():
    head = ok([], version="1.0")
    assert head.host is None and not head.keep_alive
    assert ok([("Connection", "keep-alive")], version="1.0").keep_alive


def test_framing_is_taken_from_the_head():
    assert ok([("Host", "a"), ("Content-Length", "12")]).body == BODY_LENGTH
    assert ok([("Host", "a"), ("Content-Length", "12")]).content_length == 12
    assert ok([("Host", "a"), ("Transfer-Encoding", " Chunked ")]).body == BODY_CHUNKED


def test_dot_segment_detection():
    assert has_dot_segment(b"/a/../b") and has_dot_segment(b"/./") and has_dot_segment(b"/x/%2e")
    assert not has_dot_segment(b"/a/b.c/..d/...") and not has_dot_segment(b"/v1/models%2Fx")
    assert has_dot_segment(b"/..;/admin") and has_dot_segment(b"/x/.;jsessionid=1/y")
    assert not has_dot_segment(b"/a;b/c..;d/e") and not has_dot_segment(b"/v1/a;..")


def test_ambiguous_separator_detection():
    for path in (b"/..\\admin", b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a%5cb", b"/x\\"):
        assert has_ambiguous_separator(path), path
    for path in (b"/a/b", b"/a%20b", b"/a%252Fb", b"/a.b/c"):
        assert not has_ambiguous_separator(path), path


def test_request_head_drops_hop_by_hop_and_sets_forwarding_fields():
    head = ok(
        [
            ("Host", "svc:80"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "s"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic x"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("X-Forwarded-For", "2.2.2.2"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "spoofed"),
            ("Cookie", "a=1"),
            ("Accept", "*/*"),
            ("Accept", "text/plain"),
            ("Content-Length", "3"),
        ],
        method=b"POST",
        target=b"/a%20b?q=%2F&x",
    )
    out = render_request_head(head, authority=None, client_ip=b"127.0.0.9")
    assert out == (
        b"POST /a%20b?q=%2F&x HTTP/1.1\r\n"
        b"Host: svc:80\r\n"
        b"Cookie: a=1\r\n"
        b"Accept: */*\r\n"
        b"Accept: text/plain\r\n"
        b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 127.0.0.9\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: svc:80\r\n"
        b"Content-Length: 3\r\n"
        b"\r\n"
    )


def test_remote_head_has_prefix_authority_and_added_headers_replacing_the_clients():
    head = ok([("Host", "svc"), ("Authorization", "Bearer client"), ("X-Keep", "1")])
    extra, names = render_extra((("authorization", "Bearer remote"), ("X-Tenant", "t1")))
    out = render_request_head(
        head,
        authority=b"remote.example:8443",
        client_ip=b"10.0.0.1",
        path_prefix=b"/models/m",
        extra=extra,
        extra_names=names,
    )
    assert out.startswith(b"GET /models/m/x HTTP/1.1\r\nHost: remote.example:8443\r\n")
    assert b"Bearer client" not in out
    assert b"authorization: Bearer remote\r\nX-Tenant: t1\r\n" in out
    assert b"X-Keep: 1\r\n" in out and b"X-Forwarded-Host: svc\r\n" in out


def test_websocket_upgrade_keeps_its_upgrade_fields():
    head = ok(
        [
            ("Host", "a"),
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "k"),
        ]
    )
    assert head.websocket
    out = render_request_head(head, authority=None, client_ip=b"1")
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in out and b"Sec-WebSocket-Key: k" in out


def hdrs(*pairs):
    """A raw field block, as the upstream sent it."""
    return b"".join(b"\r\n%b: %b" % (n.encode(), v.encode()) for n, v in pairs)


def test_response_head_keeps_repeated_fields_and_drops_hop_by_hop():
    data, frame, keep, _ = render_response_head(
        200,
        b"200 OK",
        hdrs(
            ("Set-Cookie", "a=1"),
            ("Connection", "X-P"),
            ("X-P", "1"),
            ("Keep-Alive", "t=1"),
            ("Set-Cookie", "b=2"),
            ("Content-Length", "5"),
        ),
        has_body=True,
        client_http11=True,
        keep_alive=True,
    )
    assert data == b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 5\r\n\r\n"
    assert (frame, keep) == (FRAME_LENGTH, True)


def test_response_without_length_is_rechunked_for_http11_and_closes_for_http10():
    data, frame, keep, until_close = render_response_head(
        200,
        b"200 OK",
        hdrs(("Transfer-Encoding", "chunked")),
        has_body=True,
        client_http11=True,
        keep_alive=True,
    )
    assert (frame, keep, until_close) == (FRAME_CHUNKED, True, False)
    assert data == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    data, frame, keep, until_close = render_response_head(
        200, b"200 OK", b"", has_body=True, client_http11=False, keep_alive=True
    )
    assert (frame, keep, until_close) == (FRAME_CLOSE, False, True) and b"Connection: close" in data


def test_bodiless_responses_get_no_framing_added():
    data, frame, _, _ = render_response_head(
        204,
        b"204 No Content",
        hdrs(("Content-Length", "0")),
        has_body=False,
        client_http11=True,
        keep_alive=True,
    )
    assert frame == FRAME_NONE and b"Content-Length" not in data and b"Transfer-Encoding" not in data
    data, frame, _, _ = render_response_head(
        200, b"200 OK", hdrs(("Content-Length", "42")), has_body=False, client_http11=True, keep_alive=True
    )
    assert frame == FRAME_NONE and b"Content-Length: 42" in data  # HEAD keeps the length


def test_response_fields_are_matched_by_name_in_any_case_and_kept_byte_for_byte():
    block = hdrs(
        ("CONTENT-length", "3 "),
        ("connection", "keep-alive"),
        ("Tea", "x"),
        ("TE-x", "y"),
        ("x-odd", "a:b\t"),
        ("Keep-Alive", "timeout=5"),
    )
    data, frame, keep, _ = render_response_head(
        200, b"200 OK", block, has_body=True, client_http11=True, keep_alive=True
    )
    assert data == b"HTTP/1.1 200 OK\r\nCONTENT-length: 3 \r\nTea: x\r\nTE-x: y\r\nx-odd: a:b\t\r\n\r\n"
    assert (frame, keep) == (FRAME_LENGTH, True)


def test_response_head_is_split_after_the_version_and_a_missing_reason_keeps_its_space():
    assert split_response_head(b"HTTP/1.0 404 Not Found\r\nA: b") == (b"404 Not Found", b"\r\nA: b")
    assert split_response_head(b"HTTP/1.1 200") == (b"200 ", b"")


def test_interim_responses_drop_hop_by_hop_fields_and_lengths():
    data = render_interim(
        b"103 Early Hints", hdrs(("Link", "</a>; rel=preload"), ("Connection", "x"), ("Content-Length", "0"))
    )
    assert data == b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"


def test_websocket_101_keeps_upgrade_and_drops_length():
    data, frame, keep, _ = render_response_head(
        101,
        b"101 Switching Protocols",
        hdrs(
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", "k"),
            ("Content-Length", "0"),
        ),
        has_body=False,
        client_http11=True,
        keep_alive=False,
        websocket=True,
    )
    assert data == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: k\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert (frame, keep) == (FRAME_NONE, False)


def test_error_answers_are_short_closing_and_carry_retry_after_when_asked():
    data = render_error(503, "shutting down", retry_after=5)
    assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 5\r\n" in data and b"Connection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nshutting down\n")


def test_histogram_and_status_classes():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.65)
    assert [status_class(s) for s in (101, 200, 302, 404, 503, 700)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "5xx",
    ]
    stats = ProxyStats()
    stats.count_response("local", 200)
    stats.count_response("remote", 201)
    stats.count_rejection(400)
    assert stats.total() == 3 and stats.total("local") == 1 and stats.rejected_total == {400: 1}
