"""Retry delays: one value type for every loop of both products that waits after a failure.

A :class:`Backoff` is a policy, not a counter: the loop keeps its own count of consecutive
failures and asks for the delay of the next attempt. That keeps it a frozen value (shared
freely, compared in tests) and lets a loop that also publishes state (a token refresher
withdrawing an expired token, an informer marking itself unsynced) own what a failure means.

The delay is exponential, capped, with *equal jitter*: ``d = min(cap, base * 2**failures)``
then uniform in ``[d/2, d]``. Jitter spreads replicas that failed together (an API server
restart) so they do not retry in lockstep; keeping half of ``d`` means a retry never comes
immediately, unlike full jitter. ``jitter=False`` gives the plain doubling, for loops whose
delay is observable (a refresher's documented retry schedule).

>>> policy = Backoff(base=0.5, cap=30.0)
>>> [policy.delay(n, rand=lambda: 1.0) for n in range(8)]
[0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
>>> policy.delay(3, rand=lambda: 0.0)
2.0
>>> Backoff(base=1.0, cap=10.0, jitter=False).delay(100)
10.0
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# 2**63 overflows nothing in Python, but a float of it is pointless: any count past this
# is at the cap for every sensible (base, cap).
_MAX_DOUBLINGS = 62


@dataclass(frozen=True)
class Backoff:
    """Delays in seconds: ``base`` after the first failure, doubling, at most ``cap``."""

    base: float = 0.5
    cap: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"Backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the next attempt, after ``failures`` consecutive failures
        (0 for the wait after the first one). ``rand`` returns a float in [0, 1)."""
        ceiling = min(self.cap, self.base * 2 ** min(max(failures, 0), _MAX_DOUBLINGS))
        if not self.jitter:
            return ceiling
        return ceiling / 2 + rand() * ceiling / 2
