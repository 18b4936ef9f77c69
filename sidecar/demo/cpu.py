"""The local demo: ``python -m sidecar.demo`` (no cluster, nothing to set up).

``--scenario llm`` runs the LLM-serving scenario instead (sidecar/demo/llm.py): a model
server that saturates on its queue while its CPU stays low, where CPU-based offloading
does nothing and the queue signal does. The default scenario:

It starts, all on 127.0.0.1 with ephemeral ports:

- a sample **model server** that streams tokens as Server-Sent Events and burns
  real CPU for each one (a SHA-256 loop until its thread has used the token's
  CPU time, so the load is the same on any machine);
- a second server standing for the **remote cluster** (same API, no CPU work);
- **offload-sidecar** in standalone mode in front of the model, with a
  ModelDeployment like the tutorial's (50% to the remote while CPU is above 50%
  of a 500m reference) but with short sustain/cooldown windows; it measures
  the model server's CPU from /proc (``--cpu-pid``), so no cgroup setup is
  needed;

then drives low, high, then low load through the sidecar, shows live the
model's CPU against the target, the offloading state and the local/remote
split, and ends with a summary. Exit status 0 when offloading turned on and
off again with no failed request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from sidecar.demo.child import Child

TOKENS = 8  # SSE events per response
CPU_PER_TOKEN = 0.0025  # seconds of model-server CPU per token: 20 ms per request
REFERENCE = "500m"  # the model's CPU request: Utilization is measured against it
TARGET = 50  # averageUtilization
PERCENTAGE = 50
LOW_RATE = 6.0  # req/s: ~24% of the reference
HIGH_RATE = 40.0  # req/s: ~160% (still ~80% with half of it offloaded)
MAX_IN_FLIGHT = 64

# --- the sample servers (run as child processes: python -m sidecar.demo --serve model) ----------


def burn(seconds: float) -> None:
    """Hash until this thread has used ``seconds`` of CPU time: real, machine-independent work."""
    end = time.thread_time() + seconds
    digest = b"token"
    while time.thread_time() < end:
        for _ in range(50):
            digest = hashlib.sha256(digest).digest()


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, cpu_per_token: float
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            close = headers.get("connection", "").lower() == "close"
            url = urlsplit(target)
            if url.path == "/healthz":
                body = b"ok\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + body)
                await writer.drain()
                if close:
                    return
                continue
            tokens = int(parse_qs(url.query).get("tokens", [str(TOKENS)])[0])
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n"
            )
            for i in range(min(tokens, 1000)):
                if cpu_per_token:
                    burn(cpu_per_token)
                else:
                    await asyncio.sleep(0.002)  # the remote's generation time, on its own hardware
                event = f'event: token\ndata: {{"server": "{name}", "i": {i}}}\n\n'.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0)  # let other streams progress between tokens
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
            if method == "HEAD" or close:
                return
    except ConnectionError:
        return
    finally:
        writer.close()


async def serve_sample(name: str, cpu_per_token: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, name, cpu_per_token), "127.0.0.1", 0
    )
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


# --- the demo's configuration ------------------------------------------------------------------------


def modeldeployment_yaml(remote_port: int, sustain: int, cooldown: int) -> str:
    """Like the tutorial's, pointed at the stand-in remote, with short windows."""
    return f"""\
apiVersion: deployment.beamlit.com/v1alpha1
kind: ModelDeployment
metadata:
  name: my-model
spec:
  model: my-model
  environment: production
  modelSourceRef:
    apiVersion: apps/v1
    kind: Deployment
    name: my-model
  offloadingConfig:
    remoteBackend:
      host: 127.0.0.1:{remote_port}
      scheme: http
    behavior:
      percentage: {PERCENTAGE}
      sustainSeconds: {sustain}
      cooldownSeconds: {cooldown}
    metrics:
      - type: Resource
        resource:
          name: cpu
          target:
            type: Utilization
            averageUtilization: {TARGET}
"""


@dataclass(frozen=True)
class Plan:
    """The demo's timeline, scaled to its duration."""

    duration: float
    high_from: float
    high_until: float
    sustain: int
    cooldown: int
    cpu_window: float

    @classmethod
    def for_duration(cls, duration: float) -> Plan:
        return cls(
            duration=duration,
            high_from=round(duration * 0.2, 1),
            high_until=round(duration * 0.6, 1),
            sustain=max(1, round(duration * 0.04)),
            cooldown=max(1, round(duration * 0.06)),
            cpu_window=round(min(3.0, max(1.0, duration / 15)), 1),
        )

    def rate(self, t: float) -> float:
        return HIGH_RATE if self.high_from <= t < self.high_until else LOW_RATE

    def phase(self, t: float) -> str:
        return "high" if self.high_from <= t < self.high_until else "low"


# --- the load and its tallies -------------------------------------------------------------------------


@dataclass
class Tally:
    local: int = 0
    remote: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    recent: list[tuple[float, str]] = field(default_factory=list)  # (time, "local"|"remote")

    def record(self, now: float, server: str | None, error: str | None) -> None:
        if error is not None or server not in ("local", "remote"):
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(error or f"unexpected server {server!r}")
            return
        if server == "local":
            self.local += 1
        else:
            self.remote += 1
        self.recent.append((now, server))

    def recent_split(self, now: float, window: float = 3.0) -> tuple[int, int]:
        self.recent = [(t, s) for t, s in self.recent if t >= now - window]
        remote = sum(1 for _, s in self.recent if s == "remote")
        return len(self.recent) - remote, remote


async def http_get(port: int, target: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """One GET with ``Connection: close``; the raw body (still chunk-framed if chunked)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"no HTTP response ({raw[:60]!r})")
    return int(status_line[1]), body


_SERVER = re.compile(rb'"server": "(\w+)"')


async def one_request(port: int, tally: Tally, clock) -> None:
    server, error = None, None
    try:
        status, body = await http_get(port, f"/v1/completions?tokens={TOKENS}")
        if status != 200:
            error = f"HTTP {status}"
        elif body.count(b"event: token") != TOKENS or b"data: [DONE]" not in body:
            error = "incomplete stream"
        else:
            match = _SERVER.search(body)
            server = match.group(1).decode() if match else None
    except (OSError, TimeoutError, ConnectionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    tally.record(clock(), server, error)


async def drive_load(port: int, plan: Plan, tally: Tally, clock, stop: asyncio.Event) -> None:
    """Open-loop arrivals at the plan's rate (evenly spaced), at most MAX_IN_FLIGHT at once."""
    in_flight: set[asyncio.Task[None]] = set()
    next_at = 0.0
    while not stop.is_set():
        now = clock()
        if now >= plan.duration:
            break
        if now < next_at:
            await asyncio.sleep(min(next_at - now, 0.05))
            continue
        next_at = max(next_at + 1 / plan.rate(now), now - 0.5)
        if len(in_flight) >= MAX_IN_FLIGHT:
            continue  # the model is saturated: this arrival is dropped, as an impatient client would
        task = asyncio.create_task(one_request(port, tally, clock))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=30)


# --- the display ----------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    t: float = 0.0
    cpu: float | None = None
    offloading: bool = False
    reason: str = "starting"
    share: int = 0


def bar(value: float | None, width: int = 30, scale: float = 200.0) -> str:
    filled = 0 if value is None else min(width, round(value / scale * width))
    cells = ["█" if i < filled else "░" for i in range(width)]
    marker = round(TARGET / scale * width)
    if marker < width:
        cells[marker] = "┃"
    return "".join(cells)


def render_block(s: Snapshot, plan: Plan, tally: Tally, rate: float, color: bool) -> list[str]:
    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if color else text

    cpu = "  ?  " if s.cpu is None else f"{s.cpu:5.0f}%"
    state = paint(" ON ", "1;30;43") if s.offloading else paint(" off", "1;32")
    local_now, remote_now = tally.recent_split(s.t)
    recent_total = local_now + remote_now
    split = f"{100 * remote_now / recent_total:3.0f}% remote" if recent_total else "   -"
    width = max(40, min(shutil.get_terminal_size().columns, 160) - 1)  # a wrapped line breaks the redraw
    return [
        f"  t={s.t:5.1f}s of {plan.duration:.0f}s   load {rate:4.0f} req/s ({plan.phase(s.t)})",
        f"  model cpu  {bar(s.cpu)} {cpu} of {REFERENCE} (target {TARGET}%)",
        f"  offloading {state}  ({PERCENTAGE}% of requests to the remote while on)",
        f"  requests   local {tally.local:6d}  remote {tally.remote:6d}  errors {tally.errors}   last 3s: {split}",
        f"  reason     {s.reason}"[:width],
    ]


async def admin_status(port: int) -> dict:
    status, body = await http_get(port, "/status", timeout=5)
    if status != 200:
        raise ConnectionError(f"/status answered {status}")
    return json.loads(body)


async def watch(
    admin_port: int,
    plan: Plan,
    tally: Tally,
    clock,
    stop: asyncio.Event,
    events: list[tuple[float, bool, str]],
    out,
    tty: bool,
) -> None:
    """Polls the sidecar's /status, notes transitions, and redraws the display."""
    shown = 0
    last_plain = -10.0
    snapshot = Snapshot()
    while not stop.is_set():
        now = clock()
        try:
            doc = await admin_status(admin_port)
        except (OSError, TimeoutError, ConnectionError, ValueError):
            doc = None
        if doc is not None:
            observations = doc.get("observations") or []
            cpu = observations[0]["current"] if observations else None
            offloading = bool(doc["decision"]["offloading"])
            reason = doc["decision"]["reason"]
            if offloading != snapshot.offloading:
                events.append((now, offloading, reason))
                word = "offloading started" if offloading else "offloading stopped"
                line = f"  {now:5.1f}s  {word}: {reason}"
                if tty and shown:
                    out.write(f"\x1b[{shown}A\x1b[J")
                    shown = 0
                out.write(line + "\n")
            snapshot = Snapshot(now, cpu, offloading, reason, doc["routing"]["activePercentage"])
        snapshot.t = now
        if tty:
            block = render_block(snapshot, plan, tally, plan.rate(now), color=True)
            if shown:
                out.write(f"\x1b[{shown}A")
            out.write("".join(f"\x1b[2K{line}\n" for line in block))
            shown = len(block)
        elif now - last_plain >= 2.0:
            last_plain = now
            cpu = "?" if snapshot.cpu is None else f"{snapshot.cpu:.0f}%"
            local_now, remote_now = tally.recent_split(now)
            out.write(
                f"  t={now:5.1f}s load={plan.rate(now):.0f}req/s cpu={cpu}/{TARGET}% "
                f"offloading={'on' if snapshot.offloading else 'off'} "
                f"local={tally.local} remote={tally.remote} errors={tally.errors} "
                f"(last 3s: local {local_now}, remote {remote_now})\n"
            )
        out.flush()
        try:
            await asyncio.wait_for(stop.wait(), 0.25 if tty else 0.5)
        except TimeoutError:
            pass


# --- processes ----------------------------------------------------------------------------------------


def sidecar_command(config: Path, model: Child, plan: Plan) -> list[str]:
    return [
        "--config", str(config),
        "--upstream", f"127.0.0.1:{model.port}",
        "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--cpu-pid", str(model.proc.pid),
        "--cpu-request", REFERENCE,
        "--cpu-window", f"{plan.cpu_window:g}s",
        "--poll-interval", "500ms",
        "--shutdown-deadline", "5s",
        "--shutdown-grace", "0s",
    ]  # fmt: skip


async def run_demo(plan: Plan, workdir: Path, out, tty: bool) -> int:
    here = [sys.executable, "-m", "sidecar.demo", "--serve"]
    children: list[Child] = []
    tally = Tally()
    events: list[tuple[float, bool, str]] = []
    try:
        model = Child("model server", [*here, "model"], workdir / "model.log")
        remote = Child("remote server", [*here, "remote"], workdir / "remote.log")
        children += [model, remote]
        await asyncio.gather(model.ready(), remote.ready())
        config = workdir / "modeldeployment.yaml"
        config.write_text(modeldeployment_yaml(remote.port, plan.sustain, plan.cooldown))
        args = sidecar_command(config, model, plan)
        sidecar = Child(
            "offload-sidecar", [sys.executable, "-m", "sidecar.cli", *args], workdir / "sidecar.log"
        )
        children.append(sidecar)
        await sidecar.ready()

        out.write(
            "Offloading demo: a model server that burns CPU per token, a stand-in remote cluster, and the\n"
            "sidecar in front of the model, all on 127.0.0.1.\n"
            f"  model server   127.0.0.1:{model.port} (pid {model.proc.pid}, {TOKENS} SSE tokens per request, "
            f"{CPU_PER_TOKEN * 1000:g} ms CPU each)\n"
            f"  remote         127.0.0.1:{remote.port}\n"
            f"  sidecar        127.0.0.1:{sidecar.port}, admin http://127.0.0.1:{sidecar.admin_port}/status\n"
            f"  ModelDeployment {config}: {PERCENTAGE}% to the remote while cpu > {TARGET}% of {REFERENCE} "
            f"for {plan.sustain}s, back after {plan.cooldown}s below\n"
            f"  the sidecar:   offload-sidecar {' '.join(args)}\n"
            f"  load: {LOW_RATE:g} req/s, {HIGH_RATE:g} req/s from {plan.high_from:g}s to {plan.high_until:g}s, "
            f"then {LOW_RATE:g} req/s until {plan.duration:g}s\n\n"
        )
        out.flush()

        start = time.monotonic()

        def clock() -> float:
            return time.monotonic() - start

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(sidecar.admin_port, plan, tally, clock, stop, events, out, tty))
        try:
            await drive_load(sidecar.port, plan, tally, clock, stop)
            # Let the last windows run out, so the summary says how it ended.
            await asyncio.sleep(min(1.0, plan.duration * 0.02))
        finally:
            stop.set()
            await watcher
        final = await admin_status(sidecar.admin_port)
    finally:
        for child in reversed(children):
            child.stop()
    return summarize(tally, events, final, plan, out)


def summarize(tally: Tally, events: list[tuple[float, bool, str]], final: dict, plan: Plan, out) -> int:
    total = tally.local + tally.remote + tally.errors
    started = [(t, r) for t, on, r in events if on]
    stopped = [(t, r) for t, on, r in events if not on]
    counters = final.get("counters", {})
    lines = [
        "",
        "Summary",
        (
            f"  requests      {total} sent: {tally.local} served locally, {tally.remote} by the remote, "
            f"{tally.errors} errors"
        ),
        (
            f"  sidecar says  local {counters.get('local', 0)}, remote {counters.get('remote', 0)}, "
            f"fallbacks {sum(counters.get('fallbacks', {}).values())}"
        ),
    ]
    for t, reason in started:
        lines.append(f"  offloading started at {t:5.1f}s: {reason}")
    for t, reason in stopped:
        lines.append(f"  offloading stopped at {t:5.1f}s: {reason}")
    if not started:
        lines.append("  offloading never started")
    for sample in tally.error_samples:
        lines.append(f"  error: {sample}")
    ok = bool(started) and bool(stopped) and stopped[-1][0] > started[0][0] and tally.errors == 0
    lines.append(f"  result        {'ok' if ok else 'FAILED'}: offloading turned on under load and off after it, "
                 f"{tally.errors} errors")  # fmt: skip
    out.write("\n".join(lines) + "\n")
    out.flush()
    return 0 if ok else 1


# --- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo",
        description="Local demo of offloading: a CPU-bound model server, a stand-in remote and "
        "offload-sidecar in standalone mode; rising then falling load, shown live.",
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load (default 60; at least 10)"
    )
    parser.add_argument("--plain", action="store_true", help="periodic lines instead of a redrawn display")
    parser.add_argument(
        "--scenario",
        choices=("cpu", "llm"),
        default="cpu",
        help="cpu: a CPU-bound model and the tutorial's CPU target; llm: an LLM server saturating on its "
        "queue while its CPU stays low, with and without the queue signal",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory (config and logs)")
    parser.add_argument("--serve", choices=("model", "remote"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        cpu = CPU_PER_TOKEN if args.serve == "model" else 0.0
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_sample("local" if args.serve == "model" else "remote", cpu))
        return 0

    if args.duration < 10:
        parser.error("--duration must be at least 10 seconds (the windows need time to play out)")
    if not sys.platform.startswith("linux"):
        parser.error("the demo measures CPU from /proc: it runs on Linux")
    plan = Plan.for_duration(args.duration)
    tty = sys.stdout.isatty() and not args.plain and os.environ.get("TERM") != "dumb"
    workdir = Path(tempfile.mkdtemp(prefix="offload-demo-"))
    try:
        if args.scenario == "llm":
            from sidecar.demo.llm import run_llm_demo

            return asyncio.run(run_llm_demo(args.duration, workdir, sys.stdout, tty))
        return asyncio.run(run_demo(plan, workdir, sys.stdout, tty))
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"  files: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
