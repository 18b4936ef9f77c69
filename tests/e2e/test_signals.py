"""Offloading on a signal the sidecars serve, on the real control plane, with no metrics
adapter: the controller (offload-webhook) reads each ready pod's /signals on its
offload-admin port and decides.

The workload's pods are kwok pods: nothing runs in them. Real sidecar processes (standalone,
pass-through, each in front of its own stand-in LLM server with 2 slots) stand in for the
injected sidecars, listening on the pods' own IPs at the injected admin port: the test
gives the loopback interface those addresses (``ip addr add``, root needed: CAP_NET_ADMIN)
and takes back what it added. Load through them raises their in-flight counts; the
controller turns offloading on within seconds and off after the cooldown, writing the status
only when the decision changes (or once per evaluation period), and never asks a custom
metrics API, which is not even registered.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from crds.signals import IN_FLIGHT
from sidecar.demo.llmsim import Capacity, LlmServer
from tests.e2e.test_controller import (  # noqa: F401 - cluster is a fixture
    Cluster,
    api_requests,
    cluster,
    deployment,
    service,
)
from tests.e2e.test_controller import modeldeployment as controller_modeldeployment
from tests.integration.servers import LoopThread
from tests.integration.test_model_signals import Load
from tests.integration.test_standalone import SidecarProcess
from tests.modeldeployments import as_yaml, standalone

pytestmark = pytest.mark.e2e

ADMIN_PORT = 15090  # the injector's adminPort in test_controller's configuration
SUSTAIN, COOLDOWN, PERIOD = 1, 3, 2


@pytest.fixture
def loopback_addresses() -> Iterator[list[str]]:
    """Addresses given to the loopback interface during the test (taken back after)."""
    added: list[str] = []
    yield added
    for address in added:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False, capture_output=True)


def add_loopback_address(address: str, added: list[str]) -> None:
    shown = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=True
    )
    if f" {address}/" in shown.stdout:
        return  # already there (another run's): used, never taken back here
    done = subprocess.run(
        ["ip", "addr", "add", f"{address}/32", "dev", "lo"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"giving lo the pod IP {address} needs root (CAP_NET_ADMIN): {done.stderr}"
    added.append(address)


def test_offloading_follows_the_sidecars_in_flight_counts_with_no_metrics_adapter(
    cluster: Cluster,  # noqa: F811 - the fixture imported above
    loopback_addresses: list[str],
    tmp_path: Path,
    capsys,
) -> None:
    c = cluster
    registry = kubernetes.client.ApiregistrationV1Api(c.kube.api_client)
    groups = {item.spec.group for item in registry.list_api_service().items if item.spec.group}
    assert "custom.metrics.k8s.io" not in groups and "external.metrics.k8s.io" not in groups

    md = controller_modeldeployment()
    offloading = md["spec"]["offloadingConfig"]
    offloading["behavior"].update(sustainSeconds=SUSTAIN, cooldownSeconds=COOLDOWN)
    target = {"type": "AverageValue", "averageValue": "2"}
    offloading["metrics"] = [{"type": "Pods", "pods": {"metric": {"name": IN_FLIGHT}, "target": target}}]
    c.create(md)  # first, so that the pods are created with the sidecar
    c.create(deployment(replicas=2, cpu="200m"))
    c.create(service())
    c.wait("2 ready pods with the sidecar", lambda: len(c.with_sidecar(c.ready_pods())) == 2, 60)
    pods = c.with_sidecar(c.ready_pods())
    for pod in pods:
        ports = [p for ctr in pod.spec.init_containers for p in ctr.ports or [] if p.name == "offload-admin"]
        assert [p.container_port for p in ports] == [ADMIN_PORT]
        add_loopback_address(pod.status.pod_ip, loopback_addresses)

    def status() -> dict[str, Any]:
        return (c.md() or {}).get("status") or {}

    def reason() -> str:
        return (status().get("decision") or {}).get("reason", "")

    # No sidecar answers yet: the metric is unknown, nothing is offloaded.
    def message() -> str:
        metrics = (status().get("decision") or {}).get("metrics") or [{}]
        return str(metrics[0].get("message"))

    c.wait("the controller to find no sidecar answering", lambda: "connection refused" in message())
    assert reason() == "MetricsUnavailable" and status()["offloading"] is False

    with LoopThread() as lt:
        capacity = Capacity(slots=2, prefill=0.2, tokens=5, token_interval=0.05)
        models = [LlmServer(f"m{i}", capacity) for i in range(2)]
        for model in models:
            lt.run(model.start())
        sidecars: list[SidecarProcess] = []
        loads: list[Load] = []
        try:
            for pod, model in zip(pods, models):
                workdir = tmp_path / pod.metadata.name
                workdir.mkdir()
                config = workdir / "md.yaml"
                config.write_text(as_yaml(standalone(80, enabled=False)))  # pass-through: it counts
                args = ["--config", str(config), "--upstream", f"127.0.0.1:{model.port}"]
                args += ["--admin-listen", f"{pod.status.pod_ip}:{ADMIN_PORT}"]
                sidecars.append(SidecarProcess(workdir, *args))

            c.wait(
                "the controller to read both sidecars: below target",
                lambda: reason() == "BelowTarget" and message() == "average over 2 ready pods",
            )
            (metric,) = status()["decision"]["metrics"]
            assert metric["name"] == f'"{IN_FLIGHT}" on pods' and metric["type"] == "Pods"
            assert metric["current"] == "0" and metric["target"] == "2", metric
            assert status()["offloading"] is False

            # Steady: evaluated every second, written only once per evaluation period.
            before = api_requests(c.webhook)
            time.sleep(6)  # a window to count writes in, not an outcome
            after = api_requests(c.webhook)
            writes = sum(v - before.get(k, 0) for k, v in after.items() if k[1].endswith("/status"))
            assert writes <= 6 / PERIOD + 1, (before, after)
            assert not [k for k in after if "custom.metrics" in k[1] or "external.metrics" in k[1]], after

            # Load: 6 clients per pod against 2 slots each; the in-flight mean goes to ~6.
            hot_at = time.monotonic()
            loads = [Load(sidecar.port, clients=6) for sidecar in sidecars]
            c.wait("status.offloading true", lambda: status().get("offloading") is True, 30)
            turned_on = time.monotonic() - hot_at
            assert turned_on <= SUSTAIN + 4, turned_on
            assert reason() == "AboveTarget"
            c.wait("the OffloadingStarted Event", lambda: bool(c.events("OffloadingStarted")))

            cool_at = time.monotonic()
            for load in loads:
                load.end()
            c.wait("status.offloading false", lambda: status().get("offloading") is False, 30)
            turned_off = time.monotonic() - cool_at
            assert COOLDOWN <= turned_off <= COOLDOWN + 6, turned_off  # the clients finish first
            assert all(not load.errors for load in loads)
        finally:
            for load in loads:
                load.end()
            for sidecar in sidecars:
                sidecar.stop()
            for model in models:
                lt.call(model.close)
    with capsys.disabled():
        print(
            f"\n[e2e] in-flight signal, no adapter: on {turned_on:.1f} s after the load began "
            f"(sustain {SUSTAIN} s), off {turned_off:.1f} s after it ended (cooldown {COOLDOWN} s); "
            f"{writes} status writes in 6 s of steady state"
        )
