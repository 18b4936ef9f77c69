"""The tutorial (README; the Beamlit "offload to any backend" tutorial), end to end on the
real node, as a user follows it:

1. the model: the tutorial's php-apache Deployment and Service in namespace `default`,
   unchanged except the image (localhost/offload-e2e-model:1, a CPU-burning HTTP server built
   here, standing in for registry.k8s.io/hpa-example, which cannot be pulled here);
2. cluster B: the same Deployment and its LoadBalancer Service in namespace `cluster-b`,
   reached by a real address, its ClusterIP;
3. the chart installed (fixture node_release), the tutorial's ModelDeployment applied
   unchanged except `remoteBackend.host` (that address), the Deployment restarted so its pod
   gets the sidecar; the controller then captures the Service (targetPort offload-proxy)
   and binds the sidecar's Role;
4. requests from the host to the Service's ClusterIP, each on its own connection, counted
   by the pod that served them: all local while cold; under load (real CPU in the pod's
   cgroup, measured by metrics-server) half of them served by cluster B once offloading
   starts; all local again after the load.

The tests of this module share that set-up (a module fixture) and run in order: the
injected pod, the tutorial's traffic, a sidecar restart, a rolling restart under load.

The offloading decision is the controller's: `status.offloading`, the OFFLOADING column of
`kubectl get mdd`; the sidecar follows it (its /status says so too), and the split of the
requests through the ClusterIP shows that it does.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes
import pytest
import yaml

from tests.e2e.controlplane.process import wait_until
from tests.e2e.node.traffic import Load, Tally, get, send, wait_until_serving
from tests.e2e.node.workloads import (
    MODEL_IMAGE,
    describe_pods,
    pod_json,
    rollout,
    running_pods,
    wait_for_endpoints,
)
from tests.e2e.objects import apply
from tests.e2e.paths import TUTORIAL_CLUSTER_A, TUTORIAL_MODELDEPLOYMENT

pytestmark = pytest.mark.e2e

CLUSTER_B = "cluster-b"
TUTORIAL_REMOTE = "my-model-on-another-cluster:80"
ADMIN_PORT = 15090  # the sidecar's offload-admin port (chart default)
LOAD_CLIENTS = 3  # enough to keep the pod at its 500m limit: 4x its 125m target


@dataclass
class Tutorial:
    cluster: Any
    service_ip: str  # the php-apache Service's ClusterIP, what clients call
    remote: str  # cluster B's address, as written into the ModelDeployment
    cluster_b_pods: set[str]

    def backend(self, pod: str) -> str:
        return "cluster B" if pod in self.cluster_b_pods else "local"

    def counts(self, tally: Tally) -> dict[str, int]:
        return tally.by_backend(self.backend)

    def model_pod(self) -> kubernetes.client.V1Pod:
        pods = running_pods(self.cluster, "default", "run=php-apache")
        assert len(pods) == 1, [p.metadata.name for p in pods]
        return pods[0]

    def sidecar_status(self) -> dict[str, Any]:
        """The sidecar's /status, from its admin port on the pod's address."""
        pod = self.model_pod()
        url = f"http://{pod.status.pod_ip}:{ADMIN_PORT}/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def sidecar_requests(self) -> int:
        """Requests the sidecar has answered (either backend)."""
        counters = self.sidecar_status()["counters"]
        return counters["local"] + counters["remote"]

    def reaches_sidecar(self) -> bool:
        before = self.sidecar_requests()
        return get(self.service_ip, 80).status == 200 and self.sidecar_requests() > before

    def modeldeployment(self) -> dict[str, Any]:
        return kubernetes.client.CustomObjectsApi(self.cluster.api_client).get_namespaced_custom_object(
            "deployment.beamlit.com", "v1alpha1", "default", "modeldeployments", "my-model"
        )

    def published(self) -> bool | None:
        """The controller's decision (status.offloading), None while it has published none."""
        return (self.modeldeployment().get("status") or {}).get("offloading")

    def followed(self) -> bool:
        """The decision the sidecar follows (its /status)."""
        return bool(self.sidecar_status()["decision"]["offloading"])

    def offloading_is(self, on: bool) -> bool:
        """The controller published `on` and the sidecar follows it."""
        return self.published() is on and self.followed() is on

    def mdd_columns(self) -> dict[str, str]:
        """`kubectl get mdd` as a user reads it: column name -> value."""
        header, row = self.get_mdd().splitlines()
        starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
        bounds = list(zip(starts, starts[1:] + [None], strict=True))
        return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}

    def get_mdd(self) -> str:
        shown = self.cluster.kubectl("get", "mdd", "-n", "default", "my-model")
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.rstrip()


def _swap_image(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            assert container["image"] == "registry.k8s.io/hpa-example"
            container["image"] = MODEL_IMAGE
    return docs


def _tutorial_docs(cluster_b: bool = False) -> list[dict[str, Any]]:
    docs = _swap_image(list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())))
    if cluster_b:
        # The tutorial's cluster B Service is a LoadBalancer, "reachable from the first cluster".
        next(d for d in docs if d["kind"] == "Service")["spec"]["type"] = "LoadBalancer"
    return docs


@pytest.fixture(scope="module")
def tutorial(real_node, node_release, report) -> Iterator[Tutorial]:
    cluster = real_node
    core = kubernetes.client.CoreV1Api(cluster.api_client)
    core.create_namespace({"metadata": {"name": CLUSTER_B, "labels": {"offload-e2e": "true"}}})
    try:
        apply(cluster, _tutorial_docs(cluster_b=True), CLUSTER_B)
        rollout(cluster, CLUSTER_B, "php-apache")
        remote = f"{core.read_namespaced_service('php-apache', CLUSTER_B).spec.cluster_ip}:80"
        cluster_b_pods = {p.metadata.name for p in running_pods(cluster, CLUSTER_B, "run=php-apache")}

        apply(cluster, _tutorial_docs(), "default")
        rollout(cluster, "default", "php-apache")
        text = TUTORIAL_MODELDEPLOYMENT.read_text()
        assert text.count(TUTORIAL_REMOTE) == 1
        applied = cluster.kubectl("apply", "-f", "-", stdin=text.replace(TUTORIAL_REMOTE, remote))
        assert applied.returncode == 0, applied.stderr
        # Pods get the sidecar when they are created: restart, as the tutorial's NOTES say.
        restarted = cluster.kubectl("rollout", "restart", "-n", "default", "deployment/php-apache")
        assert restarted.returncode == 0, restarted.stderr
        rollout(cluster, "default", "php-apache")
        service_ip = core.read_namespaced_service("php-apache", "default").spec.cluster_ip
        tut = Tutorial(cluster, service_ip, remote, cluster_b_pods)

        def captured() -> bool:
            port = core.read_namespaced_service("php-apache", "default").spec.ports[0]
            return (
                port.target_port == "offload-proxy"
                and (tut.modeldeployment().get("status") or {}).get("captured") is True
            )

        wait_until("the controller to capture the php-apache Service", captured, 120, alive=cluster.processes)
        # kube-proxy follows the new targetPort within moments: wait until a request through
        # the ClusterIP is one the sidecar counts.
        wait_until("requests through the ClusterIP to reach the sidecar", tut.reaches_sidecar, 60,
                   alive=cluster.processes)  # fmt: skip
        report(f"[tutorial] cluster B at {remote}; php-apache at {service_ip}, captured:\n{tut.get_mdd()}")
        yield tut
    except BaseException:
        report(describe_pods(cluster, "default"))
        raise
    finally:
        for args in (
            ("delete", "-n", "default", "modeldeployments.deployment.beamlit.com", "my-model", "--wait=true"),
            ("delete", "-n", "default", "deployment/php-apache", "service/php-apache", "--ignore-not-found"),
        ):
            cluster.kubectl(*args, timeout=120)
        core.delete_namespace(CLUSTER_B, propagation_policy="Background")


def _started_at(status: dict[str, Any]) -> str:
    return status["state"]["running"]["startedAt"]


def test_the_injected_pod_starts_its_sidecar_first_confined_and_reading_its_modeldeployment(tutorial):
    pod = tutorial.model_pod()
    doc = pod_json(tutorial.cluster, "default", pod.metadata.name)
    (sidecar_spec,) = [c for c in doc["spec"]["initContainers"] if c["name"] == "offload-proxy"]
    assert sidecar_spec["restartPolicy"] == "Always"  # a native sidecar
    # The kubelet starts the model only once this probe passed: the proxy listens first.
    assert sidecar_spec["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar_spec["image"] == "localhost/offload:0.1.0"
    security = sidecar_spec["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    (sidecar,) = [s for s in doc["status"]["initContainerStatuses"] if s["name"] == "offload-proxy"]
    (model,) = doc["status"]["containerStatuses"]
    assert sidecar["ready"] and sidecar["started"] and model["ready"], doc["status"]
    # The kubelet started the sidecar before the model (RFC 3339 seconds compare as strings).
    assert _started_at(sidecar) <= _started_at(model), (sidecar, model)
    conditions = {c["type"]: c["status"] for c in doc["status"]["conditions"]}
    assert conditions["Ready"] == "True"

    status = tutorial.sidecar_status()
    # The sidecar reads its ModelDeployment from the API server with its projected token
    # (through the `kubernetes` Service), and runs as the image's non-root user.
    assert status["mode"] == "cluster", status
    assert status["configurationErrors"] == [], status["configurationErrors"]
    assert status["routing"]["remote"] == f"http://{tutorial.remote}", status["routing"]
    assert status["routing"]["percentage"] == 50
    ident = tutorial.cluster.kubectl(
        "exec", "-n", "default", pod.metadata.name, "-c", "offload-proxy", "--",
        "python3", "-c", "import os; print(os.getuid())",
    )  # fmt: skip
    assert ident.returncode == 0 and ident.stdout.strip() == "65532", ident.stdout + ident.stderr


def test_tutorial_requests_through_the_cluster_ip_local_then_half_to_cluster_b_under_load_then_local(
    tutorial, report
):
    cluster, ip = tutorial.cluster, tutorial.service_ip
    phases: list[tuple[str, dict[str, int], str]] = []

    def show(phase: str, tally: Tally) -> dict[str, int]:
        counts = tutorial.counts(tally)
        mdd = tutorial.get_mdd()
        status = tutorial.modeldeployment()["status"]
        # The controller keeps the Service captured and counts the injected pods throughout.
        assert (status["captured"], status["injected"]) == (True, "1/1"), status
        phases.append((phase, counts, mdd))
        report(f"[tutorial] {phase}: {counts} failed={len(tally.failed)}\n{mdd}")
        return counts

    # Cold: the model is idle, every request is served locally, through the sidecar.
    wait_until("the controller to publish its decision: not offloading", lambda: tutorial.offloading_is(False),
               60, interval=1, alive=cluster.processes)  # fmt: skip
    assert tutorial.mdd_columns()["OFFLOADING"] == "false"
    through_sidecar = tutorial.sidecar_requests()
    cold = send(ip, 80, 20)
    assert not cold.failed, cold.failed[:3]
    assert show("before the load", cold) == {"local": 20}
    assert tutorial.sidecar_requests() - through_sidecar == 20  # every one through the sidecar

    with Load(ip, 80, clients=LOAD_CLIENTS, max_seconds=420) as load:
        # Real CPU at the pod's limit (500m against 250m of requests, the sidecar's included)
        # is over the 50% target; after metrics-server's window and sustainSeconds (30 s) the
        # sidecar offloads.
        wait_until(
            "offloading to start under load (published and followed)",
            lambda: tutorial.offloading_is(True),
            240,
            interval=1,
            alive=cluster.processes,
        )
        started = time.monotonic()
        wait_until(
            "100 requests since offloading started",
            lambda: len(load.since(started).outcomes) >= 100,
            120,
            alive=cluster.processes,
        )
        during = load.since(started)
        columns = tutorial.mdd_columns()
    assert not load.tally.failed, load.tally.failed[:3]
    counts = show("during the load, once offloading started", during)
    total = sum(counts.values())
    # Exactly 50 of every 100 consecutive requests go remote (an error-diffusion counter);
    # requests in flight at the boundary blur it by a few.
    assert abs(counts.get("cluster B", 0) - total / 2) <= 3, counts
    assert columns["OFFLOADING"] == "true", columns
    report(f"[tutorial] utilization published by the controller under load: {columns['UTILIZATION']}")

    # After the load: once CPU stays under the target for cooldownSeconds (120 s), all local.
    wait_until("offloading to stop after the load (published and followed)",
               lambda: tutorial.offloading_is(False), 300, interval=1, alive=cluster.processes)  # fmt: skip
    assert tutorial.mdd_columns()["OFFLOADING"] == "false"
    after = send(ip, 80, 20)
    assert not after.failed, after.failed[:3]
    assert show("after the load", after) == {"local": 20}


def _sidecar_container_id(tutorial) -> tuple[str, int]:
    doc = pod_json(tutorial.cluster, "default", tutorial.model_pod().metadata.name)
    (status,) = [s for s in doc["status"]["initContainerStatuses"] if s["name"] == "offload-proxy"]
    return status["containerID"].removeprefix("containerd://"), status["restartCount"]


def _sidecar_state(tutorial) -> tuple[int, bool]:
    """(restart count, ready) of the sidecar container."""
    doc = pod_json(tutorial.cluster, "default", tutorial.model_pod().metadata.name)
    (status,) = [s for s in doc["status"]["initContainerStatuses"] if s["name"] == "offload-proxy"]
    return status["restartCount"], status["ready"]


def _task_pid(cluster, container_id: str) -> int:
    listed = cluster.ctr("tasks", "ls")
    for line in listed.stdout.splitlines()[1:]:
        task, pid, state = line.split()
        if task == container_id and state == "RUNNING":
            return int(pid)
    raise AssertionError(f"no running task {container_id} in: {listed.stdout}")


def test_the_model_keeps_running_while_its_sidecar_restarts(tutorial, report):
    """The sidecar process is killed (as by an OOM kill): the kubelet restarts it alone, the
    model container is not restarted, and requests through the ClusterIP succeed again."""
    cluster = tutorial.cluster
    pod = tutorial.model_pod()
    (model_before,) = pod.status.container_statuses
    container_id, restarts = _sidecar_container_id(tutorial)
    with Load(tutorial.service_ip, 80, clients=1, max_seconds=180) as load:
        os.kill(_task_pid(cluster, container_id), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            "the kubelet to restart the sidecar, and the sidecar to be ready again",
            lambda: _sidecar_state(tutorial) == (restarts + 1, True),
            120,
            alive=cluster.processes,
        )
        wait_for_endpoints(cluster, "default", "php-apache", 1)
        wait_until_serving(tutorial.service_ip, 80)
        back = time.monotonic()
        wait_until("20 requests after the restart", lambda: len(load.since(back).outcomes) >= 20, 60)
    after = load.since(back)
    assert not after.failed, after.failed[:3]
    gap = [o for o in load.tally.failed if o.started >= killed - 1]
    report(f"[tutorial] sidecar killed: back in {back - killed:.1f}s, {len(gap)} of "
           f"{len(load.tally.outcomes)} requests failed meanwhile")  # fmt: skip
    (model_after,) = tutorial.model_pod().status.container_statuses
    assert tutorial.model_pod().metadata.name == pod.metadata.name
    assert model_after.restart_count == model_before.restart_count
    assert model_after.container_id == model_before.container_id


def test_a_rolling_restart_under_load_fails_no_request(tutorial, report):
    """kubectl rollout restart while clients send requests: the new pod is injected and
    becomes Ready, the old one drains (model first, then its sidecar) and no request fails."""
    cluster = tutorial.cluster
    old = tutorial.model_pod().metadata.name
    with Load(tutorial.service_ip, 80, clients=2, max_seconds=240) as load:
        wait_until("the first requests", lambda: len(load.tally.outcomes) >= 5, 30)
        restarted = cluster.kubectl("rollout", "restart", "-n", "default", "deployment/php-apache")
        assert restarted.returncode == 0, restarted.stderr
        rollout(cluster, "default", "php-apache")
        core = kubernetes.client.CoreV1Api(cluster.api_client)
        wait_until(
            f"the old pod {old} to be gone",
            lambda: old not in {p.metadata.name for p in core.list_namespaced_pod("default").items},
            120,
            alive=cluster.processes,
        )
        done = time.monotonic()
        wait_until("20 requests to the new pod", lambda: len(load.since(done).outcomes) >= 20, 60)
    tally = load.tally
    served = {o.served_by for o in tally.outcomes if o.status == 200}
    new = tutorial.model_pod().metadata.name
    report(f"[tutorial] rolling restart under load: {len(tally.outcomes)} requests, "
           f"{len(tally.failed)} failed, served by {sorted(served)}")  # fmt: skip
    assert new != old and {old, new} <= served, served
    assert not tally.failed, [(o.error, o.status) for o in tally.failed[:5]]
    (sidecar,) = [c for c in tutorial.model_pod().spec.init_containers if c.name == "offload-proxy"]
    assert sidecar.restart_policy == "Always"
