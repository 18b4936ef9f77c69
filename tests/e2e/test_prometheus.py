"""The chart's recording rules, alerts and dashboard against a real Prometheus (Debian's
package) scraping real processes under load.

Scraped, each as the chart's monitors would find it (static targets with the labels a
PodMonitor and the chart's ServiceMonitor give: namespace, pod, and job offload-webhook):

- three standalone `offload-sidecar` processes on loopback in front of two CPU-burning model
  servers (`python -m sidecar.demo --serve model`): ModelDeployment alpha (two sidecars, a
  live remote, short windows) is driven hot, offloads and turns off again; beta (one sidecar,
  a remote that refuses connections, a cooldown of an hour) offloads into a failing remote,
  opens its breaker, falls back, and stays on once its load is gone;
- `offload-webhook` with its controller on the real control plane: a workload whose pods were
  created before the pod webhook was registered (pods without the sidecar, which a rollout
  then injects), and pods of an unrelated workload (skipped injections).

The rules are the chart's rendered PrometheusRule, loaded by Prometheus and evaluated every
second. Then every recording rule, every alert expression and every dashboard query is
checked part by part (tests/promql_check.py): each selector matches stored series and its
labels exist, each grouping and join label is carried, each part that cannot rightly be empty
returns data, and the result carries the labels its name, annotations or legend use. Alerts
the scenario provokes must fire (for the right ModelDeployment only), the others stay quiet.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self

import kubernetes
import pytest
import yaml

from crds.model import GROUP, PLURAL, VERSION
from sidecar.demo.child import Child
from sidecar.demo.cpu import http_get
from tests.chart.helm import Helm, by_kind, documents, find_helm
from tests.e2e import objects
from tests.e2e.controlplane.admission import mutating_webhook_configuration
from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.process import ManagedProcess, wait_until
from tests.e2e.controlplane.webhook_process import injector_config
from tests.promql_check import (
    ANNOTATION_LABEL,
    GRAFANA_VARIABLES,
    LEGEND_LABEL,
    Checker,
    Prometheus,
    dashboard_queries,
)

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
SIDECAR_NAMESPACE = "team-a"  # the namespace label of the sidecars' targets
WEBHOOK_NAMESPACE = "offload-system"  # and of the webhook's (its release namespace)
TOKENS = 2  # SSE tokens per request: 5 ms of the model server's CPU each
LOW, HIGH = 2.0, 30.0  # requests/s per ModelDeployment: ~10% and ~150% of 100m
HELD = 15  # seconds an alert's condition must hold to count as firing here (its `for`, scaled)
INJECTOR_CONFIG = injector_config("e2e-prometheus", memory_limit=None)
CHART_VALUES = (
    *("--set", "monitoring.prometheusRule.enabled=true"),
    *("--set", "monitoring.grafanaDashboard.enabled=true"),
)
FIRING = {
    "OffloadRemoteBackendDown": {("team-a", "beta")},
    "OffloadRemoteFallbacksHigh": {("team-a", "beta")},
    "OffloadingStuckOn": {("team-a", "beta")},
    "OffloadPodsWithoutSidecar": {(WEBHOOK_NAMESPACE, None)},
}
QUIET = {
    "OffloadSidecarDecisionStale",
    "OffloadWebhookCertificateExpiring",
    "OffloadWebhookNotReady",
    "OffloadWebhookDown",
    "OffloadControllerNoLeader",
}


def modeldeployment_yaml(name: str, remote_port: int, *, sustain: int, cooldown: int) -> str:
    return f"""\
apiVersion: {GROUP}/{VERSION}
kind: ModelDeployment
metadata: {{name: {name}, namespace: {SIDECAR_NAMESPACE}}}
spec:
  model: {name}
  modelSourceRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}
  offloadingConfig:
    remoteBackend: {{host: "127.0.0.1:{remote_port}", scheme: http}}
    behavior: {{percentage: 50, sustainSeconds: {sustain}, cooldownSeconds: {cooldown}}}
    metrics:
      - type: Resource
        resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 50}}}}
"""


class Load:
    """Open-loop GETs at a per-port rate (changed on the fly), from a thread of its own;
    bounded: at most 32 in flight per port, and it stops by itself after ``limit`` seconds."""

    def __init__(self, ports: list[int], limit: float = 600.0) -> None:
        self.rates = dict.fromkeys(ports, LOW)
        self.statuses: Counter[int | str] = Counter()
        self.limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def set(self, ports: list[int], rate: float) -> None:
        for port in ports:
            self.rates[port] = rate

    async def _main(self) -> None:
        await asyncio.gather(*(self._drive(port) for port in self.rates))

    async def _drive(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.limit
        in_flight: set[asyncio.Task[None]] = set()
        next_at = loop.time()
        while not self._stop.is_set() and loop.time() < end:
            now = loop.time()
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.05))
                continue
            next_at = max(next_at + 1 / self.rates[port], now - 0.5)
            if len(in_flight) < 32:
                task = asyncio.create_task(self._one(port))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=15)

    async def _one(self, port: int) -> None:
        try:
            status, _ = await http_get(port, f"/v1/completions?tokens={TOKENS}", timeout=15)
            self.statuses[status] += 1
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.statuses[type(exc).__name__] += 1


def prometheus_config(targets: dict[str, int], webhook_port: int, ca_file: Path) -> dict:
    """Scrape every second, evaluate every second; the labels of the chart's monitors."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": "offload-sidecars",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        "labels": {"namespace": SIDECAR_NAMESPACE, "pod": pod, "container": "offload-proxy"},
                    }
                    for pod, port in targets.items()
                ],
            },
            {
                "job_name": "offload-webhook",
                "scheme": "https",
                "tls_config": {"ca_file": str(ca_file), "server_name": "localhost"},
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{webhook_port}"],
                        "labels": {"namespace": WEBHOOK_NAMESPACE, "pod": "offload-webhook-0"},
                    }
                ],
            },
        ],
    }


def workload(name: str, labels: dict[str, str], replicas: int = 2) -> dict[str, Any]:
    return objects.deployment(name, [objects.vllm_container("1")], labels=labels, replicas=replicas)


@pytest.fixture(scope="module")
def chart() -> dict[tuple[str, str], dict]:
    return by_kind(documents(Helm(find_helm()).render(*CHART_VALUES)))


def test_rules_alerts_and_dashboard_against_prometheus_scraping_sidecars_and_the_webhook(
    kube, namespace, modeldeployment_crd, run_webhook, tmp_path, chart
):
    prometheus_binary = shutil.which("prometheus")
    assert prometheus_binary, "prometheus is missing: apt-get install prometheus (see .ci/run)"
    groups = chart["PrometheusRule", "offload"]["spec"]["groups"]
    board = json.loads(chart["ConfigMap", "offload-dashboard"]["data"]["offload.json"])
    children: list[Child] = []
    processes: list[ManagedProcess] = []
    admission = kubernetes.client.AdmissionregistrationV1Api(kube.api_client)
    apps = kubernetes.client.AppsV1Api(kube.api_client)
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    registration = f"offload-e2e-prom-{namespace}"[:63]
    try:
        # -- the webhook and its controller, with a workload whose pods predate injection --
        config = tmp_path / "injector.yaml"
        config.write_text(INJECTOR_CONFIG)
        webhook = run_webhook(
            *("--injector-config", str(config)),
            *("--leader-election-namespace", namespace),
            *("--leader-election-lease-duration", "6"),
            *("--leader-election-renew-deadline", "4"),
            *("--leader-election-retry-period", "1"),
            *("--sidecar-cluster-role", "offload-e2e-sidecar"),
            *("--evaluation-period", "2"),
            env={"KUBECONFIG": str(kube.kubeconfig)},
        )
        alive = [webhook.process, *kube.processes]
        wait_until("the webhook's cache (/readyz)", lambda: webhook.get("/readyz") == 200, 60, alive=alive)
        apps.create_namespaced_deployment(namespace, workload("vllm", {"app": "vllm"}))
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ModelDeployment",
                "metadata": {"name": "vllm"},
                "spec": {
                    "model": "llama-3-8b",
                    "modelSourceRef": {"kind": "Deployment", "name": "vllm"},
                    "offloadingConfig": {
                        "remoteBackend": {"host": "remote.example:80", "scheme": "http"},
                        "metrics": [],
                    },
                },
            },
        )

        # -- model servers, remotes and sidecars on loopback --
        here = [sys.executable, "-m", "sidecar.demo", "--serve"]
        model_a = Child("model a", [*here, "model"], tmp_path / "model-a.log")
        model_b = Child("model b", [*here, "model"], tmp_path / "model-b.log")
        remote = Child("remote", [*here, "remote"], tmp_path / "remote.log")
        children += [model_a, model_b, remote]
        asyncio.run(_ready(model_a, model_b, remote))
        dead_remote = free_port()  # nothing listens there: every connection is refused
        configs = {
            "alpha": modeldeployment_yaml("alpha", remote.port, sustain=2, cooldown=4),
            "beta": modeldeployment_yaml("beta", dead_remote, sustain=2, cooldown=3600),
        }
        for name, text in configs.items():
            (tmp_path / f"{name}.yaml").write_text(text)
        admin_ports: dict[str, int] = {}  # pod -> admin port (its ModelDeployment: offload_sidecar_info)
        proxy_ports: dict[str, int] = {}
        for pod, name, model in (
            ("alpha-0", "alpha", model_a),
            ("alpha-1", "alpha", model_a),
            ("beta-0", "beta", model_b),
        ):
            child = Child(
                pod,
                [
                    *(sys.executable, "-m", "sidecar.cli"),
                    *("--config", str(tmp_path / f"{name}.yaml")),
                    *("--upstream", f"127.0.0.1:{model.port}"),
                    *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
                    *("--cpu-pid", str(model.proc.pid), "--cpu-request", "100m", "--cpu-window", "2s"),
                    *("--poll-interval", "500ms", "--shutdown-deadline", "5s", "--shutdown-grace", "0s"),
                ],
                tmp_path / f"{pod}.log",
            )
            children.append(child)
            asyncio.run(_ready(child))
            admin_ports[pod] = child.admin_port
            proxy_ports[pod] = child.port

        # -- Prometheus with the chart's rules --
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        (workdir / "prometheus.yml").write_text(
            yaml.safe_dump(prometheus_config(admin_ports, webhook.port, webhook.cert_dir / "ca.crt"))
        )
        port = free_port()
        processes.append(
            ManagedProcess(
                "prometheus",
                [
                    prometheus_binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                workdir / "prometheus.log",
                cwd=workdir,
            )
        )
        alive += processes
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        start = time.time()

        def value(query: str) -> list[tuple[dict[str, str], float]]:
            try:
                result = prometheus.get("/api/v1/query", query=query)["result"]
            except OSError:
                return []  # not listening yet
            return [(r["metric"], float(r["value"][1])) for r in result]

        def holds(query: str) -> bool:
            return bool(value(query))

        def held(query: str) -> set[tuple[str | None, str | None]]:
            """(namespace, modeldeployment) of the series ``query`` returned for HELD seconds
            in a row since the start: an alert's `for`, scaled to this test."""
            result = prometheus.get("/api/v1/query_range", query=query, start=start, end=time.time(), step=1)
            keys = set()
            for series in result["result"]:
                times = [float(t) for t, _ in series["values"]]
                run = longest = 1
                for a, b in itertools.pairwise(times):
                    run = run + 1 if b - a <= 1.5 else 1
                    longest = max(longest, run)
                if times and longest >= HELD:
                    keys.add((series["metric"].get("namespace"), series["metric"].get("modeldeployment")))
            return keys

        alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}

        wait_until("every target scraped", lambda: len(value("up == 1")) == 4, 60, alive=alive)

        # -- the scenario --
        alpha = [proxy_ports["alpha-0"], proxy_ports["alpha-1"]]
        beta = [proxy_ports["beta-0"]]
        with Load([*alpha, *beta]) as load:
            wait_until(
                "the controller counting the 2 pods created before injection",
                lambda: holds("offload_webhook_pods_without_sidecar == 2"),
                60,
                alive=alive,
            )
            wait_until(
                "low load recorded",
                lambda: holds(
                    'namespace_modeldeployment_backend:offload_sidecar_requests:rate1m{backend="local"} > 0'
                ),
                60,
                alive=alive,
            )
            load.set(alpha, HIGH / 2)
            load.set(beta, HIGH / 2)
            wait_until(
                "alpha offloading",
                lambda: holds(_md("offload_sidecar_offloading:max", "alpha", "== 1")),
                90,
                alive=alive,
            )
            wait_until(
                "beta offloading",
                lambda: holds(_md("offload_sidecar_offloading:max", "beta", "== 1")),
                90,
                alive=alive,
            )
            wait_until(
                "alpha's remote answering about half",
                lambda: holds(_md("offload_sidecar_remote_share:ratio_rate1m", "alpha", "> 0.3")),
                90,
                alive=alive,
            )
            wait_until(
                "beta's breaker open",
                lambda: holds(_md("offload_sidecar_breaker_open:sum", "beta", "== 1")),
                90,
                alive=alive,
            )

            # Alerts wait out their `for`; here each alert's condition must hold HELD seconds.
            wait_until(
                "OffloadPodsWithoutSidecar's condition held",
                lambda: bool(held(alerts["OffloadPodsWithoutSidecar"]["expr"])),
                120,
                alive=alive,
            )
            # Pods of a workload no ModelDeployment names (skipped), and the bare pods'
            # workload rolled out again under the pod webhook (injected): bare pods go to 0.
            admission.create_mutating_webhook_configuration(
                mutating_webhook_configuration(
                    registration, webhook.url("/mutate-pods"), webhook.ca_bundle, namespace
                )
            )
            apps.create_namespaced_deployment(namespace, workload("other", {"app": "other"}, replicas=1))
            done = kube.kubectl("rollout", "restart", "deployment/vllm", "-n", namespace)
            assert done.returncode == 0, done.stderr

            load.set([*alpha, *beta], LOW)
            wait_until(
                "alpha back to local",
                lambda: holds(_md("offload_sidecar_offloading:max", "alpha", "== 0")),
                90,
                alive=alive,
            )
            wait_until(
                "beta still offloading below its target (cooldown pending)",
                lambda: holds(
                    'namespace_modeldeployment_reason:offload_sidecar_decision_reason:sum{modeldeployment="beta", reason="CooldownPending"} > 0'
                ),
                60,
                alive=alive,
            )
            wait_until(
                "the rolled-out pods injected (no pod without the sidecar)",
                lambda: (
                    holds("offload_webhook_pods_without_sidecar == 0")
                    and holds(
                        'offload_webhook_injections_skipped_total{reason="NoMatchingModelDeployment"} > 0'
                    )
                    and holds('offload_webhook_admission_reviews_total{result="injected"} > 0')
                ),
                90,
                alive=alive,
            )
            for name in FIRING:
                expr = alerts[name]["expr"]
                wait_until(f"{name}'s condition held", lambda e=expr: bool(held(e)), 120, alive=alive)
            statuses = dict(load.statuses)
        end = time.time()

        # Every client request got a model's answer, through the failures too.
        assert set(statuses) == {200}, statuses
        # -- what the dashboard shows happened --
        checker = Checker(prometheus, start, end, step=1.0)
        offloading = prometheus.get(
            "/api/v1/query_range",
            query=_md("offload_sidecar_offloading:max", "alpha"),
            start=start,
            end=end,
            step=1,
        )["result"][0]["values"]
        states = [v for _, v in offloading]
        switches = sum(1 for a, b in itertools.pairwise(states) if a != b)
        assert switches >= 2 and states[-1] == "0", f"alpha should turn on, then off: {states}"
        reasons = {
            s["reason"]
            for s in checker.prometheus.range_series(
                'namespace_modeldeployment_reason:offload_sidecar_decision_reason:sum{modeldeployment="alpha"} > 0',
                start,
                end,
                1.0,
            )
        }
        assert {"SustainPending", "AboveTarget", "CooldownPending", "BelowTarget"} <= reasons, reasons

        # -- every recording rule: its parts sound, its result with exactly its level's labels --
        found: list[str] = []
        for rule in (r for g in groups for r in g["rules"] if "record" in r):
            level = set(rule["record"].split(":")[0].split("_"))
            # The rule's own labels (quantile) are added to what its expression returns.
            found += checker.problems(
                rule["expr"], need_data=True, labels=level - set(rule.get("labels", {}))
            )
            stored = checker.prometheus.series(rule["record"], start, end)
            expected = level | set(rule.get("labels", {})) | {"__name__"}
            shapes = {frozenset(s) for s in stored}
            if shapes != {frozenset(expected)}:
                found.append(
                    f"{rule['record']}: recorded with labels {sorted(map(sorted, shapes))}, not {sorted(expected)}"
                )

        # -- every alert: its parts sound; it fires for exactly what the scenario broke --
        for rule in (r for g in groups for r in g["rules"] if "alert" in r):
            name = rule["alert"]
            labels = set(ANNOTATION_LABEL.findall(" ".join(rule["annotations"].values())))
            found += [f"{name}: {p}" for p in checker.problems(rule["expr"], need_data=False, labels=labels)]
            fired = held(rule["expr"])
            if name in FIRING:
                assert fired == FIRING[name], f"{name} fired for {fired}, expected {FIRING[name]}"
                pending = checker.prometheus.range_series(f'ALERTS{{alertname="{name}"}}', start, end, 1.0)
                assert pending, f"Prometheus never evaluated {name} as pending or firing"
            else:
                assert name in QUIET and fired == set(), f"{name} fired for {fired} in a healthy part"

        # -- every dashboard query: sound, with data, with the labels its legend shows --
        for where, query, legend in dashboard_queries(board):
            for variable, replacement in GRAFANA_VARIABLES.items():
                query = query.replace(variable, replacement)
            labels = set(LEGEND_LABEL.findall(legend))
            found += [f"{where}: {p}" for p in checker.problems(query, need_data=True, labels=labels)]
        assert found == [], "\n".join(found)

        # The checks are not vacuous: each kind of mistake in a query is named.
        mistakes = {
            "offload_sidecar_requests_totl": "no series named",
            'offload_sidecar_requests_total{backnd="local"}': "has no label 'backnd'",
            'offload_sidecar_requests_total{backend="remot"}': "selects none",
            "sum by (model) (offload_sidecar_requests_total)": "groups by ['model']",
            "offload_sidecar_offloading * on (job, instance) group_left (md) offload_sidecar_info": "copies ['md']",
            "offload_sidecar_offloading * on (job, pod_name) offload_sidecar_info": "matches on ['pod_name']",
            "offload_sidecar_offloading * on (job) offload_sidecar_info": "Prometheus refuses it",
            "histogram_quantile(0.9, sum by (backend) (rate(offload_sidecar_request_duration_seconds_bucket[1m])))": "no le",
        }
        for query, problem in mistakes.items():
            assert any(problem in p for p in checker.problems(query, need_data=True)), query
        legend = checker.problems(
            "sum by (backend) (offload_sidecar_requests_total)", need_data=True, labels={"pod"}
        )
        assert any("a series without ['pod']" in p for p in legend), legend
    finally:
        try:
            admission.delete_mutating_webhook_configuration(registration)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        for process in processes:
            process.stop()
        for child in reversed(children):
            child.stop()
        for md in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, md["metadata"]["name"])
        # The controller removes its finalizer; the namespace can then go.
        wait_until(
            "the ModelDeployments gone",
            lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
            30,
        )


async def _ready(*children: Child) -> None:
    await asyncio.gather(*(child.ready() for child in children))


def _md(figure: str, name: str, condition: str = "") -> str:
    """A per-ModelDeployment recorded figure of one ModelDeployment, with a filter."""
    return f'namespace_modeldeployment:{figure}{{modeldeployment="{name}"}} {condition}'.strip()
