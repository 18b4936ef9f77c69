"""offload-sidecar in standalone mode, as a process between two real upstreams.

The CPU signal is real: a child process burns CPU while a flag file exists and
the sidecar measures it with ``--cpu-pid`` against a 100m reference.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.servers import REPO
from tests.modeldeployments import as_yaml, standalone

SPINNER = """
import os, sys, time
flag = sys.argv[1]
while True:
    if os.path.exists(flag):
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            pass
    else:
        time.sleep(0.05)
"""


def modeldeployment(
    remote_port: int, *, percentage: int = 50, metrics: bool = True, enabled: bool = True
) -> str:
    behavior = {"sustainSeconds": 1, "cooldownSeconds": 1}
    doc = standalone(remote_port, percentage=percentage, enabled=enabled, behavior=behavior, metrics=metrics)
    return as_yaml(doc)


class SidecarProcess:
    def __init__(self, tmp_path: Path, *args: str):
        self.log_path = tmp_path / "sidecar.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar.cli",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--poll-interval",
                "200ms",
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"proxy listening on .*:(\d+); admin listening on .*:(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"sidecar did not start: {line!r}\n{self.log_path.read_text()}")
        self.port, self.admin_port = int(match.group(1)), int(match.group(2))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()

    def admin(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def status(self) -> dict:
        code, body = self.admin("/status")
        assert code == 200
        return json.loads(body)

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "") -> dict:
        end = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}: {json.dumps(status, indent=1)}")
            time.sleep(0.1)

    def requests(self, n: int, path: str = "/echo") -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        codes = []
        try:
            for _ in range(n):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                codes.append(response.status)
        finally:
            conn.close()
        return codes

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


@pytest.fixture
def spinner(tmp_path):
    flag = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", SPINNER, str(flag)])
    yield proc.pid, flag
    proc.kill()
    proc.wait(10)


def test_offloading_turns_on_with_real_cpu_load_and_off_when_it_ends(tmp_path, upstreams, spinner):
    local, remote = upstreams
    pid, flag = spinner
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(remote.port))
    sidecar = SidecarProcess(
        tmp_path,
        "--config", str(config),
        "--upstream", f"127.0.0.1:{local.port}",
        "--cpu-pid", str(pid),
        "--cpu-request", "100m",
        "--cpu-window", "1s",
    )  # fmt: skip
    try:
        status = sidecar.wait_for(lambda s: s["observations"] and s["observations"][0]["current"] is not None)
        assert status["observations"][0]["current"] < 50, status["observations"]
        assert not status["decision"]["offloading"]
        assert sidecar.requests(20) == [200] * 20
        assert (local.count(), remote.count()) == (20, 0)

        flag.touch()  # the model runs hot: ~1 core against a 100m reference
        status = sidecar.wait_for(lambda s: s["decision"]["offloading"], what="offloading to start")
        assert "above target" in status["decision"]["reason"]
        assert sidecar.requests(100) == [200] * 100
        assert (local.count(), remote.count()) == (70, 50)

        flag.unlink()  # load gone
        status = sidecar.wait_for(lambda s: not s["decision"]["offloading"], what="offloading to stop")
        assert "below target" in status["decision"]["reason"]
        assert sidecar.requests(20) == [200] * 20
        assert (local.count(), remote.count()) == (90, 50)

        _, metrics = sidecar.admin("/metrics")
        assert 'offload_sidecar_offloading_transitions_total{to="on"} 1' in metrics
        assert 'offload_sidecar_offloading_transitions_total{to="off"} 1' in metrics
        assert 'offload_sidecar_requests_total{backend="remote",code="2xx"} 50' in metrics
        log = sidecar.log_text()
        assert log.count("offloading started") == 1 and log.count("offloading stopped") == 1
        assert "to http://127.0.0.1:" in log
    finally:
        sidecar.stop()


def test_the_file_is_reloaded_and_disabled_or_invalid_means_pass_through(tmp_path, upstreams):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    # behavior.staticSplit (no metrics): on from the start.
    config.write_text(modeldeployment(remote.port, percentage=100, metrics=False))
    sidecar = SidecarProcess(tmp_path, "--config", str(config), "--upstream", str(local.port))
    try:
        status = sidecar.status()
        assert status["decision"]["offloading"] and "static split" in status["decision"]["reason"]
        assert sidecar.requests(10) == [200] * 10
        assert (local.count(), remote.count()) == (0, 10)

        config.write_text(modeldeployment(remote.port, percentage=20, metrics=False))
        sidecar.wait_for(lambda s: s["routing"]["activePercentage"] == 20, what="the new percentage")
        sidecar.requests(100)
        assert (local.count(), remote.count()) == (80, 30)

        config.write_text(modeldeployment(remote.port, percentage=20, metrics=False, enabled=False))
        status = sidecar.wait_for(lambda s: s["routing"]["remote"] is None, what="pass-through")
        assert "disabled" in status["decision"]["reason"]
        sidecar.requests(10)
        assert (local.count(), remote.count()) == (90, 30)

        config.write_text(modeldeployment(remote.port, percentage=250, metrics=False))
        status = sidecar.wait_for(lambda s: s["configuration"] is None, what="the configuration dropped")
        assert any("spec.offloadingConfig.behavior.percentage" in e for e in status["configurationErrors"])
        assert status["routing"]["remote"] is None
        sidecar.requests(10)
        assert (local.count(), remote.count()) == (100, 30)
        assert "spec.offloadingConfig.behavior.percentage: must be between 0 and 100" in sidecar.log_text()
    finally:
        sidecar.stop()


def test_sigterm_fails_readiness_at_once_and_lets_a_request_in_flight_finish(tmp_path, upstreams):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(remote.port))
    sidecar = SidecarProcess(
        tmp_path, "--config", str(config), "--upstream", str(local.port), "--shutdown-grace", "1s"
    )
    try:
        assert sidecar.admin("/readyz")[0] == 200
        result = {}

        def slow():
            result["codes"] = sidecar.requests(1, "/slow?delay_ms=1500")

        thread = threading.Thread(target=slow)
        thread.start()
        sidecar.wait_for(lambda s: s["counters"]["localInFlight"] == 1, what="the request in flight")
        os.kill(sidecar.proc.pid, signal.SIGTERM)
        # Not ready from the signal on, while the request (1.5 s) is still being served.
        end = time.monotonic() + 1.0
        while sidecar.admin("/readyz")[0] != 503:
            assert time.monotonic() < end, "readyz still 200 a second after SIGTERM"
            time.sleep(0.02)
        assert thread.is_alive()
        thread.join(10)
        assert result["codes"] == [200]
        assert sidecar.proc.wait(15) == 0
        assert "stopped" in sidecar.log_text()
    finally:
        sidecar.stop()


def test_idle_rss_is_within_40_mib(tmp_path, upstreams):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(remote.port))
    sidecar = SidecarProcess(tmp_path, "--config", str(config), "--upstream", str(local.port))
    try:
        sidecar.requests(50)
        sidecar.admin("/metrics")
        sidecar.admin("/status")
        rss_kib = int(subprocess.run(["ps", "-o", "rss=", "-p", str(sidecar.proc.pid)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
        print(f"sidecar RSS after 50 requests: {rss_kib / 1024:.1f} MiB")
        assert rss_kib <= 40 * 1024
    finally:
        sidecar.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "8000"], "standalone mode needs --config"),
        (["--upstream", "8000", "--config", "/nonexistent.yaml"], "no such file"),
        (["--upstream", "nope:port", "--config", "x"], "not host:port"),
        (["--upstream", "8000", "--config", "x", "--cpu-request", "lots"], "not a CPU amount"),
        (["--upstream", "8000", "--config", "x", "--poll-interval", "0s"], "must be more than zero"),
        (
            ["--upstream", "8000", "--mode", "cluster"],
            "cluster mode needs POD_NAMESPACE and MODELDEPLOYMENT_NAME",
        ),
    ],
)
def test_bad_command_lines_are_refused_with_the_reason(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k not in ("POD_NAMESPACE", "MODELDEPLOYMENT_NAME")},
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr


def test_a_missing_cpu_pid_is_refused(tmp_path):
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(1))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--upstream", "8000", "--config", str(config), "--cpu-pid", "999999999"],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "no such process" in result.stderr
