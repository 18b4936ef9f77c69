"""The ModelDeployment controller on a real control plane (kwok pods, real EndpointSlices).

offload-webhook runs as a local process with --injector-config (injection and the
controller), registered as the pod webhook of the test's namespace, with its leader Lease
in that namespace. The fixture of ``../shared/cases/controller.md``: ServiceAccount ``vllm``,
Deployment ``vllm`` (labels app: vllm, container ``model`` port http: 8000), Service ``vllm``
(port {http, 80 -> 8000}) and ModelDeployment ``vllm`` naming both (serviceRef.targetPort 80).
"Captured" is reached by applying the fixture and restarting the Deployment.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
import urllib3

from crds.model import API_VERSION, GROUP, PLURAL, VERSION
from tests.e2e import objects
from tests.e2e.controlplane.admission import mutating_webhook_configuration
from tests.e2e.controlplane.process import wait_until
from tests.e2e.controlplane.webhook_process import WebhookServer, _console_script, injector_config

pytestmark = pytest.mark.e2e

FINALIZER = "offload.beamlit.com/controller"
ORIGINAL = "offload.beamlit.com/original-target-port"
SIDECAR_ROLE = "offload-e2e-sidecar"
INJECTOR_CONFIG = injector_config("e2e-controller")


# --- objects ---------------------------------------------------------------------------------------


def deployment(name="vllm", replicas=2, labels=None, service_account="vllm", cpu="2") -> dict[str, Any]:
    """The model's workload: vLLM's image on port 8000 (named http), requesting `cpu`."""
    return objects.deployment(
        name,
        [objects.vllm_container(cpu)],
        labels=labels or {"app": "vllm"},
        replicas=replicas,
        service_account=service_account,
    )


def service(ports=None, **spec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "vllm"},
        "spec": {
            "selector": {"app": "vllm"},
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}],
            **spec,
        },
    }


def modeldeployment(
    name="vllm", target_port=80, service_name="vllm", workload="vllm", **spec
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": "llama-3-8b",
            "modelSourceRef": {"kind": "Deployment", "name": workload},
            "serviceRef": {"name": service_name, "targetPort": target_port},
            "offloadingConfig": {
                "remoteBackend": {"host": "remote.example:80", "scheme": "http"},
                "behavior": {"percentage": 50},
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 50},
                        },
                    }
                ],
            },
            **spec,
        },
    }


# --- the cluster, as the tests see it -------------------------------------------------------------


class Cluster:
    def __init__(self, kube, namespace: str, webhook: WebhookServer) -> None:
        self.kube, self.namespace, self.webhook = kube, namespace, webhook
        self.core = kubernetes.client.CoreV1Api(kube.api_client)
        self.apps = kubernetes.client.AppsV1Api(kube.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(kube.api_client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(kube.api_client)
        self.alive = [webhook.process, *kube.processes]

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 30) -> None:
        wait_until(what, condition, timeout, alive=self.alive)

    def create(self, obj: dict[str, Any]) -> None:
        kind = obj["kind"]
        if kind == "Deployment":
            self.apps.create_namespaced_deployment(self.namespace, obj)
        elif kind == "Service":
            self.core.create_namespaced_service(self.namespace, obj)
        elif kind == "ModelDeployment":
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, obj)
        elif kind == "ServiceAccount":
            self.core.create_namespaced_service_account(self.namespace, obj)
        else:
            raise ValueError(kind)

    def md(self, name="vllm") -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_md(self, patch: dict[str, Any], name="vllm") -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, patch, _content_type="application/merge-patch+json"
        )

    def condition(self, type_: str, name="vllm") -> dict[str, Any]:
        md = self.md(name) or {}
        return next((c for c in (md.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})

    def service(self, name="vllm") -> dict[str, Any]:
        return self.kube.api_client.sanitize_for_serialization(
            self.core.read_namespaced_service(name, self.namespace)
        )

    def captured(self, name="vllm") -> bool:
        return any(p.get("targetPort") == "offload-proxy" for p in self.service(name)["spec"]["ports"])

    def pods(self, selector="app=vllm") -> list[Any]:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return [p for p in items if p.metadata.deletion_timestamp is None]

    def ready_pods(self, selector="app=vllm") -> list[Any]:
        return [
            p
            for p in self.pods(selector)
            if any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        ]

    def restart(self, name="vllm") -> None:
        """kubectl rollout restart. kubectl refuses a second restart in the same second (its
        restartedAt annotation counts seconds), so that refusal is retried into the next one."""
        deadline = time.monotonic() + 5
        while True:
            done = self.kube.kubectl("rollout", "restart", f"deployment/{name}", "-n", self.namespace)
            if done.returncode == 0:
                return
            assert "within the past second" in done.stderr and time.monotonic() < deadline, done.stderr
            time.sleep(0.1)

    def events(self, reason: str, name="vllm") -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.kind=ModelDeployment,involvedObject.name={name}"
        ).items
        return [e for e in items if e.reason == reason]

    def endpoint_ports(self, service="vllm") -> set[tuple[str, int]]:
        discovery = kubernetes.client.DiscoveryV1Api(self.kube.api_client)
        slices = discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={service}"
        ).items
        found = set()
        for s in slices:
            for endpoint in s.endpoints or []:
                if endpoint.conditions and endpoint.conditions.ready and endpoint.target_ref:
                    for port in s.ports or []:
                        found.add((endpoint.target_ref.name, port.port))
        return found

    def with_sidecar(self, pods) -> list[Any]:
        return [p for p in pods if any(c.name == "offload-proxy" for c in (p.spec.init_containers or []))]


def start_controller(run_webhook, kube, namespace: str, tmp_path, *extra: str) -> WebhookServer:
    config = tmp_path / "injector.yaml"
    config.write_text(INJECTOR_CONFIG)
    return run_webhook(
        "--injector-config",
        str(config),
        "--leader-election-namespace",
        namespace,
        "--leader-election-lease-duration",
        "6",
        "--leader-election-renew-deadline",
        "4",
        "--leader-election-retry-period",
        "1",
        "--sidecar-cluster-role",
        SIDECAR_ROLE,
        "--evaluation-period",
        "2",
        *extra,
        env={"KUBECONFIG": str(kube.kubeconfig)},
    )


@pytest.fixture
def cluster(kube, namespace, modeldeployment_crd, run_webhook, tmp_path) -> Iterator[Cluster]:
    """The controller running for `namespace`, the pod webhook registered for it; afterwards every
    ModelDeployment is deleted and its finalizer seen removed (the controller cleans up)."""
    server = start_controller(run_webhook, kube, namespace, tmp_path)
    wait_until(
        "the webhook's cache (/readyz)", lambda: server.get("/readyz") == 200, 60, alive=[server.process]
    )
    admission = kubernetes.client.AdmissionregistrationV1Api(kube.api_client)
    name = f"offload-e2e-ctl-{namespace}"[:63]
    admission.create_mutating_webhook_configuration(
        mutating_webhook_configuration(name, server.url("/mutate-pods"), server.ca_bundle, namespace)
    )
    c = Cluster(kube, namespace, server)
    c.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "vllm"}})
    try:
        yield c
    finally:
        try:
            admission.delete_mutating_webhook_configuration(name)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:  # a test may have removed it, as if the webhook were down
                raise
        if c.webhook.process.exit_code is None and namespace_exists(c):
            for md in c.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
                c.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, md["metadata"]["name"]
                )
            c.wait(
                "every ModelDeployment gone (finalizers removed)",
                lambda: (
                    not c.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
                ),
            )


def namespace_exists(c: Cluster) -> bool:
    try:
        c.core.read_namespace(c.namespace)
        return True
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return False
        raise


def captured_fixture(c: Cluster, svc: dict[str, Any] | None = None, md: dict[str, Any] | None = None) -> dict:
    """Applies the base fixture, restarts the Deployment, waits until captured; returns the
    Service's spec.ports as they were before the ModelDeployment existed."""
    c.create(deployment())
    c.create(svc or service())
    c.wait("2 ready pods", lambda: len(c.ready_pods()) == 2)
    before = copy.deepcopy(c.service()["spec"]["ports"])
    c.create(md or modeldeployment())
    c.restart()
    c.wait("the Service captured", c.captured, 60)
    return before


# --- the tests -----------------------------------------------------------------------------------


def test_capture_points_the_service_at_the_sidecars_and_only_injected_pods_serve(cluster):
    c = cluster
    c.create(deployment())
    c.create(service())
    c.wait("2 ready pods", lambda: len(c.ready_pods()) == 2)
    c.create(modeldeployment())
    # Before the restart no pod carries the sidecar: the Service is left alone, and says why.
    c.wait("the capture condition", lambda: c.condition("TrafficCaptured").get("status") == "False")
    assert c.condition("TrafficCaptured")["reason"] == "PodsWithoutSidecar"
    assert not c.captured()
    assert FINALIZER in c.md()["metadata"]["finalizers"]

    c.restart()
    c.wait("the Service captured", c.captured, 60)
    svc = c.service()
    assert svc["metadata"]["annotations"][ORIGINAL] == "8000"
    assert svc["spec"]["ports"][0]["targetPort"] == "offload-proxy"
    c.wait("2 injected ready pods", lambda: len(c.with_sidecar(c.ready_pods())) == 2 == len(c.ready_pods()))
    injected = {p.metadata.name for p in c.with_sidecar(c.ready_pods())}
    c.wait(
        "the EndpointSlices on the sidecar port", lambda: c.endpoint_ports() == {(n, 15080) for n in injected}
    )

    c.wait("status Ready", lambda: c.condition("Ready").get("status") == "True")
    status = c.md()["status"]
    assert status["captured"] is True and status["injected"] == "2/2"
    assert status["observedGeneration"] == c.md()["metadata"]["generation"]
    assert c.condition("Injected")["reason"] == "AllPodsInjected"
    binding = c.rbac.read_namespaced_role_binding("vllm-offload-sidecar", c.namespace)
    assert binding.role_ref.name == SIDECAR_ROLE
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", "vllm")]
    assert len(c.events("ServiceCaptured")) == 1
    printed = c.kube.kubectl("get", "mdd", "-n", c.namespace)
    assert printed.returncode == 0, printed.stderr
    header, row = printed.stdout.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "MODEL", "OFFLOADING", "UTILIZATION", "CAPTURED", "INJECTED"]
    assert "true" in row.split() and "2/2" in row.split()


@pytest.mark.parametrize(
    ("original_target", "node_port"), [("http", 30080), (8000, 30081)], ids=["named-target", "integer-target"]
)
def test_deleting_restores_the_ports_byte_for_byte_and_removes_binding_and_finalizer(
    cluster, original_target, node_port
):
    c = cluster
    ports = [
        {
            "name": "http",
            "port": 80,
            "targetPort": original_target,
            "nodePort": node_port,
            "appProtocol": "http",
            "protocol": "TCP",
        },
        {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"},
    ]
    before = captured_fixture(c, service(ports, type="NodePort"))
    captured_ports = c.service()["spec"]["ports"]
    assert captured_ports[1] == before[1]  # the metrics port never changes
    c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.namespace, PLURAL, "vllm")
    c.wait("the ModelDeployment gone", lambda: c.md() is None, 10)
    assert c.service()["spec"]["ports"] == before
    assert ORIGINAL not in (c.service()["metadata"].get("annotations") or {})
    with pytest.raises(kubernetes.client.ApiException) as gone:
        c.rbac.read_namespaced_role_binding("vllm-offload-sidecar", c.namespace)
    assert gone.value.status == 404


def test_enabled_false_restores_and_true_captures_again(cluster):
    c = cluster
    before = captured_fixture(c)
    c.patch_md({"spec": {"enabled": False}})
    c.wait("restored", lambda: c.service()["spec"]["ports"] == before, 10)
    c.wait("Ready False Disabled", lambda: c.condition("Ready").get("reason") == "Disabled")
    c.patch_md({"spec": {"enabled": True}})
    c.wait("captured again", c.captured, 10)


def test_a_hand_reverted_service_is_captured_again_unless_it_opts_out(cluster):
    c = cluster
    captured_fixture(c)
    c.core.patch_namespaced_service(
        "vllm",
        c.namespace,
        [{"op": "replace", "path": "/spec/ports/0/targetPort", "value": 8000}],
        _content_type="application/json-patch+json",
    )
    c.wait("captured again", c.captured, 10)

    c.core.patch_namespaced_service(
        "vllm",
        c.namespace,
        [
            {"op": "add", "path": "/metadata/annotations/offload.beamlit.com~1capture", "value": "false"},
            {"op": "replace", "path": "/spec/ports/0/targetPort", "value": 8000},
        ],
        _content_type="application/json-patch+json",
    )
    c.wait("the opt-out seen", lambda: c.condition("TrafficCaptured").get("reason") == "CaptureOptedOut")
    version = c.service()["metadata"]["resourceVersion"]
    # Three more reconciles later the controller has still not touched the Service.
    seen = reconciles(c.webhook)
    c.wait("three more reconciles", lambda: reconciles(c.webhook) >= seen + 3, 20)
    assert c.service()["metadata"]["resourceVersion"] == version
    assert not c.captured()


def test_two_ports_with_the_same_number_never_collapse(cluster):
    c = cluster
    ports = [
        {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
        {"name": "h3", "port": 443, "targetPort": 8443, "protocol": "UDP"},
    ]
    watch = kubernetes.watch.Watch()
    captured_fixture(c, service(ports), modeldeployment(target_port=443))
    svc = c.service()
    assert [(p["protocol"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("TCP", "offload-proxy"),
        ("UDP", 8443),
    ]
    c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.namespace, PLURAL, "vllm")
    c.wait("restored", lambda: not c.captured(), 10)
    seen = []
    for event in watch.stream(
        c.core.list_namespaced_service,
        c.namespace,
        field_selector="metadata.name=vllm",
        resource_version="0",
        timeout_seconds=2,
    ):
        seen.append(len(event["object"].spec.ports))
    # Every version of the Service kept both ports (list from the watch cache, then none).
    assert seen and all(n == 2 for n in seen)
    assert [(p["protocol"], p["targetPort"]) for p in c.service()["spec"]["ports"]] == [
        ("TCP", 8443),
        ("UDP", 8443),
    ]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "None"}, "HeadlessService"),
        ({"type": "ExternalName", "externalName": "x.example"}, "ExternalNameService"),
    ],
)
def test_a_service_that_cannot_be_captured_is_untouched_and_others_still_reconcile(cluster, spec, reason):
    c = cluster
    c.create(deployment())
    odd = service(**spec)
    if spec.get("type") == "ExternalName":
        odd["spec"].pop("selector")
        odd["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP"}]
    c.create(odd)
    c.create(modeldeployment())
    c.create(deployment("other", labels={"app": "other"}))
    other_svc = service()
    other_svc["metadata"]["name"] = "other"
    other_svc["spec"]["selector"] = {"app": "other"}
    c.create(other_svc)
    c.create(modeldeployment("other", service_name="other", workload="other"))
    c.restart("other")
    c.wait("the other Service captured", lambda: c.captured("other"), 60)
    c.wait(f"TrafficCaptured {reason}", lambda: c.condition("TrafficCaptured").get("reason") == reason)
    version = c.service()["metadata"]["resourceVersion"]
    seen = reconciles(c.webhook)
    c.wait("three more reconciles", lambda: reconciles(c.webhook) >= seen + 3, 20)
    assert c.service()["metadata"]["resourceVersion"] == version  # no change, no hot loop
    assert len(c.events(reason)) == 1


def test_pods_of_another_workload_behind_the_service_block_capture(cluster):
    c = cluster
    c.create(deployment(labels={"app": "vllm", "track": "stable"}))
    c.create(deployment("vllm-canary", replicas=1, labels={"app": "vllm", "track": "canary"}))
    c.create(service())
    c.wait("3 ready pods", lambda: len(c.ready_pods()) == 3)
    c.create(modeldeployment())
    c.restart()
    c.wait("the stable pods injected", lambda: len(c.with_sidecar(c.ready_pods("track=stable"))) == 2, 60)
    c.wait(
        "the capture condition names the canary",
        lambda: "vllm-canary" in c.condition("TrafficCaptured").get("message", ""),
    )
    assert c.condition("TrafficCaptured")["reason"] == "PodsWithoutSidecar"
    assert not c.captured()
    # The workload's own pods are all injected: the canary is not the workload's.
    c.wait("Injected 2/2", lambda: (c.md().get("status") or {}).get("injected") == "2/2")


def test_pods_created_while_the_webhook_was_down_restore_until_they_are_gone(cluster):
    c = cluster
    captured_fixture(c)
    admission = kubernetes.client.AdmissionregistrationV1Api(c.kube.api_client)
    name = f"offload-e2e-ctl-{c.namespace}"[:63]
    registered = admission.read_mutating_webhook_configuration(name)
    admission.delete_mutating_webhook_configuration(name)  # as if the webhook were down
    c.apps.patch_namespaced_deployment_scale(
        "vllm", c.namespace, {"spec": {"replicas": 4}}, _content_type="application/merge-patch+json"
    )
    c.wait("restored while bare pods are ready", lambda: not c.captured(), 30)
    c.wait("Injected says which pods", lambda: c.condition("Injected").get("reason") == "PodsWithoutSidecar")
    c.wait("a PodsWithoutSidecar Event", lambda: len(c.events("PodsWithoutSidecar")) >= 1)
    # Never zero ready endpoints because of the product: all 4 pods serve on the model's port.
    c.wait("4 endpoints on port 8000", lambda: len({n for n, p in c.endpoint_ports() if p == 8000}) == 4)

    registered.metadata = kubernetes.client.V1ObjectMeta(name=name)
    admission.create_mutating_webhook_configuration(registered)
    c.restart()
    c.wait("captured again once every ready pod is injected", c.captured, 90)


def test_deleting_the_namespace_finishes(cluster, kube):
    c = cluster
    captured_fixture(c)
    c.create(modeldeployment("dangling", service_name="nonexistent"))
    c.core.delete_namespace(c.namespace)

    def gone() -> bool:
        try:
            c.core.read_namespace(c.namespace)
            return False
        except kubernetes.client.ApiException as exc:
            return exc.status == 404

    c.wait("the namespace gone", gone, 60)


def test_rolebinding_of_another_owner_is_left_alone(cluster):
    c = cluster
    c.rbac.create_namespaced_role_binding(
        c.namespace,
        {
            "metadata": {"name": "vllm-offload-sidecar"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "someone", "namespace": c.namespace}],
        },
    )
    c.create(deployment())
    c.create(service())
    c.create(modeldeployment())
    c.wait(
        "RoleBindingConflict", lambda: c.condition("SidecarRBACReady").get("reason") == "RoleBindingConflict"
    )
    binding = c.rbac.read_namespaced_role_binding("vllm-offload-sidecar", c.namespace)
    assert binding.role_ref.name == "view" and binding.subjects[0].name == "someone"
    c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.namespace, PLURAL, "vllm")
    c.wait("the ModelDeployment gone", lambda: c.md() is None, 10)
    assert c.rbac.read_namespaced_role_binding("vllm-offload-sidecar", c.namespace).role_ref.name == "view"


def test_rolebinding_subjects_follow_the_service_account(cluster):
    c = cluster
    c.create(deployment())
    c.create(modeldeployment())
    c.wait(
        "the RoleBinding",
        lambda: c.condition("SidecarRBACReady").get("status") == "True",
    )
    c.apps.patch_namespaced_deployment(
        "vllm",
        c.namespace,
        {"spec": {"template": {"spec": {"serviceAccountName": "other"}}}},
        _content_type="application/merge-patch+json",
    )

    def subjects() -> list[str]:
        return [
            s.name for s in c.rbac.read_namespaced_role_binding("vllm-offload-sidecar", c.namespace).subjects
        ]

    c.wait("subjects follow", lambda: subjects() == ["other"], 10)


def lease_holder(c: Cluster) -> str:
    lease = kubernetes.client.CoordinationV1Api(c.kube.api_client).read_namespaced_lease(
        "offload-controller", c.namespace
    )
    return lease.spec.holder_identity or ""


def test_a_killed_leader_is_replaced_within_the_lease_duration_and_nothing_flaps(
    cluster, kube, run_webhook, tmp_path
):
    c = cluster
    (tmp_path / "second").mkdir()
    second = start_controller(run_webhook, kube, c.namespace, tmp_path / "second")
    wait_until("second webhook ready", lambda: second.get("/readyz") == 200, 60, alive=[second.process])
    captured_fixture(c)
    servers = [c.webhook, second]
    holder = lease_holder(c)
    [leader] = [s for s in servers if f"leading as {holder}" in s.process.log_path.read_text()]
    [follower] = [s for s in servers if s is not leader]
    versions: list[Any] = []
    watch = kubernetes.watch.Watch()

    def record() -> None:
        try:
            for event in watch.stream(
                c.core.list_namespaced_service,
                c.namespace,
                field_selector="metadata.name=vllm",
                timeout_seconds=60,
            ):
                versions.append(event["object"].spec.ports[0].target_port)
        except urllib3.exceptions.ProtocolError:
            pass  # watch.stop() below cuts the stream

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    leader.process._signal_group(signal.SIGKILL)
    killed = time.monotonic()
    c.alive = [follower.process, *kube.processes]
    c.wait("the follower leads", lambda: lease_holder(c) not in ("", holder), 15)
    took = time.monotonic() - killed
    assert took <= 6 + 2, f"took over after {took:.1f}s (lease duration 6s, retry 1s)"
    c.webhook = follower  # the fixture's cleanup needs a running controller
    assert len(c.events("ServiceCaptured")) == 1  # never captured twice
    # The new leader acts: a hand-reverted Service is captured again.
    c.core.patch_namespaced_service(
        "vllm",
        c.namespace,
        [{"op": "replace", "path": "/spec/ports/0/targetPort", "value": 8000}],
        _content_type="application/json-patch+json",
    )
    c.wait("captured again by the new leader", c.captured, 10)
    assert f"leading as {lease_holder(c)}" in follower.process.log_path.read_text()
    watch.stop()
    recorder.join(10)
    # Every version of the Service since the kill pointed at the sidecars but the one we reverted:
    # nothing was restored by mistake during the handover.
    assert versions.count(8000) == 1 and versions[-1] == "offload-proxy", versions


def test_release_all_restores_everything_and_keeps_the_lease(cluster, kube, run_webhook, tmp_path):
    c = cluster
    before = captured_fixture(c)

    argv = _console_script("offload-webhook", "webhook.cli") + [
        "--release-all",
        "--leader-election-namespace",
        c.namespace,
        "--sidecar-cluster-role",
        SIDECAR_ROLE,
    ]
    started = time.monotonic()
    done = subprocess.run(
        argv,
        check=False,
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert c.service()["spec"]["ports"] == before, done.stderr[-5000:]
    assert FINALIZER not in (c.md()["metadata"].get("finalizers") or [])
    assert (
        c.rbac.list_namespaced_role_binding(
            c.namespace, label_selector="app.kubernetes.io/managed-by=offload-controller"
        ).items
        == []
    )
    # The running controller stays a follower: nothing is captured again.
    assert lease_holder(c).endswith("-release")
    c.patch_md({"metadata": {"labels": {"poke": "1"}}})
    c.wait(
        "the running webhook reports it does not lead",
        lambda: metric(c.webhook, "offload_webhook_leader") == 0,
    )
    assert lease_holder(c).endswith("-release") and not c.captured()
    assert time.monotonic() - started < 60


def metric(server: WebhookServer, name: str) -> float:
    """The sum of a metric's samples on the webhook's /metrics (a counter's _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(server.text("/metrics")):
        if family.name == name or family.name + "_total" == name:
            total += sum(s.value for s in family.samples if s.name in (name, name + "_total"))
    return total


def reconciles(server: WebhookServer) -> float:
    return metric(server, "offload_webhook_reconcile_total")


def api_requests(server: WebhookServer) -> dict[tuple[str, str], float]:
    """offload_webhook_api_requests_total by (verb, resource), from the webhook's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(server.text("/metrics")):
        if family.name == "offload_webhook_api_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["verb"], sample.labels["resource"]] = sample.value
    return counts


def requests_per_minute(c: Cluster, seconds: float) -> tuple[float, dict]:
    """The controller's API requests (watches excluded: they are long-lived) per minute, over
    a window of steady state; and the breakdown."""
    before = api_requests(c.webhook)
    started = time.monotonic()
    c.wait("the window to pass", lambda: time.monotonic() - started >= seconds, seconds + 5)
    after = api_requests(c.webhook)
    elapsed = time.monotonic() - started
    # Watches are long-lived and the Lease is renewed per process, not per ModelDeployment.
    delta = {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if k[0] != "watch" and not k[1].startswith("leases.") and v - before.get(k, 0)
    }
    return sum(delta.values()) * 60 / elapsed, delta


def test_api_requests_per_modeldeployment_do_not_grow_with_its_pods(cluster, capsys):
    """One ModelDeployment, its workload at 1 pod and then at 20: the controller's API requests
    per minute in steady state (the evaluation of its metrics every period, any status write)."""
    c = cluster
    c.create(deployment(replicas=1, cpu="100m"))  # 20 pods fit on the kwok node
    c.create(service())
    c.create(modeldeployment())
    c.restart()
    c.wait("captured with 1 pod", lambda: c.captured() and len(c.with_sidecar(c.ready_pods())) == 1, 60)
    one, one_detail = requests_per_minute(c, 12)
    c.apps.patch_namespaced_deployment_scale(
        "vllm", c.namespace, {"spec": {"replicas": 20}}, _content_type="application/merge-patch+json"
    )
    c.wait("20 injected ready pods", lambda: len(c.with_sidecar(c.ready_pods())) == 20, 120)
    c.wait("status says 20/20", lambda: (c.md().get("status") or {}).get("injected") == "20/20")
    twenty, twenty_detail = requests_per_minute(c, 12)
    with capsys.disabled():
        print(
            f"\n[api load] one ModelDeployment, evaluation period 2 s: {one:.1f} requests/min with 1 pod "
            f"{dict(one_detail)}, {twenty:.1f} with 20 pods {dict(twenty_detail)}"
        )
    # Per period at most: one metrics read per metric and one status write; pods add nothing.
    assert twenty <= one + 6, (one_detail, twenty_detail)


def test_status_is_written_only_when_it_changes_and_other_writers_lose_nothing(cluster):
    """Steady state with another client patching labels every 200 ms and changing the
    percentage once: at most one status write per evaluation period, no Event, no condition
    transition, and every one of the other client's changes kept (patches, never updates)."""
    c = cluster
    captured_fixture(c)
    c.wait("status Ready", lambda: c.condition("Ready").get("status") == "True")
    before = c.md()
    transitions = {cond["type"]: cond["lastTransitionTime"] for cond in before["status"]["conditions"]}
    events = len(c.core.list_namespaced_event(c.namespace).items)
    statuses = []
    period, window = 2.0, 10.0
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < window:
        i += 1
        c.patch_md({"metadata": {"labels": {"poke": str(i)}}})
        if i == 10:
            c.patch_md({"spec": {"offloadingConfig": {"behavior": {"percentage": 30}}}})
        status = (c.md() or {}).get("status")
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        time.sleep(0.2)
    after = c.md()
    assert after["metadata"]["labels"]["poke"] == str(i)
    assert after["spec"]["offloadingConfig"]["behavior"]["percentage"] == 30
    c.wait(
        "observedGeneration follows",
        lambda: c.md()["status"]["observedGeneration"] == c.md()["metadata"]["generation"],
    )
    writes = len(statuses) - 1
    assert writes <= window / period + 1, statuses
    assert {
        cond["type"]: cond["lastTransitionTime"] for cond in c.md()["status"]["conditions"]
    } == transitions
    assert len(c.core.list_namespaced_event(c.namespace).items) == events


def test_the_tutorial_as_written_ends_captured_and_undoes_itself(
    kube, modeldeployment_crd, run_webhook, tmp_path, tutorial_in_default_namespace
):
    """The tutorial's Deployment, Service and ModelDeployment, applied unchanged in namespace
    default (plus the restart the README asks for): the Service's port ends pointing at
    offload-proxy and its EndpointSlices list only injected pods on the sidecar's port;
    deleting the ModelDeployment restores the Service and removes its RoleBinding."""
    from tests.e2e.paths import TUTORIAL_CLUSTER_A, TUTORIAL_MODELDEPLOYMENT

    server = start_controller(run_webhook, kube, "default", tmp_path)
    wait_until(
        "the webhook's cache (/readyz)", lambda: server.get("/readyz") == 200, 60, alive=[server.process]
    )
    admission = kubernetes.client.AdmissionregistrationV1Api(kube.api_client)
    name = "offload-e2e-ctl-tutorial"
    admission.create_mutating_webhook_configuration(
        mutating_webhook_configuration(name, server.url("/mutate-pods"), server.ca_bundle, "default")
    )
    c = Cluster(kube, "default", server)
    try:
        for path in (TUTORIAL_CLUSTER_A, TUTORIAL_MODELDEPLOYMENT):
            applied = kube.kubectl("apply", "-f", str(path))
            assert applied.returncode == 0, applied.stderr
        before = c.service("php-apache")["spec"]["ports"]
        c.wait("the tutorial's pod ready", lambda: len(c.ready_pods("run=php-apache")) == 1, 60)
        c.restart("php-apache")
        c.wait("the Service captured", lambda: c.captured("php-apache"), 60)
        c.wait(
            "the EndpointSlice lists only the injected pod, on the sidecar's port",
            lambda: (
                {p for _, p in c.endpoint_ports("php-apache")} == {15080}
                and {n for n, _ in c.endpoint_ports("php-apache")}
                == {p.metadata.name for p in c.with_sidecar(c.ready_pods("run=php-apache"))}
            ),
        )
        c.wait("Ready", lambda: c.condition("Ready", "my-model").get("status") == "True")
        assert c.service("php-apache")["metadata"]["annotations"][ORIGINAL] == "80"
        c.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "my-model")
        c.wait("the ModelDeployment gone", lambda: c.md("my-model") is None, 30)
        assert c.service("php-apache")["spec"]["ports"] == before
        assert not c.rbac.list_namespaced_role_binding(
            "default", label_selector="app.kubernetes.io/managed-by=offload-controller"
        ).items
    finally:
        admission.delete_mutating_webhook_configuration(name)
