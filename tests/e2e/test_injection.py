"""Sidecar injection as the real API server drives it: offload-webhook runs as a local
process (watching the control plane through a kubeconfig), registered by a
MutatingWebhookConfiguration whose clientConfig.url points at it, failurePolicy Ignore.

Pods of the tutorial's Deployment, named by a ModelDeployment, come up (kwok runs them)
with the sidecar exactly once; an unrelated Deployment's pods do not get it; with the
webhook stopped, pods are still created; and every golden patched pod is accepted by
the API server's own validation."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from tests import modeldeployments as md
from tests.e2e import objects
from tests.e2e.controlplane.admission import mutating_webhook_configuration
from tests.e2e.controlplane.process import wait_until
from tests.e2e.controlplane.webhook_process import WebhookServer, injector_config
from tests.e2e.paths import REPO_ROOT, TUTORIAL_CLUSTER_A

pytestmark = pytest.mark.e2e

GOLDEN = REPO_ROOT / "tests" / "testdata" / "inject"
SIDECAR = "offload-proxy"
INJECTOR_CONFIG = injector_config("e2e-1")


@pytest.fixture
def injector(kube, namespace, modeldeployment_crd, run_webhook, tmp_path) -> Iterator[WebhookServer]:
    """offload-webhook --injector-config, ready (cache synced), registered for `namespace`."""
    config = tmp_path / "injector.yaml"
    config.write_text(INJECTOR_CONFIG)
    server = run_webhook(
        "--injector-config",
        str(config),
        "--log-level",
        "debug",
        # Injection alone: the controller has tests of its own (test_controller.py).
        "--controller",
        "off",
        "--leader-election-namespace",
        namespace,
        env={"KUBECONFIG": str(kube.kubeconfig)},
    )
    wait_until(
        "the webhook's cache to sync (/readyz 200)",
        lambda: server.get("/readyz") == 200,
        60,
        alive=[server.process, *kube.processes],
    )
    name = f"offload-e2e-inject-{namespace}"[:63]
    admission = kubernetes.client.AdmissionregistrationV1Api(kube.api_client)
    admission.create_mutating_webhook_configuration(
        mutating_webhook_configuration(name, server.url("/mutate-pods"), server.ca_bundle, namespace)
    )
    try:
        yield server
    finally:
        admission.delete_mutating_webhook_configuration(name)


def apply_tutorial(kube, namespace: str, replicas: int) -> None:
    deployment, service = yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())
    deployment["spec"]["replicas"] = replicas
    apps = kubernetes.client.AppsV1Api(kube.api_client)
    core = kubernetes.client.CoreV1Api(kube.api_client)
    core.create_namespaced_service(namespace, service)
    apps.create_namespaced_deployment(namespace, deployment)


def create_modeldeployment(kube, namespace: str) -> None:
    doc = md.tutorial()
    doc["spec"]["modelSourceRef"]["namespace"] = namespace
    doc["spec"]["serviceRef"]["namespace"] = namespace
    kubernetes.client.CustomObjectsApi(kube.api_client).create_namespaced_custom_object(
        md.GROUP, md.VERSION, namespace, md.PLURAL, doc
    )


def unrelated_deployment(name: str, replicas: int) -> dict:
    web = {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}
    return objects.deployment(name, [web], labels={"app": name}, replicas=replicas)


def sidecars(pod) -> list:
    containers = (pod.spec.init_containers or []) + pod.spec.containers
    return [c for c in containers if c.name == SIDECAR]


def running_pods(kube, namespace: str, selector: str, count: int) -> list:
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def pods():
        items = core.list_namespaced_pod(namespace, label_selector=selector).items
        return [p for p in items if p.metadata.deletion_timestamp is None]

    wait_until(
        f"{count} running pods {selector}",
        lambda: len([p for p in pods() if p.status.phase == "Running"]) == count,
        90,
        alive=kube.processes,
    )
    return pods()


def dry_run_injects(kube, namespace: str) -> bool:
    """Does the webhook inject a pod of php-apache now? (Server-side dry run: nothing stored.)"""
    core = kubernetes.client.CoreV1Api(kube.api_client)
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "probe-", "labels": {"run": "php-apache"}},
        "spec": {
            "containers": [
                {
                    "name": "php-apache",
                    "image": "registry.k8s.io/hpa-example",
                    "ports": [{"containerPort": 80}],
                }
            ]
        },
    }
    created = core.create_namespaced_pod(namespace, probe, dry_run="All")
    return len(sidecars(created)) == 1


def test_pods_of_a_referenced_deployment_get_the_sidecar_once_and_others_do_not(kube, namespace, injector):
    create_modeldeployment(kube, namespace)
    apply_tutorial(kube, namespace, replicas=0)
    wait_until(
        "the webhook to see the ModelDeployment, Deployment and Service",
        lambda: dry_run_injects(kube, namespace),
        30,
        alive=[injector.process, *kube.processes],
    )

    apps = kubernetes.client.AppsV1Api(kube.api_client)
    apps.patch_namespaced_deployment_scale("php-apache", namespace, {"spec": {"replicas": 2}})
    apps.create_namespaced_deployment(namespace, unrelated_deployment("web", 1))

    for pod in running_pods(kube, namespace, "run=php-apache", 2):
        [sidecar] = sidecars(pod)
        assert pod.spec.init_containers[-1].name == SIDECAR and sidecar.restart_policy == "Always"
        assert sidecar.image == "ghcr.io/model-offloading/offload:e2e"
        assert {p.name: p.container_port for p in sidecar.ports} == {
            "offload-proxy": 15080,
            "offload-admin": 15090,
        }
        env = {e.name: e.value for e in sidecar.env}
        assert env["MODELDEPLOYMENT_NAME"] == "my-model" and env["OFFLOAD_UPSTREAM"] == "127.0.0.1:80"
        assert sidecar.security_context.run_as_non_root and sidecar.security_context.read_only_root_filesystem
        assert pod.metadata.annotations["offload.beamlit.com/injected"] == "my-model"
        assert pod.metadata.annotations["offload.beamlit.com/injector-config-version"] == "e2e-1"
        # The model container is untouched.
        assert [c.name for c in pod.spec.containers] == ["php-apache"]

    [web] = running_pods(kube, namespace, "app=web", 1)
    assert sidecars(web) == [] and "offload.beamlit.com/injected" not in (web.metadata.annotations or {})
    log = injector.process.log_path.read_text()
    assert "reason=Injected modeldeployment=my-model" in log
    assert "reason=NoMatchingModelDeployment" in log  # the web pod, logged with its stable reason


def test_with_the_webhook_stopped_pods_are_still_created(kube, namespace, injector):
    create_modeldeployment(kube, namespace)
    apply_tutorial(kube, namespace, replicas=0)
    wait_until(
        "the webhook to see the ModelDeployment",
        lambda: dry_run_injects(kube, namespace),
        30,
        alive=[injector.process, *kube.processes],
    )
    apps = kubernetes.client.AppsV1Api(kube.api_client)
    apps.patch_namespaced_deployment_scale("php-apache", namespace, {"spec": {"replicas": 1}})
    [injected] = running_pods(kube, namespace, "run=php-apache", 1)
    assert len(sidecars(injected)) == 1

    injector.stop()  # the webhook configuration stays registered, pointing at nothing
    started = time.monotonic()
    apps.patch_namespaced_deployment_scale("php-apache", namespace, {"spec": {"replicas": 2}})
    pods = running_pods(kube, namespace, "run=php-apache", 2)
    assert time.monotonic() - started < 60
    # failurePolicy Ignore: the new pod was admitted without the sidecar; the old one keeps it.
    assert sorted(len(sidecars(p)) for p in pods) == [0, 1]
    core = kubernetes.client.CoreV1Api(kube.api_client)
    direct = core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "while-down", "labels": {"run": "php-apache"}},
            "spec": {"containers": [{"name": "php-apache", "image": "registry.k8s.io/hpa-example"}]},
        },
    )
    assert sidecars(direct) == []


@pytest.mark.parametrize(
    "case", sorted(p.name[: -len(".patched.yaml")] for p in GOLDEN.glob("*.patched.yaml"))
)
def test_the_api_server_accepts_every_golden_patched_pod(kube, namespace, case):
    """Server-side dry run of each patched pod: the API server's Pod validation, for real."""
    pod = yaml.safe_load((GOLDEN / f"{case}.patched.yaml").read_text())
    pod = copy.deepcopy(pod)
    pod["metadata"].pop("namespace", None)
    pod["metadata"].pop("ownerReferences", None)  # their owners do not exist here
    core = kubernetes.client.CoreV1Api(kube.api_client)
    created = core.create_namespaced_pod(namespace, pod, dry_run="All")
    assert len(sidecars(created)) == int(
        Path(GOLDEN / f"{case}.patch.json").read_text().strip() != "[]" or case == "already-injected"
    )
