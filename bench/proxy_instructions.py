"""Instructions the sidecar proxy executes per request, counted by callgrind.

    python bench/proxy_instructions.py [--requests 2000] [--annotate]

Wall-clock figures on a shared machine wander by tens of percent; instruction
counts don't, so this is the figure to compare a hot-path change against. The
proxy (``python -m sidecar.proxy``) runs under ``valgrind --tool=callgrind`` in
front of nginx serving 1 KiB. After a warm-up the counters are zeroed, a fixed
workload runs, and the counters are dumped; the report is instructions per
request (the whole process: Python, uvloop, httptools, the kernel-call wrappers).

Workloads, each on keep-alive connections with one request in flight per
connection, so every read carries exactly one request or one response:

- ``get``: GET /1k with a browser-like head (8 fields);
- ``minimal``: GET /1k with only Host, as wrk sends it;
- ``post``: POST with a 256-byte Content-Length body;
- ``get4``: GET on 4 connections taking turns (more connections, same work).

To compare versions in one run, give each source tree:
``--source before=/path/to/old/checkout --source after=.``; each workload is then
counted for each tree in turn (its tree first on the child's PYTHONPATH) and
printed side by side with the difference.

Needs valgrind and nginx (apt-get install -y valgrind nginx).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from proxy_bench import free_port, parse_source, source_env, start_nginx, wait_port

GET = (
    b"GET /1k?q=1 HTTP/1.1\r\nHost: model.example\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\nAccept-Language: en-US,en;q=0.9\r\nCache-Control: no-cache\r\n"
    b"X-Request-Id: 0123456789abcdef\r\nConnection: keep-alive\r\n\r\n"
)
GET_MINIMAL = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # what wrk sends
POST = (
    b"POST /1k HTTP/1.1\r\nHost: model.example\r\nUser-Agent: bench/1.0\r\nContent-Type: application/json\r\n"
    b"Content-Length: 256\r\n\r\n" + b"x" * 256
)
# nginx serves static files to GET/HEAD only; a POST gets 405, still a full exchange.


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one response with a Content-Length body from sock."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", bytes(buf[:end]))
            length = int(m.group(1)) if m else 0
            total = end + 4 + length
            while len(buf) < total:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("proxy closed mid-response")
                buf += chunk
            del buf[:total]
            return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("proxy closed the connection")
        buf += chunk


def drive(port: int, request: bytes, count: int, connections: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    bufs = [bytearray() for _ in socks]
    try:
        for i in range(count):
            k = i % connections
            socks[k].sendall(request)
            read_response(socks[k], bufs[k])
    finally:
        for s in socks:
            s.close()


def has_totals(path: Path) -> bool:
    return any(line.startswith(("summary:", "totals:")) for line in path.read_text().splitlines())


def callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def measure(
    tmp: Path,
    upstream: int,
    workload: str,
    requests: int,
    annotate: bool,
    bare: bool = False,
    source: Path = REPO,
    hash_seed: int = 0,
) -> float:
    request = {"post": POST, "minimal": GET_MINIMAL}.get(workload, GET)
    connections = 4 if workload == "get4" else 1
    port = free_port()
    out = tmp / f"callgrind.{workload}"
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}.%p",
            sys.executable,
            *([str(HERE / "bare_relay.py")] if bare else ["-m", "sidecar.proxy"]),
            "--listen",
            f"127.0.0.1:{port}",
            "--local",
            f"127.0.0.1:{upstream}",
        ],
        cwd=source,
        # A fixed hash seed: with a random one, dict and set layouts (and so the
        # counts) differ by a few hundred instructions from one process to the next.
        env=source_env(source) | {"PYTHONHASHSEED": str(hash_seed)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, timeout=120)
        drive(port, request, 200, connections)  # warm-up: pools, code paths, allocator
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        drive(port, request, requests, connections)
        subprocess.run(
            ["callgrind_control", "-d", f"{workload}", str(proc.pid)], check=True, capture_output=True
        )
        # The dump is complete once its totals line is written.
        deadline = time.monotonic() + 30
        while not (dumps := sorted(tmp.glob(f"callgrind.{workload}.{proc.pid}.*"))) or not has_totals(
            dumps[-1]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("callgrind wrote no complete dump")
            time.sleep(0.05)
        if annotate:
            shutil.copy(dumps[-1], f"/tmp/callgrind.{workload}.out")
            text = subprocess.run(
                ["callgrind_annotate", "--threshold=100", "--auto=no", str(dumps[-1])],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            # Skip the frames every instruction runs under (main, the loop, ...).
            own = [
                line for line in text.splitlines() if "%)" in line and not re.search(r"\((?:100|9\d)\.", line)
            ]
            print("\n".join(own[:60]))
        return callgrind_total(dumps[-1]) / requests
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workload", action="append", choices=("get", "minimal", "post", "get4"))
    parser.add_argument("--annotate", action="store_true", help="print callgrind_annotate's top functions")
    parser.add_argument("--bare", action="store_true", help="also count bench/bare_relay.py, the floor")
    parser.add_argument(
        "--source",
        action="append",
        type=parse_source,
        metavar="LABEL=DIR",
        help="a source tree to run the sidecar from (repeat to compare versions in one run)",
    )
    parser.add_argument(
        "--hash-seed",
        type=int,
        action="append",
        help="PYTHONHASHSEED of the proxy (repeat: the mean of several)",
    )
    args = parser.parse_args()
    seeds = args.hash_seed or [0]
    sources = dict(args.source) if args.source else {"sidecar": REPO}
    missing = [t for t in ("valgrind", "callgrind_control", "nginx") if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="proxy-instr-") as tmp_name:
        tmp = Path(tmp_name)
        nginx_port = free_port()
        nginx = start_nginx(tmp, nginx_port)
        try:
            wait_port(nginx_port)
            for workload in args.workload or ["get", "minimal", "post", "get4"]:
                counts = {
                    label: sum(
                        measure(
                            tmp,
                            nginx_port,
                            workload,
                            args.requests,
                            args.annotate,
                            source=source,
                            hash_seed=seed,
                        )
                        for seed in seeds
                    )
                    / len(seeds)
                    for label, source in sources.items()
                }
                line = f"{workload:7} " + "; ".join(f"{label} {n:9,.0f}" for label, n in counts.items())
                line += " instructions per request"
                if len(counts) > 1:
                    first, *_, last = counts.values()
                    line += f"; last minus first {last - first:+,.0f} ({(last - first) / first:+.2%})"
                per_request = counts[next(iter(counts))]
                if args.bare:
                    floor = measure(tmp, nginx_port, workload, args.requests, False, bare=True)
                    line += f"; bare relay {floor:9,.0f}; sidecar minus bare {per_request - floor:9,.0f}"
                print(line, flush=True)
        finally:
            nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
