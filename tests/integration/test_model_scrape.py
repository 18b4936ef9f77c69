"""The sidecar's scrape of a model server's metrics, over real sockets: every framing a
server may use, and every way a scrape can fail, each bounded and said in words; and a
real exporter (prometheus_client's own HTTP server) scraped and parsed."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from sidecar.signals import FetchError, fetch, parse_gauges


async def fetch_from(answer: bytes | None, **kwargs) -> str:
    """``fetch`` from a server that reads one request head and writes ``answer`` (None: never
    answers); the server and its connections are gone when this returns."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await asyncio.Event().wait()
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await fetch("127.0.0.1", port, "/metrics", **{"timeout": 2.0, **kwargs})
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\ntgi_queue_size 3\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11\r\ntgi_queue_size 3\n\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\ntgi_queue_size 3\n",  # ended by the close
    ],
)
def test_every_framing_of_a_body_is_read(answer):
    assert asyncio.run(fetch_from(answer)) == "tgi_queue_size 3\n"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "answered 404"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
            "the connection closed before the response ended",
        ),
        (b"HTTP/1.1 200 OK\r\n", "the connection closed before the response ended"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed response"),
    ],
)
def test_a_failed_scrape_says_why(answer, message):
    with pytest.raises(FetchError, match=message):
        asyncio.run(fetch_from(answer))


def test_an_exposition_over_the_size_bound_is_refused_without_reading_it_all():
    body = b"x" * 3 * 1024 * 1024
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with pytest.raises(FetchError, match="larger than 1 MiB"):
        asyncio.run(fetch_from(answer, limit=1024 * 1024))


def test_a_server_that_never_answers_is_given_up_on_at_the_timeout():
    with pytest.raises(TimeoutError):
        asyncio.run(fetch_from(None, timeout=0.3))


def test_a_real_prometheus_exporter_is_scraped_and_its_gauge_picked_out():
    registry = CollectorRegistry()
    queue = Gauge("vllm:num_requests_waiting", "queued", ["model_name"], registry=registry)
    queue.labels("llama").set(7)
    Counter("vllm:request_success", "done", registry=registry).inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        text = asyncio.run(fetch("127.0.0.1", server.server_port, "/metrics", timeout=5.0))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    got = parse_gauges(text, ["vllm:num_requests_waiting", "vllm:request_success_total"])
    (series,) = got["vllm:num_requests_waiting"].series
    assert (series.labels, series.value) == ({"model_name": "llama"}, 7.0)
    assert got["vllm:request_success_total"].error == "vllm:request_success_total is a counter, not a gauge"
