"""The remote standing in for a workload with no ready pod, on the real control plane.

offload-webhook runs the controller with ``--gateway-selector`` naming a kwok Deployment of
"gateway pods" (Ready, with pod IPs, running no code), and ``offload-sidecar --mode gateway``
runs here as a process on loopback, against the same API server. The API server refuses
loopback addresses in EndpointSlices (ValidateEndpointIP), so the switching is proven on the
API objects (the slice's addresses are the kwok gateway pods', its port is the one the
gateway process listens on) and the data path by sending requests to that port on
127.0.0.1, where the gateway process serves them from a real remote server.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import kubernetes
import pytest
import yaml

from crds.model import GROUP, PLURAL, VERSION
from tests.e2e.controlplane.admission import mutating_webhook_configuration
from tests.e2e.controlplane.process import wait_until
from tests.e2e.objects import apply
from tests.e2e.paths import TUTORIAL_CLUSTER_A
from tests.e2e.standin_support import (
    GATEWAY_LABELS,
    GatewayProcess,
    Recorder,
    gateway_deployment,
    tutorial_modeldeployment,
)
from tests.e2e.test_controller import Cluster, start_controller
from tests.integration.servers import LoopThread, Upstream

pytestmark = pytest.mark.e2e

SLICE = "php-apache-offload-standin"
GATEWAY_SELECTOR = ",".join(f"{k}={v}" for k, v in GATEWAY_LABELS.items())
API_KEY = "e2e-key-7c1d"


@dataclass
class Env:
    c: Cluster
    remote: Upstream
    gateway: GatewayProcess
    recorder: Recorder
    ports: tuple[int, int]

    def standin(self) -> dict[str, Any]:
        return ((self.c.md("my-model") or {}).get("status") or {}).get("standIn") or {}

    def condition(self) -> dict[str, Any]:
        return self.c.condition("RemoteStandingIn", "my-model")

    def slice(self) -> Any | None:
        discovery = kubernetes.client.DiscoveryV1Api(self.c.kube.api_client)
        try:
            return discovery.read_namespaced_endpoint_slice(SLICE, self.c.namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def scale(self, replicas: int) -> float:
        started = time.monotonic()
        done = self.c.kube.kubectl(
            "scale", "deployment/php-apache", f"--replicas={replicas}", "-n", self.c.namespace
        )
        assert done.returncode == 0, done.stderr
        return started

    def gateway_pod_ips(self) -> set[str]:
        selector = GATEWAY_SELECTOR
        return {p.status.pod_ip for p in self.c.ready_pods(selector)}


@pytest.fixture
def env(kube, namespace, modeldeployment_crd, run_webhook, tmp_path) -> Iterator[Env]:
    first = random.randrange(20000, 28000, 100)
    ports = (first, first + 99)
    server = start_controller(
        run_webhook,
        kube,
        namespace,
        tmp_path,
        "--gateway-selector", GATEWAY_SELECTOR,
        "--gateway-namespace", namespace,
        "--gateway-ports", f"{ports[0]}-{ports[1]}",
    )  # fmt: skip
    wait_until("the webhook's cache", lambda: server.get("/readyz") == 200, 60, alive=[server.process])
    admission = kubernetes.client.AdmissionregistrationV1Api(kube.api_client)
    name = f"offload-e2e-standin-{namespace}"[:63]
    admission.create_mutating_webhook_configuration(
        mutating_webhook_configuration(name, server.url("/mutate-pods"), server.ca_bundle, namespace)
    )
    c = Cluster(kube, namespace, server)
    apply(kube, [gateway_deployment(2)], namespace)
    c.wait("2 ready gateway pods", lambda: len(c.ready_pods(GATEWAY_SELECTOR)) == 2)
    with LoopThread() as lt:
        remote = lt.run(Upstream.started("remote"))
        gateway = GatewayProcess(tmp_path / "gateway", kube.kubeconfig, namespace)
        c.alive.append(gateway.process)
        recorder = Recorder(kube.api_client, namespace, "run=php-apache").start()
        try:
            yield Env(c, remote, gateway, recorder, ports)
        finally:
            recorder.stop()
            admission.delete_mutating_webhook_configuration(name)
            for md in c.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
                c.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, md["metadata"]["name"]
                )
            c.wait(
                "every ModelDeployment gone",
                lambda: (
                    not c.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
                ),
            )
            gateway.stop()
            lt.run(remote.kill())


def tutorial(e: Env, **behavior: Any) -> dict[str, Any]:
    """The ModelDeployment first (so the tutorial's pods are injected), then the tutorial's
    Deployment and Service, until the first pod serves and the remote no longer stands in for
    it (the handover after its start is over); returns the ModelDeployment as applied."""
    doc = tutorial_modeldeployment(e.c.namespace, e.remote.port, **behavior)
    apply(e.c.kube, [doc], e.c.namespace)
    apply(e.c.kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), e.c.namespace)
    e.c.wait("a ready php-apache pod", lambda: len(e.c.ready_pods("run=php-apache")) == 1, 60)
    e.c.wait("a gateway port", lambda: isinstance(e.standin().get("port"), int))
    e.c.wait("LocalReplicasReady", lambda: e.condition().get("reason") == "LocalReplicasReady", 30)
    e.c.wait("no stand-in slice", lambda: e.slice() is None, 15)
    return doc


def test_scaled_to_zero_the_gateway_serves_the_remote_until_a_pod_is_ready_again(env):
    e = env
    c = e.c
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "remote-api"},
        "data": {"apiKey": base64.b64encode(API_KEY.encode()).decode()},
    }
    apply(c.kube, [secret], c.namespace)
    doc = tutorial_modeldeployment(c.namespace, e.remote.port)
    doc["spec"]["offloadingConfig"]["remoteBackend"]["headersFromSecrets"] = [
        {"name": "X-Api-Key", "secretKeyRef": {"name": "remote-api", "key": "apiKey"}}
    ]
    apply(c.kube, [doc], c.namespace)
    apply(c.kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), c.namespace)
    c.wait("the Service captured", lambda: c.captured("php-apache"), 60)
    c.wait("a gateway port", lambda: isinstance(e.standin().get("port"), int))
    port = e.standin()["port"]
    assert e.ports[0] <= port <= e.ports[1]
    # The remote stood in while the first pod was starting, and no longer does.
    c.wait("the local pod serving", lambda: e.standin().get("active") is False)
    assert e.standin()["portName"] == ""  # the tutorial's port is unnamed
    assert (e.condition()["status"], e.condition()["reason"]) == ("False", "LocalReplicasReady")
    assert e.slice() is None
    c.wait("the gateway listening on it", lambda: e.gateway.listening(f"{c.namespace}/my-model", port))

    # -- the last pod goes: the Service's endpoints become the gateway's --
    # (The remote already stood in while the first pod was starting: an Event each time.)
    started_before = len(c.events("RemoteStandingIn", "my-model"))
    stood_down_before = len(c.events("RemoteStoodDown", "my-model"))
    scaled = e.scale(0)
    c.wait("the stand-in slice", lambda: e.recorder.slice_event("ADDED", scaled) is not None, 15)
    gone = e.recorder.no_ready_pod_since(scaled)
    added, _ = e.recorder.slice_event("ADDED", scaled)
    assert gone is not None and added - gone < 5.0, f"slice {added - gone:.2f}s after the last ready pod went"
    written = e.slice()
    assert written.metadata.labels == {
        "kubernetes.io/service-name": "php-apache",
        "endpointslice.kubernetes.io/managed-by": "controller.offload.beamlit.com",
        "offload.beamlit.com/modeldeployment": "my-model",
    }
    assert [(p.name, p.port, p.protocol) for p in written.ports] == [("", port, "TCP")]
    assert {a for ep in written.endpoints for a in ep.addresses} == e.gateway_pod_ips()
    assert all(ep.conditions.ready for ep in written.endpoints)
    # The Service's own slice has no ready endpoint left: kube-proxy sends the ClusterIP to ours.
    discovery = kubernetes.client.DiscoveryV1Api(c.kube.api_client)
    theirs = discovery.list_namespaced_endpoint_slice(
        c.namespace,
        label_selector="kubernetes.io/service-name=php-apache,"
        "endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io",
    ).items
    assert theirs and not [ep for s in theirs for ep in s.endpoints or [] if ep.conditions.ready]

    c.wait("RemoteStandingIn True", lambda: e.condition().get("status") == "True")
    assert e.condition()["reason"] == "ScaledToZero"
    assert "Deployment php-apache is scaled to zero" in e.condition()["message"]
    assert f"http://127.0.0.1:{e.remote.port}" in e.condition()["message"]
    assert e.standin()["active"] is True
    assert len(c.events("RemoteStandingIn", "my-model")) == started_before + 1
    printed = c.kube.kubectl("get", "mdd", "my-model", "-n", c.namespace)
    header, row = printed.stdout.splitlines()[:2]
    assert header.split()[-2:] == ["STAND-IN", "AGE"] and row.split()[-2] == "true", printed.stdout

    # -- a request on the slice's port reaches the real remote, with its credentials --
    answer = httpx.get(f"http://127.0.0.1:{port}/index.php", headers={"Host": "php-apache"}, timeout=10)
    assert answer.status_code == 200 and answer.headers["x-upstream"] == "remote"
    (seen,) = e.remote.requests
    assert seen.header("host") == f"127.0.0.1:{e.remote.port}" and seen.header("x-api-key") == API_KEY

    # -- a pod is ready again: the slice goes, never before --
    up = e.scale(1)
    c.wait("the stand-in slice deleted", lambda: e.recorder.slice_event("DELETED", up) is not None, 60)
    ready = e.recorder.pod_ready_since(up)
    deleted, _ = e.recorder.slice_event("DELETED", up)
    assert ready is not None and ready <= deleted, "the slice went before any pod was ready"
    assert deleted - ready < 5.0, f"slice deleted {deleted - ready:.2f}s after a pod was ready"
    c.wait("RemoteStandingIn False", lambda: e.condition().get("reason") == "LocalReplicasReady")
    assert e.standin() == {"port": port, "active": False, "portName": ""}
    assert len(c.events("RemoteStoodDown", "my-model")) == stood_down_before + 1
    assert not e.recorder.errors
    # The gateway keeps its listener: what it was serving would have finished.
    assert e.gateway.listening(f"{c.namespace}/my-model", port)


def test_a_workload_with_no_ready_pod_is_stood_in_for_like_one_scaled_to_zero(env):
    e = env
    c = e.c
    tutorial(e)
    c.kube.kubectl("scale", "deployment/php-apache", "--replicas=2", "-n", c.namespace)
    c.wait("2 ready php-apache pods", lambda: len(c.ready_pods("run=php-apache")) == 2, 60)
    pods = c.ready_pods("run=php-apache")
    # As a kubelet reports a crash-looping container or a model still loading its weights.
    for pod in pods:
        c.core.patch_namespaced_pod_status(
            pod.metadata.name, c.namespace, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        )
    c.wait("the stand-in slice", lambda: e.slice() is not None, 15)
    c.wait("RemoteStandingIn True", lambda: e.condition().get("status") == "True")
    assert e.condition()["reason"] == "NoReadyReplica", e.condition()
    assert "has 0 ready of 2 pods" in e.condition()["message"]
    assert {a for ep in e.slice().endpoints for a in ep.addresses} == e.gateway_pod_ips()

    c.core.patch_namespaced_pod_status(
        pods[0].metadata.name, c.namespace, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    c.wait("the slice gone once a pod is ready", lambda: e.slice() is None, 15)
    c.wait("LocalReplicasReady", lambda: e.condition().get("reason") == "LocalReplicasReady")


def test_a_gateway_pod_that_stops_being_ready_leaves_the_slice(env):
    e = env
    c = e.c
    tutorial(e)
    e.scale(0)
    c.wait("the stand-in slice", lambda: e.slice() is not None and len(e.slice().endpoints) == 2, 15)
    leaving = c.ready_pods(GATEWAY_SELECTOR)[0]
    c.core.delete_namespaced_pod(leaving.metadata.name, c.namespace)
    # By name: kwok may give its replacement the same address.
    c.wait(
        "the leaving gateway pod out of the slice",
        lambda: leaving.metadata.name not in {ep.target_ref.name for ep in e.slice().endpoints},
        15,
    )
    c.wait("its replacement in", lambda: len(e.slice().endpoints) == 2, 30)


def test_without_any_remote_nothing_stands_in_and_the_condition_says_why(env):
    e = env
    c = e.c
    doc = tutorial_modeldeployment(c.namespace, e.remote.port)
    del doc["spec"]["offloadingConfig"]["remoteBackend"]
    doc["spec"]["offloadingConfig"]["metrics"] = []  # with metrics a remote is required
    apply(c.kube, [doc], c.namespace)
    apply(c.kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), c.namespace)
    c.wait("a ready php-apache pod", lambda: len(c.ready_pods("run=php-apache")) == 1, 60)
    c.wait("LocalReplicasReady", lambda: e.condition().get("reason") == "LocalReplicasReady")
    warned = len(c.events("NoRemote", "my-model"))  # the first pod's start may have warned already
    e.scale(0)
    c.wait("RemoteStandingIn NoRemote", lambda: e.condition().get("reason") == "NoRemote", 15)
    assert e.condition()["status"] == "False"
    assert "no remote backend" in e.condition()["message"]
    c.wait("a Warning Event", lambda: len(c.events("NoRemote", "my-model")) == warned + 1)
    assert {event.type for event in c.events("NoRemote", "my-model")} == {"Warning"}
    assert e.slice() is None and e.standin() == {}
    assert e.gateway.status()["modelDeployments"] == {}


def test_the_hold_waits_for_a_local_pod_then_sends_to_the_remote(env):
    e = env
    c = e.c
    tutorial(e, coldStartHoldSeconds=2)
    c.wait("the Service captured", lambda: c.captured("php-apache"), 60)
    port = e.standin()["port"]
    key = f"{c.namespace}/my-model"
    c.wait("the gateway listening", lambda: e.gateway.listening(key, port))
    # The gateway follows the Service's own EndpointSlices: the ready pod, by the Service port's
    # name, on the port the Service resolves in it (captured: the sidecar's offload-proxy).
    pod_ip = c.ready_pods("run=php-apache")[0].status.pod_ip

    def local_pods() -> list[str]:
        return e.gateway.status()["modelDeployments"][key]["localPods"]["ready"]

    c.wait("the ready pod seen by the gateway", lambda: local_pods() == [f"{pod_ip}:15080"])
    e.scale(0)
    c.wait("no ready pod seen by the gateway", lambda: local_pods() == [])
    c.wait("the stand-in slice", lambda: e.slice() is not None, 15)
    c.wait("RemoteStandingIn True", lambda: e.condition().get("status") == "True")
    assert "after holding each request up to 2s for a local pod" in e.condition()["message"]
    started = time.monotonic()
    answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert answer.headers["x-upstream"] == "remote"
    assert time.monotonic() - started >= 2.0
    lane = e.gateway.status()["modelDeployments"][key]["localPods"]
    assert (lane["heldTotal"], lane["holdExpiredTotal"]) == (1, 1)
