"""webhook/controller/evaluation.py: which API calls one evaluation makes, how the recorded
answers of tests/testdata/hpa reach the HPA arithmetic, and the status it publishes.

The API client is replaced by an in-process stand-in (FakeGet) answering from the recorded
fixtures; tests/integration/test_evaluation_api.py drives the real client over TLS."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from crds.decision import INITIAL, DecisionState, step
from crds.model import LabelSelector, LabelSelectorRequirement, ModelDeployment, OffloadingBehavior
from crds.observation import MetricObservation
from crds.status import PublishedDecision, stale_after_seconds
from crds.validation import validate_object
from webhook.controller.evaluation import (
    ApiError,
    MetricsReader,
    decide,
    decision_status,
    evaluate_modeldeployment,
    ready_replicas,
    state_from_status,
)

DATA = Path(__file__).parents[1] / "testdata"
NOW = datetime.fromisoformat("2025-06-01T12:00:00Z")
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "php-apache", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"run": "php-apache"}}},
    "status": {"replicas": 3},
}
PODMETRICS = "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods"
PACKETS_PATH = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/packets-per-second"
QUEUE_PATH = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_messages_ready"
OBJECT_PATH = (
    "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/ingresses/main-route/requests-per-second"
)


def load(*parts: str) -> Any:
    return json.loads(DATA.joinpath("hpa", *parts).read_text())


class FakeGet:
    """Stand-in for the API client: path -> answer (a dict, or an exception to raise)."""

    def __init__(self, answers: dict[str, Any]):
        self.answers = answers
        self.calls: list[tuple[str, dict[str, str]]] = []

    def __call__(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        self.calls.append((path, dict(query)))
        answer = self.answers.get(path)
        if answer is None:
            raise ApiError(404, f"{path} not found")
        if isinstance(answer, Exception):
            raise answer
        return copy.deepcopy(answer)


def model(metrics: list[dict[str, Any]], **behavior: Any) -> ModelDeployment:
    obj = yaml.safe_load((DATA / "modeldeployments" / "tutorial.yaml").read_text())
    obj["metadata"]["generation"] = 4
    obj["spec"]["offloadingConfig"]["metrics"] = metrics
    obj["spec"]["offloadingConfig"]["behavior"].update(behavior)
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
INGRESS_RPS = {
    "type": "Object",
    "object": {
        "describedObject": {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "main-route"},
        "metric": {"name": "requests-per-second"},
        "target": {"type": "Value", "value": "10k"},
    },
}


def answers(case: str = "three-ready") -> dict[str, Any]:
    return {
        "/apis/apps/v1/namespaces/default/deployments/php-apache": DEPLOYMENT,
        PODMETRICS: load(case, "podmetrics.json"),
        PACKETS_PATH: load("custom", "pods-packets-per-second.json"),
        QUEUE_PATH: load("custom", "external-queue-messages-ready.json"),
        OBJECT_PATH: load("custom", "object-requests-per-second.json"),
    }


def pods(case: str = "three-ready") -> list[dict[str, Any]]:
    return load(case, "pods.json")["items"]


def reader(get: FakeGet, clock: list[float] | None = None) -> MetricsReader:
    ticks = clock if clock is not None else [0.0]
    return MetricsReader(None, get=get, clock=lambda: NOW, monotonic=lambda: ticks[0])


# --- the API calls of one evaluation ---------------------------------------------------------------


def test_one_evaluation_reads_one_podmetrics_list_and_one_request_per_custom_metric() -> None:
    md = model([CPU, MEMORY, PACKETS, QUEUE])
    get = FakeGet(answers())
    metrics_reader = reader(get)
    observations = metrics_reader.observe(md, pods(), selector={"matchLabels": {"run": "php-apache"}})
    assert [o.display() for o in observations][:1] == ["66%/50%"]
    assert [o.type for o in observations] == ["Resource", "Resource", "Pods", "External"]
    assert observations[2].current == pytest.approx(1033.5)
    # 20 + 30 over the 3 pods that are neither deleted nor finished (the HPA's status.replicas).
    assert observations[3].current == pytest.approx(50 / 3, abs=0.001)
    assert get.calls == [
        (PODMETRICS, {"labelSelector": "run=php-apache"}),
        (PACKETS_PATH, {"labelSelector": "run=php-apache"}),
        (QUEUE_PATH, {"labelSelector": "queue=worker_tasks"}),
    ]
    assert metrics_reader.requests == 3


@pytest.mark.parametrize("count", [1, 20, 100])
def test_the_requests_of_an_evaluation_do_not_grow_with_the_pod_count(count: int) -> None:
    template = pods()[0]
    many = []
    for i in range(count):
        pod = copy.deepcopy(template)
        pod["metadata"]["name"] = f"php-apache-{i}"
        many.append(pod)
    get = FakeGet(answers())
    metrics_reader = reader(get)
    metrics_reader.observe(model([CPU]), many, selector="run=php-apache")
    assert metrics_reader.requests == 1


def test_without_a_selector_the_workload_is_read_once_per_ttl() -> None:
    md = model([CPU])
    get = FakeGet(answers())
    clock = [0.0]
    metrics_reader = reader(get, clock)
    metrics_reader.observe(md, pods())
    clock[0] = 299.0
    metrics_reader.observe(md, pods())
    clock[0] = 300.0
    metrics_reader.observe(md, pods())
    workload_reads = [p for p, _ in get.calls if p.endswith("/deployments/php-apache")]
    assert len(workload_reads) == 2
    assert [q for p, q in get.calls if p == PODMETRICS] == [{"labelSelector": "run=php-apache"}] * 3


def test_object_metrics_name_the_object_and_divide_nothing_for_a_value_target() -> None:
    [obs] = reader(FakeGet(answers())).observe(model([INGRESS_RPS]), pods(), selector="run=php-apache")
    assert obs.type == "Object" and obs.current is not None and obs.current > 0, obs


def test_status_replicas_can_be_given() -> None:
    md = model([QUEUE])
    [obs] = reader(FakeGet(answers())).observe(md, pods(), selector="run=php-apache", status_replicas=5)
    assert obs.current == pytest.approx(10)  # 50 over 5


def test_an_api_that_is_not_served_makes_that_metric_unknown_only() -> None:
    md = model([CPU, PACKETS])
    client_answers = answers()
    del client_answers[PACKETS_PATH]
    observations = reader(FakeGet(client_answers)).observe(md, pods(), selector="run=php-apache")
    assert observations[0].current == 66
    assert observations[1].current is None
    assert "custom.metrics.k8s.io is not served here" in observations[1].reason


def test_forbidden_says_the_controllers_role_is_missing_a_rule() -> None:
    client_answers = answers()
    client_answers[PODMETRICS] = ApiError(403, "no")
    [obs] = reader(FakeGet(client_answers)).observe(model([CPU]), pods(), selector="run=php-apache")
    assert obs.current is None and "forbidden; the controller's ClusterRole must allow it" in obs.reason


@pytest.mark.parametrize(
    "failure",
    [ConnectionRefusedError(111, "refused"), TimeoutError(), RuntimeError("urllib3 gave up")],
)
def test_an_unreachable_metrics_api_makes_its_metrics_unknown(failure: Exception) -> None:
    client_answers = answers()
    client_answers[PODMETRICS] = failure
    observations = reader(FakeGet(client_answers)).observe(
        model([CPU, MEMORY]), pods(), selector="run=php-apache"
    )
    assert [o.current for o in observations] == [None, None]
    assert all(o.reason.startswith("metrics.k8s.io: ") for o in observations)
    assert [o.target for o in observations] == [50, 100 * 2**20]


def test_an_unreadable_workload_makes_every_metric_unknown_with_the_reason() -> None:
    client_answers = answers()
    client_answers["/apis/apps/v1/namespaces/default/deployments/php-apache"] = ApiError(404, "gone")
    observations = reader(FakeGet(client_answers)).observe(model([CPU, MEMORY]), pods())
    assert [o.current for o in observations] == [None, None]
    assert all("cannot read the label selector of Deployment/php-apache" in o.reason for o in observations)


@pytest.mark.parametrize("bad", [[{"metadata": {}}], [None], ["pod"]])
def test_malformed_pods_make_every_metric_unknown_never_raise(bad: list[Any]) -> None:
    observations = reader(FakeGet(answers())).observe(model([CPU]), bad, selector="run=php-apache")
    assert observations[0].current is None and "cannot read the workload's pods" in observations[0].reason


def test_no_metrics_no_request() -> None:
    get = FakeGet(answers())
    md = model([], staticSplit=True)
    assert reader(get).observe(md, pods()) == []
    assert get.calls == []


def test_selectors_given_typed_are_written_as_a_query() -> None:
    selector = LabelSelector(
        match_labels={"run": "php-apache"},
        match_expressions=(LabelSelectorRequirement("tier", "In", ("b", "a")),),
    )
    get = FakeGet(answers())
    reader(get).observe(model([CPU]), pods(), selector=selector)
    assert get.calls == [(PODMETRICS, {"labelSelector": "run=php-apache,tier in (a,b)"})]


def test_ready_replicas_counts_running_ready_pods_not_being_deleted() -> None:
    assert ready_replicas(pods("three-ready")) == 3
    deleting = pods("three-ready")
    deleting[0]["metadata"]["deletionTimestamp"] = "2025-06-01T11:59:00Z"
    assert ready_replicas(deleting) == 2
    assert ready_replicas(pods("pending")) < len(pods("pending"))
    assert ready_replicas([{"metadata": {}}, None]) == 0  # type: ignore[list-item]


# --- the decision and the status ------------------------------------------------------------------


def cpu(percent: float | None) -> MetricObservation:
    return MetricObservation(
        "resource cpu on pods (as a percentage of request)", percent, 50, "3 pods", "Resource", "percent"
    )


def queue(value: float | None) -> MetricObservation:
    return MetricObservation(
        '"queue_messages_ready" (external metric, target average value)', value, 0.25, "", "External"
    )


BEHAVIOR = OffloadingBehavior(percentage=50, sustain_seconds=30, cooldown_seconds=60)


def status_after(observations, state=INITIAL, now=NOW, previous=None, period=15.0) -> dict[str, Any]:
    decision = step(state, observations, now.timestamp(), BEHAVIOR)
    return decision_status(
        decision, observations, now=now, previous=previous, generation=4, period_seconds=period
    )


def test_the_status_fields_of_one_evaluation() -> None:
    status = status_after([cpu(72), queue(0.1)])
    assert status == {
        "observedGeneration": 4,
        "offloading": False,
        "offloadingStatus": False,
        "utilization": "72%/50%",
        "decision": {
            "reason": "SustainPending",
            "message": status["decision"]["message"],
            "lastTransitionTime": "2025-06-01T12:00:00Z",
            "lastEvaluationTime": "2025-06-01T12:00:00Z",
            "evaluationPeriodSeconds": 15,
            "metrics": [
                {
                    "name": "resource cpu on pods (as a percentage of request)",
                    "type": "Resource",
                    "current": "72%",
                    "target": "50%",
                    "ratio": 1.44,
                    "message": "3 pods",
                },
                {
                    "name": '"queue_messages_ready" (external metric, target average value)',
                    "type": "External",
                    "current": "100m",
                    "target": "250m",
                    "ratio": 0.4,
                    "message": "",
                },
            ],
        },
    }
    assert "offloading in 30s" in status["decision"]["message"]


def test_unknown_metrics_are_null_and_the_utilization_says_unknown() -> None:
    status = status_after([cpu(None)])
    assert status["utilization"] == "<unknown>/50%"
    assert status["decision"]["reason"] == "MetricsUnavailable"
    assert status["decision"]["metrics"][0]["current"] is None
    assert status["decision"]["metrics"][0]["ratio"] is None


def test_unchanged_inputs_give_byte_identical_output_but_for_the_evaluation_time() -> None:
    first = status_after([cpu(20)])
    later = NOW + timedelta(seconds=15)
    second = status_after([cpu(20)], now=later, previous=first)
    assert second["decision"]["lastEvaluationTime"] == "2025-06-01T12:00:15Z"
    second["decision"]["lastEvaluationTime"] = first["decision"]["lastEvaluationTime"]
    assert json.dumps(second) == json.dumps(first)


def test_last_transition_time_moves_only_when_offloading_changes() -> None:
    t0 = status_after([cpu(20)])
    assert t0["decision"]["lastTransitionTime"] == "2025-06-01T12:00:00Z"
    state = INITIAL
    previous = t0
    times = []
    for seconds, value in ((15, 80), (30, 80), (45, 80), (60, 80), (75, 52), (90, 20)):
        now = NOW + timedelta(seconds=seconds)
        decision = step(state, [cpu(value)], now.timestamp(), BEHAVIOR)
        state = decision.state
        previous = decision_status(
            decision, [cpu(value)], now=now, previous=previous, generation=4, period_seconds=15
        )
        times.append((previous["offloading"], previous["decision"]["lastTransitionTime"]))
    on_at = "2025-06-01T12:00:45Z"  # hot from 15 s, for the 30 s sustain window
    assert times == [
        (False, "2025-06-01T12:00:00Z"),
        (False, "2025-06-01T12:00:00Z"),
        (True, on_at),
        (True, on_at),
        (True, on_at),
        (True, on_at),
    ]


def test_a_new_leader_continues_from_the_published_state() -> None:
    published = status_after(
        [cpu(80)], state=DecisionState(True, NOW.timestamp() - 600, None, "x", "AboveTarget")
    )
    published["decision"]["lastTransitionTime"] = "2025-06-01T11:50:00Z"
    state = state_from_status(published)
    assert state.offloading is True
    assert state.since == datetime(2025, 6, 1, 11, 50, tzinfo=UTC).timestamp()
    assert state.pending_since is None and state.code == "AboveTarget"
    # Cool from now on: off only after a whole cooldown observed by the new leader.
    now = NOW + timedelta(seconds=15)
    decisions = []
    for seconds in (15, 45, 75):
        now = NOW + timedelta(seconds=seconds)
        decision = step(state, [cpu(20)], now.timestamp(), BEHAVIOR)
        state = decision.state
        decisions.append(decision.offloading)
    assert decisions == [True, True, False]


@pytest.mark.parametrize(
    "status",
    [None, {}, {"offloading": "yes"}, {"utilization": "1%/2%"}, "status", {"offloadingStatus": None}],
)
def test_no_published_decision_starts_from_the_initial_state(status: Any) -> None:
    assert state_from_status(status) == INITIAL


def test_the_beamlit_field_alone_is_read_as_the_decision() -> None:
    state = state_from_status({"offloadingStatus": True})
    assert state.offloading is True and state.since is None


def test_decide_uses_unix_time_and_the_ready_replicas() -> None:
    md = model([], staticSplit=False)
    decision = decide(md, [], INITIAL, NOW, ready_replicas=0)
    assert decision.offloading and decision.code == "NoReadyReplicas"
    assert decision.state.since == NOW.timestamp()
    assert not decide(md, [], INITIAL, NOW, ready_replicas=2).offloading


def test_evaluate_modeldeployment_observes_decides_and_writes_the_status_fields() -> None:
    md = model([CPU], sustainSeconds=0)
    get = FakeGet(answers())
    evaluation = evaluate_modeldeployment(reader(get), md, pods(), None, now=NOW, selector="run=php-apache")
    assert evaluation.decision.offloading and evaluation.decision.code == "AboveTarget"
    assert evaluation.status["offloading"] is True and evaluation.status["utilization"] == "66%/50%"
    assert evaluation.status["observedGeneration"] == 4
    assert len(get.calls) == 1


def test_the_status_reads_back_as_it_was_written() -> None:
    status = status_after([cpu(72), queue(None)])
    published = PublishedDecision.from_status(status)
    assert published is not None
    assert published.offloading is False and published.code == "SustainPending"
    assert published.last_evaluation == NOW and published.period_seconds == 15
    assert published.utilization == "72%/50%"
    assert [(o.metric, o.current, o.target, o.type) for o in published.observations] == [
        ("resource cpu on pods (as a percentage of request)", 72.0, 50.0, "Resource"),
        ('"queue_messages_ready" (external metric, target average value)', None, 0.25, "External"),
    ]
    assert not published.stale(NOW + timedelta(seconds=60))
    assert published.stale(NOW + timedelta(seconds=61))


@pytest.mark.parametrize(("period", "bound"), [(None, 60), (1, 60), (15, 60), (30, 120)])
def test_the_staleness_bound(period: float | None, bound: float) -> None:
    assert stale_after_seconds(period) == bound


def test_the_status_fits_the_crd_schema() -> None:
    """Every field decision_status writes is in the CRD's status schema, with its type."""
    crd = yaml.safe_load((Path(__file__).parents[2] / "crds" / "modeldeployment.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    problems: list[str] = []

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        kind = node.get("type")
        if value is None:
            if not node.get("nullable"):
                problems.append(f"{path}: null but not nullable")
            return
        python = {
            "object": dict,
            "array": list,
            "string": str,
            "boolean": bool,
            "integer": int,
            "number": (int, float),
        }
        if not isinstance(value, python[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
            problems.append(f"{path}: {value!r} is not {kind}")
        if kind == "object":
            for key, child in value.items():
                if key not in node.get("properties", {}):
                    problems.append(f"{path}.{key}: not in the schema")
                else:
                    check(child, node["properties"][key], f"{path}.{key}")
            for key in node.get("required", []):
                if key not in value:
                    problems.append(f"{path}.{key}: required")
        if kind == "array":
            for i, item in enumerate(value):
                check(item, node["items"], f"{path}[{i}]")

    check(status_after([cpu(72), queue(None)]), schema, "status")
    assert problems == []


# --- the controller's Evaluation (webhook.controller.runner.Evaluation) ---------------------------


def controller_evaluation(get: FakeGet, now: list[datetime]) -> Any:
    from webhook.controller.evaluation import ControllerEvaluation

    metrics_reader = MetricsReader(None, get=get, clock=lambda: now[0])
    return ControllerEvaluation(None, period_seconds=15, reader=metrics_reader, clock=lambda: now[0])


def usage_at(percent_of_request: int) -> dict[str, Any]:
    """The three-ready PodMetrics with every container scaled to ``percent_of_request``."""
    doc = copy.deepcopy(load("three-ready", "podmetrics.json"))
    for item in doc["items"]:
        for container in item["containers"]:
            request = 200 if container["name"] == "php-apache" else 50
            container["usage"]["cpu"] = f"{request * percent_of_request // 100}m"
    return doc


def test_the_controllers_evaluation_keeps_the_pending_window_between_periods() -> None:
    client_answers = answers()
    client_answers[PODMETRICS] = usage_at(90)
    get = FakeGet(client_answers)
    now = [NOW]
    evaluation = controller_evaluation(get, now)
    md = model([CPU], sustainSeconds=30)
    key = ("default", "my-model")
    status: dict[str, Any] = {}
    seen = []
    for seconds in (0, 15, 30):
        now[0] = NOW + timedelta(seconds=seconds)
        fields, condition = evaluation.evaluate(key, md, pods(), status, 4, workload=DEPLOYMENT)
        status = {**status, **fields}
        seen.append((fields["offloading"], condition.type, condition.status, condition.reason))
    assert seen == [
        (False, "Offloading", False, "SustainPending"),
        (False, "Offloading", False, "SustainPending"),
        (True, "Offloading", True, "AboveTarget"),
    ]
    assert status["decision"]["lastTransitionTime"] == "2025-06-01T12:00:30Z"
    assert status["utilization"] == "90%/50%"
    # The workload from the cache gave the selector: no read of the Deployment, ever.
    assert [p for p, _ in get.calls] == [PODMETRICS] * 3
    assert get.calls[0][1] == {"labelSelector": "run=php-apache"}


def test_the_controllers_evaluation_starts_from_the_status_after_a_gap_or_another_leaders_decision() -> None:
    client_answers = answers()
    client_answers[PODMETRICS] = usage_at(90)
    now = [NOW]
    evaluation = controller_evaluation(FakeGet(client_answers), now)
    md = model([CPU], sustainSeconds=30)
    key = ("default", "my-model")
    evaluation.evaluate(key, md, pods(), {}, 4, workload=DEPLOYMENT)  # hot: window from 12:00:00
    # Leadership lost and regained 60 s later: the window starts over, no instant flip.
    now[0] = NOW + timedelta(seconds=60)
    fields, _ = evaluation.evaluate(key, md, pods(), {}, 4, workload=DEPLOYMENT)
    assert fields["offloading"] is False and fields["decision"]["reason"] == "SustainPending"
    # Another leader published offloading meanwhile: continue from its state.
    now[0] = NOW + timedelta(seconds=70)
    other = {"offloading": True, "decision": {"lastTransitionTime": "2025-06-01T12:01:05Z"}}
    fields, condition = evaluation.evaluate(key, md, pods(), other, 4, workload=DEPLOYMENT)
    assert fields["offloading"] is True and condition.status is True
    assert fields["decision"]["lastTransitionTime"] == "2025-06-01T12:01:05Z"
    evaluation.forget(key)
    now[0] = NOW + timedelta(seconds=75)
    fields, _ = evaluation.evaluate(key, md, pods(), {}, 4, workload=DEPLOYMENT)
    assert fields["offloading"] is False  # forgotten, and nothing published: from the start


def test_the_controllers_evaluation_without_metrics_offloads_only_without_a_ready_replica() -> None:
    now = [NOW]
    evaluation = controller_evaluation(FakeGet({}), now)
    md = model([])
    fields, condition = evaluation.evaluate(("default", "my-model"), md, pods(), {}, 4)
    assert (fields["offloading"], condition.reason, fields["utilization"]) == (False, "NoMetrics", "")
    fields, condition = evaluation.evaluate(("default", "other"), md, [], {}, 4)
    assert (fields["offloading"], condition.reason) == (True, "NoReadyReplicas")
