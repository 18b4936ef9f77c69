"""The sidecar's cluster side on the real control plane, with the credentials a sidecar
really has: a ServiceAccount token bound to the sidecar's minimal Role
(charts/offload/files/sidecar-role.yaml), in a kubeconfig standing in for the
in-cluster files; and the controller's metric evaluation against the metrics API.

- The Role allows exactly what the sidecar reads (its ModelDeployment), no pod, no
  metric, no Secret.
- The cluster ConfigSource follows edits of its ModelDeployment (percentage, remote
  host, enabled) and the decision published in its status through its watch, with no
  further list.
- The controller's MetricsReader reads PodMetrics through the aggregation layer from a
  FAKE metrics server (tests/e2e/fake_metrics_server.py: there are no kubelets to
  measure anything) over the Deployment's kwok pods, crosses the target both ways, and
  makes the same number of requests for 1 pod and for 20.
- There is no controller on this branch's control plane: the tests publish the decision
  themselves, as the controller would, with ``kubectl patch --subresource=status``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import pytest
import yaml

from crds.backoff import Backoff
from crds.decision import INITIAL, step
from crds.model import GROUP, PLURAL, VERSION, OffloadingBehavior
from sidecar.cluster.client import ApiError, KubeClient
from sidecar.cluster.config import ClusterConfigSource
from sidecar.cluster.credentials import load_kubeconfig
from tests import modeldeployments as md
from tests.e2e.controlplane.kubeconfig import write_service_account_kubeconfig
from tests.e2e.controlplane.process import wait_until
from tests.e2e.fake_metrics_server import FakeMetricsServer
from tests.e2e.objects import apply
from tests.e2e.paths import REPO_ROOT, TUTORIAL_CLUSTER_A
from webhook.controller.evaluation import MetricsReader, decision_status

pytestmark = pytest.mark.e2e

ROLE_FILE = REPO_ROOT / "charts" / "offload" / "files" / "sidecar-role.yaml"
CLUSTER_ROLE = "offload-sidecar-e2e"
ACCOUNT = "model-server"


def modeldeployment(namespace: str, **changes: Any) -> dict[str, Any]:
    doc = md.variant(
        "my-model",
        {
            "spec.modelSourceRef.namespace": namespace,
            "spec.serviceRef.namespace": namespace,
            **{k.replace("__", "."): v for k, v in changes.items()},
        },
    )
    doc["metadata"]["namespace"] = namespace
    return doc


def grant_modeldeployment_role(kube, namespace: str, rules: list[dict[str, Any]]) -> None:
    """The per-ModelDeployment Role ``my-model-sidecar`` with `rules` (crds.rbac's), bound to
    the model's ServiceAccount, as the controller grants it."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "my-model-sidecar"}, "rules": rules}  # fmt: skip
    apply(kube, role, namespace)
    done = kube.kubectl(
        "create", "rolebinding", "my-model-sidecar", "--role=my-model-sidecar",
        f"--serviceaccount={namespace}:{ACCOUNT}", "-n", namespace,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture
def sidecar_kubeconfig(kube, namespace, tmp_path) -> Path:
    """A kubeconfig with the token of a ServiceAccount bound to the sidecar's Role only."""
    rules = yaml.safe_load(ROLE_FILE.read_text())["rules"]
    apply(kube, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": CLUSTER_ROLE}, "rules": rules})  # fmt: skip
    for args in (
        ("create", "serviceaccount", ACCOUNT, "-n", namespace),
        ("create", "rolebinding", "offload-sidecar", f"--clusterrole={CLUSTER_ROLE}",
         f"--serviceaccount={namespace}:{ACCOUNT}", "-n", namespace),
    ):  # fmt: skip
        done = kube.kubectl(*args)
        assert done.returncode == 0, done.stderr
    return write_service_account_kubeconfig(tmp_path / "sidecar-kubeconfig", kube, namespace, ACCOUNT)


def test_the_sidecar_role_allows_its_modeldeployment_and_nothing_else(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig
) -> None:
    apply(kube, modeldeployment(namespace))
    kube.kubectl(
        "create", "secret", "generic", "remote-credentials", "--from-literal=clientSecret=x", "-n", namespace
    )
    apply(kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), namespace)

    async def scenario() -> None:
        client = KubeClient(load_kubeconfig(sidecar_kubeconfig))
        try:
            listed = await client.get(
                f"/apis/deployment.beamlit.com/v1alpha1/namespaces/{namespace}/modeldeployments",
                {"fieldSelector": "metadata.name=my-model"},
            )
            assert [i["metadata"]["name"] for i in listed["items"]] == ["my-model"]
            refused = [
                f"/api/v1/namespaces/{namespace}/secrets/remote-credentials",
                f"/api/v1/namespaces/{namespace}/secrets",
                "/apis/deployment.beamlit.com/v1alpha1/namespaces/default/modeldeployments",
                f"/api/v1/namespaces/{namespace}/services/php-apache",
                # The controller evaluates the metrics: the sidecar reads no pod, workload or metric.
                f"/apis/apps/v1/namespaces/{namespace}/deployments/php-apache",
                f"/api/v1/namespaces/{namespace}/pods",
                f"/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods",
            ]
            for path in refused:
                with pytest.raises(ApiError) as caught:
                    await client.get(path)
                assert caught.value.status == 403, path
        finally:
            await client.close()

    asyncio.run(scenario())


def test_the_cluster_source_follows_edits_through_its_watch(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, capsys
) -> None:
    apply(kube, modeldeployment(namespace))
    edits = [
        ({"spec.offloadingConfig.behavior.percentage": 30}, lambda m: m.spec.offloading_config.behavior.percentage == 30),
        ({"spec.offloadingConfig.remoteBackend.host": "other-cluster:8080"},
         lambda m: m.spec.offloading_config.remote_backend.host == "other-cluster:8080"),
        ({"spec.enabled": False}, lambda m: m.spec.enabled is False),
    ]  # fmt: skip
    latencies: list[float] = []

    async def scenario() -> None:
        client = KubeClient(load_kubeconfig(sidecar_kubeconfig))
        source = ClusterConfigSource(client, namespace, "my-model", backoff=Backoff(base=0.1, cap=1))
        updates = source.updates()
        first = await asyncio.wait_for(anext(updates), 30)
        assert first is not None and first.spec.offloading_config.behavior.percentage == 50
        for changes, expected in edits:
            patch = {}
            for dotted, value in changes.items():
                node = patch
                *head, last = dotted.split(".")
                for key in head:
                    node = node.setdefault(key, {})
                node[last] = value
            done = await asyncio.to_thread(
                kube.kubectl, "patch", "modeldeployment", "my-model", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            started = time.monotonic()
            model = await asyncio.wait_for(anext(updates), 10)
            latencies.append(time.monotonic() - started)
            assert model is not None and expected(model), model
        # The decision the controller publishes in the status comes through the same watch.
        for offloading in (True, False):
            done = await asyncio.to_thread(
                kube.kubectl, "patch", "modeldeployment", "my-model", "-n", namespace, "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": published(offloading)}),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            started = time.monotonic()
            model = await asyncio.wait_for(anext(updates), 10)
            latencies.append(time.monotonic() - started)
            assert model is not None and model.spec.enabled is False  # the spec is unchanged
            assert source.published is not None and source.published.offloading is offloading
            assert source.published.code == ("AboveTarget" if offloading else "BelowTarget")
        # Every edit came through one watch: one list, one watch request in all.
        assert client.requests == 2
        done = await asyncio.to_thread(kube.kubectl, "delete", "modeldeployment", "my-model", "-n", namespace)
        assert done.returncode == 0, done.stderr
        assert await asyncio.wait_for(anext(updates), 10) is None
        await updates.aclose()
        await client.close()

    asyncio.run(scenario())
    with capsys.disabled():
        print(
            f"\n[e2e] ModelDeployment edit (3 spec, 2 status) -> sidecar update after kubectl returned: "
            f"{[f'{x * 1000:.0f} ms' for x in latencies]}"
        )


def published(offloading: bool, *, age: float = 0.0, period: int = 15) -> dict[str, Any]:
    """The status fields the controller writes (webhook/controller/evaluation.py), for a
    cpu metric hot (90%/50%) or cool (20%/50%), evaluated ``age`` seconds ago."""
    from crds.observation import MetricObservation

    observation = MetricObservation(
        "resource cpu on pods (as a percentage of request)",
        90 if offloading else 20,
        50,
        "2 pods",
        "Resource",
        "percent",
    )
    now = datetime.now(UTC) - timedelta(seconds=age)
    behavior = OffloadingBehavior(sustain_seconds=0, cooldown_seconds=0)
    decision = step(INITIAL, [observation], now.timestamp(), behavior)  # on at once when hot
    assert decision.offloading is offloading
    return decision_status(
        decision, [observation], now=now, previous=None, generation=1, period_seconds=period
    )


def ready_php_apache_pods(kube, namespace: str, count: int = 2) -> list[dict[str, Any]]:
    """The (scaled to ``count``) php-apache pods as API JSON once all are Running and Ready."""
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def ready_pods() -> list[dict[str, Any]]:
        pods = core.list_namespaced_pod(namespace, label_selector="run=php-apache").items
        ready = [
            kube.api_client.sanitize_for_serialization(p)
            for p in pods
            if p.status.phase == "Running"
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return ready if len(ready) == count else []

    wait_until(f"{count} Running, Ready php-apache pods", ready_pods, 90, alive=kube.processes)
    return ready_pods()


def wait_until_samples_postdate_readiness(kube, namespace: str, pods: list[str], selector: str) -> None:
    """Polls the pods' PodMetrics through the API server until each pod's sample was taken
    at least its window after the pod became Ready: only then does the HPA's rule for cpu
    (crds/hpa.py) count the sample of a pod that is still in its initialization period."""
    core = kubernetes.client.CoreV1Api(kube.api_client)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    ready_since = {}
    for name in pods:
        conditions = core.read_namespaced_pod(name, namespace).status.conditions or []
        (ready,) = [c for c in conditions if c.type == "Ready" and c.status == "True"]
        ready_since[name] = ready.last_transition_time

    def postdate() -> bool:
        listed = custom.list_namespaced_custom_object(
            "metrics.k8s.io", "v1beta1", namespace, "pods", label_selector=selector
        )
        taken = {
            item["metadata"]["name"]: datetime.fromisoformat(item["timestamp"])
            - timedelta(seconds=float(item["window"].removesuffix("s")))
            for item in listed["items"]
        }
        return all(name in taken and taken[name] >= since for name, since in ready_since.items())

    wait_until("metrics samples a window younger than readiness", postdate, 30, alive=kube.processes)


@pytest.fixture
def fake_metrics_server(kube, tmp_path) -> Iterator[FakeMetricsServer]:
    with FakeMetricsServer(tmp_path / "fake-metrics") as server:
        apply(kube, server.registration())
        api = kubernetes.client.ApiregistrationV1Api(kube.api_client)

        def available() -> bool:
            status = api.read_api_service("v1beta1.metrics.k8s.io").status
            return any(c.type == "Available" and c.status == "True" for c in (status.conditions or []))

        wait_until(
            "the APIService v1beta1.metrics.k8s.io to be Available", available, 60, alive=kube.processes
        )
        yield server
        kube.kubectl("delete", "apiservice", "v1beta1.metrics.k8s.io", "--ignore-not-found")
        kube.kubectl("delete", "service", server.service, "-n", server.namespace, "--ignore-not-found")


def test_the_controllers_evaluation_crosses_the_target_both_ways_with_as_many_requests_for_20_pods_as_for_1(
    kube, namespace, modeldeployment_crd, fake_metrics_server, capsys
) -> None:
    apply(kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), namespace)
    model = ClusterConfigSource(None, namespace, "my-model").model_of(modeldeployment(namespace))  # type: ignore[arg-type]
    assert model is not None
    measured = {}
    for count in (1, 20):
        kube.kubectl("scale", "deployment/php-apache", f"--replicas={count}", "-n", namespace)
        pods = ready_php_apache_pods(kube, namespace, count)

        def serve_usage(cpu: str) -> None:
            for pod in pods:
                fake_metrics_server.set_usage(
                    namespace,
                    pod["metadata"]["name"],
                    {"run": "php-apache"},
                    {"php-apache": {"cpu": cpu, "memory": "10Mi"}},
                )

        reader = MetricsReader(kube.api_client)
        serve_usage("180m")  # 90% of the 200m request, against a 50% target
        wait_until_samples_postdate_readiness(
            kube, namespace, [p["metadata"]["name"] for p in pods], "run=php-apache"
        )
        [hot] = reader.observe(model, pods)
        assert (hot.current, hot.target) == (90, 50), hot.reason
        assert hot.reason == f"{count} pod{'s' if count > 1 else ''}"
        serve_usage("40m")
        [cool] = reader.observe(model, pods)
        assert cool.current == 20, cool.reason
        # The first evaluation also read the workload's selector (once per TTL), the second
        # only PodMetrics; given the selector (the controller's cache has it), one request.
        first_two = reader.requests
        before = reader.requests
        reader.observe(model, pods, selector={"matchLabels": {"run": "php-apache"}})
        measured[count] = (first_two, reader.requests - before)
    assert measured[1] == measured[20] == (3, 1)
    assert any("/namespaces/" + namespace + "/pods" in r for r in fake_metrics_server.requests)
    with capsys.disabled():
        print(
            "\n[e2e] controller API requests per ModelDeployment evaluation (one cpu metric), "
            f"1 pod: {measured[1][1]}, 20 pods: {measured[20][1]} (+1 workload read per selector TTL; "
            f"first two evaluations: {measured[1][0]} vs {measured[20][0]}); at a 15 s period "
            f"{measured[20][1] * 4}/min whatever the pod count; sidecars: one list + one watch each"
        )


def test_the_per_modeldeployment_rules_open_exactly_the_referenced_secret(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig
) -> None:
    from crds.rbac import sidecar_rules_for
    from sidecar.credentials.secrets import SecretKeyReader

    doc = modeldeployment(
        namespace,
        spec__offloadingConfig__remoteBackend__scheme="https",
        spec__offloadingConfig__remoteBackend__authConfig={
            "type": "oauth",
            "oauthConfig": {
                "clientId": "offloader",
                "tokenUrl": "https://auth.example/token",
                "clientSecretRef": {"name": "remote-credentials"},
            },
        },
    )
    model = ClusterConfigSource(None, namespace, "my-model").model_of(doc)  # type: ignore[arg-type]
    assert model is not None
    rules = sidecar_rules_for(model)
    grant_modeldeployment_role(kube, namespace, rules)
    for name, value in (("remote-credentials", "s3cret"), ("unrelated", "other")):
        done = kube.kubectl(
            "create", "secret", "generic", name, f"--from-literal=clientSecret={value}", "-n", namespace
        )
        assert done.returncode == 0, done.stderr

    async def scenario() -> None:
        client = KubeClient(load_kubeconfig(sidecar_kubeconfig))
        try:
            assert (
                await SecretKeyReader(client, namespace, "remote-credentials", "clientSecret").read()
                == "s3cret"
            )
            assert await SecretKeyReader(client, namespace, "unrelated", "clientSecret").read() is None
        finally:
            await client.close()

    asyncio.run(scenario())


# --- the sidecar process in cluster mode ---------------------------------------------------------


class SidecarProcess:
    """offload-sidecar in cluster mode, with a kubeconfig standing in for the pod's credentials."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        upstream_port: int,
        logs: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ):
        from tests.e2e.controlplane.net import free_port

        self.port, self.admin_port = free_port(), free_port()
        env = {
            **os.environ,
            "POD_NAME": "php-apache-0",
            "POD_NAMESPACE": namespace,
            "MODELDEPLOYMENT_NAME": "my-model",
            "KUBECONFIG": str(kubeconfig),
            **(env or {}),
        }
        self.log_path = logs
        self._log = logs.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "sidecar.cli",
                "--upstream", f"127.0.0.1:{upstream_port}",
                "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{self.admin_port}",
                "--poll-interval", "1s",
                *extra,
            ],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        with httpx.Client(timeout=5) as client:
            return client.get(f"http://127.0.0.1:{self.admin_port}/status").json()

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> float:
        """Polls /status until ``predicate`` holds; returns how long that took."""
        started = time.monotonic()

        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"offload-sidecar exited ({self.proc.returncode}):\n{self.log_tail()}")
            return predicate(self.status())

        try:
            wait_until(what, check, timeout, interval=0.02)
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}\nlast /status: {json.dumps(self.status(), indent=1)}\n{self.log_tail()}"
            ) from None
        return time.monotonic() - started

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def test_a_sidecar_process_follows_its_modeldeployment_and_the_published_decision(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, tmp_path, capsys
) -> None:
    from tests.integration.servers import LoopThread, Upstream

    with LoopThread() as loop:
        local = loop.run(Upstream.started("local"))
        remote = loop.run(Upstream.started("remote"))
        other_remote = loop.run(Upstream.started("other-remote"))
        apply(
            kube,
            modeldeployment(
                namespace,
                spec__offloadingConfig__remoteBackend__host=f"127.0.0.1:{remote.port}",
                spec__offloadingConfig__behavior={"percentage": 50},
            ),
        )

        def send(n: int) -> list[str]:
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                return [client.get("/v1/echo").json()["server"] for _ in range(n)]

        def patch(doc: dict[str, Any], *subresource: str) -> None:
            done = kube.kubectl(
                "patch", "modeldeployment", "my-model", "-n", namespace, *subresource,
                "--type=merge", "-p", json.dumps(doc),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr

        def publish(offloading: bool, age: float = 0.0) -> None:
            """What the controller does once per period: write the decision in the status."""
            patch({"status": published(offloading, age=age)}, "--subresource=status")

        sidecar = SidecarProcess(sidecar_kubeconfig, namespace, local.port, tmp_path / "sidecar.log")
        try:
            sidecar.wait_for(
                "the sidecar to read its ModelDeployment, with no decision published yet",
                lambda s: s["ready"] and s["mode"] == "cluster" and s["configuration"] is not None
                and s["decision"]["code"] == "NotEvaluated",
            )  # fmt: skip
            assert sidecar.status()["decision"]["offloading"] is False
            assert set(send(10)) == {"local"}

            # Published hot: offloading at 50%, exactly every other request, within a second.
            latencies = {}
            publish(True)
            latencies["status on"] = sidecar.wait_for(
                "offloading to start", lambda s: s["decision"]["offloading"] is True
            )
            status = sidecar.status()
            assert status["observations"][0]["display"] == "90%/50%"
            assert status["decision"]["code"] == "AboveTarget" and status["decision"]["stale"] is False
            assert status["decision"]["controller"]["observedGeneration"] == 1
            served = send(20)
            assert served.count("remote") == 10 and served.count("local") == 10
            assert len(remote.requests) == 10

            # Edits of the ModelDeployment's spec, seen on /status.
            patch({"spec": {"offloadingConfig": {"behavior": {"percentage": 100}}}})
            latencies["percentage"] = sidecar.wait_for(
                "percentage 100", lambda s: s["routing"]["activePercentage"] == 100
            )
            assert set(send(5)) == {"remote"}
            patch(
                {"spec": {"offloadingConfig": {"remoteBackend": {"host": f"127.0.0.1:{other_remote.port}"}}}}
            )
            latencies["remote host"] = sidecar.wait_for(
                "the new remote host",
                lambda s: s["routing"]["remote"] == f"http://127.0.0.1:{other_remote.port}",
            )
            assert set(send(5)) == {"other-remote"}
            patch({"spec": {"enabled": False}})
            latencies["enabled"] = sidecar.wait_for(
                "pass-through", lambda s: s["routing"]["activePercentage"] == 0
            )
            assert set(send(5)) == {"local"}
            patch({"spec": {"enabled": True}})
            sidecar.wait_for("offloading again", lambda s: s["routing"]["activePercentage"] == 100)

            # The controller stops re-evaluating (a status 10 minutes old): the decision stands,
            # and /status and /metrics say it is stale.
            publish(True, age=600)
            sidecar.wait_for("the decision to be stale", lambda s: s["decision"]["stale"] is True)
            status = sidecar.status()
            assert status["decision"]["offloading"] is True and "stale" in status["decision"]["reason"]
            assert status["decision"]["controller"]["staleAfterSeconds"] == 60
            with httpx.Client(timeout=5) as client:
                metrics = client.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics").text
            assert "offload_sidecar_decision_stale 1" in metrics
            assert set(send(5)) == {"other-remote"}

            # Published cool again: offloading stops; no more requests reach a remote.
            before = len(other_remote.requests)
            publish(False)
            latencies["status off"] = sidecar.wait_for(
                "offloading to stop", lambda s: s["decision"]["offloading"] is False
            )
            assert sidecar.status()["decision"]["stale"] is False
            assert set(send(10)) == {"local"}
            assert len(other_remote.requests) == before
            assert sidecar.status()["decision"]["transitions"] == {"on": 2, "off": 2}
            rss = next(
                line.split()[1]
                for line in Path(f"/proc/{sidecar.proc.pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        finally:
            sidecar.stop()
            for server in (local, remote, other_remote):
                loop.run(server.stop())
    assert all(v < 1.0 for v in latencies.values()), latencies
    with capsys.disabled():
        print(f"\n[e2e] sidecar process: edit -> /status after kubectl returned: "
              f"{ {k: f'{v * 1000:.0f} ms' for k, v in latencies.items()} }; RSS {int(rss) / 1024:.1f} MiB")  # fmt: skip


def test_a_modeldeployment_without_remote_backend_offloads_to_the_installations_default(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, tmp_path
) -> None:
    """The Beamlit sample's shape (metrics, no remoteBackend): the injector passes the
    default backend in OFFLOAD_DEFAULT_REMOTE_BACKEND and the sidecar offloads there."""
    from tests.integration.servers import LoopThread, Upstream

    with LoopThread() as loop:
        local = loop.run(Upstream.started("local"))
        remote = loop.run(Upstream.started("default-remote"))
        doc = modeldeployment(namespace, spec__offloadingConfig__behavior={"percentage": 100})
        del doc["spec"]["offloadingConfig"]["remoteBackend"]
        apply(kube, doc)
        done = kube.kubectl(
            "patch", "modeldeployment", "my-model", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": published(True)}),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        sidecar = SidecarProcess(
            sidecar_kubeconfig,
            namespace,
            local.port,
            tmp_path / "sidecar.log",
            env={"OFFLOAD_DEFAULT_REMOTE_BACKEND": f"http://127.0.0.1:{remote.port}/pool"},
        )
        try:
            sidecar.wait_for(
                "offloading to the default remote backend",
                lambda s: (
                    s["decision"]["offloading"] is True
                    and s["routing"]["remote"] == f"http://127.0.0.1:{remote.port}/pool"
                ),
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                served = [client.get("/v1/echo").json()["server"] for _ in range(5)]
            assert served == ["default-remote"] * 5
            assert [r.target for r in remote.requests] == [b"/pool/v1/echo"] * 5
        finally:
            sidecar.stop()
            for server in (local, remote):
                loop.run(server.stop())


def test_headers_from_secrets_are_read_with_the_per_modeldeployment_role_and_follow_the_secret(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, tmp_path
) -> None:
    """A sidecar process in cluster mode reads its remote's API key from a Secret, through the
    Role sidecar_rules_for writes: unused (local) while the Secret is missing, then sent, then
    rotated; the value is never in its log or on /status."""
    from crds.rbac import sidecar_rules_for
    from tests.integration.servers import LoopThread, Upstream

    api_key, rotated = "ak-e2e-5c1f0d", "ak-e2e-rotated-77b2"
    with LoopThread() as loop:
        local = loop.run(Upstream.started("local"))
        remote = loop.run(Upstream.started("remote"))
        doc = modeldeployment(
            namespace,
            spec__offloadingConfig__remoteBackend__host=f"127.0.0.1:{remote.port}",
            spec__offloadingConfig__remoteBackend__headersFromSecrets=[
                {"name": "X-Api-Key", "secretKeyRef": {"name": "remote-api", "key": "apiKey"}}
            ],
            spec__offloadingConfig__behavior={"percentage": 100, "staticSplit": True},
            spec__offloadingConfig__metrics=[],
        )
        apply(kube, doc)
        # The controller's decision for a static split, published by the test: offloading.
        done = kube.kubectl(
            "patch", "modeldeployment", "my-model", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": published(True)}),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        model = ClusterConfigSource(None, namespace, "my-model").model_of(doc)  # type: ignore[arg-type]
        assert model is not None
        rules = sidecar_rules_for(model)
        assert rules == [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["remote-api"], "verbs": ["get"]}
        ]
        grant_modeldeployment_role(kube, namespace, rules)

        def secret(value: str) -> None:
            apply(
                kube,
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "remote-api"},
                 "stringData": {"apiKey": value}},
                namespace,
            )  # fmt: skip

        def send(n: int) -> list[str]:
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                return [client.get("/v1/echo").json()["server"] for _ in range(n)]

        sidecar = SidecarProcess(
            sidecar_kubeconfig, namespace, local.port, tmp_path / "sidecar.log", "--secret-refresh", "1s"
        )
        try:
            status: dict[str, Any] = {}

            def unavailable(s: dict[str, Any]) -> bool:
                status.update(s)
                return s["decision"]["offloading"] and "cannot read" in (
                    s["routing"]["remoteUnavailable"] or ""
                )

            sidecar.wait_for("the remote to be unused for want of its Secret", unavailable)
            assert status["routing"]["remote"] is None
            assert status["routing"]["remoteUnavailable"].startswith(
                f"header X-Api-Key from Secret remote-api key 'apiKey': cannot read Secret {namespace}/remote-api: "
            )
            assert "404" in status["routing"]["remoteUnavailable"]
            assert set(send(5)) == {"local"}

            secret(api_key)
            sidecar.wait_for("the Secret to be read", lambda s: s["routing"]["remote"] is not None)
            assert set(send(5)) == {"remote"}
            assert [r.header("x-api-key") for r in remote.requests] == [api_key] * 5

            secret(rotated)
            deadline = time.monotonic() + 15  # re-read every second (--secret-refresh 1s)
            while remote.requests[-1].header("x-api-key") != rotated:
                assert time.monotonic() < deadline, "the rotated key never reached the remote"
                assert send(1) == ["remote"]
                time.sleep(0.1)
            assert sidecar.status()["routing"]["remoteUnavailable"] is None
            for text in (sidecar.log_path.read_text(errors="replace"), json.dumps(sidecar.status())):
                assert api_key not in text and rotated not in text
        finally:
            sidecar.stop()
            for server in (local, remote):
                loop.run(server.stop())


# --- the whole loop: metrics -> the controller's decision -> the sidecar ---------------------------


def test_the_controller_decides_from_the_metrics_and_a_sidecar_follows_both_ways(
    kube,
    namespace,
    modeldeployment_crd,
    run_webhook,
    sidecar_kubeconfig,
    fake_metrics_server,
    tmp_path,
    capsys,
) -> None:
    """offload-webhook with its controller (evaluation period 2 s) reads PodMetrics from the
    fake metrics server through the aggregation layer, publishes the decision in the status
    (with an Event, shown by kubectl get mdd), and a sidecar process following that
    ModelDeployment splits exactly as decided."""
    from tests.e2e.test_controller import Cluster, deployment, service, start_controller
    from tests.e2e.test_controller import modeldeployment as controller_modeldeployment
    from tests.integration.servers import LoopThread, Upstream

    sustain, cooldown, period = 4, 4, 2
    server = start_controller(run_webhook, kube, namespace, tmp_path)
    c = Cluster(kube, namespace, server)
    c.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "vllm"}})
    c.create(deployment(replicas=2, cpu="200m"))
    c.create(service())
    c.wait("2 ready pods", lambda: len(c.ready_pods()) == 2, 60)
    pods = [p.metadata.name for p in c.ready_pods()]

    def usage(cpu: str) -> None:
        for pod in pods:
            fake_metrics_server.set_usage(
                namespace, pod, {"app": "vllm"}, {"model": {"cpu": cpu, "memory": "10Mi"}}
            )

    usage("40m")  # 20% of the 200m request: cool
    wait_until_samples_postdate_readiness(kube, namespace, pods, "app=vllm")

    def status() -> dict[str, Any]:
        return (c.md("my-model") or {}).get("status") or {}

    with LoopThread() as loop:
        local = loop.run(Upstream.started("local"))
        remote = loop.run(Upstream.started("remote"))
        md = controller_modeldeployment(name="my-model")
        md["spec"]["offloadingConfig"]["remoteBackend"]["host"] = f"127.0.0.1:{remote.port}"
        md["spec"]["offloadingConfig"]["behavior"].update(sustainSeconds=sustain, cooldownSeconds=cooldown)
        c.create(md)  # its pods' usage: 20% of the 200m request, cool
        sidecar = None
        try:
            c.wait(
                "the controller to publish: cool",
                lambda: status().get("decision", {}).get("reason") == "BelowTarget",
                30,
            )
            assert status()["offloading"] is False and status()["utilization"] == "20%/50%"
            sidecar = SidecarProcess(sidecar_kubeconfig, namespace, local.port, tmp_path / "sidecar.log")
            sidecar.wait_for(
                "the sidecar to follow the published decision",
                lambda s: s["ready"] and s["decision"]["code"] == "BelowTarget",
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                assert {client.get("/v1/echo").json()["server"] for _ in range(10)} == {"local"}

            # Hot: on after the sustain window, within one more evaluation period or two.
            hot_at = time.monotonic()
            usage("180m")  # 90% against a 50% target
            c.wait("status.offloading true", lambda: status().get("offloading") is True, 30)
            turned_on = time.monotonic() - hot_at
            assert sustain <= turned_on <= sustain + 2 * period + 2, turned_on
            assert status()["decision"]["reason"] == "AboveTarget" and status()["utilization"] == "90%/50%"
            c.wait("the OffloadingStarted Event", lambda: bool(c.events("OffloadingStarted", "my-model")))
            listed = kube.kubectl("get", "mdd", "my-model", "-n", namespace)
            assert listed.returncode == 0, listed.stderr
            header, row = listed.stdout.splitlines()[:2]
            assert header.split()[:4] == ["NAME", "MODEL", "OFFLOADING", "UTILIZATION"]
            assert row.split()[2:4] == ["true", "90%/50%"], listed.stdout
            sidecar.wait_for("the sidecar to offload", lambda s: s["decision"]["offloading"] is True, 5)
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                served = [client.get("/v1/echo").json()["server"] for _ in range(20)]
            assert served.count("remote") == 10 and served.count("local") == 10

            # Cool again: off after the cooldown window.
            cool_at = time.monotonic()
            usage("40m")
            c.wait("status.offloading false", lambda: status().get("offloading") is False, 30)
            turned_off = time.monotonic() - cool_at
            assert cooldown <= turned_off <= cooldown + 2 * period + 2, turned_off
            c.wait("the OffloadingStopped Event", lambda: bool(c.events("OffloadingStopped", "my-model")))
            sidecar.wait_for(
                "the sidecar to stop offloading", lambda s: s["decision"]["offloading"] is False, 5
            )
            before = len(remote.requests)
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                assert {client.get("/v1/echo").json()["server"] for _ in range(10)} == {"local"}
            assert len(remote.requests) == before
        finally:
            if sidecar is not None:
                sidecar.stop()
            # Deleted while the controller runs, so its finalizer comes off.
            c.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "my-model")
            c.wait("the ModelDeployment gone", lambda: c.md("my-model") is None, 30)
            for upstream in (local, remote):
                loop.run(upstream.stop())
    with capsys.disabled():
        print(
            f"\n[e2e] controller decision: on {turned_on:.1f} s after the load rose (sustain {sustain} s, "
            f"period {period} s), off {turned_off:.1f} s after it fell (cooldown {cooldown} s)"
        )
