"""The webhook's watches (webhook/watches.py, CacheSync) with the kubernetes client against stand-in API servers
on loopback TLS (FAKE: tests/integration/fake_apiserver.py, one per collection, because
the real API server cannot be made to expire a watch or vanish on cue; the e2e tier runs
the same code against the real one): initial list, events, 410 Gone -> relist, the API
server gone and back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import kubernetes
import pytest

from crds.backoff import Backoff
from tests.e2e.controlplane.process import wait_until
from tests.integration.fake_apiserver import FakeApiServer, LoopbackPKI
from tests.integration.servers import LoopThread
from webhook.cache import DEPLOYMENTS, MODELDEPLOYMENTS, SERVICES, STATEFULSETS, ClusterCache
from webhook.watches import CacheSync

COLLECTIONS = {
    MODELDEPLOYMENTS: ("/apis/deployment.beamlit.com/v1alpha1/modeldeployments", "ModelDeploymentList"),
    DEPLOYMENTS: ("/apis/apps/v1/deployments", "DeploymentList"),
    STATEFULSETS: ("/apis/apps/v1/statefulsets", "StatefulSetList"),
    SERVICES: ("/api/v1/services", "ServiceList"),
}


def md(name, workload="llm"):
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "models", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "model": "m",
            "modelSourceRef": {"kind": "Deployment", "name": workload},
            "offloadingConfig": {
                "remoteBackend": {"host": "remote.example:80"},
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
        },
    }


def api_client(server: FakeApiServer, path: Path) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(server.kubeconfig(path)), client_configuration=configuration
    )
    configuration.retries = 0
    return kubernetes.client.ApiClient(configuration)


def list_functions(clients: dict[str, kubernetes.client.ApiClient]) -> dict:
    custom = kubernetes.client.CustomObjectsApi(clients[MODELDEPLOYMENTS])

    def list_modeldeployments(**kwargs):
        return custom.list_cluster_custom_object(
            "deployment.beamlit.com", "v1alpha1", "modeldeployments", **kwargs
        )

    return {
        MODELDEPLOYMENTS: list_modeldeployments,
        DEPLOYMENTS: kubernetes.client.AppsV1Api(clients[DEPLOYMENTS]).list_deployment_for_all_namespaces,
        STATEFULSETS: kubernetes.client.AppsV1Api(clients[STATEFULSETS]).list_stateful_set_for_all_namespaces,
        SERVICES: kubernetes.client.CoreV1Api(clients[SERVICES]).list_service_for_all_namespaces,
    }


@pytest.fixture
def cluster(tmp_path):
    pki = LoopbackPKI.create(tmp_path / "pki")
    with LoopThread() as loop:
        servers = {}
        for resource, (path, kind) in COLLECTIONS.items():
            server = FakeApiServer(pki, path, kind=kind)
            loop.run(server.start())
            servers[resource] = server
        clients = {r: api_client(s, tmp_path / f"{r}.kubeconfig") for r, s in servers.items()}
        cache = ClusterCache(stale_after=0.5)
        sync = CacheSync(
            cache,
            None,
            watch_timeout=30,
            backoff=Backoff(base=0.05, cap=0.2),
            list_functions_=list_functions(clients),
        )
        try:
            yield loop, servers, cache, sync
        finally:
            sync.stop()
            for client in clients.values():
                client.close()
            for server in servers.values():
                loop.run(server.stop())
            loop.run(asyncio.sleep(0.05))  # let the servers' connection tasks see the close


def names(cache):
    return sorted(c.model.name for c in cache.modeldeployments("models"))


def test_lists_then_follows_events(cluster):
    loop, servers, cache, sync = cluster
    loop.run(servers[MODELDEPLOYMENTS].put(md("a")))
    loop.run(
        servers[DEPLOYMENTS].put(
            {
                "metadata": {"name": "llm", "namespace": "models"},
                "spec": {"selector": {"matchLabels": {"app": "llm"}}},
            }
        )
    )
    assert not cache.synced()
    sync.start()
    assert sync.wait_synced(10)
    assert names(cache) == ["a"] and cache.workload("Deployment", "models", "llm") is not None

    loop.run(servers[MODELDEPLOYMENTS].put(md("b")))
    wait_until("the ADDED event", lambda: names(cache) == ["a", "b"], 10)
    loop.run(servers[MODELDEPLOYMENTS].delete("a"))
    wait_until("the DELETED event", lambda: names(cache) == ["b"], 10)
    loop.run(servers[MODELDEPLOYMENTS].bookmark())
    loop.run(
        servers[SERVICES].put(
            {
                "metadata": {"name": "llm", "namespace": "models"},
                "spec": {"ports": [{"port": 80, "targetPort": 8080}]},
            }
        )
    )
    wait_until("the Service", lambda: cache.service("models", "llm") is not None, 10)
    assert sync.relists[MODELDEPLOYMENTS] == 1  # no relist while the watch is healthy


def test_an_expired_watch_is_resumed_by_a_fresh_list_that_drops_what_was_missed(cluster, caplog):
    caplog.set_level(logging.INFO, logger="webhook.watches")
    loop, servers, cache, sync = cluster
    mds = servers[MODELDEPLOYMENTS]
    loop.run(mds.put(md("a")))
    loop.run(mds.put(md("b")))
    sync.start()
    assert sync.wait_synced(10) and names(cache) == ["a", "b"]

    # "a" is deleted and the history compacted before the watch hears of it: only a relist can tell.
    def delete_quietly():
        mds.objects.pop("a")
        mds.version += 1

    loop.call(delete_quietly)
    loop.run(mds.compact())  # the open watch gets an ERROR event: 410 Gone
    wait_until("a relist after 410 Gone", lambda: sync.relists[MODELDEPLOYMENTS] >= 2, 10)
    wait_until("the missed deletion", lambda: names(cache) == ["b"], 10)
    assert cache.synced()
    assert "watch of modeldeployments expired (410 Gone): listing again" in caplog.text
    assert "watch of modeldeployments failed" not in caplog.text


def test_the_api_server_gone_makes_the_cache_unready_and_its_return_heals_it(cluster):
    loop, servers, cache, sync = cluster
    mds = servers[MODELDEPLOYMENTS]
    loop.run(mds.put(md("a")))
    sync.start()
    assert sync.wait_synced(10)
    port = mds.port
    loop.run(mds.stop())
    wait_until("unready after stale_after", lambda: not cache.synced(), 10)
    assert names(cache) == ["a"]  # the last picture is kept meanwhile, just not trusted for long

    async def restart():
        await mds.start(port)
        await mds.put(md("c"))

    loop.run(restart())
    wait_until("ready again after a relist", cache.synced, 10)
    wait_until("the change made while away", lambda: names(cache) == ["a", "c"], 10)
