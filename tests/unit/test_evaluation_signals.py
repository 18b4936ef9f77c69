"""The controller's evaluation with Pods metrics the sidecars serve: they are read from the
pods' /signals (a fake gatherer here), never from a metrics API; such ModelDeployments are
evaluated every signals period, and their status is written only when the decision changes
or once per evaluation period."""

from __future__ import annotations

from typing import Any

from crds.signals import IN_FLIGHT
from crds.validation import validate_object
from tests.unit.test_evaluation import CPU, FakeGet, answers, model, pods, reader
from webhook.controller.evaluation import MetricsReader
from webhook.controller.podsignals import PodSignalsReader, SignalGatherer
from webhook.controller.runner import Options, evaluation_period, publishes

QUEUE = "vllm:num_requests_waiting"
IN_FLIGHT_METRIC = {
    "type": "Pods",
    "pods": {"metric": {"name": IN_FLIGHT}, "target": {"type": "AverageValue", "averageValue": "4"}},
}
QUEUE_TOTAL = {
    "type": "Pods",
    "pods": {"metric": {"name": QUEUE}, "target": {"type": "Value", "value": "10"}},
}


class FakeGatherer(SignalGatherer):
    """Answers each pod's /signals from a table; records the pods read."""

    def __init__(self, documents: dict[str, Any]):
        super().__init__()
        self.documents = documents
        self.read: list[list[str]] = []

    def gather(self, targets):
        self.read.append([t.pod for t in targets])
        return {t.pod: self.documents.get(t.pod, "connection refused") for t in targets}


def with_sidecars(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded pods, each with the injected sidecar's admin port."""
    out = []
    for pod in items:
        pod = {**pod, "spec": dict(pod["spec"])}
        pod["spec"]["initContainers"] = [
            {
                "name": "offload-proxy",
                "restartPolicy": "Always",
                "ports": [{"name": "offload-admin", "containerPort": 15090}],
                "resources": {"requests": {"cpu": "50m"}},  # as injected: cpu Utilization stays valid
            }
        ]
        out.append(pod)
    return out


def doc(in_flight: float, queue: float) -> dict[str, Any]:
    return {
        "signals": {IN_FLIGHT: {"value": in_flight}},
        "gauges": {QUEUE: {"series": [{"labels": {}, "value": queue}]}},
    }


def test_sidecar_served_metrics_are_read_from_the_pods_and_the_others_from_their_apis():
    the_pods = with_sidecars(pods())
    names = [p["metadata"]["name"] for p in the_pods]
    gatherer = FakeGatherer({names[0]: doc(6, 4), names[1]: doc(2, 5), names[2]: doc(4, 3)})
    get = FakeGet(answers())
    metrics_reader = reader(get)
    metrics_reader.signals = PodSignalsReader(gatherer)
    observations = metrics_reader.observe(model([IN_FLIGHT_METRIC, CPU, QUEUE_TOTAL]), the_pods)
    assert [(o.metric, o.current, o.target, o.type) for o in observations[::2]] == [
        (f'"{IN_FLIGHT}" on pods', 4.0, 4.0, "Pods"),
        (f'"{QUEUE}" on pods (total)', 12.0, 10.0, "Pods"),
    ]
    assert observations[1].metric.startswith("resource cpu") and observations[1].current is not None
    assert [path for path, _ in get.calls if "custom.metrics" in path] == []  # no adapter asked
    assert gatherer.read == [names]  # one gathering for both metrics


def test_a_modeldeployment_whose_metrics_are_all_served_by_the_sidecars_asks_no_api_at_all():
    the_pods = with_sidecars(pods())
    gatherer = FakeGatherer({p["metadata"]["name"]: doc(1, 0) for p in the_pods})
    get = FakeGet({})  # every path answers 404
    metrics_reader = MetricsReader(None, get=get, signals=PodSignalsReader(gatherer))
    (observation,) = metrics_reader.observe(model([IN_FLIGHT_METRIC]), the_pods)
    assert observation.current == 1.0 and get.calls == []


def test_pods_without_a_sidecar_are_counted_as_pods_without_metrics():
    the_pods = pods()  # no offload-admin port on any
    metrics_reader = MetricsReader(None, get=FakeGet({}), signals=PodSignalsReader(FakeGatherer({})))
    (observation,) = metrics_reader.observe(model([IN_FLIGHT_METRIC]), the_pods)
    assert observation.current is None
    assert "no offload-admin port: the pod has no sidecar" in observation.reason


# --- how often, and when the status is written --------------------------------------------------------


OPTIONS = Options(sidecar_cluster_role="r", period=15.0, signals_period=1.0)


def test_modeldeployments_on_sidecar_signals_are_evaluated_every_signals_period():
    assert evaluation_period(model([IN_FLIGHT_METRIC, CPU]), OPTIONS) == 1.0
    assert evaluation_period(model([CPU]), OPTIONS) == 15.0
    assert evaluation_period(None, OPTIONS) == 15.0
    assert evaluation_period(model([IN_FLIGHT_METRIC]), Options("r", period=0.5, signals_period=1.0)) == 0.5


def status_of(offloading: bool, reason: str) -> dict[str, Any]:
    return {"offloading": offloading, "decision": {"reason": reason, "metrics": [{"current": "3"}]}}


def test_a_fast_evaluation_is_written_when_the_decision_changes_else_once_per_period():
    before = status_of(False, "BelowTarget")
    same = status_of(False, "BelowTarget")
    same["decision"]["metrics"] = [{"current": "2"}]  # only the values moved
    assert not publishes(before, same, since=3.0, period=15.0)
    assert publishes(before, same, since=15.0, period=15.0)
    assert publishes(before, status_of(False, "SustainPending"), since=0.5, period=15.0)
    assert publishes(before, status_of(True, "AboveTarget"), since=0.5, period=15.0)
    assert publishes({}, same, since=1e9, period=15.0)


def test_the_validated_spec_keeps_its_sidecar_metrics():
    obj = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {
            "model": "m",
            "modelSourceRef": {"name": "w"},
            "offloadingConfig": {
                "remoteBackend": {"host": "r:80"},
                "metrics": [IN_FLIGHT_METRIC, QUEUE_TOTAL],
            },
        },
    }
    result = validate_object(obj)
    assert result.ok and evaluation_period(result.model, OPTIONS) == 1.0
