"""The control plane itself: real binaries at the pinned versions, and workloads that
behave as in a cluster (kwok runs the pods)."""

from __future__ import annotations

import ipaddress
import json
import subprocess

import kubernetes
import pytest
import yaml

from tests.e2e.controlplane.cluster import NODE_NAME, POD_CIDR
from tests.e2e.controlplane.process import wait_until
from tests.e2e.paths import TUTORIAL_CLUSTER_A

pytestmark = pytest.mark.e2e

KUBE_VERSION = "v1.34.4"


def test_api_server_serves_the_pinned_version(kube):
    info = kubernetes.client.VersionApi(kube.api_client).get_code()
    assert info.git_version == KUBE_VERSION
    assert kube.versions["kube-apiserver"] == f"Kubernetes {KUBE_VERSION}"
    assert kube.versions["kube-controller-manager"] == f"Kubernetes {KUBE_VERSION}"


def test_native_sidecars_are_accepted(kube, namespace):
    """Restartable init containers (native sidecars, GA since 1.33) are admitted and kept as such."""
    pod = {
        "metadata": {"name": "with-native-sidecar"},
        "spec": {
            "initContainers": [
                {"name": "proxy", "image": "example.invalid/proxy", "restartPolicy": "Always"}
            ],
            "containers": [{"name": "model", "image": "example.invalid/model"}],
        },
    }
    core = kubernetes.client.CoreV1Api(kube.api_client)
    core.create_namespaced_pod(namespace, pod)
    stored = core.read_namespaced_pod("with-native-sidecar", namespace)
    assert stored.spec.init_containers[0].restart_policy == "Always"
    wait_until(
        "the pod to run",
        lambda: _running_and_ready(core.read_namespaced_pod("with-native-sidecar", namespace)),
        60,
        alive=kube.processes,
    )


def test_tutorial_deployment_and_service_run_with_endpoints(kube, namespace):
    """The tutorial's Deployment and Service apply unchanged; the pods run, get IPs, and the
    Service's EndpointSlice lists them as ready; scaling up adds endpoints."""
    applied = kube.kubectl("apply", "-n", namespace, "-f", str(TUTORIAL_CLUSTER_A))
    assert applied.returncode == 0, applied.stderr
    assert "deployment.apps/php-apache created" in applied.stdout
    assert "service/php-apache created" in applied.stdout

    ips = _wait_for_ready_pods(kube, namespace, replicas=1)
    assert _endpoint_ips(kube, namespace, "php-apache", ips) == ips

    scaled = kube.kubectl("scale", "-n", namespace, "deployment/php-apache", "--replicas=3")
    assert scaled.returncode == 0, scaled.stderr
    ips = _wait_for_ready_pods(kube, namespace, replicas=3)
    assert len(ips) == 3
    assert _endpoint_ips(kube, namespace, "php-apache", ips) == ips


def test_tutorial_manifests_are_unchanged_from_the_tutorial():
    """Guards the 'applies unchanged' claim: the file is the tutorial's first-cluster YAML."""
    deployment, service = yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())
    assert deployment["kind"] == "Deployment" and deployment["metadata"] == {"name": "php-apache"}
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.k8s.io/hpa-example"
    assert service["kind"] == "Service" and service["spec"]["ports"] == [{"port": 80}]


# -- helpers -------------------------------------------------------------------------------


def _running_and_ready(pod) -> bool:
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    return pod.status.phase == "Running" and conditions.get("Ready") == "True" and bool(pod.status.pod_ip)


def _wait_for_ready_pods(kube, namespace: str, replicas: int) -> set[str]:
    """Waits for the Deployment to report `replicas` ready pods; returns their IPs."""
    apps = kubernetes.client.AppsV1Api(kube.api_client)
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def ready() -> bool:
        status = apps.read_namespaced_deployment("php-apache", namespace).status
        return status.ready_replicas == replicas and status.available_replicas == replicas

    wait_until(f"{replicas} ready php-apache replicas", ready, 90, alive=kube.processes)
    pods = core.list_namespaced_pod(namespace, label_selector="run=php-apache").items
    running = [p for p in pods if p.metadata.deletion_timestamp is None]
    assert len(running) == replicas
    for pod in running:
        assert _running_and_ready(pod), pod.status
        assert pod.spec.node_name == NODE_NAME
        assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(POD_CIDR, strict=False)
    ips = {p.status.pod_ip for p in running}
    assert len(ips) == replicas, "every pod has its own IP"
    return ips


def _endpoint_ips(kube, namespace: str, service: str, expected: set[str]) -> set[str]:
    """Waits until the Service's EndpointSlices list exactly `expected` as ready on port 80."""
    discovery = kubernetes.client.DiscoveryV1Api(kube.api_client)
    seen: set[str] = set()

    def listed() -> bool:
        nonlocal seen
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}"
        ).items
        seen = set()
        for eps in slices:
            assert [p.port for p in eps.ports or []] == [80]
            for endpoint in eps.endpoints or []:
                if endpoint.conditions.ready:
                    seen.update(endpoint.addresses)
        return seen == expected

    wait_until(f"EndpointSlice of {service} to list {sorted(expected)}", listed, 60, alive=kube.processes)
    return seen


def test_helm_reaches_the_api_server(kube):
    """helm (for the chart tests) is built and talks to this control plane."""
    listed = subprocess.run(
        [
            str(kube.binaries.helm),
            "list",
            "--all-namespaces",
            "--kubeconfig",
            str(kube.kubeconfig),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
