"""The chart on the real node, with the image built here (tests/e2e/node/build-images.sh):
the webhook pods really run offload-webhook, become Ready (their readiness needs their
watches synced through the `kubernetes` Service with their projected token), pass the
restricted Pod Security Standard that their namespace enforces, and the API server calls
them over TLS verified with the chart's caBundle."""

from __future__ import annotations

import kubernetes
import pytest

from tests import modeldeployments as md
from tests.e2e.node.release import NAMESPACE

pytestmark = pytest.mark.e2e


def _webhook_pods(cluster) -> list[kubernetes.client.V1Pod]:
    pods = kubernetes.client.CoreV1Api(cluster.api_client).list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/component=webhook"
    )
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


def test_the_webhook_pods_run_the_local_image_and_become_ready(real_node, node_release):
    pods = _webhook_pods(real_node)
    assert len(pods) == 2
    for pod in pods:
        (container,) = pod.spec.containers
        assert container.image == "localhost/offload:0.1.0"
        (status,) = pod.status.container_statuses
        assert status.ready and status.state.running is not None, status
        assert status.image_id, status  # the runtime resolved the image it runs
        conditions = {c.type: c.status for c in pod.status.conditions}
        assert conditions["Ready"] == "True"
    logs = real_node.kubectl("logs", "-n", NAMESPACE, pods[0].metadata.name)
    assert logs.returncode == 0, logs.stderr
    assert "Uvicorn running" in logs.stdout + logs.stderr or "offload-webhook" in logs.stdout + logs.stderr, (
        logs.stdout[-2000:]
    )


def test_the_image_runs_non_root_read_only_without_a_shell(real_node, node_release):
    pod = _webhook_pods(real_node)[0].metadata.name

    def exec_(*argv: str):
        return real_node.kubectl("exec", "-n", NAMESPACE, pod, "--", *argv)

    ident = exec_("python3", "-c", "import os; print(os.getuid(), os.getgid())")
    assert ident.returncode == 0, ident.stderr
    assert ident.stdout.split() == ["65532", "65532"]
    written = exec_("python3", "-c", "open('/opt/offload/x', 'w')")
    assert written.returncode != 0 and "Read-only file system" in written.stderr, written.stderr
    for shell in ("sh", "bash", "/bin/sh"):
        ran = exec_(shell, "-c", "true")
        assert ran.returncode != 0, f"{shell} exists in the image"
        assert "executable file not found" in ran.stderr or "no such file" in ran.stderr, ran.stderr


def test_the_restricted_pod_security_standard_is_enforced_in_the_release_namespace(real_node, node_release):
    """The webhook pods run there (they pass it); a pod that does not is refused."""
    assert len(_webhook_pods(real_node)) == 2
    ns = kubernetes.client.CoreV1Api(real_node.api_client).read_namespace(NAMESPACE)
    assert ns.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    refused = real_node.kubectl(
        "run", "-n", NAMESPACE, "root-pod", "--image=localhost/offload:0.1.0", "--restart=Never",
        "--overrides", '{"spec": {"securityContext": {"runAsUser": 0}}}', "--", "offload-webhook", "--help",
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr


def test_the_api_server_calls_the_webhook_pods_through_the_chart_ca_bundle(
    real_node, node_release, node_namespace
):
    """A ModelDeployment only our webhook can judge: the API server's call reaches a webhook
    pod through the Service, verifies it with caBundle, and returns its verdict."""
    bad = md.variant("bad-host", {"spec.offloadingConfig.remoteBackend.host": "http://example.invalid"})
    for ref in ("modelSourceRef", "serviceRef"):
        bad["spec"][ref]["namespace"] = node_namespace
    refused = real_node.kubectl("apply", "-n", node_namespace, "-f", "-", stdin=md.as_yaml(bad))
    assert refused.returncode != 0, refused.stdout
    assert 'admission webhook "validate.modeldeployments.deployment.beamlit.com" denied the request' in (
        refused.stderr
    ), refused.stderr
    assert "spec.offloadingConfig.remoteBackend.host: must be host[:port] without a scheme" in refused.stderr
    good = md.variant("good", {})
    for ref in ("modelSourceRef", "serviceRef"):
        good["spec"][ref]["namespace"] = node_namespace
    admitted = real_node.kubectl("apply", "-n", node_namespace, "-f", "-", stdin=md.as_yaml(good))
    assert admitted.returncode == 0, admitted.stderr
