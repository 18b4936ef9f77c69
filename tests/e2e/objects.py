"""Objects in a real API server as the e2e tests write and read them: applied with kubectl
(a user's way, server-side defaults and all), and the ModelDeployment an admission refused
looked up to show it was never stored."""

from __future__ import annotations

from typing import Any

import kubernetes
import yaml

from crds.model import GROUP, PLURAL, VERSION


def apply(cluster: Any, docs: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
    """`kubectl apply` of `docs` (in `namespace` when given) against anything with a
    ``kubectl(*args, stdin=...)`` (a control plane, the real node's cluster); fails the test
    with kubectl's message when it refuses."""
    docs = docs if isinstance(docs, list) else [docs]
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    done = cluster.kubectl(*args, stdin=yaml.safe_dump_all(docs))
    assert done.returncode == 0, f"kubectl apply failed: {done.stderr}"


def deployment(
    name: str,
    containers: list[dict[str, Any]],
    *,
    labels: dict[str, str],
    replicas: int = 1,
    service_account: str | None = None,
) -> dict[str, Any]:
    """A Deployment `name` of `replicas` pods labelled `labels` (its selector too), running
    `containers` as the ServiceAccount `service_account` (the namespace's default: None)."""
    pod: dict[str, Any] = {"containers": containers}
    if service_account is not None:
        pod = {"serviceAccountName": service_account, **pod}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def vllm_container(cpu: str) -> dict[str, Any]:
    """The model server of the kwok tests' workloads (kwok runs no container): vLLM's image,
    port 8000 named http, requesting `cpu`."""
    return {
        "name": "model",
        "image": "vllm/vllm-openai:latest",
        "ports": [{"name": "http", "containerPort": 8000}],
        "resources": {"requests": {"cpu": cpu}},
    }


def modeldeployment_absent(api_client: kubernetes.client.ApiClient, namespace: str, name: str) -> bool:
    """True when the API server answers 404 for the ModelDeployment `namespace`/`name`."""
    api = kubernetes.client.CustomObjectsApi(api_client)
    try:
        api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except kubernetes.client.ApiException as exc:
        return exc.status == 404
    return False
