"""sidecar/httpclient.py over real loopback sockets (and real TLS): each framing of a response
body, the limits, and answers cut short, from a server that writes exactly the bytes given."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.httpclient import (
    IncompleteResponse,
    MalformedResponse,
    ResponseTooLarge,
    fetch,
    open_connection,
    render_request,
)
from tests.integration.fake_apiserver import LoopbackPKI

STEP = 10.0  # seconds any single step may take before the test fails

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


def answering(*answers: bytes, close: bool = True) -> tuple[Handler, list[bytes]]:
    """A handler that answers each request on a connection with the next of ``answers``
    (written as given), then closes when ``close``; the requests it read are recorded."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answer in answers:
                requests.append(await read_request(reader))
                writer.write(answer)
                await writer.drain()
            if not close:
                await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle, requests


def serve(handler: Handler, scenario: Callable[[int], Awaitable[None]], ssl_context=None) -> None:
    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
        try:
            async with asyncio.timeout(STEP):
                await scenario(server.sockets[0].getsockname()[1])
        finally:
            server.close()

    asyncio.run(main())


def get(port: int, max_body: int = 1 << 20):
    return fetch(f"http://127.0.0.1:{port}/x", timeout=STEP, max_body=max_body)


# --- the three framings ------------------------------------------------------------------------


def test_a_content_length_body_is_read_to_its_length_and_the_request_carries_host_and_close():
    handler, requests = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello")

    async def scenario(port: int) -> None:
        response = await get(port)
        assert (response.status, response.reason, response.body) == (200, "OK", b"hello")
        assert response.headers["x-a"] == "1, 2"  # repeated fields joined, names lower-cased

    serve(handler, scenario)
    assert requests[0].startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nConnection: close\r\n" in requests[0]


def test_a_chunked_body_is_dechunked_with_extensions_and_trailers():
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    handler, _ = answering(answer)

    async def scenario(port: int) -> None:
        assert (await get(port)).body == b"hello world"

    serve(handler, scenario)


def test_a_body_without_length_or_chunking_ends_when_the_server_closes():
    handler, _ = answering(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")

    async def scenario(port: int) -> None:
        response = await get(port)
        assert (response.status, response.body) == (200, b"until the end")

    serve(handler, scenario)


def test_an_interim_100_continue_is_skipped_and_a_post_carries_its_length():
    handler, requests = answering(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )

    async def scenario(port: int) -> None:
        response = await fetch(
            f"http://127.0.0.1:{port}/t?q=1", method="POST", body=b"a=b", timeout=STEP, max_body=10
        )
        assert (response.status, response.reason, response.body) == (201, "Created", b"ok")

    serve(handler, scenario)
    assert requests[0].startswith(b"POST /t?q=1 HTTP/1.1\r\n")
    assert b"Content-Length: 3\r\n" in requests[0] and requests[0].endswith(b"\r\n\r\na=b")


# --- limits ---------------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_reading_the_body():
    handler, _ = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", close=False)

    async def scenario(port: int) -> None:
        with pytest.raises(ResponseTooLarge, match="larger than 100 bytes"):
            await get(port, max_body=100)

    serve(handler, scenario)


def test_a_chunked_body_over_the_limit_is_refused_once_it_passes_it():
    chunk = b"40\r\n" + b"a" * 64 + b"\r\n"
    handler, _ = answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3, close=False)

    async def scenario(port: int) -> None:
        with pytest.raises(ResponseTooLarge, match="larger than 100 bytes"):
            await get(port, max_body=100)

    serve(handler, scenario)


def test_a_close_delimited_body_over_the_limit_is_refused():
    handler, _ = answering(b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 500)

    async def scenario(port: int) -> None:
        with pytest.raises(ResponseTooLarge):
            await get(port, max_body=100)

    serve(handler, scenario)


def test_a_head_over_the_limit_is_refused_without_waiting_for_its_end():
    handler, _ = answering(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"f" * 200_000, close=False)

    async def scenario(port: int) -> None:
        connection = await open_connection("127.0.0.1", port)
        try:
            with pytest.raises(ResponseTooLarge, match="head is larger than 1024 bytes"):
                await connection.send("GET", "/", [("Host", "x")], max_head=1024, max_body=10)
        finally:
            connection.close()

    serve(handler, scenario)


# --- answers cut short or not HTTP --------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nhel",
        b"HTTP/1.1 200 OK\r\nContent-Len",
    ],
    ids=["content-length", "chunked-between-chunks", "chunked-mid-chunk", "head"],
)
def test_a_response_cut_short_is_an_incomplete_response(answer: bytes):
    handler, _ = answering(answer)

    async def scenario(port: int) -> None:
        with pytest.raises(IncompleteResponse):
            await get(port)

    serve(handler, scenario)


def test_a_server_closing_before_answering_is_a_connection_reset():
    handler, _ = answering(b"")

    async def scenario(port: int) -> None:
        with pytest.raises(ConnectionResetError):
            await get(port)

    serve(handler, scenario)


def test_bytes_that_are_not_http_are_malformed_and_the_message_does_not_quote_them():
    handler, _ = answering(b"SECRET-TOKEN-abc not http at all\r\n\r\n")

    async def scenario(port: int) -> None:
        with pytest.raises(MalformedResponse) as caught:
            await get(port)
        assert "SECRET" not in str(caught.value)

    serve(handler, scenario)


def test_a_header_value_with_a_line_break_is_refused_before_sending():
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        render_request("GET", "/", [("Host", "a"), ("Authorization", "Bearer x\r\nInjected: 1")])


# --- one connection, several requests; a body as it arrives ----------------------------------------


def test_a_kept_alive_connection_carries_the_next_request_once_the_body_is_read():
    handler, requests = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )

    async def scenario(port: int) -> None:
        connection = await open_connection("127.0.0.1", port)
        try:
            bodies = []
            for _ in range(2):
                stream = await connection.send("GET", "/", [("Host", "x")], max_body=10)
                assert not connection.reusable  # not before its body is read
                bodies.append(await stream.read())
                assert connection.reusable
            last = await connection.send("GET", "/", [("Host", "x")], max_body=10)
            assert (last.status, await last.read()) == (404, b"")
            assert not connection.reusable  # the server said Connection: close
        finally:
            connection.close()
        assert bodies == [b"one", b"two"]

    serve(handler, scenario)
    assert len(requests) == 3


def test_a_streamed_body_yields_each_piece_as_it_arrives_then_ends():
    async def scenario_with_server() -> None:
        go = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            await writer.drain()
            await go.wait()  # the second piece only once the client has the first
            writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        connection = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            async with asyncio.timeout(STEP):
                stream = await connection.send("GET", "/watch", [("Host", "x")], max_body=1 << 20)
                pieces = []
                async for piece in stream.pieces(idle_timeout=STEP):
                    pieces.append(piece)
                    go.set()
                assert pieces == [b"first\n", b"second\n"] and stream.complete
        finally:
            connection.close()
            server.close()

    asyncio.run(scenario_with_server())


def test_a_streamed_body_silent_past_its_idle_limit_times_out():
    handler, _ = answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", close=False)

    async def scenario(port: int) -> None:
        connection = await open_connection("127.0.0.1", port)
        try:
            stream = await connection.send("GET", "/", [("Host", "x")], max_body=10)
            with pytest.raises(TimeoutError):
                async for _ in stream.pieces(idle_timeout=0.05):
                    pass
        finally:
            connection.close()

    serve(handler, scenario)


# --- TLS -------------------------------------------------------------------------------------------


def test_https_verifies_the_server_against_the_given_ca(tmp_path: Path):
    pki = LoopbackPKI.create(tmp_path)
    handler, _ = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")

    async def scenario(port: int) -> None:
        response = await fetch(
            f"https://127.0.0.1:{port}/", ssl_context=pki.client_context(), timeout=STEP, max_body=10
        )
        assert response.body == b"secure"

    serve(handler, scenario, ssl_context=pki.server_context())


def test_https_refuses_a_server_the_system_cas_do_not_know(tmp_path: Path):
    import ssl

    pki = LoopbackPKI.create(tmp_path)
    handler, _ = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async def scenario(port: int) -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            await fetch(f"https://127.0.0.1:{port}/", timeout=STEP, max_body=10)

    serve(handler, scenario, ssl_context=pki.server_context())


# --- its users: the token endpoint's POST ---------------------------------------------------------


def test_a_token_answer_in_chunks_is_read_whole_and_the_form_is_posted():
    from sidecar.credentials.oauth import TokenRequest, post_token_request

    token = b'{"access_token": "abc", "expires_in": 60}'
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(token),
        token,
    )
    handler, requests = answering(answer)

    async def scenario(port: int) -> None:
        request = TokenRequest(f"http://127.0.0.1:{port}/oauth/token", "offloader", "s3cret")
        assert await post_token_request(request, None, STEP) == (200, token)

    serve(handler, scenario)
    head, _, form = requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /oauth/token HTTP/1.1\r\n") and b"\r\nAuthorization: Basic " in head
    assert form == b"grant_type=client_credentials"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"s3cret-looking garbage\r\n\r\n", "not usable HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "not usable HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n", "too large"),
    ],
    ids=["not-http", "cut-short", "too-large"],
)
def test_a_token_answer_that_is_not_usable_http_is_a_token_error_quoting_nothing(answer: bytes, why: str):
    from sidecar.credentials.oauth import TokenError, TokenRequest, post_token_request

    handler, _ = answering(answer)

    async def scenario(port: int) -> None:
        request = TokenRequest(f"http://127.0.0.1:{port}/token", "offloader", "s3cret")
        with pytest.raises(TokenError, match=why) as caught:
            await post_token_request(request, None, STEP)
        assert "s3cret" not in str(caught.value)

    serve(handler, scenario)
