"""The webhook's metric definitions: the names, types and labels the README and the
controller rely on, and the controller's reporting interface."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from webhook import metrics


def families() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) of the offload_webhook_* families, as exposed."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition()[0].decode()):
        if family.name.startswith("offload_webhook_"):
            labels = {k for s in family.samples for k in s.labels if k != "le"}
            out[family.name] = (family.type, labels)
    return out


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_metrics_have_the_documented_names_types_and_labels():
    metrics.ADMISSION_REVIEWS.labels(metrics.MUTATE_PODS, metrics.SKIPPED, "WindowsPod")
    metrics.INJECTIONS_SKIPPED.labels("WindowsPod")
    exposed = families()
    assert exposed["offload_webhook_admission_reviews"] == ("counter", {"webhook", "result", "reason"})
    assert exposed["offload_webhook_admission_duration_seconds"] == ("histogram", {"webhook"})
    assert exposed["offload_webhook_injections_skipped"] == ("counter", {"reason"})
    assert exposed["offload_webhook_serving_certificate_expiry_timestamp_seconds"][0] == "gauge"
    assert exposed["offload_webhook_reconcile"] == ("counter", {"result"})
    assert exposed["offload_webhook_reconcile_duration_seconds"][0] == "histogram"
    assert exposed["offload_webhook_leader"][0] == "gauge"
    text = metrics.exposition()[0].decode()
    for result in metrics.RECONCILE_RESULTS:
        assert f'offload_webhook_reconcile_total{{result="{result}"}}' in text


def test_the_controller_reports_leadership_and_reconciles():
    reporter = metrics.ControllerMetrics()
    before = value("offload_webhook_reconcile_total", result="requeue")
    count = value("offload_webhook_reconcile_duration_seconds_count")
    total = value("offload_webhook_reconcile_duration_seconds_sum")
    reporter.leading(True)
    assert value("offload_webhook_leader") == 1
    reporter.reconciled("requeue", 0.25)
    assert value("offload_webhook_reconcile_total", result="requeue") == before + 1
    assert value("offload_webhook_reconcile_duration_seconds_count") == count + 1
    assert value("offload_webhook_reconcile_duration_seconds_sum") == total + 0.25
    reporter.leading(False)
    assert value("offload_webhook_leader") == 0
