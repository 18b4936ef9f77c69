"""The sidecar's own signals, per pod: what it measures in the data path and what it
scrapes from the model server, served on the admin port at ``/signals``.

    data path --stats.local_in_flight / local_waiting--> Sampler (every 100 ms)
    model's /metrics (localhost) --ModelScraper (every modelMetrics.intervalSeconds)
                                           \\                 /
                                            SignalBoard.document() --> GET /signals
                                                                   --> SignalMetricSource

- **in flight** (``offload.beamlit.com/in-flight``): requests sent to the local model
  whose response has not ended; **waiting** (``offload.beamlit.com/waiting``): those of
  them without a byte of response body yet. The data path only increments and decrements
  two integers (sidecar/proxy/exchange.py); the sampler reads them every ``SAMPLE_INTERVAL``
  and the value served is their mean over the last ``window`` seconds: uniform samples
  of a step function, an unbiased estimate of its time average (the concurrency Knative's
  queue-proxy reports), at no cost per request.
- **model gauges**: the gauges the ModelDeployment's Pods metrics name (crds/signals.py),
  scraped from ``http://127.0.0.1:<port><path>``, parsed with ``prometheus_client``'s
  text parser after the lines of other metrics are dropped (one regular expression over
  the text, so a 1 MiB exposition costs a few ms). Bounded: ``MAX_EXPOSITION_BYTES``,
  a timeout of min(interval, 5 s); a failed scrape keeps no stale value: the gauge
  reports the error until a scrape succeeds.

Pure parts (averaging, filtering, parsing, the document) take their inputs and a clock;
the sampler and scraper are thin loops around them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import httptools

from crds.model import ModelDeployment, OffloadingConfig
from crds.observation import MetricObservation, unit_of
from crds.signals import (
    IN_FLIGHT,
    SIDECAR_SIGNALS,
    WAITING,
    Aggregate,
    aggregate,
    display_name,
    local_metric_name,
    scraped_gauges,
    signal_value,
)
from sidecar.control.interfaces import MetricSource
from sidecar.proxy.stats import ProxyStats

log = logging.getLogger("sidecar.signals")

SAMPLE_INTERVAL = 0.1  # seconds between two samples of the data path's counters
DEFAULT_WINDOW = 1.0  # seconds of samples behind each value served
MAX_EXPOSITION_BYTES = 4 * 1024 * 1024  # a model server's /metrics larger than this is refused
MAX_SCRAPE_TIMEOUT = 5.0
MAX_SERIES = 256  # series kept per gauge (a Triton with many models)
SIGNALS_PATH = "/signals"


# --- the data path's counters, sampled ------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    in_flight: int
    waiting: int


def window_mean(samples: Iterable[Sample], now: float, window: float) -> tuple[float, float, int] | None:
    """(mean in flight, mean waiting, samples used) over the samples taken in the last
    ``window`` seconds before ``now``; None when there are none."""
    start = now - window
    n = total_in_flight = total_waiting = 0
    for sample in samples:
        if start < sample.at <= now:
            n += 1
            total_in_flight += sample.in_flight
            total_waiting += sample.waiting
    if not n:
        return None
    return total_in_flight / n, total_waiting / n, n


class Sampler:
    """Samples ``stats.local_in_flight`` and ``stats.local_waiting`` every ``interval``
    seconds on the running loop, keeping ``keep`` seconds of samples."""

    def __init__(
        self,
        stats: ProxyStats,
        *,
        interval: float = SAMPLE_INTERVAL,
        keep: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=max(1, math.ceil(keep / interval)))
        self._timer: asyncio.TimerHandle | None = None

    def sample(self) -> None:
        stats = self.stats
        self.samples.append(Sample(self.clock(), stats.local_in_flight, stats.local_waiting))

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.sample()
            self._timer = loop.call_later(self.interval, tick)

        tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# --- the model server's gauges ----------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class GaugeReading:
    """One gauge from one scrape: its series, or why there are none."""

    series: tuple[Series, ...] = ()
    error: str | None = None


def lines_of(text: str, names: Iterable[str]) -> str:
    """The lines of a Prometheus text exposition that belong to ``names``: their samples
    and their ``# HELP`` / ``# TYPE`` lines. One regular expression over the whole text."""
    wanted = sorted(set(names), key=len, reverse=True)
    if not wanted:
        return ""
    alternatives = "|".join(re.escape(name) for name in wanted)
    pattern = re.compile(rf"^(?:# (?:HELP|TYPE) )?(?:{alternatives})(?:[ \t{{].*)?$", re.MULTILINE)
    return "\n".join(match.group(0) for match in pattern.finditer(text)) + "\n"


def parse_gauges(text: str, names: Iterable[str]) -> dict[str, GaugeReading]:
    """Each of ``names`` from a Prometheus text exposition (0.0.4): its series, or an error
    (absent, not a gauge, unparsable). Parsed by ``prometheus_client.parser``; never raises."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(names)
    found: dict[str, GaugeReading] = {}
    try:
        families = list(text_string_to_metric_families(lines_of(text, wanted)))
    except (ValueError, TypeError, IndexError) as exc:
        message = f"the model's metrics could not be parsed: {exc}"[:300]
        return {name: GaugeReading(error=message) for name in wanted}
    for family in families:
        if family.type not in ("gauge", "unknown"):
            # Named as the exposition shows it (a counter's family drops its _total).
            shown = {family.name, f"{family.name}_total", *(sample.name for sample in family.samples)}
            for name in (shown & wanted) - found.keys():
                found[name] = GaugeReading(error=f"{name} is a {family.type}, not a gauge")
            continue
        if family.name not in wanted or family.name in found:
            continue
        series = [
            Series(dict(sample.labels), float(sample.value))
            for sample in family.samples
            if sample.name == family.name
        ]
        if not series:
            found[family.name] = GaugeReading(error=f"{family.name} has no sample")
        elif len(series) > MAX_SERIES:
            found[family.name] = GaugeReading(error=f"{family.name} has more than {MAX_SERIES} series")
        else:
            found[family.name] = GaugeReading(tuple(series))
    for name in wanted - found.keys():
        found[name] = GaugeReading(error=f"{name} is not in the model's metrics")
    return found


class FetchError(Exception):
    """The model's metrics could not be fetched; the message says why."""


class _Response:
    """httptools callbacks gathering one response, bounded in size."""

    def __init__(self, limit: int):
        self.limit = limit
        self.body: list[bytes] = []
        self.size = 0
        self.done = False
        self.head_done = False
        self.framed = False  # Content-Length or chunked: else the body ends with the connection

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            raise FetchError(f"larger than {self.limit // (1024 * 1024)} MiB")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


async def fetch(host: str, port: int, path: str, *, timeout: float, limit: int = MAX_EXPOSITION_BYTES) -> str:
    """``GET http://host:port/path``: the body as text. Raises FetchError (status, size,
    malformed), OSError (connect) or TimeoutError, all within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain;version=0.0.4\r\n"
                "User-Agent: offload-sidecar\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            response = _Response(limit)
            parser = httptools.HttpResponseParser(response)
            while not response.done:
                data = await reader.read(65536)
                if not data:
                    if response.head_done and not response.framed:
                        break  # a body without length ends with the connection (HTTP/1.0 style)
                    raise FetchError("the connection closed before the response ended")
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    if isinstance(exc.__context__, FetchError):
                        raise exc.__context__ from None
                    raise FetchError(f"malformed response: {exc}") from None
            status = parser.get_status_code()
            if status != 200:
                raise FetchError(f"answered {status}")
            return b"".join(response.body).decode("utf-8", "replace")
        finally:
            writer.close()


@dataclass(frozen=True)
class ScrapeTarget:
    host: str
    port: int
    path: str
    interval: float
    names: tuple[str, ...]

    @property
    def url(self) -> str:
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"http://{authority}{self.path}"


def scrape_target(model: ModelDeployment | None, upstream: tuple[str, int]) -> ScrapeTarget | None:
    """What to scrape for this configuration: None when no Pods metric names a model gauge."""
    config = model.spec.offloading_config if model is not None and model.spec.enabled else None
    names = scraped_gauges(config)
    if not names:
        return None
    assert config is not None
    settings = config.model_metrics
    host, port = upstream
    if settings is None:
        return ScrapeTarget(host, port, "/metrics", 1.0, names)
    return ScrapeTarget(host, settings.port or port, settings.path, settings.interval_seconds, names)


@dataclass
class ScrapeState:
    """The last scrape: when it ended (monotonic), how long it took, and its readings."""

    target: ScrapeTarget
    finished: float | None = None
    duration: float | None = None
    error: str | None = None
    readings: dict[str, GaugeReading] = field(default_factory=dict)
    scrapes: int = 0
    failures: int = 0


class ModelScraper:
    """Scrapes the model's gauges every ``target.interval`` seconds while configured."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.clock = clock
        self.sleep = sleep
        self.state: ScrapeState | None = None
        self._task: asyncio.Task[None] | None = None

    def configure(self, target: ScrapeTarget | None) -> None:
        """Follow ``target`` (None: stop scraping); an unchanged target keeps its loop."""
        if self.state is not None and target == self.state.target and self._task is not None:
            return
        self.stop()
        if target is None:
            self.state = None
            return
        log.info(
            "scraping %s of the model every %gs: %s", target.url, target.interval, ", ".join(target.names)
        )
        self.state = ScrapeState(target)
        self._task = asyncio.get_running_loop().create_task(self._run(self.state))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def scrape_once(self, state: ScrapeState) -> None:
        target = state.target
        started = self.clock()
        try:
            text = await fetch(
                target.host, target.port, target.path, timeout=min(target.interval, MAX_SCRAPE_TIMEOUT)
            )
        except (FetchError, OSError, TimeoutError, UnicodeError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            state.error = f"scraping {target.url} failed: {why}"
            state.readings = {}
            state.failures += 1
        else:
            state.error = None
            state.readings = parse_gauges(text, target.names)
        state.scrapes += 1
        state.finished = self.clock()
        state.duration = state.finished - started

    async def _run(self, state: ScrapeState) -> None:
        interval = state.target.interval
        while True:
            started = self.clock()
            try:
                await self.scrape_once(state)
            except Exception:  # a bug in parsing must not end the loop
                log.exception("scraping the model's metrics failed")
                state.error = "internal error while scraping; see the sidecar's log"
                state.readings = {}
            await self.sleep(max(0.0, interval - (self.clock() - started)))


# --- what /signals serves -----------------------------------------------------------------------


class SignalBoard:
    """The signals of this pod, as served at ``/signals`` and read by the local source."""

    def __init__(
        self,
        sampler: Sampler,
        scraper: ModelScraper,
        *,
        window: float = DEFAULT_WINDOW,
        pod: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.sampler = sampler
        self.scraper = scraper
        self.window = window
        self.pod = pod
        self.clock = clock
        self.wall = wall

    def document(self) -> dict[str, Any]:
        """::

        {"pod": str, "time": unix seconds, "windowSeconds": float,
         "signals": {"offload.beamlit.com/in-flight": {"value": mean, "now": int}, ...},
         "gauges": {name: {"series": [{"labels": {...}, "value": float}]} | {"error": str}},
         "scrape": {"url", "intervalSeconds", "ageSeconds", "durationSeconds", "error",
                    "scrapes", "failures"} | null}
        """
        now = self.clock()
        stats = self.sampler.stats
        mean = window_mean(self.sampler.samples, now, self.window)
        in_flight, waiting = (
            (mean[0], mean[1]) if mean is not None else (stats.local_in_flight, stats.local_waiting)
        )
        doc: dict[str, Any] = {
            "pod": self.pod,
            "time": round(self.wall(), 3),
            "windowSeconds": self.window,
            "signals": {
                IN_FLIGHT: {"value": round(in_flight, 4), "now": stats.local_in_flight},
                WAITING: {"value": round(waiting, 4), "now": stats.local_waiting},
            },
            "gauges": {},
            "scrape": None,
        }
        state = self.scraper.state
        if state is None:
            return doc
        target = state.target
        age = None if state.finished is None else now - state.finished
        doc["scrape"] = {
            "url": target.url,
            "intervalSeconds": target.interval,
            "ageSeconds": None if age is None else round(age, 3),
            "durationSeconds": None if state.duration is None else round(state.duration, 4),
            "error": state.error,
            "scrapes": state.scrapes,
            "failures": state.failures,
        }
        stale_after = 3 * target.interval + MAX_SCRAPE_TIMEOUT
        gauges: dict[str, Any] = {}
        for name in target.names:
            reading = state.readings.get(name)
            if state.finished is None:
                gauges[name] = {"error": "not scraped yet"}
            elif state.error is not None:
                gauges[name] = {"error": state.error}
            elif age is not None and age > stale_after:
                gauges[name] = {"error": f"the last scrape is {age:.0f}s old"}
            elif reading is None or reading.error is not None:
                gauges[name] = {"error": reading.error if reading is not None else "not scraped"}
            else:
                gauges[name] = {"series": [{"labels": s.labels, "value": s.value} for s in reading.series]}
        doc["gauges"] = gauges
        return doc


def observation_of(metric_name: str, target_type: str, result: Aggregate) -> MetricObservation:
    return MetricObservation(
        display_name(metric_name, target_type),
        result.current,
        result.target,
        result.reason,
        "Pods",
        unit_of(target_type),
    )


class SignalMetricSource:
    """Standalone mode's MetricSource: Pods metrics on the sidecar's own signals and the
    model's gauges are evaluated from this pod's board (one pod: its value is the average,
    and the total); every other metric goes to ``inner`` (the local CPU and memory)."""

    def __init__(self, inner: MetricSource, board: SignalBoard, pod: str = "this pod"):
        self.inner = inner
        self.board = board
        self.pod = pod

    async def observe(self, config: OffloadingConfig) -> list[MetricObservation]:
        metrics = config.metrics
        names = [local_metric_name(m, config) for m in metrics]
        others = tuple(m for m, name in zip(metrics, names) if name is None)
        from_inner = iter(await self.inner.observe(replace(config, metrics=others)) if others else [])
        doc = self.board.document() if any(names) else None
        out = []
        for metric, name in zip(metrics, names):
            if name is None:
                out.append(next(from_inner))
                continue
            assert metric.pods is not None  # local_metric_name names Pods metrics only
            target = metric.pods.target
            value, why = signal_value(doc, name, metric.pods.metric.selector)
            values = {self.pod: value} if value is not None else {}
            result = aggregate(target, [self.pod], values, {self.pod: why})
            out.append(observation_of(name, target.type, result))
        return out


__all__ = [
    "DEFAULT_WINDOW",
    "SIDECAR_SIGNALS",
    "SIGNALS_PATH",
    "ModelScraper",
    "Sampler",
    "SignalBoard",
    "SignalMetricSource",
    "scrape_target",
]
