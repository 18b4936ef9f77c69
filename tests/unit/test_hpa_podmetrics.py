"""sidecar/podmetrics.py: which API calls one evaluation makes and how their answers and
failures reach the HPA arithmetic. The Kubernetes client is replaced by an in-process
stand-in (FakeClient) that answers from the recorded fixtures of tests/testdata/hpa."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from crds.decode import decode_or_raise
from crds.model import LabelSelector, LabelSelectorRequirement, MetricSpec, ModelDeployment
from crds.validation import validate_object
from sidecar.kube import ApiError
from sidecar.podmetrics import PodMetricSource, resource_plural, selector_string, sidecar_rules_for

DATA = Path(__file__).parents[1] / "testdata"
NOW = datetime.fromisoformat("2025-06-01T12:00:00Z")
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "php-apache", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"run": "php-apache"}}},
    "status": {"replicas": 3},
}


def load(*parts: str) -> Any:
    return json.loads(DATA.joinpath("hpa", *parts).read_text())


class FakeClient:
    """Stand-in for KubeClient.get: path -> answer (a dict, or an exception to raise)."""

    def __init__(self, answers: dict[str, Any]):
        self.answers = answers
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        self.calls.append((path, dict(params or {})))
        answer = self.answers.get(path)
        if answer is None:
            raise ApiError(404, "NotFound", f"{path} not found")
        if isinstance(answer, Exception):
            raise answer
        return copy.deepcopy(answer)


def model(metrics: list[dict[str, Any]]) -> ModelDeployment:
    obj = yaml.safe_load((DATA / "modeldeployments" / "tutorial.yaml").read_text())
    obj["spec"]["offloadingConfig"]["metrics"] = metrics
    result = validate_object(obj)
    assert result.model is not None, result.message()
    return result.model


CPU = {
    "type": "Resource",
    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
}
MEMORY = {
    "type": "Resource",
    "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}},
}
PACKETS = {
    "type": "Pods",
    "pods": {
        "metric": {"name": "packets-per-second"},
        "target": {"type": "AverageValue", "averageValue": "1k"},
    },
}
QUEUE = {
    "type": "External",
    "external": {
        "metric": {"name": "queue_messages_ready", "selector": {"matchLabels": {"queue": "worker_tasks"}}},
        "target": {"type": "AverageValue", "averageValue": "20"},
    },
}


def answers(case: str = "three-ready") -> dict[str, Any]:
    return {
        "/apis/apps/v1/namespaces/default/deployments/php-apache": DEPLOYMENT,
        "/api/v1/namespaces/default/pods": load(case, "pods.json"),
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods": load(case, "podmetrics.json"),
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/packets-per-second": load(
            "custom", "pods-packets-per-second.json"
        ),
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_messages_ready": load(
            "custom", "external-queue-messages-ready.json"
        ),
    }


def source(client: FakeClient, md: ModelDeployment | None, clock: list[float]) -> PodMetricSource:
    return PodMetricSource(client, lambda: md, clock=lambda: NOW, monotonic=lambda: clock[0])  # type: ignore[arg-type]


def test_one_evaluation_reads_the_selector_once_and_shares_one_podmetrics_list() -> None:
    metrics = [CPU, MEMORY, PACKETS, QUEUE]
    md = model(metrics)
    client = FakeClient(answers())
    clock = [0.0]
    observations = asyncio.run(source(client, md, clock).observe(md.spec.offloading_config.metrics))
    assert [o.display() for o in observations][:1] == ["66%/50%"]
    assert observations[2].current == pytest.approx(1033.5)
    assert observations[3].current == pytest.approx(50 / 3, abs=0.001)  # 20 + 30 over status.replicas 3
    paths = [p for p, _ in client.calls]
    assert paths.count("/apis/metrics.k8s.io/v1beta1/namespaces/default/pods") == 1
    pods_call = dict(client.calls)["/api/v1/namespaces/default/pods"]
    assert pods_call == {"labelSelector": "run=php-apache", "resourceVersion": "0"}
    assert dict(client.calls)[
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_messages_ready"
    ] == {"labelSelector": "queue=worker_tasks"}
    # 4 metrics: deployment (selector) + deployment (status.replicas) + pods + podmetrics + custom + external.
    assert len(client.calls) == 6


def test_polls_within_the_period_are_answered_from_the_last_evaluation() -> None:
    md = model([CPU])
    client = FakeClient(answers())
    clock = [0.0]
    metric_source = source(client, md, clock)
    asyncio.run(metric_source.observe(md.spec.offloading_config.metrics))
    first = len(client.calls)
    clock[0] = 14.0
    asyncio.run(metric_source.observe(md.spec.offloading_config.metrics))
    assert len(client.calls) == first
    clock[0] = 15.0
    asyncio.run(metric_source.observe(md.spec.offloading_config.metrics))
    # The selector is not read again: only pods and podmetrics.
    assert len(client.calls) == first + 2


def test_an_api_that_is_not_served_makes_that_metric_unknown_only() -> None:
    md = model([CPU, PACKETS])
    client_answers = answers()
    del client_answers["/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/packets-per-second"]
    observations = asyncio.run(
        source(FakeClient(client_answers), md, [0.0]).observe(md.spec.offloading_config.metrics)
    )
    assert observations[0].current == 66
    assert observations[1].current is None
    assert "custom.metrics.k8s.io is not served here" in observations[1].reason


def test_forbidden_says_the_role_is_missing_a_rule() -> None:
    md = model([CPU])
    client_answers = answers()
    client_answers["/apis/metrics.k8s.io/v1beta1/namespaces/default/pods"] = ApiError(403, "Forbidden", "no")
    [obs] = asyncio.run(
        source(FakeClient(client_answers), md, [0.0]).observe(md.spec.offloading_config.metrics)
    )
    assert obs.current is None and "forbidden" in obs.reason


def test_an_unreachable_api_server_makes_every_metric_unknown() -> None:
    md = model([CPU, MEMORY])
    client_answers = answers()
    client_answers["/api/v1/namespaces/default/pods"] = ConnectionRefusedError(111, "refused")
    observations = asyncio.run(
        source(FakeClient(client_answers), md, [0.0]).observe(md.spec.offloading_config.metrics)
    )
    assert [o.current for o in observations] == [None, None]
    assert all("cannot read the workload Deployment/php-apache or its pods" in o.reason for o in observations)
    assert [o.target for o in observations] == [50, 100 * 2**20]


def test_no_modeldeployment_no_metrics() -> None:
    spec = decode_or_raise(MetricSpec, CPU, "m")
    [obs] = asyncio.run(source(FakeClient({}), None, [0.0]).observe((spec,)))
    assert obs.current is None and obs.reason == "no ModelDeployment in force"
    assert asyncio.run(source(FakeClient({}), None, [0.0]).observe(())) == []


def test_selectors_and_plurals() -> None:
    selector = LabelSelector(
        match_labels={"run": "php-apache", "app": "m"},
        match_expressions=(
            LabelSelectorRequirement("tier", "In", ("b", "a")),
            LabelSelectorRequirement("canary", "DoesNotExist"),
            LabelSelectorRequirement("zone", "Exists"),
            LabelSelectorRequirement("env", "NotIn", ("dev",)),
        ),
    )
    assert selector_string(selector) == "app=m,run=php-apache,tier in (a,b),!canary,zone,env notin (dev)"
    assert selector_string({"matchLabels": {"a": "1"}}) == "a=1"
    assert [resource_plural(k) for k in ("Deployment", "StatefulSet", "Ingress", "Service", "Policy")] == [
        "deployments",
        "statefulsets",
        "ingresses",
        "services",
        "policies",
    ]


def test_per_modeldeployment_rules_name_each_metric_and_secret() -> None:
    obj_metric = {
        "type": "Object",
        "object": {
            "describedObject": {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "Ingress",
                "name": "main-route",
            },
            "metric": {"name": "requests-per-second"},
            "target": {"type": "Value", "value": "10k"},
        },
    }
    md = model([CPU, PACKETS, obj_metric, QUEUE])
    assert sidecar_rules_for(md) == [
        {"apiGroups": ["custom.metrics.k8s.io"], "resources": ["pods/packets-per-second"], "verbs": ["get"]},
        {
            "apiGroups": ["custom.metrics.k8s.io"],
            "resources": ["ingresses/requests-per-second"],
            "resourceNames": ["main-route"],
            "verbs": ["get"],
        },
        {"apiGroups": ["external.metrics.k8s.io"], "resources": ["queue_messages_ready"], "verbs": ["list"]},
    ]
    assert sidecar_rules_for(model([CPU])) == []
