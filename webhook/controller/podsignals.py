"""Pods metrics the sidecars serve themselves, gathered by the controller: no
custom-metrics API, no adapter.

For a ModelDeployment whose ``offloadingConfig.metrics`` has ``Pods`` metrics on the
sidecars' signals (crds/signals.py: ``offload.beamlit.com/in-flight``,
``offload.beamlit.com/waiting``, the model server's gauges), the controller reads
``GET http://<podIP>:<offload-admin>/signals`` from each ready pod of the workload and
applies the HPA's arithmetic over those pods (AverageValue: the mean per ready pod;
Value: their sum; pods that did not answer are counted as the HPA counts pods without
metrics). The port is the pod's container port named ``offload-admin`` (the injector
declares it on the sidecar); a namespace whose NetworkPolicies deny ingress by default
must allow it from the controller's pods (README, "Signals served by the sidecars").

    pods (the controller's cache) --pod_targets--> PodTarget per ready pod (pure)
                                   --SignalGatherer.gather--> {pod: /signals document | why not}
    documents --observe_local--> one LocalObservation per local metric (pure)

Bounded: every pod is read concurrently (at most ``concurrency`` connections at once),
each within ``timeout`` seconds and ``MAX_RESPONSE_BYTES``, and the whole gathering
within ``deadline`` seconds, whatever the number of pods; one request per pod per
gathering, whatever the number of metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crds.model import MetricSpec, ModelDeployment
from crds.signals import Aggregate, aggregate, display_name, local_metric_name, signal_value

ADMIN_PORT_NAME = "offload-admin"
SIGNALS_PATH = "/signals"
DEFAULT_PERIOD_SECONDS = 1.0  # how often the controller gathers them (the decision's resolution)
DEFAULT_TIMEOUT = 0.5  # seconds per pod
DEFAULT_DEADLINE = 0.9  # seconds for the whole gathering
DEFAULT_CONCURRENCY = 64
MAX_RESPONSE_BYTES = 256 * 1024


# --- which pods, where (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class PodTarget:
    pod: str
    ip: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}{SIGNALS_PATH}"


@dataclass(frozen=True)
class Targets:
    """The workload's ready pods (names, in order), where to read each, and why some cannot be read."""

    ready: tuple[str, ...]
    targets: tuple[PodTarget, ...]
    unreachable: Mapping[str, str]


def _obj(value: Any) -> Mapping[str, Any]:
    """A JSON object, or an empty one in place of anything else (a malformed pod)."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready and not being deleted: a pod that takes traffic from its Service."""
    status = _obj(pod.get("status"))
    if _obj(pod.get("metadata")).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    conditions = [_obj(c) for c in _list(status.get("conditions"))]
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def admin_port(pod: Mapping[str, Any]) -> int | None:
    """The pod's container port named offload-admin (the sidecar's), if any."""
    spec = _obj(pod.get("spec"))
    for container in [*_list(spec.get("initContainers")), *_list(spec.get("containers"))]:
        for port in _list(_obj(container).get("ports")):
            if _obj(port).get("name") == ADMIN_PORT_NAME:
                number = port.get("containerPort")
                if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 65536:
                    return number
    return None


def pod_targets(pods: Sequence[Mapping[str, Any]]) -> Targets:
    """The ready pods among ``pods`` (API JSON, the workload's own) and their /signals address."""
    ready: list[str] = []
    targets: list[PodTarget] = []
    unreachable: dict[str, str] = {}
    for pod in pods:
        if not isinstance(pod, Mapping) or not is_ready(pod):
            continue
        name = _obj(pod.get("metadata")).get("name")
        if not isinstance(name, str) or not name:
            continue
        ready.append(name)
        ip = _obj(pod.get("status")).get("podIP")
        port = admin_port(pod)
        if port is None:
            unreachable[name] = f"no {ADMIN_PORT_NAME} port: the pod has no sidecar"
        elif not isinstance(ip, str) or not ip:
            unreachable[name] = "no pod IP"
        else:
            targets.append(PodTarget(name, ip, port))
    return Targets(tuple(ready), tuple(targets), unreachable)


# --- the metrics, from the documents (pure) -----------------------------------------------------------


@dataclass(frozen=True)
class LocalObservation:
    """One local Pods metric evaluated over the ready pods: ``metric`` as ``kubectl
    describe hpa`` names it, ``current`` (None: unknown) and ``target`` in its unit, and
    ``reason`` (how it was computed, or why it is unknown)."""

    index: int  # its position in offloadingConfig.metrics
    metric: str
    current: float | None
    target: float
    reason: str


def local_metrics(md: ModelDeployment) -> list[tuple[int, MetricSpec, str]]:
    """(position, metric, signal name) of each metric of ``md`` the sidecars serve."""
    config = md.spec.offloading_config
    if config is None:
        return []
    out = []
    for i, metric in enumerate(config.metrics):
        name = local_metric_name(metric, config)
        if name is not None:
            out.append((i, metric, name))
    return out


def observe_local(
    metrics: Sequence[tuple[int, MetricSpec, str]],
    targets: Targets,
    documents: Mapping[str, Any],
) -> list[LocalObservation]:
    """Each local metric over the ready pods. ``documents``: pod -> its /signals document,
    or a str saying why it could not be read."""
    out = []
    for index, metric, name in metrics:
        assert metric.pods is not None
        values: dict[str, float] = {}
        missing: dict[str, str] = dict(targets.unreachable)
        for pod in targets.ready:
            if pod in missing:
                continue
            doc = documents.get(pod, "not read")
            if isinstance(doc, str):
                missing[pod] = doc
                continue
            value, why = signal_value(doc, name, metric.pods.metric.selector)
            if value is None:
                missing[pod] = why
            else:
                values[pod] = value
        target = metric.pods.target
        result: Aggregate = aggregate(target, targets.ready, values, missing)
        out.append(
            LocalObservation(
                index, display_name(name, target.type), result.current, result.target, result.reason
            )
        )
    return out


# --- reading the pods (I/O) ---------------------------------------------------------------------------


Fetch = Callable[[PodTarget, float], Awaitable[Any]]


class FetchError(Exception):
    """A pod's /signals could not be read; the message says why."""


async def fetch_signals(target: PodTarget, timeout: float) -> Any:
    """``GET /signals`` from one pod's sidecar: the decoded JSON. Raises FetchError,
    OSError or TimeoutError, within ``timeout`` seconds and MAX_RESPONSE_BYTES."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(target.ip, target.port, limit=MAX_RESPONSE_BYTES)
        try:
            host = f"[{target.ip}]" if ":" in target.ip else target.ip
            writer.write(
                f"GET {SIGNALS_PATH} HTTP/1.1\r\nHost: {host}:{target.port}\r\n"
                "User-Agent: offload-controller\r\nAccept: application/json\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            raw = b""
            while len(raw) <= MAX_RESPONSE_BYTES:
                more = await reader.read(MAX_RESPONSE_BYTES + 1 - len(raw))
                if not more:
                    break
                raw += more
        finally:
            writer.close()
    if len(raw) > MAX_RESPONSE_BYTES:
        raise FetchError(f"answer over {MAX_RESPONSE_BYTES // 1024} KiB")
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise FetchError("not an HTTP response")
    if status_line[1] != b"200":
        hint = " (a sidecar older than this controller)" if status_line[1] == b"404" else ""
        raise FetchError(f"answered {status_line[1].decode('latin-1', 'replace')}{hint}")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        length = value.strip()
        if name.strip().lower() == b"content-length" and length.isdigit() and len(body) != int(length):
            raise FetchError("the answer was cut short")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchError("the answer is not JSON") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


class SignalGatherer:
    """Reads the /signals documents of many pods at once, bounded in time and size.

    Synchronous (the controller's worker thread calls it): each ``gather`` runs its own
    short-lived event loop. ``fetch`` replaces the HTTP call (tests). ``requests`` counts
    the pods read, for load measurements.
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        deadline: float = DEFAULT_DEADLINE,
        concurrency: int = DEFAULT_CONCURRENCY,
        fetch: Fetch = fetch_signals,
    ):
        self.timeout = timeout
        self.deadline = deadline
        self.concurrency = concurrency
        self._fetch = fetch
        self.requests = 0

    def gather(self, targets: Sequence[PodTarget]) -> dict[str, Any]:
        """pod -> its document, or a str saying why it could not be read. Never raises."""
        if not targets:
            return {}
        self.requests += len(targets)
        return asyncio.run(self._gather(targets))

    async def _gather(self, targets: Sequence[PodTarget]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        limit = asyncio.Semaphore(self.concurrency)

        async def one(target: PodTarget) -> None:
            async with limit:
                try:
                    results[target.pod] = await self._fetch(target, self.timeout)
                except (FetchError, OSError, TimeoutError, ValueError) as exc:
                    results[target.pod] = f"{target.url}: {_describe(exc)}"

        tasks = [asyncio.create_task(one(t)) for t in targets]
        _, pending = await asyncio.wait(tasks, timeout=self.deadline)
        for task in pending:
            task.cancel()
        for target in targets:
            results.setdefault(target.pod, f"{target.url}: not read within {self.deadline:g}s")
        return results


class PodSignalsReader:
    """The controller's reader of sidecar-served Pods metrics for one ModelDeployment."""

    def __init__(self, gatherer: SignalGatherer | None = None, clock: Callable[[], float] = time.monotonic):
        self.gatherer = gatherer if gatherer is not None else SignalGatherer()
        self.clock = clock

    def observe(self, md: ModelDeployment, pods: Sequence[Mapping[str, Any]]) -> list[LocalObservation]:
        """One LocalObservation per metric of ``md`` the sidecars serve ([] when none: no
        request is made). ``pods``: the workload's own pods (API JSON). Never raises."""
        metrics = local_metrics(md)
        if not metrics:
            return []
        targets = pod_targets(pods)
        documents = self.gatherer.gather(targets.targets)
        return observe_local(metrics, targets, documents)


def signals_reader(period: float) -> PodSignalsReader:
    """The reader for a controller gathering every ``period`` seconds: each gathering ends
    within 90% of the period (and its default bounds), so evaluations keep their pace."""
    deadline = min(DEFAULT_DEADLINE, 0.9 * period)
    return PodSignalsReader(SignalGatherer(timeout=min(DEFAULT_TIMEOUT, deadline), deadline=deadline))
