"""The offload chart installed with the real helm into the real control plane: the release
installs into a namespace that enforces the restricted Pod Security Standard, the CRD is
Established, the webhook configurations point at the chart's Service with the CA of the
chart's Secret, the webhook pods become Ready (kwok runs them), upgrades keep or renew the
certificate as documented, and an uninstall leaves nothing behind but the CRD.

kwok pods do not run the webhook's code, so nothing answers at the Service: the registered
ModelDeployment webhook (failurePolicy Fail) then refuses ModelDeployments, and the pod
webhook (Ignore) lets pods through. Both are asserted: they show that the API server really
consults the chart's configurations, with the failure policies the chart promises."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import kubernetes
import pytest
import yaml
from cryptography import x509

from tests.e2e.controlplane.kubeconfig import write_service_account_kubeconfig
from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.process import ManagedProcess, wait_until
from tests.e2e.paths import REPO_ROOT

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "offload"
RELEASE = "offload"
WEBHOOK = "offload-webhook"
SECRET = "offload-webhook-tls"
CRD_NAME = "modeldeployments.deployment.beamlit.com"
NOT_AFTER = "offload.beamlit.com/not-after"


@dataclass
class Release:
    kube: object
    namespace: str
    install_output: str

    def helm(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(self.kube.binaries.helm),
                *args,
                "--namespace",
                self.namespace,
                "--kubeconfig",
                str(self.kube.kubeconfig),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def upgrade(self, *values: str) -> None:
        upgraded = self.helm("upgrade", RELEASE, str(CHART), "--wait", "--timeout", "120s", *values)
        assert upgraded.returncode == 0, upgraded.stderr

    def secret_data(self) -> dict[str, bytes]:
        secret = kubernetes.client.CoreV1Api(self.kube.api_client).read_namespaced_secret(
            SECRET, self.namespace
        )
        return {key: base64.b64decode(value) for key, value in secret.data.items()}

    def ca_bundles(self) -> dict[str, bytes]:
        api = kubernetes.client.AdmissionregistrationV1Api(self.kube.api_client)
        validating = api.read_validating_webhook_configuration(WEBHOOK).webhooks[0]
        mutating = api.read_mutating_webhook_configuration(WEBHOOK).webhooks[0]
        return {
            "validating": validating.client_config.ca_bundle,
            "mutating": mutating.client_config.ca_bundle,
        }

    def pod_template_annotations(self) -> dict[str, str]:
        deployment = kubernetes.client.AppsV1Api(self.kube.api_client).read_namespaced_deployment(
            WEBHOOK, self.namespace
        )
        return deployment.spec.template.metadata.annotations


def _ca_subjects(bundle_b64: str | bytes) -> list[x509.Certificate]:
    raw = bundle_b64 if isinstance(bundle_b64, bytes) else bundle_b64.encode()
    return x509.load_pem_x509_certificates(base64.b64decode(raw))


@pytest.fixture(scope="module")
def release(kube) -> Iterator[Release]:
    """The chart installed with default values into a fresh namespace that enforces the
    restricted Pod Security Standard; uninstalled (if still there) and deleted afterwards."""
    namespace = f"offload-chart-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(kube.api_client)
    core.create_namespace(
        {
            "metadata": {
                "name": namespace,
                "labels": {"offload-e2e": "true", "pod-security.kubernetes.io/enforce": "restricted"},
            }
        }
    )
    rel = Release(kube, namespace, "")
    try:
        installed = rel.helm("install", RELEASE, str(CHART), "--wait", "--timeout", "120s")
        assert installed.returncode == 0, f"helm install failed:\n{installed.stderr}\n{installed.stdout}"
        rel.install_output = installed.stdout
        yield rel
    finally:
        rel.helm("uninstall", RELEASE, "--wait", "--ignore-not-found")
        core.delete_namespace(namespace, propagation_policy="Background")


def test_release_installs_and_says_what_to_do_next(release):
    listed = release.helm("list", "-o", "json")
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == RELEASE and entry["status"] == "deployed" and entry["chart"] == "offload-0.1.0"
    notes = release.install_output
    assert "kind: ModelDeployment" in notes and "kubectl get mdd" in notes
    assert f"kubectl -n {release.namespace} rollout status deployment/{WEBHOOK}" in notes


def test_crd_is_established(release):
    crd = kubernetes.client.ApiextensionsV1Api(release.kube.api_client).read_custom_resource_definition(
        CRD_NAME
    )
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True"
    assert crd.spec.names.short_names == ["mdd"]


def test_webhook_pods_become_ready_under_the_restricted_pod_security_standard(release):
    apps = kubernetes.client.AppsV1Api(release.kube.api_client)
    status = apps.read_namespaced_deployment(WEBHOOK, release.namespace).status
    assert status.ready_replicas == 2 and status.available_replicas == 2
    pods = kubernetes.client.CoreV1Api(release.kube.api_client).list_namespaced_pod(
        release.namespace, label_selector="app.kubernetes.io/component=webhook"
    )
    running = [p for p in pods.items if p.metadata.deletion_timestamp is None]
    assert len(running) == 2
    for pod in running:
        assert pod.spec.security_context.run_as_non_root is True
        assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
        ready = {c.type: c.status for c in pod.status.conditions}
        assert ready["Ready"] == "True"
    pdb = kubernetes.client.PolicyV1Api(release.kube.api_client).read_namespaced_pod_disruption_budget(
        WEBHOOK, release.namespace
    )
    assert pdb.spec.min_available == 1


def test_webhook_configurations_point_at_the_service_with_the_secret_ca(release):
    api = kubernetes.client.AdmissionregistrationV1Api(release.kube.api_client)
    validating = api.read_validating_webhook_configuration(WEBHOOK).webhooks[0]
    mutating = api.read_mutating_webhook_configuration(WEBHOOK).webhooks[0]
    secret = release.secret_data()
    for hook, path in ((validating, "/validate-modeldeployments"), (mutating, "/mutate-pods")):
        service = hook.client_config.service
        assert (service.name, service.namespace, service.path, service.port) == (
            WEBHOOK,
            release.namespace,
            path,
            443,
        )
        assert base64.b64decode(hook.client_config.ca_bundle) == secret["ca.crt"]
    assert validating.failure_policy == "Fail" and mutating.failure_policy == "Ignore"
    (ca,) = _ca_subjects(validating.client_config.ca_bundle)
    x509.load_pem_x509_certificate(secret["tls.crt"]).verify_directly_issued_by(ca)
    svc = kubernetes.client.CoreV1Api(release.kube.api_client).read_namespaced_service(
        WEBHOOK, release.namespace
    )
    assert [(p.port, p.target_port) for p in svc.spec.ports] == [(443, "https")]


def test_rbac_objects_exist_and_bind_the_webhook_service_account(release):
    rbac = kubernetes.client.RbacAuthorizationV1Api(release.kube.api_client)
    role = rbac.read_cluster_role(WEBHOOK)
    verbs = {verb for rule in role.rules for verb in rule.verbs}
    assert verbs == {"get", "list", "watch", "patch", "create", "delete", "bind"}
    binding = rbac.read_cluster_role_binding(WEBHOOK)
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", WEBHOOK, release.namespace)
    ]
    # The API server itself confirms what the webhook may and may not do.
    sa = f"system:serviceaccount:{release.namespace}:{WEBHOOK}"
    for verb, resource, allowed in [
        ("watch", "modeldeployments.deployment.beamlit.com", "yes"),
        ("list", "deployments.apps", "yes"),
        ("list", "statefulsets.apps", "yes"),
        ("get", "deployments.apps", "no"),  # a workload's selector comes from the watch cache
        ("watch", "services", "yes"),
        ("update", "services", "no"),
        ("update", "modeldeployments.deployment.beamlit.com", "no"),
        ("get", "secrets", "no"),
        ("create", "pods", "no"),
    ]:
        answer = release.kube.kubectl("auth", "can-i", verb, resource, "--as", sa, "-A")
        assert answer.stdout.strip() == allowed, (verb, resource, answer.stdout, answer.stderr)
    # The metrics the controller evaluates (APIs this control plane does not serve, hence a
    # SubjectAccessReview rather than kubectl auth can-i, which needs discovery).
    for verb, group, resource, allowed in [
        ("list", "metrics.k8s.io", "pods", True),
        ("get", "custom.metrics.k8s.io", "pods", True),
        ("list", "external.metrics.k8s.io", "queue_depth", True),
        ("create", "metrics.k8s.io", "pods", False),
    ]:
        assert _allowed(release.kube, sa, verb, group, resource, "models") is allowed, (verb, group, resource)


def test_sidecar_cluster_role_bound_as_the_controller_binds_it_grants_the_sidecar_role(release, namespace):
    """The RoleBinding the controller creates for a ModelDeployment (webhook.controller.rbac),
    applied to the chart's sidecar ClusterRole, lets the workload's service account read what
    the sidecar reads there, and nothing more."""
    from webhook.controller import rbac

    kube = release.kube
    role_file = yaml.safe_load((CHART / "files" / "sidecar-role.yaml").read_text())
    stored = kube.kubectl("get", "clusterrole", f"{RELEASE}-sidecar", "-o", "json")
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["rules"] == role_file["rules"]
    md = {
        "metadata": {
            "name": "my-model",
            "namespace": namespace,
            "uid": "00000000-0000-0000-0000-000000000001",
        }
    }
    binding = rbac.desired(md, f"{RELEASE}-sidecar", "default")
    del binding["metadata"]["ownerReferences"]  # no such ModelDeployment here
    applied = kube.kubectl("apply", "-f", "-", stdin=json.dumps(binding))
    assert applied.returncode == 0, applied.stderr
    sa = f"system:serviceaccount:{namespace}:default"
    for verb, group, resource, where, allowed in [
        ("watch", "deployment.beamlit.com", "modeldeployments", namespace, True),
        ("list", "deployment.beamlit.com", "modeldeployments", namespace, True),
        # The controller evaluates the metrics: the sidecar reads no pod, workload or metric.
        ("list", "", "pods", namespace, False),
        ("get", "apps", "deployments", namespace, False),
        ("list", "metrics.k8s.io", "pods", namespace, False),
        ("watch", "deployment.beamlit.com", "modeldeployments", "kube-system", False),
        ("get", "", "secrets", namespace, False),
        ("update", "deployment.beamlit.com", "modeldeployments", namespace, False),
    ]:
        assert _allowed(kube, sa, verb, group, resource, where) is allowed, (verb, group, resource, where)


def _allowed(kube, user: str, verb: str, group: str, resource: str, namespace: str) -> bool:
    """The API server's own authorization decision (a SubjectAccessReview)."""
    review = kubernetes.client.AuthorizationV1Api(kube.api_client).create_subject_access_review(
        {
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{user.split(':')[2]}"],
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "namespace": namespace,
                },
            }
        }
    )
    return review.status.allowed


def test_registered_webhooks_are_consulted_with_their_failure_policies(release, namespace):
    """Nothing answers behind the Service (kwok runs no code): the ModelDeployment webhook
    fails closed, the pod webhook fails open."""
    kube = release.kube
    md = (REPO_ROOT / "tests" / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
    created = kube.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=md.replace("namespace: default", f"namespace: {namespace}")
    )
    assert created.returncode != 0, "a ModelDeployment was admitted without its validating webhook answering"
    assert 'failed calling webhook "validate.modeldeployments.deployment.beamlit.com"' in created.stderr, (
        created.stderr
    )
    pod = {
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/c"}]},
    }
    kubernetes.client.CoreV1Api(kube.api_client).create_namespaced_pod(namespace, pod)


def test_offload_webhook_runs_as_the_chart_configures_it_and_syncs_with_its_rbac(release, tmp_path):
    """kwok runs no code, so the webhook pod's process is run here instead, exactly as the
    chart configures it: its arguments, its injector.yaml, its certificate from the Secret,
    and the webhook ServiceAccount's own token (so the chart's ClusterRole is all it may use).
    It becomes ready only once its watches have synced, which a missing permission prevents;
    the API server's client would verify it as here: caBundle, for the Service's name."""
    kube = release.kube
    ns = release.namespace
    core = kubernetes.client.CoreV1Api(kube.api_client)
    sa_kubeconfig = write_service_account_kubeconfig(
        tmp_path / "kubeconfig", kube, ns, WEBHOOK, duration="10m"
    )
    secret = release.secret_data()
    (tmp_path / "tls").mkdir()
    (tmp_path / "config").mkdir()
    for key in ("tls.crt", "tls.key"):
        (tmp_path / "tls" / key).write_bytes(secret[key])
    config_map = core.read_namespaced_config_map(WEBHOOK, ns)
    (tmp_path / "config" / "injector.yaml").write_text(config_map.data["injector.yaml"])
    deployment = kubernetes.client.AppsV1Api(kube.api_client).read_namespaced_deployment(WEBHOOK, ns)
    container = deployment.spec.template.spec.containers[0]
    args = [
        a.replace("=/tls/", f"={tmp_path}/tls/").replace("=/config/", f"={tmp_path}/config/")
        for a in container.args
        if not a.startswith("--port=")
    ]
    assert any(a.startswith("--injector-config=") for a in args), args
    port = free_port()
    exe = shutil.which(container.command[0])
    argv = [exe] if exe else [sys.executable, "-m", "webhook.cli"]
    argv += [*args, "--kubeconfig", str(sa_kubeconfig), "--host", "127.0.0.1", f"--port={port}"]
    process = ManagedProcess(WEBHOOK, argv, tmp_path / "webhook.log", cwd=REPO_ROOT, env={**os.environ})
    server_name = f"{WEBHOOK}.{ns}.svc"
    ctx = ssl.create_default_context(cadata=secret["ca.crt"].decode())
    try:
        wait_until(
            "offload-webhook /readyz (its watches synced with the chart's RBAC)",
            lambda: _readyz(port, ctx, server_name) == 200,
            60,
            alive=[process, *kube.processes],
        )
    finally:
        process.stop()


def test_the_gateway_runs_as_the_chart_configures_it_with_its_own_read_only_rbac(release, tmp_path):
    """The gateway's pods become Ready under the restricted standard; its process, run here
    with the chart's arguments and the gateway ServiceAccount's own token, syncs (its /readyz
    needs the ModelDeployment list), and that account reads no Secret and writes nothing."""
    kube = release.kube
    ns = release.namespace
    gateway = "offload-gateway"
    apps = kubernetes.client.AppsV1Api(kube.api_client)
    status = apps.read_namespaced_deployment(gateway, ns).status
    assert status.ready_replicas == 2
    sa_kubeconfig = write_service_account_kubeconfig(
        tmp_path / "kubeconfig", kube, ns, gateway, duration="10m"
    )
    container = apps.read_namespaced_deployment(gateway, ns).spec.template.spec.containers[0]
    admin_port = free_port()
    args = [a for a in container.args if not a.startswith("--admin-listen=")]
    exe = shutil.which(container.command[0])
    argv = [exe] if exe else [sys.executable, "-m", "sidecar.cli"]
    argv += [*args, "--kubeconfig", str(sa_kubeconfig), "--listen-host", "127.0.0.1"]
    argv += [f"--admin-listen=127.0.0.1:{admin_port}"]
    process = ManagedProcess(gateway, argv, tmp_path / "gateway.log", cwd=REPO_ROOT, env={**os.environ})
    try:
        wait_until(
            "the gateway's /readyz (its watch listed with the chart's RBAC)",
            lambda: _http_status(f"http://127.0.0.1:{admin_port}/readyz") == 200,
            60,
            alive=[process, *kube.processes],
        )
    finally:
        process.stop()
    account = f"system:serviceaccount:{ns}:{gateway}"
    for verb, group, resource, allowed in [
        ("watch", "deployment.beamlit.com", "modeldeployments", True),
        ("watch", "discovery.k8s.io", "endpointslices", True),
        ("get", "", "secrets", False),
        ("create", "discovery.k8s.io", "endpointslices", False),
        ("patch", "deployment.beamlit.com", "modeldeployments", False),
        ("list", "", "pods", False),
    ]:
        assert _allowed(kube, account, verb, group, resource, "default") is allowed, (verb, group, resource)


def _http_status(url: str) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _readyz(port: int, ctx: ssl.SSLContext, server_name: str) -> int | None:
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(f"GET /readyz HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            status_line = tls.recv(64).split(b"\r\n", 1)[0].split()
            return int(status_line[1])
    except (OSError, IndexError, ValueError):
        return None


def test_upgrade_keeps_the_certificate(release):
    before = (release.secret_data(), release.ca_bundles(), release.pod_template_annotations()["checksum/tls"])
    release.upgrade()
    after = (release.secret_data(), release.ca_bundles(), release.pod_template_annotations()["checksum/tls"])
    assert after == before


def test_regenerate_replaces_the_ca_and_certificate_and_restarts_the_pods(release):
    old = release.secret_data()
    old_checksum = release.pod_template_annotations()["checksum/tls"]
    release.upgrade("--set", "webhook.certs.regenerate=true")
    new = release.secret_data()
    assert new["tls.crt"] != old["tls.crt"] and new["ca.crt"] != old["ca.crt"]
    for bundle in release.ca_bundles().values():
        # The old CA is dropped at once: regenerate is for when it must stop being trusted.
        assert base64.b64decode(bundle) == new["ca.crt"]
    assert release.pod_template_annotations()["checksum/tls"] != old_checksum
    # helm upgrade without values reuses the last ones, regenerate=true included: that must
    # not replace the certificate again.
    release.upgrade()
    assert release.secret_data() == new


def test_an_upgrade_close_to_expiry_renews_and_trusts_both_cas_for_the_rollout(release):
    old = release.secret_data()
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    annotated = release.kube.kubectl(
        "annotate", "--overwrite", "-n", release.namespace, f"secret/{SECRET}", f"{NOT_AFTER}={soon}"
    )
    assert annotated.returncode == 0, annotated.stderr
    release.upgrade()  # renewBeforeDays is 30 by default
    new = release.secret_data()
    assert new["tls.crt"] != old["tls.crt"]
    old_ca = x509.load_pem_x509_certificate(old["ca.crt"])
    new_ca = x509.load_pem_x509_certificate(new["ca.crt"])
    for bundle in release.ca_bundles().values():
        assert _ca_subjects(bundle) == [new_ca, old_ca]
    x509.load_pem_x509_certificate(new["tls.crt"]).verify_directly_issued_by(new_ca)
    # The next upgrade, after the rollout, trusts the new CA alone.
    release.upgrade()
    for bundle in release.ca_bundles().values():
        assert _ca_subjects(bundle) == [new_ca]


def test_uninstall_removes_everything_but_the_crd(release):
    kube = release.kube
    uninstalled = release.helm("uninstall", RELEASE, "--wait")
    assert uninstalled.returncode == 0, uninstalled.stderr
    selector = f"app.kubernetes.io/instance={RELEASE}"
    namespaced = "deployments,replicasets,services,serviceaccounts,secrets,configmaps,poddisruptionbudgets"
    cluster = "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations"

    def gone() -> bool:
        left = kube.kubectl("get", namespaced, "-n", release.namespace, "-l", selector, "-o", "name")
        left_cluster = kube.kubectl("get", cluster, "-l", selector, "-o", "name")
        return (
            left.returncode == 0
            and left_cluster.returncode == 0
            and not (left.stdout + left_cluster.stdout).strip()
        )

    wait_until("the release's objects to be deleted", gone, 60, alive=kube.processes)
    crd = kubernetes.client.ApiextensionsV1Api(kube.api_client).read_custom_resource_definition(CRD_NAME)
    assert crd.metadata.name == CRD_NAME
