"""The proxy's HTTP/1.1 head rules, without sockets."""

from __future__ import annotations

import pytest

from sidecar.proxy.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    FRAME_CHUNKED,
    FRAME_CLOSE,
    FRAME_LENGTH,
    FRAME_NONE,
    LIMIT_PREFIX,
    LIMIT_TRACE,
    InvalidResponse,
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
    retry_after_seconds,
    split_response_head,
)
from sidecar.proxy.stats import Histogram, ProxyStats, status_class


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
        ([("Host", "a")], {"target": b"*", "method": b"GET"}, 400, "origin-form"),
        ([("Host", "a")], {"target": b"a.example:80", "method": b"GET"}, 400, "origin-form"),
        ([], {}, 400, "missing Host"),
        ([("Host", "a"), ("Host", "b")], {}, 400, "more than one Host"),
        ([("Host", "a b")], {}, 400, "malformed Host"),
        ([("Host", "user@evil")], {}, 400, "malformed Host"),
        ([("Host", "evil/path")], {}, 400, "malformed Host"),
        ([("Host", "a:99999999")], {}, 400, "malformed Host"),
        ([("Host", "a"), ("Transfer-Encoding", "gzip, chunked")], {}, 501, "Transfer-Encoding"),
        ([("Host", "a"), ("Transfer-Encoding", "identity")], {}, 501, "Transfer-Encoding"),
        (
            [("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Content-Length", "3")],
            {},
            400,
            "WebSocket",
        ),
        ([("Host", "a")], {"version": "0.9"}, 505, "HTTP/0.9"),
        # RFC 9112 6.1: faulty framing in HTTP/1.0, refused outright (the connection then closes).
        ([("Transfer-Encoding", "chunked")], {"version": "1.0"}, 400, "Transfer-Encoding"),
    ],
)
def test_refused_heads(headers, kw, status, fragment):
    result = inspect(headers, **kw)
    assert isinstance(result, Rejection)
    assert result.status == status
    assert fragment in result.reason


@pytest.mark.parametrize(
    "host", ["example.com", "example.com:8080", "10.0.0.1:80", "[::1]:8080", "[fe80::1]", "a-b.c_d", ""]
)
def test_well_formed_hosts_pass(host):
    assert ok([("Host", host)]).host == host.encode()


@pytest.mark.parametrize(
    ("method", "target", "limits"),
    [
        # Dangerous only under a remote's pathPrefix: they could climb out of it.
        (b"GET", b"/v2/models/acme%2Fllama-3-8b/ready", LIMIT_PREFIX),
        (b"GET", b"/v1/models%2fx?q=1", LIMIT_PREFIX),
        (b"GET", b"/v1/..%5cadmin", LIMIT_PREFIX),
        (b"GET", b"/v1/..\\admin", LIMIT_PREFIX),
        (b"GET", b"/v1/../admin", LIMIT_PREFIX),
        (b"GET", b"/v1/%2E%2e/admin?x", LIMIT_PREFIX),
        (b"GET", b"/v1/.", LIMIT_PREFIX),
        (b"GET", b"/v1/..;x=1/admin", LIMIT_PREFIX),
        (b"OPTIONS", b"*", LIMIT_PREFIX),
        # Dangerous only towards a remote that adds headers: it would echo them.
        (b"TRACE", b"/echo", LIMIT_TRACE),
        (b"TRACE", b"/a/../b", LIMIT_TRACE | LIMIT_PREFIX),
        # Nothing to climb out of: no limit.
        (b"GET", b"/v1/a.b/..c/...?next=/../x&enc=%2F", 0),
        (b"OPTIONS", b"/x", 0),
    ],
)
def test_requests_dangerous_on_one_route_only_are_kept_off_that_route_not_refused(method, target, limits):
    head = ok([("Host", "a")], method=method, target=target)
    assert head.remote_limits == limits
    # Where the limits do not apply (the local model, a remote without prefix or
    # added headers) the target goes on byte for byte.
    out = render_request_head(head, authority=None, client_ip=b"10.0.0.1")
    assert out.startswith(method + b" " + target + b" HTTP/1.1\r\n")


def test_expectations_other_than_100_continue_go_on_for_the_model_to_judge():
    head = ok([("Host", "a"), ("Expect", "200-ok"), ("Content-Length", "0")])
    assert not head.expect_continue
    assert b"Expect: 200-ok\r\n" in render_request_head(head, authority=None, client_ip=b"1")
    assert ok([("Host", "a"), ("Expect", "100-Continue, x-other")]).expect_continue
    assert not ok([("Expect", "100-continue")], version="1.0").expect_continue  # 1.0 has no 100


def test_an_empty_host_is_forwarded_without_x_forwarded_host():
    out = render_request_head(ok([("Host", "")]), authority=None, client_ip=b"10.0.0.1")
    assert out.startswith(b"GET /x HTTP/1.1\r\nHost: \r\n") and b"X-Forwarded-Host" not in out


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


def test_request_head_drops_hop_by_hop_and_keeps_forwarding_fields_that_arrived():
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
            ("X-Forwarded-Host", "public.example"),
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
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: public.example\r\n"
        b"Cookie: a=1\r\n"
        b"Accept: */*\r\n"
        b"Accept: text/plain\r\n"
        b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 127.0.0.9\r\n"
        b"Content-Length: 3\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("arrived", "added"),
    [
        ([], [b"X-Forwarded-Proto: http", b"X-Forwarded-Host: svc:80"]),
        ([("X-Forwarded-Proto", "https")], [b"X-Forwarded-Host: svc:80"]),
        ([("x-forwarded-host", "api.public.example")], [b"X-Forwarded-Proto: http"]),
        (
            [
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "api.public.example"),
                ("X-Forwarded-Port", "443"),
            ],
            [],
        ),
    ],
    ids=["none", "proto", "host", "all three"],
)
def test_forwarding_fields_are_set_only_where_absent_and_port_never(arrived, added):
    head = ok([("Host", "svc:80"), *arrived])
    for authority in (None, b"remote.example"):  # local and remote routes alike
        lines = render_request_head(head, authority=authority, client_ip=b"10.0.0.1").split(b"\r\n")
        forwarding = [x for x in lines if x.lower().startswith(b"x-forwarded-")]
        # What arrived stays as it was, in place; only what is absent is added; never a Port.
        assert (
            forwarding == [f"{n}: {v}".encode() for n, v in arrived] + [b"X-Forwarded-For: 10.0.0.1"] + added
        )


def test_a_forwarding_field_named_by_connection_is_this_hops_and_replaced():
    head = ok([("Host", "svc"), ("Connection", "X-Forwarded-Proto"), ("X-Forwarded-Proto", "https")])
    out = render_request_head(head, authority=None, client_ip=b"1")
    assert b"X-Forwarded-Proto: https" not in out and b"X-Forwarded-Proto: http\r\n" in out


def test_forwarding_fields_a_remote_sets_in_headers_to_add_are_not_added_again():
    head = ok([("Host", "svc"), ("X-Forwarded-For", "1.1.1.1")])
    extra, names = render_extra((("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "remote-says")))
    out = render_request_head(head, authority=b"r", client_ip=b"10.0.0.1", extra=extra, extra_names=names)
    assert out.count(b"X-Forwarded-Proto") == 1 and b"X-Forwarded-Proto: https\r\n" in out
    assert out.count(b"X-Forwarded-For") == 1 and b"X-Forwarded-For: remote-says\r\n" in out
    assert b"X-Forwarded-Host: svc\r\n" in out


@pytest.mark.parametrize(
    ("block", "now", "seconds"),
    [
        (b"\r\nRetry-After: 120", 0.0, 120.0),
        (b"\r\nX-A: b\r\nretry-after:  7 ", 0.0, 7.0),
        (b"\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0, 10.0),
        (b"\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0, 0.0),  # already past
        (b"\r\nRetry-After: soon", 0.0, None),
        (b"\r\nRetry-After: -5", 0.0, None),
        (b"\r\nRetry-After: Wed, 21 Oct 2015 07:28:00", 0.0, None),  # no zone
        (b"\r\nX-Retry-After: 5", 0.0, None),
        (b"", 0.0, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(block, now, seconds):
    assert retry_after_seconds(block, now) == seconds


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


@pytest.mark.parametrize(
    "fields",
    [
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "gzip")],
        [("Transfer-Encoding", "chunked;x=1")],
        [("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
    ],
)
def test_a_response_body_with_a_transfer_coding_other_than_chunked_alone_is_refused(fields):
    with pytest.raises(InvalidResponse, match="^Transfer-Encoding '.*': only chunked alone is relayed"):
        render_response_head(
            200, b"200 OK", hdrs(*fields), has_body=True, client_http11=True, keep_alive=True
        )


def test_a_transfer_coding_on_a_response_without_a_body_is_dropped_not_refused():
    # A HEAD or 304 answer may say what a GET would have got (RFC 9112 6.1).
    data, frame, _, _ = render_response_head(
        200,
        b"200 OK",
        hdrs(("Transfer-Encoding", "gzip, chunked"), ("ETag", '"a"')),
        has_body=False,
        client_http11=True,
        keep_alive=True,
    )
    assert data == b'HTTP/1.1 200 OK\r\nETag: "a"\r\n\r\n' and frame == FRAME_NONE


def test_chunked_in_any_case_is_the_one_transfer_coding_relayed():
    data, frame, _, until_close = render_response_head(
        200,
        b"200 OK",
        hdrs(("Transfer-Encoding", "Chunked ")),
        has_body=True,
        client_http11=True,
        keep_alive=True,
    )
    assert (frame, until_close) == (FRAME_CHUNKED, False)
    assert data == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


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
