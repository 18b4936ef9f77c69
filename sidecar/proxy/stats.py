"""The proxy's counters, as plain numbers the admin port renders.

Dependency-free and cheap to update from the data path: a dict increment and a
bisect per request. The admin side reads these objects (same event loop, no
locks needed) and renders them in Prometheus exposition format.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds. Spans a loopback hit (~100 us) to a long generation (minutes).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

BACKENDS = ("local", "remote")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    """``404 -> "4xx"``; anything outside 100..599 counts as 5xx."""
    return STATUS_CLASSES[status // 100 - 1] if 100 <= status < 600 else "5xx"


# requests_total keys by backend and status // 100, made once (read-only).
_KEYS = {b: (None, *((b, c) for c in STATUS_CLASSES)) for b in (*BACKENDS, "proxy")}


class Histogram:
    """A fixed-bucket histogram (Prometheus semantics: cumulative on render).

    ``counts[i]`` holds observations <= ``buckets[i]`` and > the bucket before;
    the last slot holds those above every bound (+Inf).
    """

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper_bound, cumulative_count), ...]`` ending with ``(inf, count)``."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out


class ProxyStats:
    """Everything the data path counts. Keys are plain strings for the renderer.

    - ``requests_total[(backend, status_class)]``: responses whose head reached the
      client (status_class from :data:`STATUS_CLASSES`); proxy-made errors count
      under backend ``"proxy"``.
    - ``response_head_seconds[backend]`` / ``response_seconds[backend]``: time from
      the request head to the response head, and to the end of the response.
    - ``fallbacks_total[(from, to, reason)]``: requests sent to the other backend (a
      failure kind below, breaker_open, path-outside-prefix, trace-with-credentials,
      bad-remote-config).
    - ``upstream_failures_total[(backend, kind)]``: connect / tls / timeout / reset /
      http_503 / http_429 (a busy answer not relayed, the request sent elsewhere).
    - ``rejected_total[status]``: requests refused by the proxy (4xx/5xx it made).
    - ``client_aborts_total``: clients gone before their response ended.
    - ``breaker_state``: "closed" | "open" | "half_open": the state last reported by
      a remote's circuit breaker. There is one breaker per remote address and TLS
      context (sidecar.proxy.remote); with one remote in use, it is that remote's.
    - ``in_flight``: requests being proxied now; ``open_connections``: client
      connections open now; ``tunnels``: WebSocket tunnels open now.
    - ``local_in_flight``: requests sent to the local model whose response has not
      ended; ``local_waiting``: those of them without a byte of response body yet (queued
      or in prefill, for an LLM server). Both are what the sidecar's signals sample.
    """

    __slots__ = (
        "breaker_state",
        "client_aborts_total",
        "fallbacks_total",
        "in_flight",
        "local_in_flight",
        "local_waiting",
        "open_connections",
        "rejected_total",
        "requests_total",
        "response_head_seconds",
        "response_seconds",
        "tunnels",
        "upstream_failures_total",
    )

    def __init__(self) -> None:
        self.requests_total: dict[tuple[str, str], int] = {}
        self.response_head_seconds = {b: Histogram() for b in BACKENDS}
        self.response_seconds = {b: Histogram() for b in BACKENDS}
        self.fallbacks_total: dict[tuple[str, str, str], int] = {}
        self.upstream_failures_total: dict[tuple[str, str], int] = {}
        self.rejected_total: dict[int, int] = {}
        self.client_aborts_total = 0
        self.breaker_state = "closed"
        self.in_flight = 0
        self.local_in_flight = 0
        self.local_waiting = 0
        self.open_connections = 0
        self.tunnels = 0

    @property
    def breaker_open(self) -> bool:
        return self.breaker_state != "closed"

    def count_response(self, backend: str, status: int) -> None:
        keys = _KEYS.get(backend)
        key = (
            keys[status // 100]
            if keys is not None and 100 <= status < 600
            else (backend, status_class(status))
        )
        total = self.requests_total
        total[key] = total.get(key, 0) + 1

    def count_fallback(self, source: str, target: str, reason: str) -> None:
        key = (source, target, reason)
        self.fallbacks_total[key] = self.fallbacks_total.get(key, 0) + 1

    def count_failure(self, backend: str, kind: str) -> None:
        key = (backend, kind)
        self.upstream_failures_total[key] = self.upstream_failures_total.get(key, 0) + 1

    def count_rejection(self, status: int) -> None:
        self.rejected_total[status] = self.rejected_total.get(status, 0) + 1
        self.count_response("proxy", status)

    def total(self, backend: str | None = None) -> int:
        """Responses counted, for one backend or all."""
        return sum(n for (b, _), n in self.requests_total.items() if backend is None or b == backend)
