"""A circuit breaker for the remote backend: pure state, the clock passed in.

closed --N consecutive failures--> open --backoff elapsed--> half_open
half_open --probe succeeds--> closed;  --probe fails--> open (backoff doubles, capped)

The backoff is :class:`crds.backoff.Backoff` without jitter: ``backoff_seconds``
after the breaker opens, doubled per failed probe, at most ``max_backoff_seconds``.

While open, the proxy serves the remote's share locally instead of paying a
connect timeout per request. In half_open exactly one request probes the remote;
if its outcome never arrives (the client left), another probe is allowed after
the same backoff.

Two more ways in: a remote that answers 503 or 429 with Retry-After opens it for
that long at once (:meth:`CircuitBreaker.hold`, capped at the maximum backoff);
and a request that has no other backend left goes to the remote whatever the
state (:meth:`CircuitBreaker.probe`): the breaker saves clients a wait while
another backend can serve them, never the last chance of an answer, and that
request's outcome closes or reopens it like any probe's.
"""

from __future__ import annotations

from dataclasses import dataclass

from crds.backoff import Backoff

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 5  # consecutive failures that open the breaker
    backoff_seconds: float = 1.0  # first wait before a probe
    max_backoff_seconds: float = 30.0  # the wait doubles per failed probe up to this

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not 0 < self.backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("need 0 < backoff_seconds <= max_backoff_seconds")


class CircuitBreaker:
    """
    >>> b = CircuitBreaker(BreakerSettings(failure_threshold=2, backoff_seconds=1))
    >>> b.record_failure(0.0); b.record_failure(0.1); b.state
    'open'
    >>> b.allow(0.5), b.allow(1.2), b.allow(1.3)
    (False, True, False)
    >>> b.record_success(1.4); b.state
    'closed'
    """

    __slots__ = ("failed_probes", "failures", "policy", "retry_at", "settings", "state")

    def __init__(self, settings: BreakerSettings = BreakerSettings()):
        self.settings = settings
        self.policy = Backoff(settings.backoff_seconds, settings.max_backoff_seconds, jitter=False)
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.failed_probes = 0  # consecutive, since the breaker last closed
        self.retry_at = 0.0  # when open: the next probe may start; half_open: the probe times out

    @property
    def backoff(self) -> float:
        """Seconds from opening (or from a probe's start) to the next probe."""
        return self.policy.delay(self.failed_probes)

    def allow(self, now: float) -> bool:
        """May a request go to the remote now? In half_open, True once per backoff."""
        if self.state == CLOSED:
            return True
        if now >= self.retry_at:
            self.state = HALF_OPEN
            self.retry_at = now + self.backoff
            return True
        return False

    def probe(self, now: float) -> None:
        """A request goes to the remote regardless (no other backend is left): while
        open it becomes the probe, so its outcome is recorded as a probe's."""
        if self.state == OPEN:
            self.state = HALF_OPEN
            self.retry_at = now + self.backoff

    def hold(self, now: float, seconds: float) -> None:
        """The remote asked for ``seconds`` without requests (Retry-After on a 503
        or 429): open until then, at most ``max_backoff_seconds``; never shortens a
        wait already running. The backoff for failed probes is unchanged."""
        self.failures += 1
        until = now + min(max(seconds, 0.0), self.settings.max_backoff_seconds)
        if self.state == OPEN and self.retry_at > until:
            return
        self.state = OPEN
        self.retry_at = until

    def record_success(self, now: float) -> None:
        self.state = CLOSED
        self.failures = 0
        self.failed_probes = 0

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN:
            self.failed_probes += 1
            self._open(now)
        elif self.state == CLOSED and self.failures >= self.settings.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.retry_at = now + self.backoff
