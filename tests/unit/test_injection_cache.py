"""The cache's state: lists replace, events apply, invalid ModelDeployments are absent,
readiness follows the watches' health on an injected clock."""

from __future__ import annotations

import copy

import pytest

import webhook.cache as cache_module
from webhook.cache import (
    DEPLOYMENTS,
    MODELDEPLOYMENTS,
    RESOURCES,
    SERVICES,
    STATEFULSETS,
    ClusterCache,
    service_from,
    workload_from,
)
from webhook.injection import ServicePort


def md(name, namespace="models", workload="llm", host="remote.example:80", created="2026-01-01T00:00:00Z"):
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": {
            "model": "m",
            "modelSourceRef": {"kind": "Deployment", "name": workload},
            "offloadingConfig": {
                "remoteBackend": {"host": host},
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


def deployment(name, namespace="models", labels=None):
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"matchLabels": labels or {"app": name}}},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(cache, namespace):
    return sorted(c.model.name for c in cache.modeldeployments(namespace))


def test_modeldeployments_are_indexed_by_namespace():
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [md("a"), md("b"), md("c", namespace="other")])
    assert names(cache, "models") == ["a", "b"]
    assert names(cache, "other") == ["c"]
    assert names(cache, "empty") == []
    assert cache.counts()[MODELDEPLOYMENTS] == 3


def test_an_invalid_modeldeployment_is_absent_until_fixed():
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [md("bad", host="http://x")])
    assert names(cache, "models") == []
    cache.apply(MODELDEPLOYMENTS, "MODIFIED", md("bad"))
    assert names(cache, "models") == ["bad"]
    cache.apply(MODELDEPLOYMENTS, "MODIFIED", md("bad", host="http://x"))  # broken again: gone again
    assert names(cache, "models") == []


@pytest.mark.parametrize(
    "host", ["remote:\u00b2", "[::1]:\u00b9", "remote:" + "9" * 5000, "127.0.0.1:\u0661\u0668"]
)
def test_a_stored_modeldeployment_with_a_non_ascii_port_is_absent_and_the_rest_syncs(host):
    # Stored before the validating webhook existed: the list must still load.
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [md("a"), md("bad", host=host), md("c")])
    assert names(cache, "models") == ["a", "c"]
    cache.apply(MODELDEPLOYMENTS, "MODIFIED", md("a", host=host))
    assert names(cache, "models") == ["c"]


def test_an_object_validation_cannot_handle_is_absent_and_the_rest_syncs(monkeypatch, caplog):
    # Whatever a future validator bug trips on costs that object only, logged with its name.
    real = cache_module.validate_object

    def validate(obj, settings):
        if obj["metadata"]["name"] == "bad":
            raise ValueError("a bug")
        return real(obj, settings)

    monkeypatch.setattr(cache_module, "validate_object", validate)
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [md("a"), md("bad"), md("c")])
    assert names(cache, "models") == ["a", "c"]
    cache.apply(MODELDEPLOYMENTS, "ADDED", md("bad"))
    assert names(cache, "models") == ["a", "c"]
    assert "ModelDeployment 'models'/'bad' could not be validated" in caplog.text


def test_events_add_modify_and_delete():
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [])
    cache.apply(MODELDEPLOYMENTS, "ADDED", md("a"))
    cache.apply(MODELDEPLOYMENTS, "MODIFIED", md("a", workload="llm2"))
    [entry] = cache.modeldeployments("models")
    assert (
        entry.model.spec.model_source_ref.name == "llm2"
        and entry.creation_timestamp == "2026-01-01T00:00:00Z"
    )
    cache.apply(MODELDEPLOYMENTS, "DELETED", md("a"))
    assert names(cache, "models") == []

    cache.apply(DEPLOYMENTS, "ADDED", deployment("llm"))
    cache.apply(STATEFULSETS, "ADDED", deployment("llm", labels={"app": "sts"}))
    assert cache.workload("Deployment", "models", "llm").selector.matches({"app": "llm"})
    assert cache.workload("StatefulSet", "models", "llm").selector.matches({"app": "sts"})
    cache.apply(DEPLOYMENTS, "DELETED", deployment("llm"))
    assert cache.workload("Deployment", "models", "llm") is None
    assert cache.workload("StatefulSet", "models", "llm") is not None


def test_a_fresh_list_replaces_everything_so_missed_deletions_do_not_linger():
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [md("a"), md("b")])
    cache.replace(MODELDEPLOYMENTS, [md("b")])
    assert names(cache, "models") == ["b"]
    cache.replace(DEPLOYMENTS, [deployment("x"), deployment("y")])
    cache.replace(STATEFULSETS, [deployment("s")])
    cache.replace(DEPLOYMENTS, [deployment("y")])
    assert cache.workload("Deployment", "models", "x") is None
    assert cache.workload("StatefulSet", "models", "s") is not None  # another kind's list is kept


def test_a_reader_keeps_a_consistent_snapshot_while_events_arrive():
    cache = ClusterCache()
    cache.replace(MODELDEPLOYMENTS, [md("a"), md("b")])
    snapshot = cache.modeldeployments("models")
    cache.apply(MODELDEPLOYMENTS, "DELETED", md("a"))
    assert sorted(c.model.name for c in snapshot) == ["a", "b"]


def test_services_keep_their_ports_and_the_original_target_annotation():
    svc = {
        "metadata": {
            "name": "s",
            "namespace": "models",
            "annotations": {"offload.beamlit.com/original-target-port": "http"},
        },
        "spec": {
            "ports": [
                {"port": 80, "targetPort": "offload-proxy", "name": "web"},
                {"port": 81, "targetPort": 8081},
                {"port": 82},
                {"port": 83, "targetPort": "8083"},
                # Not ASCII digits: names no container port has (int() refuses '²').
                {"port": 84, "targetPort": "\u00b2"},
                {"port": 85, "targetPort": "\u0668\u0660"},
                {"port": 86, "targetPort": "9" * 5000},
            ]
        },
    }
    info = service_from(svc)
    assert info.ports == (
        ServicePort(80, "offload-proxy", "web"),
        ServicePort(81, 8081),
        ServicePort(82),
        ServicePort(83, 8083),
        ServicePort(84, "\u00b2"),
        ServicePort(85, "\u0668\u0660"),
        ServicePort(86, "9" * 5000),
    )
    assert info.original_target_port == "http"
    cache = ClusterCache()
    cache.apply(SERVICES, "ADDED", svc)
    assert cache.service("models", "s") == info


def test_a_workload_with_an_unusable_selector_matches_nothing():
    broken = workload_from(
        "Deployment",
        {
            "metadata": {"name": "x", "namespace": "n"},
            "spec": {"selector": {"matchExpressions": [{"key": "a", "operator": "Gt"}]}},
        },
    )
    assert broken.selector is None


def test_ready_only_after_every_resource_is_listed():
    cache = ClusterCache()
    for resource in RESOURCES:
        assert not cache.synced()
        cache.mark_listed(resource)
    assert cache.synced() and cache.ready()


def test_a_failing_watch_makes_the_cache_unready_only_after_stale_after():
    clock = Clock()
    cache = ClusterCache(clock=clock, stale_after=60)
    for resource in RESOURCES:
        cache.mark_listed(resource)
    cache.mark_failing(SERVICES)
    clock.now += 30
    cache.mark_failing(SERVICES)  # still failing: the first failure's time counts
    assert cache.synced()
    clock.now += 31
    assert not cache.synced()
    cache.mark_listed(SERVICES)  # a successful relist: fresh again
    assert cache.synced()


def test_unknown_resources_are_refused():
    with pytest.raises(ValueError):
        ClusterCache().replace("pods", [])
    with pytest.raises(ValueError):
        ClusterCache().apply("pods", "ADDED", {})


def test_the_cache_does_not_keep_references_to_the_event_objects():
    cache = ClusterCache()
    obj = md("a")
    cache.apply(MODELDEPLOYMENTS, "ADDED", obj)
    before = copy.deepcopy(cache.modeldeployments("models"))
    obj["spec"]["modelSourceRef"]["name"] = "changed"
    assert cache.modeldeployments("models") == before
