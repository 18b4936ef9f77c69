"""/status's configuration: every field of the behaviour in force, as the user wrote it."""

from __future__ import annotations

from crds.validation import validate_object
from sidecar.admin.status import configuration_document
from tests.modeldeployments import variant


def test_the_configuration_shows_every_behaviour_field_and_the_model_metrics():
    doc = variant(
        "my-model",
        {
            "metadata.namespace": "default",
            "spec.offloadingConfig.behavior.spilloverInFlight": 8,
            "spec.offloadingConfig.behavior.coldStartHoldSeconds": 3,
            "spec.offloadingConfig.modelMetrics": {"port": 8000, "gauges": ["my_queue"]},
        },
    )
    result = validate_object(doc)
    assert result.ok, result.message()
    shown = configuration_document(result.model)["offloadingConfig"]
    assert shown["behavior"] == {
        "percentage": 50,
        "sustainSeconds": 30,
        "cooldownSeconds": 120,
        "tolerance": 0.1,
        "staticSplit": False,
        "spilloverInFlight": 8,
        "coldStartHoldSeconds": 3,
    }
    assert shown["modelMetrics"] == {
        "port": 8000,
        "path": "/metrics",
        "intervalSeconds": 1.0,
        "gauges": ["my_queue"],
    }


def test_without_model_metrics_there_is_no_such_key_and_no_spillover_shows_null():
    result = validate_object(variant("my-model", {"metadata.namespace": "default"}))
    shown = configuration_document(result.model)["offloadingConfig"]
    assert "modelMetrics" not in shown and shown["behavior"]["spilloverInFlight"] is None
