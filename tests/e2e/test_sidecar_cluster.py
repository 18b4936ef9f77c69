"""The sidecar's cluster side on the real control plane, with the credentials a sidecar
really has: a ServiceAccount token bound to the sidecar's minimal Role
(charts/offload/files/sidecar-role.yaml), in a kubeconfig standing in for the
in-cluster files.

- The Role allows exactly what the sidecar reads, and no Secret.
- The cluster ConfigSource follows edits of its ModelDeployment (percentage, remote
  host, enabled) through its watch, with no further list.
- PodMetrics come through the aggregation layer from a FAKE metrics server
  (tests/e2e/fake_metrics_server.py: there are no kubelets to measure anything) and
  the HPA evaluation over the Deployment's kwok pods crosses the target both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import modeldeployments as md
import pytest
import yaml
from controlplane.process import wait_until
from fake_metrics_server import FakeMetricsServer
from paths import REPO_ROOT, TUTORIAL_CLUSTER_A

from sidecar.clustersource import ClusterConfigSource
from sidecar.kube import ApiError, Backoff, KubeClient, load_kubeconfig
from sidecar.podmetrics import PodMetricSource

pytestmark = pytest.mark.e2e

ROLE_FILE = REPO_ROOT / "charts" / "offload" / "files" / "sidecar-role.yaml"
CLUSTER_ROLE = "offload-sidecar-e2e"
ACCOUNT = "model-server"


def apply(kube, doc: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
    docs = doc if isinstance(doc, list) else [doc]
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    done = kube.kubectl(*args, stdin=yaml.safe_dump_all(docs))
    assert done.returncode == 0, done.stderr


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
    token = kube.kubectl("create", "token", ACCOUNT, "-n", namespace, "--duration=1h")
    assert token.returncode == 0, token.stderr
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    path = tmp_path / "sidecar-kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "e2e", "cluster": cluster}],
                "users": [{"name": ACCOUNT, "user": {"token": token.stdout.strip()}}],
                "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": ACCOUNT}}],
                "current-context": "e2e",
            }
        )
    )
    return path


def test_the_sidecar_role_allows_what_the_sidecar_reads_and_no_secret(
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
            deployment = await client.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/php-apache")
            assert deployment["spec"]["selector"] == {"matchLabels": {"run": "php-apache"}}
            await client.get(f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": "run=php-apache"})
            refused = [
                f"/api/v1/namespaces/{namespace}/secrets/remote-credentials",
                f"/api/v1/namespaces/{namespace}/secrets",
                "/apis/deployment.beamlit.com/v1alpha1/namespaces/default/modeldeployments",
                f"/api/v1/namespaces/{namespace}/services/php-apache",
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
            f"\n[e2e] ModelDeployment edit -> sidecar update after kubectl returned: {[f'{x * 1000:.0f} ms' for x in latencies]}"
        )


def two_ready_php_apache_pods(kube, namespace: str) -> list[str]:
    """The names of the (scaled to 2) php-apache pods once both are Running and Ready."""
    core = kubernetes.client.CoreV1Api(kube.api_client)

    def ready_pods() -> list[str]:
        pods = core.list_namespaced_pod(namespace, label_selector="run=php-apache").items
        ready = [
            p.metadata.name
            for p in pods
            if p.status.phase == "Running"
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return ready if len(ready) == 2 else []

    wait_until("two Running, Ready php-apache pods", ready_pods, 60, alive=kube.processes)
    pods = ready_pods()
    time.sleep(2)  # a sample must postdate readiness by its window (1 s), as the HPA requires for cpu
    return pods


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


def test_pod_metrics_through_the_aggregation_layer_cross_the_target_both_ways(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, fake_metrics_server
) -> None:
    apply(kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), namespace)
    kube.kubectl("scale", "deployment/php-apache", "--replicas=2", "-n", namespace)
    pods = two_ready_php_apache_pods(kube, namespace)
    model = ClusterConfigSource(None, namespace, "my-model").model_of(modeldeployment(namespace))  # type: ignore[arg-type]
    assert model is not None

    def serve_usage(cpu: str) -> None:
        for pod in pods:
            fake_metrics_server.set_usage(
                namespace, pod, {"run": "php-apache"}, {"php-apache": {"cpu": cpu, "memory": "10Mi"}}
            )

    async def observe() -> Any:
        client = KubeClient(load_kubeconfig(sidecar_kubeconfig))
        try:
            source = PodMetricSource(client, lambda: model)
            [observation] = await source.observe(model.spec.offloading_config.metrics)
            return observation
        finally:
            await client.close()

    serve_usage("180m")  # 90% of the 200m request, against a 50% target
    hot = asyncio.run(observe())
    assert (hot.current, hot.target) == (90, 50), hot.reason
    assert hot.reason == "2 pods"
    serve_usage("40m")
    cool = asyncio.run(observe())
    assert cool.current == 20, cool.reason
    assert any("/namespaces/" + namespace + "/pods" in r for r in fake_metrics_server.requests)


def test_the_per_modeldeployment_rules_open_exactly_the_referenced_secret(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig
) -> None:
    from sidecar.oauth import SecretKeyReader
    from sidecar.podmetrics import sidecar_rules_for

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
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "my-model-sidecar"}, "rules": rules}  # fmt: skip
    apply(kube, role, namespace)
    done = kube.kubectl(
        "create", "rolebinding", "my-model-sidecar", "--role=my-model-sidecar",
        f"--serviceaccount={namespace}:{ACCOUNT}", "-n", namespace,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
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

    def __init__(self, kubeconfig: Path, namespace: str, upstream_port: int, logs: Path, *extra: str):
        from controlplane.net import free_port

        self.port, self.admin_port = free_port(), free_port()
        env = {
            **os.environ,
            "POD_NAME": "php-apache-0",
            "POD_NAMESPACE": namespace,
            "MODELDEPLOYMENT_NAME": "my-model",
            "KUBECONFIG": str(kubeconfig),
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


def test_a_sidecar_process_follows_its_modeldeployment_and_offloads_while_the_workload_is_hot(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, fake_metrics_server, tmp_path, capsys
) -> None:
    from tests.integration.servers import LoopThread, Upstream

    apply(kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), namespace)
    kube.kubectl("scale", "deployment/php-apache", "--replicas=2", "-n", namespace)
    with LoopThread() as loop:
        local = loop.run(Upstream.started("local"))
        remote = loop.run(Upstream.started("remote"))
        other_remote = loop.run(Upstream.started("other-remote"))
        apply(
            kube,
            modeldeployment(
                namespace,
                spec__offloadingConfig__remoteBackend__host=f"127.0.0.1:{remote.port}",
                spec__offloadingConfig__behavior={
                    "percentage": 50,
                    "sustainSeconds": 0,
                    "cooldownSeconds": 0,
                },
            ),
        )
        ready_pods = two_ready_php_apache_pods(kube, namespace)

        def usage(cpu: str) -> None:
            for pod in ready_pods:
                fake_metrics_server.set_usage(
                    namespace, pod, {"run": "php-apache"}, {"php-apache": {"cpu": cpu, "memory": "10Mi"}}
                )

        def send(n: int) -> list[str]:
            with httpx.Client(base_url=f"http://127.0.0.1:{sidecar.port}", timeout=10) as client:
                return [client.get("/v1/echo").json()["server"] for _ in range(n)]

        def patch(doc: dict[str, Any]) -> None:
            done = kube.kubectl(
                "patch", "modeldeployment", "my-model", "-n", namespace, "--type=merge", "-p", json.dumps(doc)
            )
            assert done.returncode == 0, done.stderr

        usage("40m")  # 20% of request: cool
        sidecar = SidecarProcess(sidecar_kubeconfig, namespace, local.port, tmp_path / "sidecar.log")
        try:
            sidecar.wait_for(
                "the sidecar to read its ModelDeployment and evaluate it as cool",
                lambda s: s["ready"] and s["mode"] == "cluster" and s["observations"]
                and s["observations"][0]["current"] == 20,
            )  # fmt: skip
            assert sidecar.status()["decision"]["offloading"] is False
            assert set(send(10)) == {"local"}

            # Hot: 90% against a 50% target -> offloading at 50%, exactly every other request.
            usage("180m")
            sidecar.wait_for("offloading to start", lambda s: s["decision"]["offloading"] is True)
            assert sidecar.status()["observations"][0]["display"] == "90%/50%"
            served = send(20)
            assert served.count("remote") == 10 and served.count("local") == 10
            assert len(remote.requests) == 10

            # Edits of the ModelDeployment, seen on /status.
            latencies = {}
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

            # Cool again: offloading stops; no more requests reach a remote.
            before = len(other_remote.requests)
            usage("40m")
            sidecar.wait_for("offloading to stop", lambda s: s["decision"]["offloading"] is False)
            assert set(send(10)) == {"local"}
            assert len(other_remote.requests) == before
            transitions = sidecar.status()["decision"]["transitions"]
            assert transitions, transitions
            rss = next(
                line.split()[1]
                for line in Path(f"/proc/{sidecar.proc.pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        finally:
            sidecar.stop()
            for server in (local, remote, other_remote):
                loop.run(server.stop())
    with capsys.disabled():
        print(f"\n[e2e] sidecar process: edit -> /status after kubectl returned: "
              f"{ {k: f'{v * 1000:.0f} ms' for k, v in latencies.items()} }; RSS {int(rss) / 1024:.1f} MiB")  # fmt: skip


def test_headers_from_secrets_are_read_with_the_per_modeldeployment_role_and_follow_the_secret(
    kube, namespace, modeldeployment_crd, sidecar_kubeconfig, tmp_path
) -> None:
    """A sidecar process in cluster mode reads its remote's API key from a Secret, through the
    Role sidecar_rules_for writes: unused (local) while the Secret is missing, then sent, then
    rotated; the value is never in its log or on /status."""
    from sidecar.podmetrics import sidecar_rules_for
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
            spec__offloadingConfig__behavior={"percentage": 100},
            spec__offloadingConfig__metrics=[],  # no metrics: the static split, offloading at once
        )
        apply(kube, doc)
        model = ClusterConfigSource(None, namespace, "my-model").model_of(doc)  # type: ignore[arg-type]
        assert model is not None
        rules = sidecar_rules_for(model)
        assert rules == [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["remote-api"], "verbs": ["get"]}
        ]
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "my-model-sidecar"}, "rules": rules}  # fmt: skip
        apply(kube, role, namespace)
        done = kube.kubectl(
            "create", "rolebinding", "my-model-sidecar", "--role=my-model-sidecar",
            f"--serviceaccount={namespace}:{ACCOUNT}", "-n", namespace,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

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
