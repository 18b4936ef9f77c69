"""Objects the real-node tests apply, and waits on what the kubelet reports about them."""

from __future__ import annotations

import json
from typing import Any

import kubernetes

from tests.e2e import objects
from tests.e2e.controlplane.process import wait_until

MODEL_IMAGE = "localhost/offload-e2e-model:1"  # tests/e2e/node/images/model, built here


def model_deployment(
    name: str, *, replicas: int = 1, served_by: str | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Deployment of the CPU-burning model server on port 80, requests 200m, limit 500m
    (the tutorial's php-apache). `served_by` overrides the pod name in X-Served-By."""
    labels = labels or {"run": name}
    container: dict[str, Any] = {
        "name": name,
        "image": MODEL_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": 80}],
        "resources": {"limits": {"cpu": "500m"}, "requests": {"cpu": "200m"}},
    }
    if served_by:
        container["env"] = [{"name": "SERVED_BY", "value": served_by}]
    return objects.deployment(name, [container], labels=labels, replicas=replicas)


def service(
    name: str, *, selector: dict[str, str] | None = None, cluster_ip: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"port": 80}], "selector": selector or {"run": name}}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"run": name}},
        "spec": spec,
    }


def rollout(cluster, namespace: str, deployment: str, timeout: float = 180) -> None:
    """Waits until the Deployment's rollout is complete (every new pod Ready, old ones gone)."""
    done = cluster.kubectl(
        "rollout", "status", "-n", namespace, f"deployment/{deployment}", f"--timeout={int(timeout)}s",
        timeout=timeout + 30,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"rollout of {namespace}/{deployment}: {done.stdout}{done.stderr}\n"
        + describe_pods(cluster, namespace)
    )


def describe_pods(cluster, namespace: str) -> str:
    """The pods' states and recent events, for a failure message."""
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide")
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp")
    return f"{pods.stdout}{pods.stderr}\n{events.stdout[-4000:]}"


def running_pods(cluster, namespace: str, selector: str) -> list[kubernetes.client.V1Pod]:
    core = kubernetes.client.CoreV1Api(cluster.api_client)
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None and p.status.phase == "Running"]


def cluster_ip(cluster, namespace: str, name: str) -> str:
    core = kubernetes.client.CoreV1Api(cluster.api_client)
    return core.read_namespaced_service(name, namespace).spec.cluster_ip


def pod_json(cluster, namespace: str, name: str) -> dict[str, Any]:
    done = cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for_endpoints(cluster, namespace: str, service_name: str, count: int, timeout: float = 60) -> None:
    """Waits until the Service has `count` ready endpoints (what kube-proxy balances over)."""
    discovery = kubernetes.client.DiscoveryV1Api(cluster.api_client)

    def ready() -> bool:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service_name}"
        ).items
        addresses = [e for s in slices for e in (s.endpoints or []) if e.conditions and e.conditions.ready]
        return len(addresses) == count

    wait_until(
        f"{count} ready endpoints of {namespace}/{service_name}", ready, timeout, alive=cluster.processes
    )
