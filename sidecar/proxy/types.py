"""What the objects of one request may see of each other, as Protocols.

The data path's objects are created top down: the server makes a ClientConnection
per connection, a client makes an Exchange per request, an Exchange binds an
UpstreamConnection. Each also reports back up (a connection closed, an exchange
finished). Those back-references are typed here, by what they may use, so that
no module imports the module above it; the modules import downwards only
(server -> client -> exchange -> remote -> upstream -> flow). The upstream side's
own back-reference, what a connection tells the request it carries, is
:class:`sidecar.proxy.upstream.Carried`, declared where it is used. Protocols
cost nothing at run time: this module is imported only for type checking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    from sidecar.proxy.flow import CoarseClock, ReadPauses
    from sidecar.proxy.remote import RemoteRoutes
    from sidecar.proxy.routing import RoutingTable
    from sidecar.proxy.settings import ProxySettings
    from sidecar.proxy.stats import ProxyStats
    from sidecar.proxy.upstream import UpstreamConnection, UpstreamPool


class Server(Protocol):
    """The proxy server as its client connections and their exchanges see it.

    Breaks the reversed dependencies client -> server and exchange -> server:
    sidecar.proxy.server creates ClientConnections (it imports client.py), so
    neither client.py nor exchange.py may import it back.
    """

    settings: ProxySettings
    stats: ProxyStats
    clock: CoarseClock  # read by connections for their last activity
    loop: asyncio.AbstractEventLoop
    routing: RoutingTable
    remotes: RemoteRoutes  # the remote's routes, pools and breakers
    local_pool: UpstreamPool  # the local model's connections
    local_authority: bytes  # Host for an HTTP/1.0 request that came without one
    draining: bool  # shutting down: every response closes its connection

    def connection_opened(self, conn: Any) -> None: ...

    def connection_closed(self, conn: Any) -> None: ...


class Client(Protocol):
    """A client connection as its Exchange sees it.

    Breaks the reversed dependency exchange -> client: sidecar.proxy.client
    creates the Exchange of each request (it imports exchange.py), so the
    Exchange reports back through this: its writes, the pause reasons it adds
    and removes, and its end.
    """

    server: Server
    transport: Any  # the client's asyncio transport: the response is written here
    ip: bytes  # the peer's address, for X-Forwarded-For
    reading: ReadPauses  # why the client is not being read
    feeding: bool  # a client read is being parsed: upstream writes wait for its end
    write_paused: bool  # the client's buffer is full: the upstream is not read

    def exchange_finished(self, exchange: Any) -> None:
        """The exchange answered (or failed) its request: the next one may start."""

    def open_tunnel(self, conn: UpstreamConnection) -> None:
        """A WebSocket 101 was relayed: bytes flow between the two connections as they are."""

    def close(self) -> None: ...

    def abort(self) -> None: ...
