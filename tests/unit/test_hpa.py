"""The HPA's metric arithmetic against recorded pod lists and metrics API responses.

Fixtures: tests/testdata/hpa/<case>/pods.json (a v1 PodList) and podmetrics.json
(a metrics.k8s.io/v1beta1 PodMetricsList). Every pod requests cpu 200m in the
model container and 50m in the injected native sidecar (250m a pod); the three
ready pods use 181m+20m, 150m+10m and 120m+20m of cpu (501m in all):
501 / 750 = 66% of request.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from crds.decode import decode_or_raise
from crds.hpa import (
    ExternalReading,
    HpaSettings,
    ObjectReading,
    PodUsageReading,
    PodValuesReading,
    ScaleTargetPods,
    Unreadable,
    evaluate,
    milli,
    parse_external_value_list,
    parse_go_duration,
    parse_metric_value_list,
    parse_pod,
    parse_pod_list,
    parse_pod_metrics_list,
)
from crds.model import MetricSpec

DATA = Path(__file__).parents[1] / "testdata" / "hpa"
NOW = datetime.fromisoformat("2025-06-01T12:00:00Z")


def load(*parts: str) -> Any:
    return json.loads(DATA.joinpath(*parts).read_text())


def workload(case: str) -> ScaleTargetPods:
    pods = parse_pod_list(load(case, "pods.json"))
    return ScaleTargetPods(pods=pods, status_replicas=len(pods))


def usage(case: str) -> PodUsageReading:
    return PodUsageReading(parse_pod_metrics_list(load(case, "podmetrics.json")))


def resource(name: str, target: dict[str, Any], container: str | None = None) -> MetricSpec:
    if container is None:
        data = {"type": "Resource", "resource": {"name": name, "target": target}}
    else:
        data = {
            "type": "ContainerResource",
            "containerResource": {"name": name, "container": container, "target": target},
        }
    return decode_or_raise(MetricSpec, data, "metric")


def util(percent: int) -> dict[str, Any]:
    return {"type": "Utilization", "averageUtilization": percent}


def avg(value: str) -> dict[str, Any]:
    return {"type": "AverageValue", "averageValue": value}


def one(spec: MetricSpec, case: str, *, now: datetime = NOW, tolerance: float = 0.1):
    [obs] = evaluate([spec], workload(case), [usage(case)], now, HpaSettings(tolerance=tolerance))
    return obs


# --- Utilization -------------------------------------------------------------------------------

UTILIZATION_TABLE = [
    # case, target %, expected current %, words the reason must contain
    # Σusage/Σrequests over the pods, not divided by the replica count again (that would say 22%),
    # and the native sidecar's 50m request counts (without it 501/600 = 83%).
    ("three-ready", 50, 66, ["3 pods"]),
    # A never-ready pod with a hot sample: ignored; on the way up it counts as 0 -> 501/1000.
    ("unready", 50, 50, ["4 pods", "1 pending or unready counted as 0%", "within tolerance"]),
    ("unready", 80, 66, ["1 pending or unready ignored"]),
    # A pod in its cpu initialization period whose sample predates a full window of readiness.
    ("initializing", 50, 50, ["1 pending or unready counted as 0%"]),
    # A pending pod: like an unready one.
    ("pending", 50, 50, ["1 pending or unready counted as 0%"]),
    ("pending", 80, 66, ["1 pending or unready ignored"]),
    # Terminating, Failed and Succeeded pods are out, whatever their samples say.
    ("finished", 50, 66, ["6 pods", "3 deleted or finished ignored"]),
    # A pod without samples: 0% on the way up, 100% of request on the way down...
    ("missing", 30, 50, ["1 missing metrics counted as 0%", "66% from samples alone"]),
    ("missing", 50, 50, ["1 missing metrics counted as 0%", "within tolerance"]),
    ("missing", 80, 75, ["1 missing metrics counted as 100%", "within tolerance"]),
    # ... or the target when it is above 100%.
    ("missing", 120, 80, ["1 missing metrics counted as 120%"]),
    # Counting the missing pod flips the direction (66% > 60% but 50% < 60%): no change, held at target.
    ("missing", 60, 60, ["direction flips", "no change"]),
]


@pytest.mark.parametrize(("case", "target", "current", "words"), UTILIZATION_TABLE)
def test_cpu_utilization_follows_the_hpa(case: str, target: int, current: int, words: list[str]) -> None:
    obs = one(resource("cpu", util(target)), case)
    assert obs.metric == "resource cpu on pods (as a percentage of request)"
    assert (obs.current, obs.target) == (current, target), obs.reason
    for word in words:
        assert word in obs.reason


def test_an_initializing_pod_counts_once_its_initialization_period_is_over() -> None:
    # Six minutes after its start (> 5 min) the same pod's 500m sample counts: 1001/1000.
    obs = one(resource("cpu", util(50)), "initializing", now=NOW + timedelta(minutes=4))
    assert obs.current == 100
    assert obs.reason.startswith("4 pods")


def test_the_cpu_initialization_period_is_a_setting() -> None:
    [obs] = evaluate(
        [resource("cpu", util(50))],
        workload("initializing"),
        [usage("initializing")],
        NOW,
        HpaSettings(cpu_initialization_period=timedelta(seconds=60)),
    )
    assert obs.current == 100


def test_readiness_does_not_matter_for_memory() -> None:
    # Memory: the never-ready pod's sample counts (128+96+110+100 Mi used of 4 x 96 Mi).
    obs = one(resource("memory", util(100)), "unready")
    assert obs.current == (128 + 96 + 110 + 100) * 100 // (4 * 96)
    assert obs.reason == "4 pods"


def test_a_container_without_a_request_makes_utilization_invalid_not_zero() -> None:
    obs = one(resource("cpu", util(50)), "missing-request")
    assert obs.current is None
    assert 'container "offload-sidecar" of pod "php-apache-7d8f9b6c5-c3" has no cpu request' in obs.reason
    assert obs.reason.startswith("invalid")
    # Memory is requested everywhere, and AverageValue needs no request at all.
    assert one(resource("memory", util(100)), "missing-request").current == (128 + 96 + 110) * 100 // (3 * 96)
    assert one(resource("cpu", avg("150m")), "missing-request").current == pytest.approx(0.167)


def test_no_samples_at_all_is_unknown_not_zero() -> None:
    obs = one(resource("cpu", util(50)), "no-samples")
    assert obs.current is None
    assert "no metrics for any ready pod" in obs.reason
    assert obs.display() == "<unknown>/50%"


def test_no_pods_is_unknown() -> None:
    [obs] = evaluate([resource("cpu", util(50))], ScaleTargetPods((), 0), [PodUsageReading(())], NOW)
    assert obs.current is None
    assert "no pods" in obs.reason


# --- ContainerResource ---------------------------------------------------------------------------


def test_container_resource_counts_one_container_only() -> None:
    obs = one(resource("cpu", util(50), container="php-apache"), "three-ready")
    assert obs.metric == 'resource cpu of container "php-apache" on pods (as a percentage of request)'
    assert obs.current == (181 + 150 + 120) * 100 // 600
    sidecar = one(resource("cpu", util(50), container="offload-sidecar"), "three-ready")
    assert sidecar.current == (20 + 10 + 20) * 100 // 150


def test_container_resource_ignores_a_missing_request_in_other_containers() -> None:
    # Only the named container's request matters.
    assert one(resource("cpu", util(50), container="php-apache"), "missing-request").current == 75


# --- AverageValue ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target", "current", "over"),
    [
        # (201+160+140)m / 3 = 167m against 150m: over target.
        ("cpu", "150m", 0.167, True),
        # ... against 200m: under (the comparison must not be inverted).
        ("cpu", "200m", 0.167, False),
        # (128+96+110)/3 Mi against 100Mi.
        ("memory", "100Mi", (128 + 96 + 110) * 2**20 / 3, True),
        ("memory", "128Mi", (128 + 96 + 110) * 2**20 / 3, False),
    ],
)
def test_average_value_compares_the_average_with_the_target(
    name: str, target: str, current: float, over: bool
) -> None:
    obs = one(resource(name, avg(target)), "three-ready")
    assert obs.metric == f"resource {name} on pods"
    assert obs.current == pytest.approx(current, rel=1e-6)
    assert obs.target == pytest.approx(milli(target) / 1000)
    assert obs.ratio is not None
    assert (obs.ratio > 1) is over


def test_average_value_counts_missing_pods_as_the_target_on_the_way_down() -> None:
    # 167m from samples against 250m; the missing pod counts as 250m: (501+250)/4 = 187m.
    obs = one(resource("cpu", avg("250m")), "missing")
    assert obs.current == pytest.approx(0.187)
    assert "1 missing metrics counted as the target" in obs.reason


def test_average_value_of_cpu_ignores_unready_pods() -> None:
    obs = one(resource("cpu", avg("200m")), "unready")
    assert obs.current == pytest.approx(0.167)
    assert "1 pending or unready ignored" in obs.reason


# --- Pods, Object, External ----------------------------------------------------------------------------


def spec(data: dict[str, Any]) -> MetricSpec:
    return decode_or_raise(MetricSpec, data, "metric")


PACKETS = spec({"type": "Pods", "pods": {"metric": {"name": "packets-per-second"}, "target": avg("1k")}})


def test_pods_metric_averages_per_pod_values() -> None:
    samples = parse_metric_value_list(load("custom", "pods-packets-per-second.json"))
    [obs] = evaluate([PACKETS], workload("three-ready"), [PodValuesReading(samples)], NOW)
    assert obs.metric == '"packets-per-second" on pods'
    assert obs.current == pytest.approx((1200 + 900.5 + 1000) / 3, abs=0.001)
    assert obs.target == 1000


def test_pods_metric_counts_a_pod_without_a_value_as_zero_on_the_way_up() -> None:
    samples = parse_metric_value_list(load("custom", "pods-packets-per-second.json"))
    [obs] = evaluate([PACKETS], workload("missing"), [PodValuesReading(samples)], NOW)
    # 1033.5 from samples (> 1000): the fourth pod counts as 0 -> 775.1, which flips the direction.
    assert obs.current == 1000
    assert "direction flips" in obs.reason


OBJECT = {
    "type": "Object",
    "object": {
        "describedObject": {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "main-route"},
        "metric": {"name": "requests-per-second"},
    },
}
EXTERNAL = {"type": "External", "external": {"metric": {"name": "queue_messages_ready"}}}


@pytest.mark.parametrize(
    ("data", "target", "current", "name"),
    [
        (
            OBJECT,
            {"type": "Value", "value": "8k"},
            10000,
            '"requests-per-second" on Ingress/main-route (target value)',
        ),
        # AverageValue: the object's value over the workload's 3 replicas.
        (OBJECT, avg("3k"), 3333.334, '"requests-per-second" on Ingress/main-route (target average value)'),
        (
            EXTERNAL,
            {"type": "Value", "value": "40"},
            50,
            '"queue_messages_ready" (external metric, target value)',
        ),
        (EXTERNAL, avg("20"), 16.667, '"queue_messages_ready" (external metric, target average value)'),
    ],
)
def test_object_and_external_metrics(
    data: dict[str, Any], target: dict[str, Any], current: float, name: str
) -> None:
    member = data["type"].lower()
    metric = spec({**data, member: {**data[member], "target": target}})
    if data is OBJECT:
        value = parse_metric_value_list(load("custom", "object-requests-per-second.json"))["main-route"].value
        reading: Any = ObjectReading(value)
    else:
        reading = ExternalReading(
            parse_external_value_list(load("custom", "external-queue-messages-ready.json"))
        )
    [obs] = evaluate([metric], workload("three-ready"), [reading], NOW)
    assert obs.metric == name
    assert obs.current == pytest.approx(current)


def test_average_over_no_replicas_is_unknown() -> None:
    metric = spec({**EXTERNAL, "external": {**EXTERNAL["external"], "target": avg("20")}})
    [obs] = evaluate([metric], ScaleTargetPods((), 0), [ExternalReading((50_000,))], NOW)
    assert obs.current is None
    assert "no replicas" in obs.reason


# --- several metrics, unreadable ones --------------------------------------------------------------------


def test_one_observation_per_metric_in_order_with_unreadable_ones_unknown() -> None:
    metrics = [resource("cpu", util(50)), PACKETS, resource("memory", avg("100Mi"))]
    readings = [usage("three-ready"), Unreadable("custom.metrics.k8s.io is not served"), usage("three-ready")]
    observations = evaluate(metrics, workload("three-ready"), readings, NOW)
    assert [o.current for o in observations] == [66, None, pytest.approx((128 + 96 + 110) * 2**20 / 3)]
    assert observations[1].reason == "custom.metrics.k8s.io is not served"
    assert [o.display() for o in observations][:2] == ["66%/50%", "<unknown>/1000"]


def test_metrics_and_readings_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 metrics but 1 readings"):
        evaluate([PACKETS, PACKETS], workload("three-ready"), [Unreadable("x")], NOW)


# --- parsing ---------------------------------------------------------------------------------------------


def test_pods_are_parsed_with_native_sidecars_but_not_plain_init_containers() -> None:
    pod = parse_pod(load("three-ready", "pods.json")["items"][0])
    assert [c.name for c in pod.containers] == ["php-apache", "offload-sidecar"]
    assert pod.containers[1].requests == {"memory": 32 * 2**20 * 1000, "cpu": 50}
    assert pod.running_and_ready


def test_pod_level_requests_take_precedence_for_whole_pod_metrics() -> None:
    obj = load("three-ready", "pods.json")
    for item in obj["items"]:
        item["spec"]["resources"] = {"requests": {"cpu": "1"}}
    pods = parse_pod_list(obj)
    [obs] = evaluate([resource("cpu", util(50))], ScaleTargetPods(pods, 3), [usage("three-ready")], NOW)
    assert obs.current == 501 * 100 // 3000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15.012s", 15.012), ("1m0s", 60), ("1m30.5s", 90.5), ("500ms", 0.5), ("0", 0), ("", 0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["15", "1x", "s", "1m 2s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_go_duration(text)


def test_quantities_round_up_to_milli_units_as_kubernetes_does() -> None:
    assert milli("180123456n") == 181
    assert milli("1") == 1000
    assert milli("1Ki") == 1024_000


# --- what to ask the metrics APIs -----------------------------------------------------------------


def test_selectors_and_plurals() -> None:
    from crds.hpa import resource_plural, selector_string
    from crds.model import LabelSelector, LabelSelectorRequirement

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
    with pytest.raises(ValueError, match="unknown label selector operator 'Near'"):
        selector_string({"matchExpressions": [{"key": "a", "operator": "Near"}]})
    assert [resource_plural(k) for k in ("Deployment", "StatefulSet", "Ingress", "Service", "Policy")] == [
        "deployments",
        "statefulsets",
        "ingresses",
        "services",
        "policies",
    ]


def test_unknown_observations_keep_each_target_and_type() -> None:
    from crds.hpa import unknown_observations

    specs = [resource("cpu", {"type": "Utilization", "averageUtilization": 50})]
    specs.append(resource("memory", {"type": "AverageValue", "averageValue": "100Mi"}))
    observations = unknown_observations(specs, "the API is down")
    assert [(o.current, o.target, o.type, o.reason) for o in observations] == [
        (None, 50, "Resource", "the API is down"),
        (None, 100 * 2**20, "Resource", "the API is down"),
    ]


def test_every_observation_carries_its_metric_type() -> None:
    spec = resource("cpu", {"type": "Utilization", "averageUtilization": 50})
    [obs] = evaluate([spec], workload("three-ready"), [usage("three-ready")], NOW)
    assert obs.type == "Resource" and obs.current == 66
