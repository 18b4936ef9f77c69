"""The README's first command, ``python -m sidecar.demo``, shortened: it must show
offloading turning on under load and off after it, with no failed request."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.integration.servers import REPO


def test_the_demo_offloads_under_load_and_stops_after_it_with_zero_errors():
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.demo", "--duration", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # The live display (plain lines when not on a terminal) shows cpu against target and the split.
    assert re.search(r"cpu=\d+%/50% offloading=on local=\d+ remote=\d+", out), out
    started = re.search(r"offloading started at\s+([\d.]+)s: .*above target", out)
    stopped = re.search(r"offloading stopped at\s+([\d.]+)s: .*below target", out)
    assert started and stopped, out
    assert float(started.group(1)) < float(stopped.group(1))
    totals = re.search(r"(\d+) sent: (\d+) served locally, (\d+) by the remote, (\d+) errors", out)
    assert totals, out
    sent, local, remote, errors = map(int, totals.groups())
    assert errors == 0 and local > 0 and remote > 0 and sent == local + remote
    # The sidecar's own counters agree with what the clients saw.
    assert f"sidecar says  local {local}, remote {remote}" in out
    assert "result        ok" in out


def test_the_demo_refuses_a_duration_too_short_to_show_anything():
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.demo", "--duration", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "at least 10 seconds" in result.stderr


def test_the_llm_scenario_offloads_on_the_queue_while_cpu_based_offloading_does_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.demo", "--scenario", "llm", "--duration", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # The live lines show each lane's cpu well under its target while the cpu lane's queue grows.
    cpu_lines = re.findall(r"cpu    cpu +(\d+)%/50%  queue +(\d+)  offloading +(\w+)", out)
    assert cpu_lines and all(int(cpu) < 50 and state == "off" for cpu, _, state in cpu_lines), out
    assert max(int(queue) for _, queue, _ in cpu_lines) >= 10, out
    assert re.search(r"queue  cpu +\d+%/50%  queue +\d+  offloading +ON", out), out
    started = re.search(
        r'queue: offloading started: "vllm:num_requests_waiting" on pods [\d.]+/2 above target', out
    )
    assert started, out
    summary = re.search(r"queue  (\d+) requests: (\d+) local, (\d+) remote, 0 errors", out)
    assert summary and int(summary.group(3)) > 0, out
    assert re.search(r"cpu    (\d+) requests: \1 local, 0 remote, 0 errors", out), out
    assert (
        "result ok: the cpu lane never offloaded, the queue lane offloaded under load and stopped after it"
        in out
    )
