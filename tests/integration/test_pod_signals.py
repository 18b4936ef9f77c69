"""The controller's reader of sidecar-served Pods metrics against real sidecar processes
in front of real stand-in LLM servers: each pod's /signals read over HTTP, the HPA's
arithmetic over the ready pods, and pods that cannot be read counted as the HPA counts
pods without metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crds.signals import IN_FLIGHT
from crds.validation import validate_object
from sidecar.demo.llmsim import Capacity, LlmServer
from tests.integration.servers import LoopThread
from tests.integration.test_model_signals import Load
from tests.integration.test_standalone import SidecarProcess
from tests.modeldeployments import as_yaml, standalone
from webhook.controller.podsignals import PodSignalsReader, SignalGatherer

QUEUE = "vllm:num_requests_waiting"


def metric(name: str, kind: str, value: str) -> dict:
    key = "averageValue" if kind == "AverageValue" else "value"
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": kind, key: value}}}


def pod(name: str, admin_port: int) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "model"}],
            "initContainers": [
                {
                    "name": "offload-proxy",
                    "restartPolicy": "Always",
                    "ports": [{"name": "offload-admin", "containerPort": admin_port}],
                }
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


@pytest.fixture
def pods(tmp_path: Path):
    """Two pods: a stand-in LLM (2 slots) behind a real sidecar each; the sidecars scrape
    the queue gauge (their own ModelDeployment names it, with a target never reached)."""
    with LoopThread() as lt:
        remote = LlmServer("remote", Capacity(slots=64))
        lt.run(remote.start())
        models, sidecars = [], []
        try:
            for name in ("a", "b"):
                model = LlmServer(name, Capacity(slots=2, prefill=0.2, tokens=5, token_interval=0.05))
                lt.run(model.start())
                models.append(model)
                doc = standalone(remote.port, percentage=0, static_split=False)
                doc["spec"]["offloadingConfig"]["metrics"] = [metric(QUEUE, "AverageValue", "1000")]
                doc["spec"]["offloadingConfig"]["modelMetrics"] = {"intervalSeconds": 0.2}
                (tmp_path / name).mkdir()
                config = tmp_path / name / "md.yaml"
                config.write_text(as_yaml(doc))
                sidecars.append(
                    SidecarProcess(
                        tmp_path / name, "--config", str(config), "--upstream", f"127.0.0.1:{model.port}"
                    )
                )
            yield sidecars
        finally:
            for sidecar in sidecars:
                sidecar.stop()
            for server in (*models, remote):
                lt.call(server.close)


def the_model(*metrics: dict):
    doc = standalone(80, static_split=False)
    doc["metadata"]["namespace"] = "models"
    doc["spec"]["offloadingConfig"]["metrics"] = list(metrics)
    model = validate_object(doc).model
    assert model is not None
    return model


def observe_until(reader, md, pod_list, what: str, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = reader.observe(md, pod_list)
        if predicate(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}: {got}")
        time.sleep(0.1)


def test_the_queue_and_the_in_flight_count_of_the_ready_pods_are_read_from_their_sidecars(pods):
    a, b = pods
    md = the_model(metric(QUEUE, "AverageValue", "2"), metric(IN_FLIGHT, "Value", "4"))
    pod_list = [pod("a", a.admin_port), pod("b", b.admin_port)]
    gatherer = SignalGatherer(timeout=1.0, deadline=2.0)
    reader = PodSignalsReader(gatherer)

    idle = observe_until(reader, md, pod_list, "both pods scraped", lambda got: got[0].current == 0.0)
    assert [(o.index, o.metric, o.current, o.target) for o in idle] == [
        (0, f'"{QUEUE}" on pods', 0.0, 2.0),
        (1, f'"{IN_FLIGHT}" on pods (total)', 0.0, 4.0),
    ]
    assert idle[0].reason == "average over 2 ready pods"

    load = Load(a.port, clients=8)  # only pod a is loaded: 2 in its slots, up to 6 queued
    try:
        # a's queue (up to 6) over 2 pods, and a's 8 in flight (a 1 s mean) plus b's none.
        observe_until(
            reader,
            md,
            pod_list,
            "pod a's queue in the average and its requests in the total",
            lambda got: (got[0].current or 0) >= 2.5 and (got[1].current or 0) >= 5,
        )
    finally:
        load.end()
    assert load.errors == []
    observe_until(reader, md, pod_list, "the queue drained", lambda got: got[0].current == 0.0)
    before = gatherer.requests
    reader.observe(md, pod_list)
    assert gatherer.requests - before == 2  # one request per pod, whatever the number of metrics


def test_a_ready_pod_whose_sidecar_cannot_be_read_counts_as_a_pod_without_metrics(pods):
    a, b = pods
    closed = LlmServer("x", Capacity())
    with LoopThread() as lt:
        port = lt.run(closed.start())
        lt.call(closed.close)
    md = the_model(metric(QUEUE, "AverageValue", "2"))
    pod_list = [pod("a", a.admin_port), pod("b", b.admin_port), pod("c", port)]
    reader = PodSignalsReader(SignalGatherer(timeout=1.0, deadline=2.0))
    (obs,) = observe_until(reader, md, pod_list, "a and b scraped", lambda got: got[0].current is not None)
    # a and b read 0, under the target 2: c, unread, counts as the target (the HPA's rule).
    assert obs.current == pytest.approx(2 / 3)
    assert f"c: http://127.0.0.1:{port}/signals: connection refused" in obs.reason
    b.stop()
    (obs,) = reader.observe(md, pod_list)
    assert "2 without a value" in obs.reason and obs.current == pytest.approx(2 * 2 / 3)
