"""The demo's LLM scenario: ``python -m sidecar.demo --scenario llm``.

An LLM server on a GPU saturates on its queue while its CPU idles. Two identical lanes
run side by side, all on 127.0.0.1, each a stand-in LLM server (``sidecar.demo.llmsim``: 4
requests at once, the rest queued, tokens streamed as Server-Sent Events, little CPU)
behind its own offload-sidecar, both offloading to one stand-in remote:

- lane **cpu**: the tutorial's metric, CPU Utilization above 50% of 500m;
- lane **queue**: the same, plus a Pods metric on the model's own gauge
  ``vllm:num_requests_waiting`` (AverageValue 2), which the sidecar scrapes from the
  model's /metrics and the product serves itself: no Prometheus, no adapter.

Both get the same load: below the model's capacity, then well above it, then below
again. Shown live: each model's CPU against its target, its queue, the offloading state,
the split and the recent time to first token. Exit status 0 when the queue lane offloaded
under load and stopped after it, the cpu lane never offloaded, and no request failed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.demo.child import Child
from sidecar.demo.cpu import http_get
from sidecar.demo.llmsim import Capacity

MODEL = Capacity(slots=4, prefill=0.15, tokens=16, token_interval=0.025, cpu_per_token=0.0003)
REMOTE = Capacity(slots=64, prefill=0.15, tokens=16, token_interval=0.025)
REFERENCE = "500m"
TARGET = 50
QUEUE = "vllm:num_requests_waiting"
QUEUE_TARGET = 2
PERCENTAGE = 50
LOW = 0.5  # of the model's capacity
HIGH = 1.6
REQUEST_TIMEOUT = 60.0
COOLDOWN = 5


def modeldeployment_yaml(remote_port: int, queue: bool) -> str:
    metrics = [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": TARGET}},
        }
    ]
    if queue:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": QUEUE},
                    "target": {"type": "AverageValue", "averageValue": str(QUEUE_TARGET)},
                },
            }
        )
    doc = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "my-llm"},
        "spec": {
            "model": "my-llm",
            "modelSourceRef": {"name": "my-llm"},
            "offloadingConfig": {
                "remoteBackend": {"host": f"127.0.0.1:{remote_port}"},
                "behavior": {"percentage": PERCENTAGE, "sustainSeconds": 1, "cooldownSeconds": COOLDOWN},
                "modelMetrics": {"intervalSeconds": 0.5},
                "metrics": metrics,
            },
        },
    }
    return json.dumps(doc, indent=2)  # JSON is YAML


@dataclass(frozen=True)
class Plan:
    duration: float
    high_from: float
    high_until: float

    @classmethod
    def for_duration(cls, duration: float) -> Plan:
        return cls(duration, round(duration * 0.2, 1), round(duration * 0.55, 1))

    def rate(self, t: float) -> float:
        share = HIGH if self.high_from <= t < self.high_until else LOW
        return share * MODEL.requests_per_second

    def phase(self, t: float) -> str:
        return "high" if self.high_from <= t < self.high_until else "low"


@dataclass
class Lane:
    name: str
    queue_metric: bool
    model: Child | None = None
    sidecar: Child | None = None
    local: int = 0
    remote: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ttfbs: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds to the first token)
    transitions: list[tuple[float, bool, str]] = field(default_factory=list)
    offloading: bool = False
    cpu: float | None = None
    queue: float | None = None
    reason: str = "starting"

    def recent_ttfb(self, now: float, window: float = 3.0) -> float | None:
        self.ttfbs = [(t, v) for t, v in self.ttfbs if t >= now - 30]
        recent = sorted(v for t, v in self.ttfbs if t >= now - window)
        return recent[len(recent) // 2] if recent else None


_SERVER = re.compile(rb'"server": "(\w+)"')


async def complete(port: int) -> tuple[str | None, float | None, str | None]:
    """One streamed completion: (server, seconds to the first token, error)."""
    loop = asyncio.get_running_loop()
    first = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    b"GET /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
                )
                t0 = loop.time()
                raw = b""
                while data := await reader.read(65536):
                    raw += data
                    if first is None and b"data: {" in raw:
                        first = loop.time() - t0
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    match = _SERVER.search(raw)
    if not raw.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in raw or match is None:
        return None, first, f"bad answer: {raw[:60]!r}"
    return match.group(1).decode(), first, None


async def one(lane: Lane, clock) -> None:
    assert lane.sidecar is not None
    server, first, error = await complete(lane.sidecar.port)
    if error is not None:
        lane.errors += 1
        if len(lane.error_samples) < 3:
            lane.error_samples.append(error)
        return
    if server == "remote":
        lane.remote += 1
    else:
        lane.local += 1
    if first is not None:
        lane.ttfbs.append((clock(), first))


async def drive(lanes: list[Lane], plan: Plan, clock) -> None:
    """Open-loop arrivals, evenly spaced at the plan's rate, the same to every lane."""
    tasks: set[asyncio.Task[None]] = set()
    next_at = 0.0
    while (now := clock()) < plan.duration:
        if now < next_at:
            await asyncio.sleep(min(next_at - now, 0.05))
            continue
        next_at += 1 / plan.rate(now)
        for lane in lanes:
            task = asyncio.create_task(one(lane, clock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT)


async def get_json(port: int, path: str) -> dict:
    """A JSON document from one of the demo's processes on 127.0.0.1."""
    status, body = await http_get(port, path, timeout=5)
    if status != 200:
        raise ValueError(f"GET {path}: status {status}")
    return json.loads(body)


async def model_queue(port: int) -> float | None:
    """The model's own vllm:num_requests_waiting, read from its /metrics for the display."""
    _, raw = await http_get(port, "/metrics", timeout=5)
    match = re.search(rb"^vllm:num_requests_waiting\{[^}]*\} ([\d.]+)$", raw, re.MULTILINE)
    return float(match.group(1)) if match else None


async def observe(lane: Lane, now: float) -> None:
    assert lane.sidecar is not None and lane.model is not None
    try:
        status = await get_json(lane.sidecar.admin_port, "/status")
        lane.queue = await model_queue(lane.model.port)
    except (OSError, ValueError):
        return
    observations = status.get("observations") or []
    lane.cpu = observations[0]["current"] if observations else None
    offloading = bool(status["decision"]["offloading"])
    lane.reason = status["decision"]["reason"]
    if offloading != lane.offloading:
        lane.transitions.append((now, offloading, lane.reason))
        lane.offloading = offloading


def lane_line(lane: Lane, now: float, color: bool) -> str:
    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if color else text

    cpu = "  ?" if lane.cpu is None else f"{lane.cpu:3.0f}"
    queue = "  ?" if lane.queue is None else f"{lane.queue:3.0f}"
    state = paint(" ON ", "1;30;43") if lane.offloading else paint(" off", "1;32")
    ttfb = lane.recent_ttfb(now)
    first = "   -  " if ttfb is None else f"{ttfb:5.2f}s"
    return (
        f"  {lane.name:<6} cpu {cpu}%/{TARGET}%  queue {queue}  offloading {state}  "
        f"local {lane.local:5d} remote {lane.remote:5d} errors {lane.errors}  first token (3s p50) {first}"
    )


async def watch(lanes: list[Lane], plan: Plan, clock, stop: asyncio.Event, out, tty: bool) -> None:
    shown = 0
    last_plain = -10.0
    while not stop.is_set():
        now = clock()
        before = [len(lane.transitions) for lane in lanes]
        await asyncio.gather(*(observe(lane, now) for lane in lanes))
        for lane, n in zip(lanes, before):
            for t, on, reason in lane.transitions[n:]:
                if tty and shown:
                    out.write(f"\x1b[{shown}A\x1b[J")
                    shown = 0
                out.write(
                    f"  {t:5.1f}s  {lane.name}: offloading {'started' if on else 'stopped'}: {reason}\n"
                )
        load = f"load {plan.rate(now):4.1f} req/s per lane ({plan.phase(now)})"
        header = f"  t={now:5.1f}s of {plan.duration:.0f}s   {load}"
        if tty:
            width = max(40, min(shutil.get_terminal_size().columns, 200) - 1)
            block = [header[:width], *(lane_line(lane, now, True)[: width + 24] for lane in lanes)]
            if shown:
                out.write(f"\x1b[{shown}A")
            out.write("".join(f"\x1b[2K{line}\n" for line in block))
            shown = len(block)
        elif now - last_plain >= 2.0:
            last_plain = now
            out.write(header + "\n" + "".join(lane_line(lane, now, False) + "\n" for lane in lanes))
        out.flush()
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def run_llm_demo(duration: float, workdir: Path, out, tty: bool) -> int:
    plan = Plan.for_duration(duration)
    lanes = [Lane("cpu", queue_metric=False), Lane("queue", queue_metric=True)]
    children: list[Child] = []

    def llmsim(name: str, c: Capacity) -> list[str]:
        return [
            sys.executable, "-m", "sidecar.demo.llmsim", "--name", name, "--slots", str(c.slots),
            "--prefill-ms", f"{c.prefill * 1000:g}", "--tokens", str(c.tokens),
            "--token-ms", f"{c.token_interval * 1000:g}", "--cpu-per-token-ms", f"{c.cpu_per_token * 1000:g}",
        ]  # fmt: skip

    try:
        remote = Child("remote", llmsim("remote", REMOTE), workdir / "remote.log")
        children.append(remote)
        for lane in lanes:
            lane.model = Child(
                f"{lane.name} model", llmsim("local", MODEL), workdir / f"{lane.name}-model.log"
            )
            children.append(lane.model)
        await asyncio.gather(*(c.ready() for c in children))
        for lane in lanes:
            assert lane.model is not None
            config = workdir / f"{lane.name}.yaml"
            config.write_text(modeldeployment_yaml(remote.port, lane.queue_metric))
            lane.sidecar = Child(
                f"{lane.name} sidecar",
                [
                    sys.executable, "-m", "sidecar.cli", "--config", str(config),
                    "--upstream", f"127.0.0.1:{lane.model.port}", "--listen", "127.0.0.1:0",
                    "--admin-listen", "127.0.0.1:0", "--cpu-pid", str(lane.model.proc.pid),
                    "--cpu-request", REFERENCE, "--cpu-window", "3s", "--poll-interval", "500ms",
                    "--shutdown-deadline", "5s", "--shutdown-grace", "0s",
                ],
                workdir / f"{lane.name}-sidecar.log",
            )  # fmt: skip
            children.append(lane.sidecar)
            await lane.sidecar.ready()
        capacity = MODEL.requests_per_second
        out.write(
            "LLM offloading demo: two lanes, each a stand-in LLM server (4 requests at once, the rest\n"
            f"queued, {MODEL.tokens} tokens streamed as SSE, little CPU) behind a sidecar; one remote.\n"
            f"  cpu lane:   {PERCENTAGE}% to the remote while cpu > {TARGET}% of {REFERENCE}\n"
            f"  queue lane: the same, or while {QUEUE} > {QUEUE_TARGET} per pod (scraped from the model's\n"
            "              /metrics by the sidecar: no Prometheus, no adapter)\n"
            f"  load per lane: {LOW * capacity:.1f} req/s, {HIGH * capacity:.1f} req/s from "
            f"{plan.high_from:g}s to {plan.high_until:g}s ({HIGH:g}x the model's {capacity:.1f} req/s), "
            f"then {LOW * capacity:.1f} req/s until {plan.duration:g}s\n"
            f"  sidecars: cpu http://127.0.0.1:{lanes[0].sidecar.admin_port}/status, "
            f"queue http://127.0.0.1:{lanes[1].sidecar.admin_port}/signals\n\n"
        )
        out.flush()
        start = time.monotonic()

        def clock() -> float:
            return time.monotonic() - start

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(lanes, plan, clock, stop, out, tty))
        try:
            await drive(lanes, plan, clock)
        finally:
            stop.set()
            await watcher
        await asyncio.gather(*(observe(lane, clock()) for lane in lanes))
    finally:
        for child in reversed(children):
            child.stop()
    return summarize(lanes, out)


def summarize(lanes: list[Lane], out) -> int:
    cpu, queue = lanes
    lines = ["", "Summary"]
    for lane in lanes:
        slowest = max((v for _, v in lane.ttfbs), default=0.0)
        lines.append(
            f"  {lane.name:<6} {lane.local + lane.remote + lane.errors} requests: {lane.local} local, "
            f"{lane.remote} remote, {lane.errors} errors; slowest first token {slowest:.2f}s"
        )
        for t, on, reason in lane.transitions:
            lines.append(f"         offloading {'started' if on else 'stopped'} at {t:5.1f}s: {reason}")
        if not lane.transitions:
            lines.append("         offloading never started")
        lines += [f"         error: {e}" for e in lane.error_samples]
    queue_on = [t for t, on, _ in queue.transitions if on]
    queue_off = [t for t, on, _ in queue.transitions if not on]
    ok = (
        not cpu.transitions
        and bool(queue_on)
        and bool(queue_off)
        and queue_off[-1] > queue_on[0]
        and cpu.errors == 0
        and queue.errors == 0
    )
    cpu_did = "never offloaded" if not cpu.transitions else "offloaded"
    queue_did = "under load and stopped after it" if queue_on and queue_off else "not as expected"
    lines.append(
        f"  result {'ok' if ok else 'FAILED'}: the cpu lane {cpu_did}, the queue lane offloaded {queue_did}, "
        f"{cpu.errors + queue.errors} errors"
    )
    out.write("\n".join(lines) + "\n")
    out.flush()
    return 0 if ok else 1
