"""The sidecar's data path against HAProxy, side by side on this machine.

    python bench/proxy_bench.py [--quick]

Each proxy runs alone on core 0 (taskset) in front of the same upstream; the load
generator and the upstream share core 1:

- request runs: nginx serving 1 KiB, load from wrk. Maximum throughput (closed
  loop, 64 keep-alive connections); added latency p50/p99 at fixed rates of 500
  and 2,000 req/s (wrk_rate.lua: random think time per connection; "added" is
  the same run through the proxy minus straight to nginx); CPU seconds the proxy
  spends per 10,000 requests; RSS idle and under load.
- streaming runs: a small SSE upstream (this file, --sse-server) and an SSE client
  (this file, --sse-client) with 10 and 1,000 concurrent streams of 50 events
  20 ms apart: per-event delay p50/p99, time to first byte, proxy RSS with the
  streams open, and whether every stream completed. Each streamed figure is one
  interval on one clock, never a difference of two runs (which noise can make
  negative): the delay runs from the upstream's write of an event (its stamp,
  CLOCK_MONOTONIC in integer nanoseconds, taken just before the write) to the
  client's read of it (the same system-wide clock, taken after the read), and
  time to first byte from the client's request write to its first read. The same
  figures measured straight to the upstream in the same run are printed beside
  them as the reference ("direct"): what a proxy adds is the gap between the two.

HAProxy runs with one thread and `option http-no-delay` (its default batches SSE
events by 100-200 ms). The table prints each figure, HAProxy's, their ratio, and
the goal from the issue. It installs nothing; it needs: apt-get install -y haproxy nginx wrk

To compare two versions of the sidecar in one run (same machine, same minute),
give each source tree: ``--source before=/path/to/old/checkout --source after=.``.
Each runs as its own target (its tree first on the child's PYTHONPATH, and its
working directory); a table per version follows, then one side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROXY_CORE = "0"
LOAD_CORE = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Proc:
    def __init__(self, args: list[str], core: str, **kw):
        self.popen = subprocess.Popen(
            ["taskset", "-c", core, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def status_kib(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stderr:
            self.popen.stderr.close()


def start_nginx(tmp: Path, port: int) -> Proc:
    root = tmp / "www"
    root.mkdir()
    (root / "1k").write_bytes(b"x" * 1024)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {root};
    location / {{ }}
  }}
}}
""")
    proc = Proc(["nginx", "-c", str(conf), "-p", str(tmp)], LOAD_CORE)
    wait_port(port)
    return proc


def start_haproxy(tmp: Path, port: int, upstream: int, name: str) -> Proc:
    conf = tmp / f"haproxy-{name}.cfg"
    conf.write_text(f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  maxconn 8000
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option http-no-delay
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server up 127.0.0.1:{upstream}
""")
    proc = Proc(["haproxy", "-db", "-f", str(conf)], PROXY_CORE)
    wait_port(port)
    return proc


def parse_source(text: str) -> tuple[str, Path]:
    """``LABEL=DIR`` (or just ``DIR``, labelled by its name) -> (label, absolute DIR).

    >>> parse_source("before=/tmp/old")
    ('before', PosixPath('/tmp/old'))
    """
    label, _, directory = text.rpartition("=")
    path = Path(directory).resolve()
    return label or path.name, path


def source_env(source: Path) -> dict[str, str]:
    """The environment of a child that must import the product from ``source``:
    that tree first on PYTHONPATH (the child's working directory is set to it too,
    as ``python -m`` puts the working directory before PYTHONPATH)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH", "")) if p)
    return env


def _start_python_relay(command: list[str], port: int, upstream: int, source: Path = REPO) -> Proc:
    """A Python proxy (the sidecar or the bare relay) on the proxy core, in front of upstream."""
    proc = Proc(
        [sys.executable, *command, "--listen", f"127.0.0.1:{port}", "--local", f"127.0.0.1:{upstream}"],
        PROXY_CORE,
        cwd=source,
        env=source_env(source),
    )
    wait_port(port)
    return proc


def start_bare_relay(port: int, upstream: int) -> Proc:
    return _start_python_relay([str(HERE / "bare_relay.py")], port, upstream)


def start_sidecar(port: int, upstream: int, source: Path = REPO) -> Proc:
    """``python -m sidecar.proxy`` from the tree ``source``."""
    return _start_python_relay(["-m", "sidecar.proxy"], port, upstream, source)


# --- wrk -----------------------------------------------------------------------------------


def wrk(port: int, *, seconds: float, connections: int, rate: float | None = None) -> dict:
    script = HERE / ("wrk_rate.lua" if rate else "wrk_report.lua")
    args = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/1k",
    ]
    if rate:
        args += ["--", f"{connections * 1000.0 / rate:.3f}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    match = re.search(r"RESULT (.*)", out)
    if not match:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    result = {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


# --- SSE upstream and client (run as child processes by the benchmark) --------------------


async def sse_server(port: int, events: int, interval: float) -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: proxies reuse their upstream connections
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                await writer.drain()
                for i in range(events):
                    if i:
                        await asyncio.sleep(interval)
                    # Stamped just before the write (asyncio writes at once into an empty buffer).
                    event = b"data: %d\n\n" % time.monotonic_ns()
                    writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(stream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


_EVENT = re.compile(rb"data: ([0-9]+)\n\n")


class _SseStream(asyncio.Protocol):
    """One stream. Times are time.monotonic_ns(): CLOCK_MONOTONIC, one clock for
    every process on the machine, so the upstream's stamps compare with ours."""

    def __init__(self, events: int, delays: list[int], finished: asyncio.Future):
        self.events = events
        self.delays = delays  # ns from the upstream's write of an event to our read of it
        self.finished = finished
        self.buf = b""
        self.count = 0
        self.t0 = 0
        self.ttfb: int | None = None  # ns from our request write to our first read
        self.complete = False

    def connection_made(self, transport):
        self.transport = transport
        self.t0 = time.monotonic_ns()
        transport.write(b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")

    def data_received(self, data):
        now = time.monotonic_ns()  # after the read: later than any write it returns
        if self.ttfb is None:
            self.ttfb = now - self.t0
        buf = self.buf + data
        end = 0
        for m in _EVENT.finditer(buf):
            self.delays.append(now - int(m.group(1)))
            self.count += 1
            end = m.end()
        self.buf = buf[end:]
        if self.count >= self.events and b"0\r\n\r\n" in self.buf:
            self.complete = True
            self.transport.close()

    def connection_lost(self, exc):
        if not self.finished.done():
            self.finished.set_result(None)


async def sse_client(port: int, streams: int, events: int, interval: float) -> dict:
    loop = asyncio.get_running_loop()
    delays: list[int] = []
    protocols = []

    async def one(offset: float):
        await asyncio.sleep(offset)
        finished = loop.create_future()
        _, proto = await loop.create_connection(
            lambda: _SseStream(events, delays, finished), "127.0.0.1", port
        )
        protocols.append(proto)
        try:
            await asyncio.wait_for(finished, 10 + events * interval)
        except TimeoutError:
            proto.transport.abort()

    rng = random.Random(7)  # the same start offsets for every target
    await asyncio.gather(*(one(rng.uniform(0, interval)) for _ in range(streams)))
    stuck = [(p.count, p.buf[-40:]) for p in protocols if not p.complete]
    if stuck:
        print(f"incomplete streams: {len(stuck)}, e.g. {stuck[:3]}", file=sys.stderr)
    return stream_figures(delays, [p.ttfb for p in protocols if p.ttfb is not None]) | {
        "complete": sum(1 for p in protocols if p.complete and p.count == events),
        "streams": streams,
    }


def stream_figures(delays_ns: list[int], ttfbs_ns: list[int]) -> dict:
    """Percentiles in ms of intervals measured on one clock (each the time from an
    earlier event to a later one), so none can be negative; one that is would be a
    broken measurement, and is refused rather than printed.

    >>> stream_figures([2_000_000, 1_000_000, 3_000_000], [5_000_000])["delay_p50_ms"]
    2.0
    """
    if not delays_ns or not ttfbs_ns:
        raise ValueError("no events or no first byte: every stream failed")
    if min(delays_ns) < 0 or min(ttfbs_ns) < 0:
        raise ValueError("an interval measured on one clock came out negative: the clocks differ")
    delays = sorted(delays_ns)
    ttfbs = sorted(ttfbs_ns)
    return {
        "delay_p50_ms": delays[len(delays) // 2] / 1e6,
        "delay_p99_ms": delays[int(len(delays) * 0.99)] / 1e6,
        "ttfb_p50_ms": ttfbs[len(ttfbs) // 2] / 1e6,
    }


def run_sse_client(port: int, streams: int, proxy: Proc | None, events: int, interval: float) -> dict:
    client = subprocess.Popen(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            sys.executable,
            __file__,
            "--sse-client",
            str(port),
            str(streams),
            str(events),
            str(interval),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    rss = 0
    time.sleep(min(0.5 + events * interval / 2, 3))  # mid-run: every stream open
    if proxy is not None:
        rss = proxy.status_kib("VmRSS")
    out, _ = client.communicate(timeout=60)
    result = json.loads(out)
    result["rss_kib"] = rss
    return result


# --- the run ---------------------------------------------------------------------------------


def check_tools() -> None:
    missing = [t for t in ("haproxy", "nginx", "wrk", "taskset") if shutil.which(t) is None]
    if missing:
        print(
            f"missing: {', '.join(missing)}. Install with: apt-get install -y haproxy nginx wrk",
            file=sys.stderr,
        )
        sys.exit(2)
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: the proxy on core 0, load on core 1", file=sys.stderr)
        sys.exit(2)


@contextmanager
def proxies(tmp: Path, upstream: int, tag: str, bare: bool, sources: dict[str, Path]):
    """HAProxy, one sidecar per source (named by :func:`sidecar_names`), the bare relay."""
    hp, bp = free_port(), free_port()
    targets = {"haproxy": (start_haproxy(tmp, hp, upstream, tag), hp)}
    try:
        for name, source in zip(sidecar_names(sources), sources.values()):
            sp = free_port()
            targets[name] = (start_sidecar(sp, upstream, source), sp)
        if bare:
            targets["bare"] = (start_bare_relay(bp, upstream), bp)
        yield targets
    finally:
        for proc, _ in targets.values():
            proc.stop()


def sidecar_names(sources: dict[str, Path]) -> list[str]:
    """``sidecar`` for the one tree of a plain run, ``sidecar:LABEL`` per tree when comparing."""
    if list(sources) == ["sidecar"]:
        return ["sidecar"]
    return [f"sidecar:{label}" for label in sources]


def request_runs(tmp: Path, seconds: float, repeats: int, bare: bool, sources: dict[str, Path]) -> dict:
    """Runs alternate between targets and repeat, and medians are kept: this
    machine is shared, and a burst of someone else's work should hit all alike."""
    nginx_port = free_port()
    nginx = start_nginx(tmp, nginx_port)
    out: dict = {}
    try:
        with proxies(tmp, nginx_port, "http", bare, sources) as targets:
            time.sleep(0.5)
            for name, (proc, port) in targets.items():
                out[f"{name}.rss_idle"] = proc.status_kib("VmRSS") / 1024
                wrk(port, seconds=1, connections=64)  # warm up pools and caches
            runs: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in targets}
            for _ in range(repeats):
                for name, (proc, port) in targets.items():
                    cpu0 = proc.cpu_seconds()
                    r = wrk(port, seconds=seconds, connections=64)
                    runs[name].append((r["rps"], proc.cpu_seconds() - cpu0, r["requests"], r["errors"]))
            for name, (proc, _) in targets.items():
                rps, cpu, requests, _ = sorted(runs[name])[len(runs[name]) // 2]
                out[f"{name}.max_rps"] = rps
                out[f"{name}.max_errors"] = sum(r[3] for r in runs[name])
                out[f"{name}.cpu_per_10k_max"] = cpu / requests * 10_000
                out[f"{name}.rss_load"] = proc.status_kib("VmHWM") / 1024
            everyone = {"direct": (None, nginx_port), **targets}
            for rate, conns in ((500, 10), (2000, 20)):
                seen: dict[str, list[dict]] = {name: [] for name in everyone}
                for _ in range(repeats):
                    for name, (proc, port) in everyone.items():
                        cpu0 = proc.cpu_seconds() if proc else 0.0
                        r = wrk(port, seconds=seconds, connections=conns, rate=rate)
                        r["cpu"] = proc.cpu_seconds() - cpu0 if proc else 0.0
                        seen[name].append(r)

                def median(name: str, field: str, seen: dict[str, list[dict]] = seen) -> float:
                    return statistics.median(r[field] for r in seen[name])

                for name in targets:
                    out[f"{name}.{rate}.rps"] = median(name, "rps")
                    out[f"{name}.{rate}.p50_added"] = (
                        median(name, "p50_us") - median("direct", "p50_us")
                    ) / 1000
                    out[f"{name}.{rate}.p99_added"] = (
                        median(name, "p99_us") - median("direct", "p99_us")
                    ) / 1000
                    out[f"{name}.{rate}.cpu_per_10k"] = (
                        sum(r["cpu"] for r in seen[name]) / sum(r["requests"] for r in seen[name]) * 10_000
                    )
                    out[f"{name}.{rate}.errors"] = sum(r["errors"] for r in seen[name])
    finally:
        nginx.stop()
    return out


def streaming_runs(tmp: Path, events: int, interval: float, bare: bool, sources: dict[str, Path]) -> dict:
    sse_port = free_port()
    server = Proc(
        [sys.executable, __file__, "--sse-server", str(sse_port), str(events), str(interval)], LOAD_CORE
    )
    wait_port(sse_port)
    out: dict = {}
    try:
        with proxies(tmp, sse_port, "sse", bare, sources) as targets:
            for streams in (10, 1000):
                # Straight to the upstream, in the same run: the reference printed beside.
                everyone = {"direct": (None, sse_port), **targets}
                for name, (proc, port) in everyone.items():
                    r = run_sse_client(port, streams, proc, events, interval)
                    out[f"{name}.sse{streams}.delay_p50"] = r["delay_p50_ms"]
                    out[f"{name}.sse{streams}.delay_p99"] = r["delay_p99_ms"]
                    out[f"{name}.sse{streams}.ttfb"] = r["ttfb_p50_ms"]
                    out[f"{name}.sse{streams}.complete"] = f"{r['complete']}/{streams}"
                    if proc is not None:
                        out[f"{name}.sse{streams}.rss"] = r["rss_kib"] / 1024
    finally:
        server.stop()
    return out


ROWS = [
    # (label, key suffix, unit, goal text, goal check on (sidecar, haproxy))
    ("max throughput", "max_rps", "req/s", ">= 0.5x HAProxy", lambda s, h: s >= 0.5 * h),
    ("errors at max throughput", "max_errors", "", "0", lambda s, h: s == 0),
    ("added latency p50 @ 500 req/s", "500.p50_added", "ms", "", None),
    ("added latency p99 @ 500 req/s", "500.p99_added", "ms", "", None),
    (
        "added latency p50 @ 2,000 req/s",
        "2000.p50_added",
        "ms",
        "<= 1.5x HAProxy",
        lambda s, h: s <= 1.5 * max(h, 0.01),
    ),
    (
        "added latency p99 @ 2,000 req/s",
        "2000.p99_added",
        "ms",
        "<= 2x HAProxy",
        lambda s, h: s <= 2 * max(h, 0.01),
    ),
    ("achieved rate (2,000 req/s target)", "2000.rps", "req/s", "", None),
    ("CPU s per 10k requests @ max", "cpu_per_10k_max", "s", "<= 2x HAProxy", lambda s, h: s <= 2 * h),
    (
        "CPU s per 10k requests @ 2,000 req/s",
        "2000.cpu_per_10k",
        "s",
        "<= 2x HAProxy",
        lambda s, h: s <= 2 * h,
    ),
    ("RSS idle", "rss_idle", "MiB", "<= 40 MiB", lambda s, h: s <= 40),
    ("RSS peak under load", "rss_load", "MiB", "", None),
    # Streamed figures: one interval on one clock each (see the module docstring).
    ("SSE 10: per-event delay p50, upstream write to client read", "sse10.delay_p50", "ms", "", None),
    (
        "SSE 10: per-event delay p99, upstream write to client read",
        "sse10.delay_p99",
        "ms",
        "<= 1 ms",  # all of the delay, not only the proxy's share: stricter than the goal
        lambda s, h: s <= 1.0,
    ),
    ("SSE 10: time to first byte p50, request write to first read", "sse10.ttfb", "ms", "", None),
    (
        "SSE 10: streams complete",
        "sse10.complete",
        "",
        "all",
        lambda s, h: s.split("/")[0] == s.split("/")[1],
    ),
    ("SSE 1,000: per-event delay p50, upstream write to client read", "sse1000.delay_p50", "ms", "", None),
    ("SSE 1,000: per-event delay p99, upstream write to client read", "sse1000.delay_p99", "ms", "", None),
    ("SSE 1,000: time to first byte p50, request write to first read", "sse1000.ttfb", "ms", "", None),
    ("SSE 1,000: RSS with the streams open", "sse1000.rss", "MiB", "<= 60 MiB", lambda s, h: s <= 60),
    (
        "SSE 1,000: streams complete",
        "sse1000.complete",
        "",
        "all",
        lambda s, h: s.split("/")[0] == s.split("/")[1],
    ),
]


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def ratio(reference, value) -> str:
    # Differences near zero (HAProxy adds ~nothing) make ratios meaningless.
    ok = isinstance(value, float) and isinstance(reference, float) and reference > 0.01 and value > 0
    return f"{value / reference:.2f}x" if ok else "-"


def print_table(results: dict, sidecar: str = "sidecar") -> None:
    bare = any(k.startswith("bare.") for k in results)
    header = (
        "figure",
        sidecar,
        "HAProxy",
        "ratio",
        "goal",
        "met",
        *(("bare relay", "ratio") if bare else ()),
        "direct",
    )
    rows = []
    for label, key, unit, goal, check in ROWS:
        s, h = results.get(f"{sidecar}.{key}"), results.get(f"haproxy.{key}")
        if s is None or h is None:
            continue
        met = "" if check is None else ("yes" if check(s, h) else "NO")
        row = (f"{label} ({unit})" if unit else label, fmt(s), fmt(h), ratio(h, s), goal, met)
        if bare:
            b = results.get(f"bare.{key}")
            row += ("-", "-") if b is None else (fmt(b), ratio(h, b))
        d = results.get(f"direct.{key}")  # the same figure without a proxy, same run
        row += ("-" if d is None else fmt(d),)
        rows.append(row)
    print_rows(header, rows)


def print_rows(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    print(line.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line.format(*r))


def print_comparison(results: dict, names: list[str]) -> None:
    """The versions side by side: each figure and its ratio to HAProxy's, same run."""
    header = ("figure", *(f"{n} {col}" for n in names for col in ("", "/ HAProxy")), "HAProxy")
    rows = []
    for label, key, unit, _, _ in ROWS:
        h = results.get(f"haproxy.{key}")
        values = [results.get(f"{n}.{key}") for n in names]
        if h is None or any(v is None for v in values):
            continue
        cells: list[str] = []
        for v in values:
            cells += (fmt(v), ratio(h, v))
        rows.append((f"{label} ({unit})" if unit else label, *cells, fmt(h)))
    print_rows(tuple(h.strip() for h in header), rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--sse-server":
        port, events, interval = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        import uvloop

        uvloop.run(sse_server(port, events, interval))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--sse-client":
        port, streams, events, interval = (
            int(sys.argv[2]),
            int(sys.argv[3]),
            int(sys.argv[4]),
            float(sys.argv[5]),
        )
        import uvloop

        print(json.dumps(uvloop.run(sse_client(port, streams, events, interval))))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3, help="length of each wrk run")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per figure, alternating targets; medians kept"
    )
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    parser.add_argument(
        "--source",
        action="append",
        type=parse_source,
        metavar="LABEL=DIR",
        help="a source tree to run the sidecar from (repeat to compare versions in one run)",
    )
    parser.add_argument(
        "--no-bare",
        dest="bare",
        action="store_false",
        help="skip bench/bare_relay.py, the floor any Python relay on this machine stays above",
    )
    args = parser.parse_args()
    check_tools()
    sources = dict(args.source) if args.source else {"sidecar": REPO}
    names = sidecar_names(sources)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        results = request_runs(Path(tmp), args.seconds, args.repeats, args.bare, sources)
        results.update(streaming_runs(Path(tmp), events=50, interval=0.02, bare=args.bare, sources=sources))
    print(
        f"\nsidecar proxy vs HAProxy 1 thread, each pinned to core {PROXY_CORE}; nginx 1 KiB / SSE upstream "
        f"and the load on core {LOAD_CORE}; {args.seconds:g} s per run, median of {args.repeats}; "
        f"{time.monotonic() - started:.0f} s in all\n"
    )
    for name, source in zip(names, sources.values()):
        if len(names) > 1:
            print(f"\n{name}: {source}\n")
        print_table(results, name)
    if len(names) > 1:
        print("\nside by side, same run\n")
        print_comparison(results, names)
    if args.json:
        print(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
