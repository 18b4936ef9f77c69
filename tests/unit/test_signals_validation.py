"""Validation of the LLM-serving additions: Pods metrics the sidecars serve themselves,
modelMetrics, and behavior.spilloverInFlight. Every error names its field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from crds.model import ModelMetrics, OffloadingConfig
from crds.signals import (
    IN_FLIGHT,
    KNOWN_MODEL_GAUGES,
    WAITING,
    has_local_metrics,
    local_metric_name,
    scraped_gauges,
    served_locally,
)
from crds.validation import ValidationSettings, validate_object

BASE: dict[str, Any] = {
    "apiVersion": "deployment.beamlit.com/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "llm", "namespace": "models"},
    "spec": {
        "model": "llama",
        "modelSourceRef": {"name": "vllm"},
        "serviceRef": {"name": "vllm", "targetPort": 80},
        "offloadingConfig": {
            "remoteBackend": {"host": "llm.other-cluster.example:443", "scheme": "https"},
            "metrics": [],
        },
    },
}
MET = "spec.offloadingConfig.metrics[0]"


def pods(name: str, target: dict[str, Any] | None = None, selector: Any = None) -> dict[str, Any]:
    metric: dict[str, Any] = {"name": name}
    if selector is not None:
        metric["selector"] = selector
    return {
        "type": "Pods",
        "pods": {"metric": metric, "target": target or {"type": "AverageValue", "averageValue": "4"}},
    }


def with_(metrics: list[dict[str, Any]] | None = None, **config: Any) -> dict[str, Any]:
    obj = copy.deepcopy(BASE)
    offloading = obj["spec"]["offloadingConfig"]
    offloading["metrics"] = metrics or []
    for key, value in config.items():
        if key == "behavior":
            offloading.setdefault("behavior", {}).update(value)
        elif value is None:
            offloading.pop(key, None)
        else:
            offloading[key] = value
    return obj


def errors(obj: dict[str, Any], settings: ValidationSettings = ValidationSettings()) -> list[str]:
    return [str(e) for e in validate_object(obj, settings).errors]


def warnings(obj: dict[str, Any]) -> list[str]:
    return list(validate_object(obj).warnings)


# --- which names are served locally -------------------------------------------------------------


def test_the_sidecars_own_signals_and_the_well_known_gauges_are_served_locally():
    assert served_locally(IN_FLIGHT, None) == "sidecar"
    assert served_locally(WAITING, None) == "sidecar"
    for name in ("vllm:num_requests_waiting", "tgi_queue_size", "nv_inference_pending_request_count"):
        assert name in KNOWN_MODEL_GAUGES
        assert served_locally(name, None) == "model"
    assert served_locally("requests_per_second", None) is None


def test_a_gauge_listed_in_model_metrics_is_served_locally_and_scraped():
    config = OffloadingConfig(model_metrics=ModelMetrics(gauges=("my_queue_length",)))
    assert served_locally("my_queue_length", config) == "model"
    assert served_locally("my_queue_length", OffloadingConfig()) is None


def test_scraped_gauges_are_the_model_gauges_named_by_pods_metrics_only():
    model = validate_object(
        with_(
            [
                pods("vllm:num_requests_waiting"),
                pods(IN_FLIGHT),
                pods("vllm:num_requests_waiting", {"type": "Value", "value": "10"}),
                pods("from_an_adapter"),
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                },
            ]
        )
    ).model
    assert model is not None
    config = model.spec.offloading_config
    assert scraped_gauges(config) == ("vllm:num_requests_waiting",)
    assert has_local_metrics(config)
    assert [local_metric_name(m, config) for m in config.metrics] == [
        "vllm:num_requests_waiting",
        IN_FLIGHT,
        "vllm:num_requests_waiting",
        None,
        None,
    ]


def test_without_pods_metrics_on_local_names_nothing_is_local():
    model = validate_object(with_([pods("from_an_adapter")])).model
    assert model is not None
    assert not has_local_metrics(model.spec.offloading_config)
    assert scraped_gauges(model.spec.offloading_config) == ()


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric",
    [
        pods(IN_FLIGHT),
        pods(WAITING, {"type": "Value", "value": "12"}),
        pods("vllm:num_requests_waiting", {"type": "Value", "value": "20"}),
        pods("vllm:num_requests_waiting", selector={"matchLabels": {"model_name": "llama"}}),
        pods("vllm:kv_cache_usage_perc", {"type": "AverageValue", "averageValue": "800m"}),
    ],
)
def test_pods_metrics_on_local_signals_take_average_value_or_value(metric):
    assert errors(with_([metric])) == []


def test_a_pods_metric_read_from_the_custom_metrics_api_keeps_the_hpas_average_value_only():
    assert errors(with_([pods("requests_per_second", {"type": "Value", "value": "3"})])) == [
        f"{MET}.pods.target.type: must be one of AverageValue for this metric, got 'Value'"
    ]


def test_validation_says_which_names_are_served_locally():
    (warning,) = [w for w in warnings(with_([pods("requests_per_second")])) if "custom metrics" in w]
    assert warning.startswith(
        f"{MET}.pods.metric.name: 'requests_per_second' is read from the custom metrics API"
    )
    assert (
        IN_FLIGHT in warning and "vllm:num_requests_waiting" in warning and "modelMetrics.gauges" in warning
    )
    assert not [w for w in warnings(with_([pods(IN_FLIGHT)])) if "custom metrics" in w]


def test_an_unknown_name_under_the_sidecars_prefix_is_refused_with_the_names_it_measures():
    assert errors(with_([pods("offload.beamlit.com/queue")])) == [
        f"{MET}.pods.metric.name: 'offload.beamlit.com/queue' is not a signal the sidecar measures; "
        f"it measures {IN_FLIGHT}, {WAITING}"
    ]


def test_a_selector_on_the_sidecars_own_signal_is_refused():
    assert errors(with_([pods(IN_FLIGHT, selector={"matchLabels": {"a": "b"}})])) == [
        f"{MET}.pods.metric.selector: must not be set for '{IN_FLIGHT}': the sidecar's own signal has one series"
    ]


@pytest.mark.parametrize(
    ("model_metrics", "expected"),
    [
        ({"port": 0}, "spec.offloadingConfig.modelMetrics.port: must be between 1 and 65535, got 0"),
        ({"path": "metrics"}, "spec.offloadingConfig.modelMetrics.path: must start with /"),
        ({"path": "/me trics"}, "spec.offloadingConfig.modelMetrics.path: must start with /"),
        (
            {"intervalSeconds": 0.05},
            "spec.offloadingConfig.modelMetrics.intervalSeconds: must be between 0.1 and 60",
        ),
        ({"intervalSeconds": "1s"}, "spec.offloadingConfig.modelMetrics.intervalSeconds: must be a number"),
        (
            {"gauges": ["ok", "not-a-name"]},
            "spec.offloadingConfig.modelMetrics.gauges[1]: must be a Prometheus metric name",
        ),
        ({"gauges": ["q", "q"]}, "spec.offloadingConfig.modelMetrics.gauges[1]: 'q' is listed twice"),
        (
            {"gauges": [f"g{i}" for i in range(33)]},
            "spec.offloadingConfig.modelMetrics.gauges: must have at most 32",
        ),
        ({"scheme": "https"}, "spec.offloadingConfig.modelMetrics.scheme: unknown field"),
    ],
)
def test_model_metrics_errors_name_the_field(model_metrics, expected):
    (error,) = errors(with_([pods("vllm:num_requests_waiting")], modelMetrics=model_metrics))
    assert error.startswith(expected)


def test_model_metrics_defaults_are_the_models_port_metrics_path_and_one_second():
    model = validate_object(with_([pods("my_gauge")], modelMetrics={"gauges": ["my_gauge"]})).model
    assert model is not None
    config = model.spec.offloading_config.model_metrics
    assert config == ModelMetrics(port=None, path="/metrics", interval_seconds=1.0, gauges=("my_gauge",))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "spec.offloadingConfig.behavior.spilloverInFlight: must be between 1 and 100000, got 0"),
        (
            100_001,
            "spec.offloadingConfig.behavior.spilloverInFlight: must be between 1 and 100000, got 100001",
        ),
        ("8", "spec.offloadingConfig.behavior.spilloverInFlight: must be an integer, got string"),
    ],
)
def test_spillover_must_be_a_positive_count(value, expected):
    assert errors(with_(behavior={"spilloverInFlight": value})) == [expected]


def test_spillover_is_allowed_without_metrics_and_needs_a_remote():
    assert errors(with_(behavior={"spilloverInFlight": 8})) == []
    assert errors(with_(behavior={"spilloverInFlight": 8}, remoteBackend=None)) == [
        "spec.offloadingConfig.behavior.spilloverInFlight: needs a remoteBackend: "
        "this installation has no default remote backend to spill over to"
    ]


def test_spillover_with_percentage_zero_is_allowed_with_a_warning_saying_what_is_offloaded():
    found = warnings(with_(behavior={"spilloverInFlight": 8, "percentage": 0}))
    assert any("spilloverInFlight is set with percentage 0" in w for w in found)
