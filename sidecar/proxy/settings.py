"""The data path's settings: timeouts in seconds, sizes in bytes."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from sidecar.proxy.breaker import BreakerSettings
from sidecar.proxy.upstream import Resolver


@dataclass(frozen=True)
class ProxySettings:
    """Timeouts in seconds, sizes in bytes."""

    connect_timeout: float = 2.0  # TCP connect + TLS handshake to an upstream
    read_timeout: float = 300.0  # a request in flight with neither side sending anything
    client_idle_timeout: float = 60.0  # a keep-alive connection between requests; a head in all
    upstream_idle_timeout: float = 4.0  # pooled upstream connections (below uvicorn's 5 s)
    tunnel_idle_timeout: float = 3600.0  # a WebSocket tunnel with no bytes either way
    max_header_bytes: int = 32 * 1024  # request line + header fields, else 431
    max_header_count: int = 100  # header fields, else 431
    replay_buffer_bytes: int = 64 * 1024  # request body kept for a retry on the other side
    max_idle_per_upstream: int = 256
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    shutdown_grace: float = 1.0  # after readiness goes false, keep accepting this long
    remote_ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # None: system CAs
    tick: float = 0.5  # resolution of timeouts and idle sweeps
    # Never connect to a remote on a link-local or cloud metadata address (crds.addresses),
    # whatever its name resolves to: the shared gateway would be an SSRF to the node's
    # credentials. The local model (127.0.0.1, a pod's address) is not screened.
    refuse_link_local_remotes: bool = True
    # How remote host names are resolved (loop.getaddrinfo's shape); None: the loop's getaddrinfo.
    remote_resolver: Resolver | None = field(default=None, compare=False)
