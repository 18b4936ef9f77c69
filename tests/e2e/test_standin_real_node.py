"""The remote standing in for a workload with no ready pod, on the real node: the chart's
gateway pods run ``offload-sidecar --mode gateway`` from the image built here, the
controller's EndpointSlice points the Service at them, and kube-proxy sends real requests
for the Service's ClusterIP there, on to the remote ("cluster B": the same model server in
another namespace, reached by its ClusterIP, as in the tutorial)."""

from __future__ import annotations

import time

import kubernetes
import pytest

from tests import modeldeployments as md
from tests.e2e.controlplane.process import wait_until
from tests.e2e.node.release import NAMESPACE
from tests.e2e.node.traffic import Load, get, wait_until_serving
from tests.e2e.node.workloads import cluster_ip, model_deployment, rollout, running_pods, service
from tests.e2e.objects import apply

pytestmark = pytest.mark.e2e

SLICE = "php-apache-offload-standin"


def served_by(ip: str) -> str | None:
    return get(ip, 80, timeout=5).served_by


def test_scaled_to_zero_the_clusterip_is_served_by_the_remote_and_nothing_fails_when_it_comes_back(
    real_node, node_release, node_namespace
):
    ns = node_namespace
    gateways = running_pods(real_node, NAMESPACE, "app.kubernetes.io/component=gateway")
    assert len(gateways) == 2 and all(p.status.container_statuses[0].ready for p in gateways)
    apply(real_node, [model_deployment("cluster-b", served_by="cluster-b"), service("cluster-b")], ns)
    rollout(real_node, ns, "cluster-b")
    remote = f"{cluster_ip(real_node, ns, 'cluster-b')}:80"
    doc = md.variant(
        "my-model",
        {
            "spec.modelSourceRef.namespace": ns,
            "spec.serviceRef.namespace": ns,
            "spec.offloadingConfig.remoteBackend.host": remote,
        },
    )
    apply(real_node, [doc], ns)  # first, so the model's pods get the sidecar
    apply(real_node, [model_deployment("php-apache"), service("php-apache")], ns)
    rollout(real_node, ns, "php-apache")
    ip = cluster_ip(real_node, ns, "php-apache")
    wait_until_serving(ip, 80)
    custom = kubernetes.client.CustomObjectsApi(real_node.api_client)

    def stand_in() -> dict:
        obj = custom.get_namespaced_custom_object(md.GROUP, md.VERSION, ns, md.PLURAL, "my-model")
        return (obj.get("status") or {}).get("standIn") or {}

    # The remote stood in while the first pod started; once it is ready, the pod serves.
    wait_until("a gateway port", lambda: stand_in().get("active") is False and "port" in stand_in(), 60)
    wait_until("php-apache serving", lambda: (served_by(ip) or "").startswith("php-apache"), 30, interval=0.1)

    # -- the last pod goes: the ClusterIP answers from cluster B, through the gateway --
    with Load(ip, 80, clients=2) as going:
        scaled = time.monotonic()
        done = real_node.kubectl("scale", "deployment/php-apache", "--replicas=0", "-n", ns)
        assert done.returncode == 0, done.stderr
        wait_until("cluster B answering", lambda: going.since(scaled).by_backend().get("cluster-b"), 30)
        switched = min(o.started for o in going.since(scaled).outcomes if o.served_by == "cluster-b") - scaled
        # The terminating pod serves what kube-proxy still sends it until it is gone.
        wait_until("the php-apache pods gone", lambda: not _pods(real_node, ns), 60)
        gone = time.monotonic()
        wait_until("a few requests after that", lambda: len(going.since(gone).outcomes) >= 20, 30)
    after = going.since(gone)
    assert after.by_backend() == {"cluster-b": len(after.outcomes)}, [o.error for o in after.failed][:5]
    during = going.since(scaled)
    print(
        f"scaled to zero -> first answer from cluster B at the ClusterIP {switched:.2f}s; "
        f"{len(during.failed)} of {len(during.outcomes)} requests failed during the switch"
    )
    discovery = kubernetes.client.DiscoveryV1Api(real_node.api_client)
    written = discovery.read_namespaced_endpoint_slice(SLICE, ns)
    assert {ep.target_ref.name for ep in written.endpoints} == {p.metadata.name for p in gateways}
    assert written.ports[0].port == stand_in()["port"]

    # -- a pod comes back: no request fails while the Service goes back to it --
    with Load(ip, 80, clients=2) as load:
        done = real_node.kubectl("scale", "deployment/php-apache", "--replicas=1", "-n", ns)
        assert done.returncode == 0, done.stderr
        rollout(real_node, ns, "php-apache")
        wait_until("the stand-in slice gone", lambda: not _exists(discovery, ns), 30)
        back = time.monotonic()
        wait_until(
            "php-apache answering again, 10 times",
            lambda: (
                len([o for o in load.since(back).outcomes if (o.served_by or "").startswith("php-apache")])
                >= 10
            ),
            30,
        )
    tally = load.tally
    assert tally.outcomes and not tally.failed, [o.error for o in tally.failed][:5]
    backends = tally.by_backend(lambda pod: "cluster-b" if pod == "cluster-b" else "php-apache")
    print(f"pod back: {len(tally.outcomes)} requests, none failed, served by {backends}")
    assert set(backends) == {"cluster-b", "php-apache"}, backends


def _pods(cluster, ns: str) -> list:
    core = kubernetes.client.CoreV1Api(cluster.api_client)
    return core.list_namespaced_pod(ns, label_selector="run=php-apache").items


def _exists(discovery, ns: str) -> bool:
    try:
        discovery.read_namespaced_endpoint_slice(SLICE, ns)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
