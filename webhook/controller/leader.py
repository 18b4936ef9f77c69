"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does.

Every webhook replica serves admission; only the one holding the Lease reconciles. A
candidate takes the Lease when it is absent, released (empty holder) or not renewed for
the holder's ``leaseDurationSeconds`` as observed on the candidate's own clock (clocks of different machines
are never compared); the holder renews every ``retry_period`` and stops leading when it has
not renewed for ``renew_deadline`` (shorter than the lease duration, so it stops before
anyone else may start). Writes carry the Lease's resourceVersion, so two candidates racing
for it cannot both win. On shutdown the holder releases the Lease, so a successor takes
over at once instead of after the lease duration.

``kubernetes.leaderelection`` is not used: it reads the process-wide default client
configuration instead of the client it is given, and can neither stop nor release.

``decide`` is the pure rule; ``LeaderElector`` is the thread that applies it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("webhook.controller.leader")


@dataclass(frozen=True)
class Timing:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True)
class Observed:
    """The Lease as last read, and when (on our monotonic clock) its record last changed."""

    holder: str
    record: tuple[Any, ...]  # (holder, renewTime, leaseDurationSeconds): a change means alive
    changed_at: float

    @property
    def duration(self) -> float | None:
        """The holder's own leaseDurationSeconds: it, not ours, says when the Lease expires."""
        value = self.record[2] if len(self.record) > 2 else None
        return float(value) if isinstance(value, int | float) and value > 0 else None


def decide(observed: Observed | None, identity: str, now: float, timing: Timing) -> str:
    """``"renew"`` (ours), ``"acquire"`` (absent, released or expired) or ``"wait"``."""
    if observed is None or not observed.holder:
        return "acquire"
    if observed.holder == identity:
        return "renew"
    if now - observed.changed_at >= (observed.duration or timing.lease_duration):
        return "acquire"
    return "wait"


def _now_rfc3339_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Runs the election in a thread; ``leading()`` says whether this replica may act now."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        *,
        timing: Timing = Timing(),
        on_started: Callable[[], None] = lambda: None,
        on_stopped: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import kubernetes

        self._api = kubernetes.client.CoordinationV1Api(api_client)
        self._exception = kubernetes.client.ApiException
        self.namespace, self.name, self.identity = namespace, name, identity
        self._timing = timing
        self._on_started, self._on_stopped = on_started, on_stopped
        self._clock = clock
        self._observed: Observed | None = None
        self._renewed_at: float | None = None  # last successful write as holder
        self._leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def leading(self) -> bool:
        """True while the last renewal is younger than the renew deadline."""
        renewed = self._renewed_at
        return self._leading and renewed is not None and self._clock() - renewed < self._timing.renew_deadline

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timing.retry_period + 5)
        if self._leading:
            self._set_leading(False)
            if release:
                self._release()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - API server unreachable or refusing: try again
                log.warning("leader election: %s: %s", type(exc).__name__, str(exc)[:200])
            if self._leading and not self.leading():
                log.warning("lost the lease %s/%s (not renewed in time)", self.namespace, self.name)
                self._set_leading(False)
            self._stop.wait(self._timing.retry_period)

    def _step(self) -> None:
        lease = self._read()
        action = decide(self._observed, self.identity, self._clock(), self._timing)
        if action == "wait":
            return
        if lease is None:
            self._create()
        else:
            self._update(lease, acquiring=action == "acquire")
        self._renewed_at = self._clock()
        if not self._leading:
            log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.name)
            self._set_leading(True)

    def _read(self) -> Any:
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except self._exception as exc:
            if exc.status == 404:
                self._observed = None
                return None
            raise
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_duration_seconds) if spec else (None,) * 3
        if self._observed is None or self._observed.record != record:
            self._observed = Observed(str(record[0] or ""), record, self._clock())
        return lease

    def _create(self) -> None:
        import kubernetes

        now = _now_rfc3339_micro()
        body = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=kubernetes.client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=int(self._timing.lease_duration),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        self._api.create_namespaced_lease(self.namespace, body)

    def _update(self, lease: Any, *, acquiring: bool) -> None:
        now = _now_rfc3339_micro()
        spec = lease.spec
        if acquiring:
            spec.holder_identity = self.identity
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.lease_duration_seconds = int(self._timing.lease_duration)
        spec.renew_time = now
        # replace carries metadata.resourceVersion: a concurrent writer makes this a 409.
        self._api.replace_namespaced_lease(self.name, self.namespace, lease)

    def take_over(self) -> float:
        """Hold the Lease now, whoever holds it (``--release-all`` on uninstall); returns the
        previous holder's lease duration: it stops acting within that time."""
        while True:
            lease = self._read()
            try:
                if lease is None:
                    self._create()
                    return 0.0
                previous = (
                    float(lease.spec.lease_duration_seconds or 0) if lease.spec.holder_identity else 0.0
                )
                self._update(lease, acquiring=True)
                return previous
            except self._exception as exc:
                if exc.status != 409:
                    raise

    def _release(self) -> None:
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.lease_duration_seconds = 1
                self._api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("released the lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # noqa: BLE001 - best effort: the lease expires anyway
            log.warning("could not release the lease: %s", str(exc)[:200])

    def _set_leading(self, value: bool) -> None:
        self._leading = value
        (self._on_started if value else self._on_stopped)()
