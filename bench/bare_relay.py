"""The floor under the sidecar's figures: a bare Python byte relay on uvloop.

    python bench/bare_relay.py --listen 127.0.0.1:PORT --local 127.0.0.1:UPSTREAM

Each client connection gets its own upstream connection, and every read from one
side is written to the other as is: no parsing, no routing, no pool, no timeouts,
no header rules. It is not a proxy anyone should run (it would forward anything);
it measures what the event loop, the two protocols and the four system calls per
request cost on this machine, which no HTTP proxy written this way can go below.
The benchmark runs it alongside the sidecar and HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import Any

import uvloop


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class UpstreamSide(asyncio.Protocol):
    def __init__(self, client: Any):
        self.client = client

    def connection_made(self, transport: Any) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class ClientSide(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]):
        self.upstream_address = upstream
        self.upstream: Any = None
        self.early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _nodelay(transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: UpstreamSide(self.transport), *self.upstream_address
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        if self.early:
            upstream.writelines(self.early)
            self.early = []

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientSide(upstream), *listen, backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--local", required=True)
    args = parser.parse_args()
    uvloop.run(serve(_host_port(args.listen), _host_port(args.local)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
