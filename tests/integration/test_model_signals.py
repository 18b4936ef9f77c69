"""offload-sidecar (a real process, standalone) in front of a real stand-in LLM server
that queues beyond its capacity and exports vLLM's gauges: the sidecar scrapes them,
serves them and its own counts at /signals, and offloads on them."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest

from crds.signals import IN_FLIGHT, WAITING
from sidecar.demo.llmsim import Capacity, LlmServer
from tests.integration.servers import LoopThread
from tests.integration.test_standalone import SidecarProcess
from tests.modeldeployments import as_yaml, standalone

QUEUE = "vllm:num_requests_waiting"


@pytest.fixture
def servers():
    """The local model (2 slots, 0.4 s per request) and a remote with room to spare."""
    with LoopThread() as lt:
        local = LlmServer("local", Capacity(slots=2, prefill=0.2, tokens=5, token_interval=0.05))
        remote = LlmServer("remote", Capacity(slots=64, prefill=0.2, tokens=5, token_interval=0.05))
        lt.run(local.start())
        lt.run(remote.start())
        yield local, remote
        lt.call(local.close)
        lt.call(remote.close)


def config(tmp_path: Path, remote_port: int, metric: dict, **offloading) -> Path:
    doc = standalone(
        remote_port, percentage=100, behavior={"sustainSeconds": 1, "cooldownSeconds": 1}, static_split=False
    )
    doc["spec"]["offloadingConfig"]["metrics"] = [metric]
    doc["spec"]["offloadingConfig"].update(offloading)
    path = tmp_path / "md.yaml"
    path.write_text(as_yaml(doc))
    return path


def pods_metric(name: str, average: str) -> dict:
    return {
        "type": "Pods",
        "pods": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": average}},
    }


class Load:
    """``clients`` threads streaming completions through the sidecar until stopped."""

    def __init__(self, port: int, clients: int):
        self.port = port
        self.served: dict[str, int] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def client(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", "/v1/completions")
                response = conn.getresponse()
                body = response.read()
                server = "remote" if b'"server": "remote"' in body else "local"
                ok = response.status == 200 and b"[DONE]" in body
            except (OSError, http.client.HTTPException) as exc:
                ok, server, body = False, "", repr(exc).encode()
            finally:
                conn.close()
            with self.lock:
                if ok:
                    self.served[server] = self.served.get(server, 0) + 1
                else:
                    self.errors.append(body[:200].decode("latin-1"))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def signals(sidecar: SidecarProcess) -> dict:
    code, body = sidecar.admin("/signals")
    assert code == 200
    return json.loads(body)


def wait_signals(sidecar: SidecarProcess, what: str, predicate, timeout: float = 20) -> dict:
    end = time.monotonic() + timeout
    while True:
        doc = signals(sidecar)
        if predicate(doc):
            return doc
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(doc, indent=1)}")
        time.sleep(0.05)


def queue_value(doc: dict) -> float:
    series = doc["gauges"][QUEUE].get("series") or []
    return sum(s["value"] for s in series)


def test_the_models_queue_is_scraped_served_at_signals_and_offloads_while_it_is_long(tmp_path, servers):
    local, remote = servers
    path = config(
        tmp_path,
        remote.port,
        pods_metric(QUEUE, "2"),
        modelMetrics={"intervalSeconds": 0.2},
    )
    sidecar = SidecarProcess(tmp_path, "--config", str(path), "--upstream", f"127.0.0.1:{local.port}")
    load = None
    try:
        idle = wait_signals(sidecar, "a first scrape", lambda d: "series" in d["gauges"].get(QUEUE, {}))
        assert idle["gauges"][QUEUE]["series"] == [{"labels": {"model_name": "stand-in"}, "value": 0.0}]
        assert idle["scrape"]["url"] == f"http://127.0.0.1:{local.port}/metrics"
        assert idle["signals"][IN_FLIGHT]["value"] == 0 and idle["signals"][WAITING]["value"] == 0
        assert sidecar.status()["decision"]["offloading"] is False

        load = Load(sidecar.port, clients=8)  # 8 at once against 2 slots: a queue of up to 6
        busy = wait_signals(sidecar, "the queue seen", lambda d: queue_value(d) >= 3)
        assert busy["signals"][WAITING]["now"] >= 1
        status = sidecar.wait_for(lambda s: s["decision"]["offloading"], what="offloading on the queue")
        (observation,) = status["observations"]
        assert observation["metric"] == f'"{QUEUE}" on pods' and observation["target"] == 2.0
        wait_until_remote = time.monotonic() + 10
        while load.served.get("remote", 0) == 0 and time.monotonic() < wait_until_remote:
            time.sleep(0.05)
        assert load.served.get("remote", 0) > 0
        load.end()
        sidecar.wait_for(
            lambda s: not s["decision"]["offloading"], what="offloading off once the queue is gone"
        )
        assert load.errors == []
        assert queue_value(signals(sidecar)) == 0
    finally:
        if load is not None:
            load.end()
        sidecar.stop()


def test_the_sidecars_own_in_flight_count_offloads_without_any_model_metrics(tmp_path, servers):
    local, remote = servers
    path = config(tmp_path, remote.port, pods_metric(IN_FLIGHT, "3"))
    sidecar = SidecarProcess(tmp_path, "--config", str(path), "--upstream", f"127.0.0.1:{local.port}")
    load = None
    try:
        assert signals(sidecar)["scrape"] is None  # nothing to scrape: no model gauge is named
        load = Load(sidecar.port, clients=8)
        doc = wait_signals(sidecar, "requests in flight", lambda d: d["signals"][IN_FLIGHT]["value"] >= 4)
        assert doc["signals"][WAITING]["value"] > 0  # beyond 2 slots, requests wait for their first token
        sidecar.wait_for(lambda s: s["decision"]["offloading"], what="offloading on the in-flight count")
        load.end()
        sidecar.wait_for(lambda s: not s["decision"]["offloading"], what="offloading off")
        assert load.errors == []
    finally:
        if load is not None:
            load.end()
        sidecar.stop()


def test_a_model_metrics_endpoint_that_cannot_be_read_never_starts_offloading_and_says_why(tmp_path, servers):
    local, remote = servers
    closed = LlmServer("x", Capacity())
    with LoopThread() as lt:  # a port that was just free: nothing listens there
        port = lt.run(closed.start())
        lt.call(closed.close)
    path = config(
        tmp_path,
        remote.port,
        pods_metric(QUEUE, "2"),
        modelMetrics={"port": port, "intervalSeconds": 0.2},
    )
    sidecar = SidecarProcess(tmp_path, "--config", str(path), "--upstream", f"127.0.0.1:{local.port}")
    try:
        doc = wait_signals(sidecar, "a failed scrape", lambda d: (d["scrape"] or {}).get("failures", 0) >= 2)
        assert f"scraping http://127.0.0.1:{port}/metrics failed" in doc["gauges"][QUEUE]["error"]
        status = sidecar.wait_for(lambda s: s["observations"] and s["observations"][0]["current"] is None)
        assert "failed" in status["observations"][0]["reason"]
        assert status["decision"]["offloading"] is False
    finally:
        sidecar.stop()
