"""A stand-in LLM server for the demo, the mission benchmark and the tests.

    python -m sidecar.demo.llmsim --slots 4 --prefill-ms 100 --tokens 20 --token-ms 25

Like vLLM or TGI on a GPU, it serves at most ``slots`` requests at once and queues the
rest (first come, first served); a request then takes a fixed time: ``prefill-ms`` before
its first token, then ``tokens`` tokens ``token-ms`` apart, streamed as Server-Sent Events
(``data: {"server": NAME, "i": i}``, then ``data: [DONE]``). The response head is sent at
once, as those servers do, so a queued request is visible only as a late first token.
Its CPU stays low whatever the queue (``cpu-per-token`` of real work per token, default
none): on a GPU server, CPU does not show saturation.

``GET /metrics`` is a Prometheus text exposition with vLLM's names:
``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (gauges, label
``model_name``), plus a counter and a histogram so that a scraper must pick its gauges.
``GET /healthz`` answers ok. Any other path serves a completion; ``?tokens=N`` overrides
the token count. The server prints ``listening on 127.0.0.1:PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from sidecar.demo.cpu import burn


@dataclass(frozen=True)
class Capacity:
    slots: int = 4  # requests generated at once
    prefill: float = 0.1  # seconds before the first token, once a slot is free
    tokens: int = 20
    token_interval: float = 0.025  # seconds between tokens
    cpu_per_token: float = 0.0  # seconds of real CPU work per token

    @property
    def service_time(self) -> float:
        return self.prefill + (self.tokens - 1) * self.token_interval

    @property
    def requests_per_second(self) -> float:
        """The most it can serve with no queue growing."""
        return self.slots / self.service_time



class LlmServer:
    """The server; ``waiting`` and ``running`` are what /metrics reports."""

    def __init__(self, name: str, capacity: Capacity, model: str = "stand-in"):
        self.name = name
        self.capacity = capacity
        self.model = model
        self.slots = asyncio.Semaphore(capacity.slots)
        self.waiting = 0
        self.running = 0
        self.served = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._connection, host, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def metrics_text(self) -> str:
        label = f'{{model_name="{self.model}"}}'
        return (
            "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(self.running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {float(self.waiting)}\n"
            "# HELP vllm:request_success_total Count of successfully processed requests.\n"
            "# TYPE vllm:request_success_total counter\n"
            f"vllm:request_success_total{label} {float(self.served)}\n"
            "# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency.\n"
            "# TYPE vllm:e2e_request_latency_seconds histogram\n"
            f'vllm:e2e_request_latency_seconds_bucket{{le="1.0",model_name="{self.model}"}} 0.0\n'
            f'vllm:e2e_request_latency_seconds_bucket{{le="+Inf",model_name="{self.model}"}} 0.0\n'
            f"vllm:e2e_request_latency_seconds_count{label} 0.0\n"
            f"vllm:e2e_request_latency_seconds_sum{label} 0.0\n"
        )

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        length = int(headers.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)
        keep = headers.get("connection", "").lower() != "close"
        url = urlsplit(target)
        if url.path in ("/metrics", "/healthz"):
            body = (self.metrics_text() if url.path == "/metrics" else "ok\n").encode()
            kind = b"text/plain; version=0.0.4; charset=utf-8" if url.path == "/metrics" else b"text/plain"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                % (kind, len(body), b"" if keep else b"Connection: close\r\n", body)
            )
            await writer.drain()
            return keep
        tokens = self.capacity.tokens
        with contextlib.suppress(ValueError, IndexError, KeyError):
            tokens = max(1, min(1000, int(parse_qs(url.query)["tokens"][0])))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n" + (b"" if keep else b"Connection: close\r\n") + b"\r\n"
        )
        await writer.drain()
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            capacity = self.capacity
            await asyncio.sleep(capacity.prefill)
            for i in range(tokens):
                if i:
                    await asyncio.sleep(capacity.token_interval)
                if capacity.cpu_per_token:
                    burn(capacity.cpu_per_token)
                event = f'data: {{"server": "{self.name}", "i": {i}}}\n\n'.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
            self.served += 1
        finally:
            self.running -= 1
            self.slots.release()
        return keep and method != "HEAD"


async def serve(name: str, capacity: Capacity, port: int = 0) -> None:
    server = LlmServer(name, capacity)
    await server.start("127.0.0.1", port)
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo.llmsim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="local", help="named in every event (which server answered)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--slots", type=int, default=Capacity.slots, help="requests generated at once")
    parser.add_argument("--prefill-ms", type=float, default=Capacity.prefill * 1000)
    parser.add_argument("--tokens", type=int, default=Capacity.tokens)
    parser.add_argument("--token-ms", type=float, default=Capacity.token_interval * 1000)
    parser.add_argument("--cpu-per-token-ms", type=float, default=0.0, help="real CPU work per token")
    args = parser.parse_args(argv)
    capacity = Capacity(
        slots=args.slots,
        prefill=args.prefill_ms / 1000,
        tokens=args.tokens,
        token_interval=args.token_ms / 1000,
        cpu_per_token=args.cpu_per_token_ms / 1000,
    )
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            asyncio.run(serve(args.name, capacity, args.port))
        else:
            uvloop.run(serve(args.name, capacity, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
