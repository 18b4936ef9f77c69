"""The controller's gathering of sidecar-served Pods metrics, pure parts and the bounded
gathering with a fake fetch (no sockets): which pods are read, where, and what their
documents add up to."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crds.signals import IN_FLIGHT
from crds.validation import validate_object
from webhook.controller.podsignals import (
    FetchError,
    PodSignalsReader,
    PodTarget,
    SignalGatherer,
    local_metrics,
    observe_local,
    pod_targets,
)

QUEUE = "vllm:num_requests_waiting"


def pod(
    name: str,
    *,
    ip: str | None = "10.0.0.1",
    ready: bool = True,
    phase: str = "Running",
    admin: int | None = 15090,
    deleted: bool = False,
    native: bool = True,
) -> dict[str, Any]:
    sidecar = {"name": "offload-proxy", "ports": [{"name": "offload-proxy", "containerPort": 15080}]}
    if admin is not None:
        sidecar["ports"].append({"name": "offload-admin", "containerPort": admin})
    spec: dict[str, Any] = {
        "containers": [{"name": "model", "ports": [{"name": "http", "containerPort": 8000}]}]
    }
    if native:
        spec["initContainers"] = [{**sidecar, "restartPolicy": "Always"}]
    else:
        spec["containers"].append(sidecar)
    meta: dict[str, Any] = {"name": name}
    if deleted:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": meta, "spec": spec, "status": status}


def model(*metrics: dict[str, Any]):
    doc = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llm", "namespace": "models"},
        "spec": {
            "model": "llama",
            "modelSourceRef": {"name": "vllm"},
            "offloadingConfig": {"remoteBackend": {"host": "remote:80"}, "metrics": list(metrics)},
        },
    }
    result = validate_object(doc)
    assert result.model is not None, result.errors
    return result.model


def pods_metric(name: str, kind: str = "AverageValue", value: str = "4") -> dict[str, Any]:
    key = "averageValue" if kind == "AverageValue" else "value"
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": {"type": kind, key: value}}}


CPU = {
    "type": "Resource",
    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
}


def doc(in_flight: float, queue: float | None = None) -> dict[str, Any]:
    gauges = {} if queue is None else {QUEUE: {"series": [{"labels": {"model_name": "m"}, "value": queue}]}}
    return {"signals": {IN_FLIGHT: {"value": in_flight, "now": 0}}, "gauges": gauges}


# --- which pods, where -----------------------------------------------------------------------------


def test_only_ready_pods_are_read_at_their_ip_and_admin_port():
    targets = pod_targets(
        [
            pod("a", ip="10.0.0.1"),
            pod("b", ip="fd00::2", admin=9999, native=False),
            pod("starting", ready=False),
            pod("pending", phase="Pending"),
            pod("leaving", deleted=True),
            pod("no-sidecar", admin=None),
            pod("no-ip", ip=None),
        ]
    )
    assert targets.ready == ("a", "b", "no-sidecar", "no-ip")
    assert targets.targets == (PodTarget("a", "10.0.0.1", 15090), PodTarget("b", "fd00::2", 9999))
    assert targets.targets[1].url == "http://[fd00::2]:9999/signals"
    assert targets.unreachable == {
        "no-sidecar": "no offload-admin port: the pod has no sidecar",
        "no-ip": "no pod IP",
    }


@pytest.mark.parametrize(
    "junk",
    [{}, {"status": "x"}, {"metadata": {"name": "x"}, "status": {"phase": "Running", "conditions": ["x"]}}],
)
def test_malformed_pods_are_skipped_not_crashed_on(junk):
    assert pod_targets([junk, pod("a")]).ready == ("a",)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "metadata",
                    "spec",
                    "status",
                    "name",
                    "phase",
                    "podIP",
                    "conditions",
                    "type",
                    "containers",
                    "initContainers",
                    "ports",
                    "containerPort",
                    "deletionTimestamp",
                ]
            ),
            c,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@given(st.lists(JSON, max_size=4))
def test_pod_targets_never_raises_whatever_the_pods(pods):
    targets = pod_targets(pods)
    assert {t.pod for t in targets.targets} <= set(targets.ready)


# --- the metrics from the documents ---------------------------------------------------------------


def test_only_the_metrics_the_sidecars_serve_are_gathered_here_in_order():
    md = model(CPU, pods_metric(QUEUE), pods_metric("from_an_adapter"), pods_metric(IN_FLIGHT, "Value", "10"))
    assert [(i, name) for i, _, name in local_metrics(md)] == [(1, QUEUE), (3, IN_FLIGHT)]
    assert local_metrics(model(CPU)) == []


def test_average_and_total_over_the_ready_pods_documents():
    md = model(pods_metric(QUEUE, "AverageValue", "4"), pods_metric(IN_FLIGHT, "Value", "10"))
    targets = pod_targets([pod("a"), pod("b"), pod("c", ready=False)])
    got = observe_local(local_metrics(md), targets, {"a": doc(2.0, queue=6), "b": doc(5.0, queue=8)})
    assert [(o.index, o.metric, o.current, o.target) for o in got] == [
        (0, f'"{QUEUE}" on pods', 7.0, 4.0),
        (1, f'"{IN_FLIGHT}" on pods (total)', 7.0, 10.0),
    ]
    assert got[0].reason == "average over 2 ready pods"


def test_pods_that_could_not_be_read_are_counted_as_the_hpa_counts_pods_without_metrics():
    md = model(pods_metric(QUEUE, "AverageValue", "4"))
    targets = pod_targets([pod("a"), pod("b"), pod("c", admin=None)])
    (over,) = observe_local(
        local_metrics(md), targets, {"a": doc(1, queue=12), "b": "http://x/signals: timed out"}
    )
    assert over.current == 4.0  # (12 + 0 + 0) / 3: 12 alone is over, so the unread count as 0
    assert "2 without a value (b: http://x/signals: timed out; c: no offload-admin port" in over.reason
    (unknown,) = observe_local(local_metrics(md), targets, {"a": "refused", "b": "refused"})
    assert unknown.current is None and unknown.reason.startswith("no value from any ready pod")


def test_a_sidecar_that_does_not_scrape_the_gauge_yet_is_a_pod_without_a_value():
    md = model(pods_metric(QUEUE))
    targets = pod_targets([pod("a"), pod("b")])
    (obs,) = observe_local(local_metrics(md), targets, {"a": doc(0, queue=2), "b": doc(0)})
    assert obs.current == 3.0  # 2 under 4: b counted as the target
    assert f"b: the sidecar does not scrape {QUEUE} (yet)" in obs.reason


# --- the bounded gathering --------------------------------------------------------------------------


def test_gathering_reads_every_pod_once_and_turns_failures_into_reasons():
    async def fetch(target: PodTarget, timeout: float) -> Any:
        if target.pod == "refused":
            raise ConnectionRefusedError(111, "refused")
        if target.pod == "bad":
            raise FetchError("answered 404 (a sidecar older than this controller)")
        return {"pod": target.pod}

    gatherer = SignalGatherer(fetch=fetch)
    targets = [PodTarget(name, "10.0.0.1", 1) for name in ("a", "refused", "bad")]
    assert gatherer.gather(targets) == {
        "a": {"pod": "a"},
        "refused": "http://10.0.0.1:1/signals: connection refused",
        "bad": "http://10.0.0.1:1/signals: answered 404 (a sidecar older than this controller)",
    }
    assert gatherer.requests == 3
    assert gatherer.gather([]) == {} and gatherer.requests == 3


def test_the_whole_gathering_ends_at_its_deadline_with_at_most_concurrency_reads_at_once():
    open_now = [0]
    most = [0]

    async def fetch(target: PodTarget, timeout: float) -> Any:
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            if target.pod.startswith("hang"):
                await asyncio.Event().wait()
            await asyncio.sleep(0)
            return {"ok": True}
        finally:
            open_now[0] -= 1

    gatherer = SignalGatherer(fetch=fetch, deadline=0.2, concurrency=3)
    targets = [PodTarget(f"p{i}", "10.0.0.1", 1) for i in range(10)] + [PodTarget("hang", "10.0.0.2", 1)]
    results = gatherer.gather(targets)
    assert results["hang"] == "http://10.0.0.2:1/signals: not read within 0.2s"
    assert all(results[f"p{i}"] == {"ok": True} for i in range(10))
    assert most[0] <= 3


def test_a_modeldeployment_without_local_metrics_makes_no_request():
    calls = []

    async def fetch(target, timeout):
        calls.append(target)
        return {}

    reader = PodSignalsReader(SignalGatherer(fetch=fetch))
    assert reader.observe(model(CPU, pods_metric("from_an_adapter")), [pod("a")]) == []
    assert calls == []
    (obs,) = reader.observe(model(pods_metric(IN_FLIGHT)), [pod("a"), pod("b")])
    assert len(calls) == 2 and obs.current is None  # {} has no signals: both without a value
