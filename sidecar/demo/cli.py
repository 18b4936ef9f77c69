"""``python -m sidecar.demo``: the command line of both scenarios and of the sample servers it starts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from sidecar.demo.cpu import CPU_PER_TOKEN, Plan, run_demo, serve_sample
from sidecar.demo.llm import run_llm_demo


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
            return asyncio.run(run_llm_demo(args.duration, workdir, sys.stdout, tty))
        return asyncio.run(run_demo(plan, workdir, sys.stdout, tty))
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"  files: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

