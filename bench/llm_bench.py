"""The mission benchmark: how fast, and how well, each policy offloads an LLM server
that saturates on its queue.

    python bench/llm_bench.py            # about 3 minutes
    python bench/llm_bench.py --quick    # shorter phases, a smoke run (figures not comparable)

On 127.0.0.1, for each policy in turn, with fresh processes:

- the **local model**: ``sidecar.demo.llmsim`` serving at most 4 requests at once, each 0.15 s
  to its first token then 16 tokens 25 ms apart (0.525 s: 7.6 req/s at most), the rest
  queued; it streams tokens as Server-Sent Events and sends its response head at once,
  as vLLM does. It burns 1 ms of CPU per token, so its CPU rises with the requests it
  serves and stops rising at its capacity, whatever its queue;
- the **remote**: the same server with 64 slots (spare capacity);
- **offload-sidecar** (standalone) in front of the local model, configured per policy;
- the **load**: Poisson arrivals (one seeded schedule, the same for every policy) at
  0.5x the local capacity, stepped to 2x, then back to 0.5x; one request per connection.

Policies (60% offloaded while offloading, for every policy that offloads):

1. no offload: the sidecar passes everything through;
2. Beamlit-like: CPU Utilization only, polled every 5 s (over 5 s), 5 s sustain and
   cooldown, a random split (bench/beamlit_like.py);
3. the product on CPU Utilization with its defaults (1 s poll standalone, 10 s CPU
   window, 30 s sustain, 120 s cooldown);
4. the product on its in-flight signal (``offload.beamlit.com/in-flight``, AverageValue
   3 per pod, sampled every 100 ms, mean of the last 0.3 s), 1 s sustain, 5 s cooldown,
   100 ms poll;
5. the same with spillover at 4 in flight (the model's capacity).

Figures, per policy, each beside its ratio to the no-offload run of this same run:
time from the step to the first offloaded request (the send time of the first request
sent after the step that the remote served), p50/p99 time to first byte of the
response body (the first token: the response head comes at once; measured on one
monotonic clock from the request's write to the read that brought the first body byte)
and errors (a status other than 200, a cut or incomplete stream, no answer within 60 s)
of the requests sent during the spike, and the share of requests the remote served
(during the spike, and overall). A figure that does not exist is printed as such
("never", "-"), never as a number; a ratio whose reference is 0 or absent is "-".
Goals, printed beside the figures: with spillover, p99 time to first byte during the
spike <= 1.5x its own p99 at 0.5x load (the first phase, after 2 s of warm-up) and
zero errors; with the in-flight signal, the first offloaded request <= 2 s after the step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from sidecar.demo.llm import get_json
from sidecar.demo.llmsim import Capacity

LOCAL = Capacity(slots=4, prefill=0.15, tokens=16, token_interval=0.025, cpu_per_token=0.001)
REMOTE = Capacity(slots=64, prefill=0.15, tokens=16, token_interval=0.025)
PERCENTAGE = 60
CPU_REQUEST = "200m"  # the local model's cpu request: ~35% at 0.5x load, ~65% at capacity
CPU_TARGET = 50
IN_FLIGHT_TARGET = "3"  # per pod: 0.75 of the 4 slots (0.5x load keeps ~2 in flight)
REQUEST_TIMEOUT = 60.0
WARMUP = 2.0  # seconds of the first phase left out of the 0.5x-load reference


@dataclass(frozen=True)
class Phases:
    low: float = 10.0  # seconds at 0.5x before the step
    spike: float = 12.0  # seconds at 2x
    after: float = 6.0  # seconds at 0.5x after it

    @property
    def step(self) -> float:
        return self.low

    @property
    def spike_end(self) -> float:
        return self.low + self.spike

    @property
    def total(self) -> float:
        return self.low + self.spike + self.after

    def rate(self, t: float, capacity: float) -> float:
        return capacity * (2.0 if self.step <= t < self.spike_end else 0.5)


def schedule(phases: Phases, capacity: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start) at the phases' rates. A gap drawn at
    one rate that would cross a change of rate is drawn again from the change (the process
    is memoryless): the spike's arrivals start at the step, not one slow gap after it."""
    rng = random.Random(seed)
    boundaries = [phases.step, phases.spike_end, phases.total]
    times, t = [], 0.0
    while True:
        candidate = t + rng.expovariate(phases.rate(t, capacity))
        boundary = next((b for b in boundaries if t < b <= candidate), None)
        if boundary is not None:
            t = boundary
            if boundary >= phases.total:
                return times
            continue
        t = candidate
        times.append(t)


# --- policies -----------------------------------------------------------------------------------------


def modeldeployment(
    remote_port: int, *, behavior: dict, metrics: list[dict] | None, enabled: bool = True
) -> str:
    doc = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llm"},
        "spec": {
            "model": "llm",
            "enabled": enabled,
            "modelSourceRef": {"name": "llm"},
            "offloadingConfig": {
                "remoteBackend": {"host": f"127.0.0.1:{remote_port}"},
                "behavior": {"percentage": PERCENTAGE, **behavior},
                **({"metrics": metrics} if metrics is not None else {}),
            },
        },
    }
    return json.dumps(doc, indent=1)  # JSON is YAML


CPU_METRIC = {
    "type": "Resource",
    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": CPU_TARGET}},
}
IN_FLIGHT_METRIC = {
    "type": "Pods",
    "pods": {
        "metric": {"name": "offload.beamlit.com/in-flight"},
        "target": {"type": "AverageValue", "averageValue": IN_FLIGHT_TARGET},
    },
}


@dataclass(frozen=True)
class Policy:
    key: str
    name: str
    config: Callable[[int], str]  # remote port -> the ModelDeployment
    args: tuple[str, ...] = ()
    program: tuple[str, ...] = ("-m", "sidecar.cli")


POLICIES = (
    Policy(
        "none",
        "no offload",
        lambda port: modeldeployment(port, behavior={}, metrics=None, enabled=False),
    ),
    Policy(
        "beamlit",
        "Beamlit-like: cpu, 5 s poll, 5 s sustain, random split",
        lambda port: modeldeployment(
            port, behavior={"sustainSeconds": 5, "cooldownSeconds": 5}, metrics=[CPU_METRIC]
        ),
        ("--poll-interval", "5s", "--cpu-window", "5s"),
        (str(HERE / "beamlit_like.py"),),
    ),
    Policy(
        "cpu",
        "product: cpu Utilization, defaults",
        lambda port: modeldeployment(port, behavior={}, metrics=[CPU_METRIC]),
    ),
    Policy(
        "inflight",
        "product: in-flight signal (0.3 s mean), 1 s sustain",
        lambda port: modeldeployment(
            port, behavior={"sustainSeconds": 1, "cooldownSeconds": 5}, metrics=[IN_FLIGHT_METRIC]
        ),
        ("--poll-interval", "100ms", "--signal-window", "300ms"),
    ),
    Policy(
        "spillover",
        f"product: in-flight signal (0.3 s mean), 1 s sustain, spillover at {LOCAL.slots}",
        lambda port: modeldeployment(
            port,
            behavior={"sustainSeconds": 1, "cooldownSeconds": 5, "spilloverInFlight": LOCAL.slots},
            metrics=[IN_FLIGHT_METRIC],
        ),
        ("--poll-interval", "100ms", "--signal-window", "300ms"),
    ),
)


# --- processes ----------------------------------------------------------------------------------------


class Child:
    """A child process that prints ``listening on ...:PORT`` (and maybe an admin port) when ready."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name = name
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO, env=env
        )
        self.ports: list[int] = []

    async def ready(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        self.ports = [int(p) for p in re.findall(r"listening on [^:\s]+:(\d+)", line)]
        if not self.ports:
            raise RuntimeError(f"{self.name} did not start: {line!r}\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def llmsim(name: str, capacity: Capacity) -> list[str]:
    return [
        sys.executable, "-m", "sidecar.demo.llmsim", "--name", name, "--slots", str(capacity.slots),
        "--prefill-ms", f"{capacity.prefill * 1000:g}", "--tokens", str(capacity.tokens),
        "--token-ms", f"{capacity.token_interval * 1000:g}",
        "--cpu-per-token-ms", f"{capacity.cpu_per_token * 1000:g}",
    ]  # fmt: skip


# --- the load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    sent: float  # seconds from the start of the schedule
    ttfb: float | None  # seconds to the first body byte; None when there was none
    server: str | None  # "local" or "remote"
    error: str | None


_SERVER = re.compile(rb'"server": "(\w+)"')


async def one_request(port: int, sent: float, tokens: int) -> Record:
    """One completion, one connection; the first body byte timed on the monotonic clock."""
    loop = asyncio.get_running_loop()
    ttfb = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
                )
                t0 = loop.time()
                raw = b""
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    raw += data
                    if ttfb is None:
                        end = raw.find(b"\r\n\r\n")
                        if end >= 0 and len(raw) > end + 4:
                            ttfb = loop.time() - t0
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return Record(sent, ttfb, None, "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return Record(sent, ttfb, None, head.split(b"\r\n", 1)[0].decode("latin-1")[:60] or "no answer")
    match = _SERVER.search(body)
    if body.count(b"data: {") != tokens or b"data: [DONE]" not in body or match is None:
        return Record(sent, ttfb, None, "incomplete stream")
    return Record(sent, ttfb, match.group(1).decode(), None)


async def drive(port: int, times: Sequence[float], tokens: int) -> list[Record]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for t in times:
        delay = start + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(port, loop.time() - start, tokens)))
    return list(await asyncio.gather(*tasks))


# --- the figures (pure) ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Figures:
    first_offload: float | None  # seconds after the step; None: never
    p50: float | None
    p99: float | None
    errors: int
    spike_requests: int
    spike_offloaded: float | None  # share, 0..1
    overall_offloaded: float | None
    low_p99: float | None  # p99 time to first byte in the first 0.5x phase, after warm-up
    low_requests: int
    low_offloaded: float | None  # share the remote served before the step (at 0.5x)


def figures(records: Sequence[Record], phases: Phases) -> Figures:
    spike = [r for r in records if phases.step <= r.sent < phases.spike_end]
    low = [r for r in records if WARMUP <= r.sent < phases.step and r.error is None]
    after_step = [r.sent - phases.step for r in records if r.sent >= phases.step and r.server == "remote"]
    served = [r for r in records if r.server is not None]
    spike_served = [r for r in spike if r.server is not None]

    def share(rs: Sequence[Record]) -> float | None:
        return sum(r.server == "remote" for r in rs) / len(rs) if rs else None

    ttfbs = [r.ttfb for r in spike if r.error is None and r.ttfb is not None]
    return Figures(
        first_offload=min(after_step) if after_step else None,
        p50=percentile(ttfbs, 50),
        p99=percentile(ttfbs, 99),
        errors=sum(r.error is not None for r in spike),
        spike_requests=len(spike),
        spike_offloaded=share(spike_served),
        overall_offloaded=share(served),
        low_p99=percentile([r.ttfb for r in low if r.ttfb is not None], 99),
        low_requests=len(low),
        low_offloaded=share([r for r in records if r.sent < phases.step and r.server is not None]),
    )


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def seconds(value: float | None, never: str = "-") -> str:
    if value is None:
        return never
    return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(results: Sequence[tuple[Policy, Figures]], phases: Phases) -> list[str]:
    reference = next(f for p, f in results if p.key == "none")
    header = (
        "| policy | first offloaded request after the step | TTFB p50, spike | TTFB p99, spike "
        "| errors, spike | offloaded, spike | offloaded, overall |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for policy, f in results:
        never = f"never (within the {phases.spike:g} s spike and the {phases.after:g} s after)"
        cells = [
            policy.name,
            f"{seconds(f.first_offload, never)} ({ratio(f.first_offload, reference.first_offload)})",
            f"{seconds(f.p50)} ({ratio(f.p50, reference.p50)})",
            f"{seconds(f.p99)} ({ratio(f.p99, reference.p99)})",
            f"{f.errors} of {f.spike_requests} ({ratio(f.errors, reference.errors)})",
            f"{percent(f.spike_offloaded)} ({ratio(f.spike_offloaded, reference.spike_offloaded)})",
            f"{percent(f.overall_offloaded)} ({ratio(f.overall_offloaded, reference.overall_offloaded)})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals(results: Sequence[tuple[Policy, Figures]]) -> list[str]:
    by_key = {p.key: f for p, f in results}
    spill, inflight = by_key["spillover"], by_key["inflight"]
    lines = []
    if spill.p99 is not None and spill.low_p99 is not None:
        ok = spill.p99 <= 1.5 * spill.low_p99
        lines.append(
            f"spillover: TTFB p99 during the spike {seconds(spill.p99)} = "
            f"{spill.p99 / spill.low_p99:.2f}x its p99 at 0.5x load ({seconds(spill.low_p99)}, "
            f"{spill.low_requests} requests); goal <= 1.5x {'✓' if ok else '✗'}"
        )
    else:
        lines.append("spillover: no TTFB measured: goal ✗")
    lines.append(
        f"spillover: {spill.errors} errors of {spill.spike_requests} requests during the spike; "
        f"goal 0 {'✓' if spill.errors == 0 else '✗'}"
    )
    start = inflight.first_offload
    ok = start is not None and start <= 2.0
    lines.append(
        f"in-flight signal: first offloaded request {seconds(start, 'never')} after the step; "
        f"goal <= 2 s {'✓' if ok else '✗'}"
    )
    return lines


# --- the run ------------------------------------------------------------------------------------------


async def run_policy(policy: Policy, times: Sequence[float], workdir: Path) -> tuple[list[Record], dict]:
    children: list[Child] = []
    try:
        local = Child("local model", llmsim("local", LOCAL), workdir / f"{policy.key}-local.log")
        remote = Child("remote", llmsim("remote", REMOTE), workdir / f"{policy.key}-remote.log")
        children += [local, remote]
        await asyncio.gather(local.ready(), remote.ready())
        config = workdir / f"{policy.key}.yaml"
        config.write_text(policy.config(remote.ports[0]))
        sidecar = Child(
            "offload-sidecar",
            [
                sys.executable, *policy.program,
                "--config", str(config), "--upstream", f"127.0.0.1:{local.ports[0]}",
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--cpu-pid", str(local.proc.pid), "--cpu-request", CPU_REQUEST,
                "--shutdown-deadline", "2s", "--shutdown-grace", "0s", *policy.args,
            ],
            workdir / f"{policy.key}-sidecar.log",
        )  # fmt: skip
        children.append(sidecar)
        await sidecar.ready()
        proxy_port, admin_port = sidecar.ports[0], sidecar.ports[1]
        deadline = time.monotonic() + 10
        while (await get_json(admin_port, "/status"))["configuration"] is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{policy.name}: the sidecar never loaded {config}")
            await asyncio.sleep(0.1)
        records = await drive(proxy_port, times, LOCAL.tokens)
        status = await get_json(admin_port, "/status")
        return records, status
    finally:
        for child in reversed(children):
            child.stop()


async def run(phases: Phases, seed: int, out, only: Sequence[str] = ()) -> int:
    times = schedule(phases, LOCAL.requests_per_second, seed)
    rate = LOCAL.requests_per_second
    out.write(
        f"Local model: {LOCAL.slots} requests at once, {LOCAL.prefill * 1000:g} ms to the first token, "
        f"{LOCAL.tokens} tokens {LOCAL.token_interval * 1000:g} ms apart: at most {rate:.1f} req/s; "
        f"{LOCAL.cpu_per_token * 1000:g} ms CPU per token against a {CPU_REQUEST} request.\n"
        f"Remote: {REMOTE.slots} at once, same times. Load: Poisson, {rate / 2:.1f} req/s for {phases.low:g} s, "
        f"{2 * rate:.1f} req/s for {phases.spike:g} s, {rate / 2:.1f} req/s for {phases.after:g} s "
        f"({len(times)} requests, seed {seed}, the same for every policy). {PERCENTAGE}% offloaded while offloading.\n\n"
    )
    out.flush()
    results: list[tuple[Policy, Figures]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        for policy in POLICIES:
            if only and policy.key not in only and policy.key != "none":
                continue
            t0 = time.monotonic()
            records, status = await run_policy(policy, times, Path(tmp))
            f = figures(records, phases)
            results.append((policy, f))
            counters = status.get("counters", {})
            out.write(
                f"  {policy.name}: {len(records)} requests in {time.monotonic() - t0:.0f} s, "
                f"{percent(f.low_offloaded)} offloaded before the step; "
                f"sidecar: local {counters.get('local')}, remote {counters.get('remote')}, "
                f"spillovers {counters.get('spillovers')}, transitions {status['decision']['transitions']}\n"
            )
            out.flush()
    out.write("\n" + "\n".join(table(results, phases)) + "\n\n")
    if not only:
        out.write("\n".join(goals(results)) + "\n")
    out.write(f"\n(run time {time.monotonic() - began:.0f} s)\n")
    out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/llm_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (a smoke run)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=[p.key for p in POLICIES],
        help="run only these policies (and the no-offload reference); no goals printed",
    )
    args = parser.parse_args(argv)
    phases = Phases(low=4, spike=6, after=3) if args.quick else Phases()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run(phases, args.seed, sys.stdout, args.only))
    return uvloop.run(run(phases, args.seed, sys.stdout, args.only))


if __name__ == "__main__":
    sys.exit(main())
