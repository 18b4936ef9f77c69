"""Which backend serves the next request: the pure routing policy.

While offloading is active exactly ``percentage`` of every 100 consecutive
requests go to the remote backend, spread evenly (an error-diffusion counter,
the two-backend case of smooth weighted round-robin); otherwise none do.
Spillover, whether offloading or not: a request the spread leaves local goes to the
remote when the local model already has ``spillover`` requests in flight.
O(1) per request, no randomness, so tests and users can count on it.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from crds.model import RemoteBackend, expand_path_prefix


@dataclass(frozen=True)
class RemoteTarget:
    """A remote backend resolved for the data path."""

    scheme: str  # "http" or "https"
    host: str  # what to connect to (an IPv6 address without brackets)
    port: int
    authority: str  # the Host header value sent to the remote
    path_prefix: str = ""  # "" or "/prefix" without trailing slash
    # Header values can be credentials (headersToAdd, headersFromSecrets, a token): not in repr.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Verifies an https remote with the ModelDeployment's caBundle (None: the proxy's
    # default context). Compared by identity: build one per bundle (:class:`CaBundleContexts`)
    # so that an unchanged bundle keeps the target equal and a new one does not.
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def from_backend(
        cls,
        backend: RemoteBackend,
        ssl_context_for: Callable[[str], ssl.SSLContext] | None = None,
        *,
        model: str,
    ) -> RemoteTarget:
        """From a *validated* RemoteBackend (``host`` is ``name[:port]``) of the
        ModelDeployment whose ``spec.model`` is ``model`` (``$model`` in pathPrefix).

        ``ssl_context_for`` makes the context of a ``caBundle`` (default:
        :func:`ca_bundle_context`, a new one per call).
        """
        default_port = 443 if backend.scheme == "https" else 80
        host = backend.host
        if host.startswith("["):
            end = host.index("]")
            name, rest = host[1:end], host[end + 1 :]
            port = int(rest[1:]) if rest.startswith(":") else default_port
        else:
            name, _, port_text = host.partition(":")
            port = int(port_text) if port_text else default_port
        make_context = ca_bundle_context if ssl_context_for is None else ssl_context_for
        return cls(
            scheme=backend.scheme,
            host=name,
            port=port,
            authority=host,
            path_prefix=expand_path_prefix(backend.path_prefix or "", model).rstrip("/"),
            headers=tuple(backend.headers_to_add.items()),
            ssl_context=(
                make_context(backend.ca_bundle)
                if backend.ca_bundle is not None and backend.scheme == "https"
                else None
            ),
        )


def ca_bundle_context(pem: str) -> ssl.SSLContext:
    """A client context trusting exactly the PEM CAs given: verification and hostname check on.

    Raises ssl.SSLError or ValueError for a bundle that is not PEM certificates
    (validation refuses those before they get here).
    """
    return ssl.create_default_context(cadata=pem)  # cadata given: no system CA is loaded


class CaBundleContexts:
    """One SSLContext per distinct caBundle, reused while the bundle stays the same.

    Keeps the ``limit`` most recently used bundles: a sidecar follows one
    ModelDeployment, so one or two are in use at a time.
    """

    def __init__(self, limit: int = 4, build: Callable[[str], ssl.SSLContext] = ca_bundle_context):
        self._limit = limit
        self._build = build
        self._contexts: dict[str, ssl.SSLContext] = {}

    def __call__(self, pem: str) -> ssl.SSLContext:
        context = self._contexts.pop(pem, None)
        if context is None:
            context = self._build(pem)
        self._contexts[pem] = context  # most recent last
        while len(self._contexts) > self._limit:
            del self._contexts[next(iter(self._contexts))]
        return context

    def __len__(self) -> int:
        return len(self._contexts)


@dataclass(frozen=True)
class RoutePlan:
    """What the control side wants: where to offload, how much, and whether now."""

    remote: RemoteTarget | None = None
    percentage: int = 0
    offloading: bool = False
    # behavior.spilloverInFlight: requests in flight to the local model beyond which
    # the next one goes to the remote at once, offloading or not. None: no spillover.
    spillover: int | None = None

    @property
    def active_percentage(self) -> int:
        return self.percentage if (self.offloading and self.remote is not None) else 0

    @property
    def spill_at(self) -> int:
        """Local requests in flight from which the next request spills over (never: maxsize)."""
        if self.spillover is None or self.remote is None:
            return NEVER
        return self.spillover


NEVER = sys.maxsize


class PercentageSpread:
    """Says, request by request, whether this one is offloaded.

    >>> spread = PercentageSpread(50)
    >>> [spread.next_is_remote() for _ in range(4)]
    [False, True, False, True]
    """

    __slots__ = ("_credit", "_percentage")

    def __init__(self, percentage: int):
        if not 0 <= percentage <= 100:
            raise ValueError(f"percentage must be between 0 and 100, got {percentage}")
        self._percentage = percentage
        self._credit = 0

    def next_is_remote(self) -> bool:
        self._credit += self._percentage
        if self._credit >= 100:
            self._credit -= 100
            return True
        return False


class RoutingTable:
    """The plan in force plus its spread; the proxy asks it once per request.

    ``spillovers`` counts the requests sent to the remote by the spillover rule.
    """

    __slots__ = ("_plan", "_spill_at", "_spread", "spillovers")

    def __init__(self, plan: RoutePlan = RoutePlan()):
        self._plan = plan
        self._spread = PercentageSpread(plan.active_percentage)
        self._spill_at = plan.spill_at
        self.spillovers = 0

    @property
    def plan(self) -> RoutePlan:
        return self._plan

    def update(self, plan: RoutePlan) -> None:
        if plan.active_percentage != self._plan.active_percentage:
            self._spread = PercentageSpread(plan.active_percentage)
        self._plan = plan
        self._spill_at = plan.spill_at

    def choose(self, local_in_flight: int = 0) -> RemoteTarget | None:
        """The remote target for the next request, or None for the local model.

        ``local_in_flight``: requests in flight to the local model now. A request the
        spread leaves local spills over to the remote once that reaches the plan's
        ``spillover``; the spread itself is not disturbed (its share stays exact).

        >>> table = RoutingTable(RoutePlan(remote=RemoteTarget("http", "r", 80, "r"), spillover=2))
        >>> [table.choose(n) is not None for n in (0, 1, 2, 5)], table.spillovers
        ([False, False, True, True], 2)
        """
        if self._spread.next_is_remote():
            return self._plan.remote
        if local_in_flight >= self._spill_at:
            self.spillovers += 1
            return self._plan.remote
        return None
