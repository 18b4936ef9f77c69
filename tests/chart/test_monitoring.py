"""The chart's monitoring: the PodMonitor, ServiceMonitor and PrometheusRule checked against the
Prometheus Operator's published CRD schemas, the rule file under promtool (`check rules` and
the unit tests of every alert), the Grafana dashboard's ConfigMap and layout, and every query
of rules and dashboard naming only metrics the product exposes. The same rules and queries
run against a real Prometheus scraping real sidecars in tests/e2e/test_prometheus.py."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.chart.helm import CHART, NAMESPACE, REPO_ROOT, by_kind, documents
from tests.chart.operator_crds import problems, schemas
from tests.promql_check import ANNOTATION_LABEL, GRAFANA_VARIABLES, dashboard_queries, selectors

pytestmark = pytest.mark.helm

RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
UNIT_TESTS = Path(__file__).with_name("prometheus") / "rules.test.yaml"
README = REPO_ROOT / "README.md"
ALL_ON = (
    *("--set", "monitoring.podMonitor.enabled=true"),
    *("--set", "monitoring.serviceMonitor.enabled=true"),
    *("--set", "monitoring.prometheusRule.enabled=true"),
    *("--set", "monitoring.grafanaDashboard.enabled=true"),
)
KINDS = ("PodMonitor", "ServiceMonitor", "PrometheusRule")
SEVERITIES = {"warning", "critical"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        raise RuntimeError("promtool is missing: apt-get install prometheus (see .ci/run)")
    return found


def rule_file() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerts(groups: list[dict]) -> dict[str, dict]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def recorded(groups: list[dict]) -> list[dict]:
    return [r for g in groups for r in g["rules"] if "record" in r]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def grafana_substituted(query: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        query = query.replace(name, value)
    assert "$" not in query.replace("$labels", ""), f"an unknown Grafana variable in {query!r}"
    return query


def product_metrics() -> set[str]:
    """Every series name the sidecar and the webhook expose (histograms with their _bucket,
    _sum and _count), plus Prometheus's own up."""
    from sidecar.admin.metrics import render_metrics
    from tests.integration.test_admin import busy_stats, offloading_view
    from webhook import metrics

    text = render_metrics(offloading_view(), busy_stats(), ready=True) + metrics.exposition()[0].decode()
    names = {"up"}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.fixture(scope="module")
def monitoring(helm):
    return by_kind(documents(helm.render(*ALL_ON)))


@pytest.fixture(scope="module")
def crds():
    return schemas()


# ---- the objects --------------------------------------------------------------------------------


def test_monitoring_is_off_by_default(default_render):
    kinds = {doc["kind"] for doc in documents(default_render)}
    assert not kinds & set(KINDS)
    assert not any(
        "grafana_dashboard" in (doc["metadata"].get("labels") or {}) for doc in documents(default_render)
    )


def test_helm_lint_strict_passes_with_every_monitoring_option(helm):
    linted = helm.run("lint", "--strict", "--kube-version", "v1.34.4", str(CHART), *ALL_ON)
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            *("--set", "monitoring.podMonitor.labels.release=kube-prometheus-stack"),
            *("--set", "monitoring.serviceMonitor.labels.release=kube-prometheus-stack"),
            *("--set", "monitoring.prometheusRule.labels.release=kube-prometheus-stack"),
            *("--set", "monitoring.podMonitor.interval=30s"),
            *("--set", "monitoring.serviceMonitor.tlsConfig.insecureSkipVerify=true"),
            *("--set", "monitoring.prometheusRule.alertLabels.team=ml-platform"),
            *("--set", "monitoring.prometheusRule.runbookBaseUrl=https://docs.example/offload"),
        ],
        [*("--set", "webhook.certs.existingSecret=my-tls"), *("--set", "webhook.certs.caBundle=Zm9v")],
    ],
    ids=["defaults", "every-option", "own-certificate"],
)
def test_monitoring_objects_are_valid_against_the_operators_published_schemas(helm, crds, extra):
    objects = by_kind(documents(helm.render(*ALL_ON, *extra)))
    rendered = [obj for (kind, _), obj in objects.items() if kind in KINDS]
    assert sorted(obj["kind"] for obj in rendered) == sorted(KINDS)
    for obj in rendered:
        assert problems(obj, crds[obj["kind"]]) == [], obj["kind"]
        assert obj["metadata"]["namespace"] == NAMESPACE


def test_the_schema_check_is_not_vacuous(monitoring, crds):
    """A misspelt field (which the API server would silently prune) and a bad value both fail."""
    import copy

    pod_monitor = copy.deepcopy(monitoring["PodMonitor", "offload-sidecars"])
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["intervall"] = endpoint.pop("interval")
    endpoint["scheme"] = "ftp"
    found = problems(pod_monitor, crds["PodMonitor"])
    assert any("'intervall' was unexpected" in p for p in found), found
    assert any(p.startswith("spec.podMetricsEndpoints.0.scheme") for p in found), found
    rule = copy.deepcopy(monitoring["PrometheusRule", "offload"])
    del rule["spec"]["groups"][0]["name"]
    assert any("'name' is a required property" in p for p in problems(rule, crds["PrometheusRule"]))


def test_the_podmonitor_scrapes_the_admin_port_of_injected_pods_in_every_namespace(monitoring):
    from webhook.injection import INJECTED_ANNOTATION
    from webhook.injector_config import ADMIN_PORT_NAME

    spec = monitoring["PodMonitor", "offload-sidecars"]["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (ADMIN_PORT_NAME, "/metrics", "15s")
    meta_label = "__meta_kubernetes_pod_annotationpresent_" + re.sub(
        r"[^a-zA-Z0-9_]", "_", INJECTED_ANNOTATION
    )
    assert endpoint["relabelings"] == [{"action": "keep", "sourceLabels": [meta_label], "regex": "true"}]


def test_the_servicemonitor_verifies_the_certificate_the_webhook_serves(monitoring):
    service_monitor = monitoring["ServiceMonitor", "offload-webhook"]
    service = monitoring["Service", "offload-webhook"]
    secret = monitoring["Secret", "offload-webhook-tls"]
    spec = service_monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["scheme"], endpoint["path"]) == ("https", "/metrics")
    tls = endpoint["tlsConfig"]
    assert tls["ca"] == {"secret": {"name": "offload-webhook-tls", "key": "ca.crt"}}
    certificate = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tls["serverName"] in names.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    assert certificate.issuer == ca.subject
    # The webhook's alerts select this job, whatever the release is called.
    assert endpoint["relabelings"] == [
        {"action": "replace", "targetLabel": "job", "replacement": "offload-webhook"}
    ]
    assert 'up{job="offload-webhook"}' in RULES.read_text()


def test_the_servicemonitor_uses_the_users_own_certificate_secret(helm):
    objects = by_kind(
        documents(
            helm.render(
                *ALL_ON,
                "--set",
                "webhook.certs.existingSecret=my-tls",
                "--set",
                "webhook.certs.caBundle=Zm9v",
            )
        )
    )
    tls = objects["ServiceMonitor", "offload-webhook"]["spec"]["endpoints"][0]["tlsConfig"]
    assert tls["ca"] == {"secret": {"name": "my-tls", "key": "ca.crt"}}


def test_the_prometheusrule_ships_the_rule_file_as_it_is_and_promtool_accepts_it(monitoring, tmp_path):
    groups = monitoring["PrometheusRule", "offload"]["spec"]["groups"]
    assert groups == rule_file()["groups"]
    path = tmp_path / "rendered.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    checked = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in checked.stdout


def test_the_rule_file_passes_promtool_check_rules_with_no_lint_finding():
    checked = subprocess.run(
        [promtool(), "check", "rules", "--lint=all", "--lint-fatal", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_fires_and_resolves_in_the_promtool_unit_tests():
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tested = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == set(alerts(rule_file()["groups"])), "every alert needs a unit test where it fires"
    for group in tests["tests"]:
        cases = group.get("alert_rule_test", [])
        if cases:  # pending or resolved too, not only firing
            assert any(not case["exp_alerts"] for case in cases), group["name"]
    ran = subprocess.run(
        [promtool(), "test", "rules", UNIT_TESTS.name],
        cwd=UNIT_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout


def test_the_unit_tests_catch_a_broken_alert(tmp_path):
    """promtool test rules fails when an alert's threshold changes: the tests pin behaviour."""
    broken = tmp_path / "rules.yaml"
    broken.write_text(
        RULES.read_text().replace("offload_webhook_leader) == 0", "offload_webhook_leader) == 2")
    )
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(broken)]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    ran = subprocess.run(
        [promtool(), "test", "rules", "t.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert ran.returncode != 0 and "OffloadControllerNoLeader" in ran.stdout + ran.stderr


@pytest.mark.parametrize(
    "values, absent",
    [
        (["--set", "monitoring.prometheusRule.disabledAlerts={OffloadingStuckOn}"], {"OffloadingStuckOn"}),
        (
            ["--set", "webhook.mutating.enabled=false"],
            {"OffloadControllerNoLeader", "OffloadPodsWithoutSidecar"},
        ),
    ],
    ids=["disabled-by-name", "no-controller"],
)
def test_alerts_that_do_not_apply_are_left_out(helm, values, absent):
    groups = by_kind(documents(helm.render(*ALL_ON, *values)))["PrometheusRule", "offload"]["spec"]["groups"]
    assert set(alerts(rule_file()["groups"])) - set(alerts(groups)) == absent
    assert recorded(groups) == recorded(rule_file()["groups"])


def test_alert_labels_and_runbook_urls_are_added_to_every_alert(helm):
    groups = by_kind(
        documents(
            helm.render(
                *ALL_ON,
                *("--set", "monitoring.prometheusRule.alertLabels.team=ml-platform"),
                *("--set", "monitoring.prometheusRule.runbookBaseUrl=https://docs.example/offload"),
            )
        )
    )["PrometheusRule", "offload"]["spec"]["groups"]
    original = alerts(rule_file()["groups"])
    for name, rule in alerts(groups).items():
        assert rule["labels"] == {**original[name]["labels"], "team": "ml-platform"}
        assert rule["annotations"] == {
            **original[name]["annotations"],
            "runbook_url": f"https://docs.example/offload#{name.lower()}",
        }


def test_disabled_alerts_accept_exactly_the_alert_names(helm):
    schema = json.loads((CHART / "values.schema.json").read_text())
    enum = schema["properties"]["monitoring"]["properties"]["prometheusRule"]["properties"]["disabledAlerts"]
    assert set(enum["items"]["enum"]) == set(alerts(rule_file()["groups"]))
    refused = helm.template("--set", "monitoring.prometheusRule.disabledAlerts={OffloadStuckOn}")
    assert refused.returncode != 0 and "disabledAlerts" in refused.stderr


# ---- the rules ----------------------------------------------------------------------------------


def test_recording_rules_are_named_level_metric_operations_after_the_labels_they_keep():
    for rule in recorded(rule_file()["groups"]):
        level, metric, operations = rule["record"].split(":")
        assert metric.startswith("offload_") and operations, rule["record"]
        by = re.search(r"^\s*(?:sum|max|min|count) by \(([^)]*)\)", rule["expr"])
        if by:  # the level names exactly the labels the aggregation keeps
            kept = [label.strip() for label in by.group(1).split(",")]
            assert level.split("_") == kept, rule["record"]


def test_every_alert_says_how_bad_what_and_what_to_do_with_a_runbook_in_the_readme():
    readme = README.read_text()
    for name, rule in alerts(rule_file()["groups"]).items():
        assert re.fullmatch(r"Offload[A-Za-z]+", name)
        assert rule["labels"]["severity"] in SEVERITIES
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert rule["annotations"]["description"].endswith(f"See README.md, Alerts, {name}."), name
        assert re.search(rf"^#### `?{name}`?$", readme, re.MULTILINE), (
            f"README.md: no runbook section for {name}"
        )
        assert "for" in rule, name
        # The annotations name only labels the alert carries (its expression's grouping).
        for label in ANNOTATION_LABEL.findall(" ".join(rule["annotations"].values())):
            assert label in rule["expr"] or label in {"namespace", "pod"}, (name, label)


def test_every_query_names_only_metrics_the_product_exposes_or_the_rules_record():
    known = product_metrics() | {r["record"] for r in recorded(rule_file()["groups"])}
    queries = [(r.get("record") or r["alert"], r["expr"]) for g in rule_file()["groups"] for r in g["rules"]]
    queries += [(where, grafana_substituted(query)) for where, query, _ in dashboard_queries(dashboard())]
    for where, query in queries:
        for name, _ in selectors(query):
            assert name in known, f"{where}: {name} is neither exposed nor recorded"


# ---- the dashboard ------------------------------------------------------------------------------


def test_the_dashboard_configmap_is_loaded_by_grafanas_sidecar(monitoring, helm):
    configmap = monitoring["ConfigMap", "offload-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["offload.json"]) == dashboard()
    elsewhere = by_kind(
        documents(
            helm.render(
                *ALL_ON,
                *("--set", "monitoring.grafanaDashboard.namespace=monitoring"),
                *("--set", "monitoring.grafanaDashboard.annotations.grafana_folder=Offloading"),
            )
        )
    )["ConfigMap", "offload-dashboard"]
    assert elsewhere["metadata"]["namespace"] == "monitoring"
    assert elsewhere["metadata"]["annotations"] == {"grafana_folder": "Offloading"}


def test_the_dashboard_has_its_rows_and_a_sound_layout():
    board = dashboard()
    assert board["uid"] == "offload-overview" and board["schemaVersion"] >= 36
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Decision, per ModelDeployment",
        "Traffic",
        "Errors, fallbacks and the remote's breaker",
        "Webhook and controller",
    ]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and panel["description"], panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )


# ---- the injector option ------------------------------------------------------------------------


def test_prometheus_annotations_reach_the_injector_configuration(helm):
    from webhook.injector_config import parse_config

    rendered = helm.render("--set", "sidecar.prometheusAnnotations=true")
    text = by_kind(documents(rendered))["ConfigMap", "offload-webhook"]["data"]["injector.yaml"]
    assert parse_config(yaml.safe_load(text)).prometheus_annotations is True


def test_the_readme_metrics_table_documents_every_metric_and_no_other():
    readme = README.read_text()
    table = readme[readme.index("### Metrics") : readme.index("### Recording rules")]
    documented = set(re.findall(r"`((?:offload|process)_[a-z_]+)`", table))
    exposed = {
        name
        for name in product_metrics() - {"up"}
        if not re.search(r"_(bucket|sum|count)$", name) or name.endswith("_total")
    }
    sidecar_and_webhook = {n for n in exposed if n.startswith("offload_")}
    assert sidecar_and_webhook - documented == set(), "exposed but not in README.md's metrics table"
    assert {n for n in documented if n.startswith("offload_")} - sidecar_and_webhook == set(), (
        "documented, not exposed"
    )
