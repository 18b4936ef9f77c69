"""The webhook's Prometheus /metrics on its HTTPS port: every metric is exposed, reviews are
counted by webhook, result and reason, skipped injections by reason, and no label value
comes from the objects reviewed (the series stay bounded)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import ssl
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from certs.issue import issue_ca, issue_serving_cert
from crds.validation import ValidationSettings
from tests.modeldeployments import admission_review
from tests.unit.test_golden import CONFIG, cluster, load_case, review_for
from webhook.app import build_app
from webhook.cli import tls_server
from webhook.mutating import answer_pod
from webhook.reasons import Reason
from webhook.tls import ReloadingCertificate
from webhook.validating import answer_modeldeployment

TUTORIAL = yaml.safe_load(
    (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
)
DEFINED = {
    "offload_webhook_admission_reviews_total": "counter",
    "offload_webhook_admission_duration_seconds": "histogram",
    "offload_webhook_injections_skipped_total": "counter",
    "offload_webhook_serving_certificate_expiry_timestamp_seconds": "gauge",
    "offload_webhook_serving_certificate_reloads_total": "counter",
    # Defined here, counted by the controller.
    "offload_webhook_reconcile_total": "counter",
    "offload_webhook_reconcile_duration_seconds": "histogram",
    "offload_webhook_leader": "gauge",
    "offload_webhook_pods_without_sidecar": "gauge",
    # Read from /readyz's own function at each scrape.
    "offload_webhook_ready": "gauge",
}
CODES = {
    "mutate-pods",
    "validate-modeldeployments",
    *("allowed", "denied", "error", "injected", "skipped", "success", "requeue"),
    *(reason.value for reason in Reason),
    *("Valid", "Invalid", "NotValidated", "BadRequest", "400", "413", "415"),
    *("Allowed", "Denied"),  # a handler answering a bare AdmissionReview
}


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrics-certs")
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("metrics-test-ca", now=now, days=2)
    pair = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
    for name, data in (("ca.crt", ca.cert_pem), ("tls.crt", pair.cert_pem), ("tls.key", pair.key_pem)):
        (directory / name).write_bytes(data)
    cache = cluster()
    app = build_app(
        {
            "/validate-modeldeployments": partial(answer_modeldeployment, settings=ValidationSettings()),
            "/mutate-pods": partial(answer_pod, view=cache, config=CONFIG),
        },
        ready=cache.synced,
    )
    certificate = ReloadingCertificate(directory / "tls.crt", directory / "tls.key")
    server = tls_server(app, certificate, host="127.0.0.1", port=0, log_level="warning")
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        thread.join(0.01)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10) as client:
        yield client, pair
    server.should_exit = True
    thread.join(10)


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_metric_is_exposed_with_its_type_and_the_controllers_start_at_zero(webhook):
    client, pair = webhook
    text = client.get("/metrics").text
    for name, kind in DEFINED.items():
        assert f"# TYPE {name} {kind}" in text, name
    assert "_created" not in text
    samples = scrape(client)
    for result in ("success", "error", "requeue"):
        assert value(samples, "offload_webhook_reconcile_total", result=result) == 0
    assert value(samples, "offload_webhook_reconcile_duration_seconds_count") == 0
    assert ("offload_webhook_leader", ()) in samples
    assert ("offload_webhook_pods_without_sidecar", ()) in samples
    assert value(samples, "offload_webhook_ready") == 1  # the test's cache is synced
    expiry = pair.certificate.not_valid_after_utc.timestamp()
    assert value(samples, "offload_webhook_serving_certificate_expiry_timestamp_seconds") == expiry
    assert value(samples, "process_resident_memory_bytes") > 0


def test_reviews_are_counted_by_webhook_result_and_reason(webhook):
    client, _ = webhook
    before = scrape(client)
    namespace, pod = load_case("one-container")
    assert "patch" in client.post("/mutate-pods", json=review_for("a", namespace, pod)).json()["response"]
    windows = copy.deepcopy(load_case("windows-pod")[1])
    for i in range(3):
        client.post("/mutate-pods", json=review_for(f"w{i}", namespace, windows))
    malformed = {**pod, "spec": "a string"}
    client.post("/mutate-pods", json=review_for("m", namespace, malformed))
    assert (
        client.post("/mutate-pods", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    )
    bad = copy.deepcopy(TUTORIAL)
    bad["spec"]["offloadingConfig"]["behavior"]["percentage"] = 150
    for obj in (TUTORIAL, bad):
        client.post("/validate-modeldeployments", json=admission_review(obj, uid="v"))
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    reviews = "offload_webhook_admission_reviews_total"
    assert delta(reviews, webhook="mutate-pods", result="injected", reason="Injected") == 1
    assert delta(reviews, webhook="mutate-pods", result="skipped", reason="WindowsPod") == 3
    assert delta(reviews, webhook="mutate-pods", result="skipped", reason="MalformedPod") == 1
    assert delta(reviews, webhook="mutate-pods", result="error", reason="415") == 1
    assert delta(reviews, webhook="validate-modeldeployments", result="allowed", reason="Valid") == 1
    assert delta(reviews, webhook="validate-modeldeployments", result="denied", reason="Invalid") == 1
    skipped = "offload_webhook_injections_skipped_total"
    assert delta(skipped, reason="WindowsPod") == 3 and delta(skipped, reason="MalformedPod") == 1
    durations = "offload_webhook_admission_duration_seconds_count"
    assert delta(durations, webhook="mutate-pods") == 6
    assert delta(durations, webhook="validate-modeldeployments") == 2


def test_label_values_are_stable_codes_never_taken_from_the_objects(webhook):
    client, _ = webhook
    _, pod = load_case("one-container")
    for i in range(20):
        named = {**pod, "metadata": {**pod["metadata"], "name": f"pod-{i}", "labels": {"app": f"x{i}"}}}
        client.post("/mutate-pods", json=review_for(f"uid-{i}", f"ns-{i}", named))
    samples = scrape(client)
    label_values = {v for (name, labels) in samples if name.startswith("offload_webhook_") for _, v in labels}
    assert not any(v.startswith(("pod-", "ns-", "uid-", "x")) for v in label_values), label_values
    codes = {
        v for (name, labels) in samples if name.startswith("offload_webhook_") for k, v in labels if k != "le"
    }
    assert codes <= CODES, codes - CODES


def test_pods_without_sidecar_sum_over_modeldeployments_and_only_the_leader_reports_them(webhook):
    from webhook.metrics import ControllerMetrics

    client, _ = webhook
    metrics = ControllerMetrics()
    metrics.leading(True)
    metrics.without_sidecar(("team-a", "llama"), 2)
    metrics.without_sidecar(("team-b", "mistral"), 1)
    assert value(scrape(client), "offload_webhook_pods_without_sidecar") == 3
    metrics.without_sidecar(("team-a", "llama"), 0)  # injected since, or deleted
    assert value(scrape(client), "offload_webhook_pods_without_sidecar") == 1
    metrics.leading(False)  # a follower's figures would be stale: the new leader reports
    samples = scrape(client)
    assert value(samples, "offload_webhook_pods_without_sidecar") == 0
    assert value(samples, "offload_webhook_leader") == 0
