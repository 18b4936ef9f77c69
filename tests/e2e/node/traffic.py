"""Real requests from the host to a Service's ClusterIP (through kube-proxy's rules), counted
by the pod that served them (the model server's X-Served-By header).

Every request opens a new connection, as a client behind a load balancer would, so each is
balanced by kube-proxy on its own and none is stuck to a pod that went away."""

from __future__ import annotations

import collections
import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self


@dataclass
class Outcome:
    """One request: the pod that served it (None when it failed), its status, or the error."""

    served_by: str | None
    status: int | None
    error: str | None = None
    started: float = 0.0
    seconds: float = 0.0


def get(host: str, port: int, path: str = "/", timeout: float = 30.0) -> Outcome:
    """One GET on a fresh connection; never raises for a network error (it is the outcome)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return Outcome(resp.getheader("X-Served-By"), resp.status, None, started, time.monotonic() - started)
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(None, None, f"{type(exc).__name__}: {exc}", started, time.monotonic() - started)
    finally:
        conn.close()


@dataclass
class Tally:
    """Outcomes of a run of requests."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def by_backend(self, classify: Callable[[str], str] = lambda pod: pod) -> dict[str, int]:
        """Successful requests per backend: classify maps a pod name to a backend name."""
        counts = collections.Counter(
            classify(o.served_by) for o in self.outcomes if o.status == 200 and o.served_by
        )
        return dict(sorted(counts.items()))


def wait_until_serving(host: str, port: int, timeout: float = 60.0, path: str = "/") -> None:
    """Polls until a request succeeds: a Service's endpoints can be ready before kube-proxy has
    programmed them (meanwhile the ClusterIP refuses connections)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = get(host, port, path, timeout=10)
        if last.status == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not answer 200 within {timeout:.0f}s (last: {last})")


def send(host: str, port: int, count: int, path: str = "/") -> Tally:
    """`count` requests, one after another."""
    return Tally([get(host, port, path) for _ in range(count)])


class Load:
    """`clients` threads sending requests back to back until stop() (or `max_seconds`, a bound
    so that no load outlives a failed test). Outcomes are collected in `tally`."""

    def __init__(
        self, host: str, port: int, clients: int, max_seconds: float = 600.0, path: str = "/"
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            outcome = get(self.host, self.port, self.path)
            with self._lock:
                self.tally.outcomes.append(outcome)
            if outcome.status is None:
                # A refused connection fails at once: pace the retries instead of spinning.
                self._stop.wait(0.05)

    def since(self, moment: float) -> Tally:
        """The outcomes of the requests started at or after `moment` (time.monotonic())."""
        with self._lock:
            return Tally([o for o in self.tally.outcomes if o.started >= moment])

    def stop(self) -> Tally:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.tally
