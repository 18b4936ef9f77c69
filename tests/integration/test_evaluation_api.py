"""The controller's MetricsReader through the real ``kubernetes`` client, over verified TLS
with a bearer token, against a stand-in for the aggregated metrics APIs on loopback.

FAKE: the server below answers the recorded responses of tests/testdata/hpa for the paths
one evaluation asks for (the e2e tier runs the same reader against the real
kube-apiserver with a fake metrics server behind its aggregation layer); it exists to show
the exact requests on the wire and to answer errors on cue.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kubernetes
import pytest
import yaml

from crds.validation import validate_object
from tests.integration.fake_apiserver import LoopbackPKI
from webhook.controller.evaluation import MetricsReader

DATA = Path(__file__).parents[1] / "testdata"
TOKEN = "controller-token-1"
PODMETRICS = "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods"
PACKETS = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/packets-per-second"


def load(*parts: str) -> Any:
    return json.loads(DATA.joinpath("hpa", *parts).read_text())


class MetricsApis(ThreadingHTTPServer):
    """Answers GETs from ``routes`` (path -> (status, JSON body)); records what it saw."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext):
        super().__init__(("127.0.0.1", 0), Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.routes: dict[str, tuple[int, Any]] = {}
        self.seen: list[tuple[str, dict[str, str], str | None]] = []


class Handler(BaseHTTPRequestHandler):
    server: MetricsApis

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        url = urlsplit(self.path)
        self.server.seen.append((url.path, dict(parse_qsl(url.query)), self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            status, body = 401, {"kind": "Status", "message": "Unauthorized"}
        else:
            status, body = self.server.routes.get(
                url.path, (404, {"kind": "Status", "message": f"the server could not find {url.path}"})
            )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def apis(tmp_path: Path) -> Iterator[tuple[MetricsApis, Any]]:
    pki = LoopbackPKI.create(tmp_path / "pki")
    server = MetricsApis(pki.server_context())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": f"https://127.0.0.1:{server.server_address[1]}",
                            "certificate-authority-data": base64.b64encode(pki.ca.cert_pem).decode(),
                        },
                    }
                ],
                "users": [{"name": "controller", "user": {"token": TOKEN}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "controller"}}],
                "current-context": "c",
            }
        )
    )
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.retries = 0
    api_client = kubernetes.client.ApiClient(configuration)
    try:
        yield server, api_client
    finally:
        api_client.close()
        server.shutdown()
        server.server_close()


def model() -> Any:
    obj = yaml.safe_load((DATA / "modeldeployments" / "tutorial.yaml").read_text())
    obj["spec"]["offloadingConfig"]["metrics"].append(
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "packets-per-second"},
                "target": {"type": "AverageValue", "averageValue": "1k"},
            },
        }
    )
    result = validate_object(obj)
    assert result.model is not None, result.message()
    return result.model


def test_one_evaluation_over_tls_with_the_token_and_the_literal_wildcard(apis) -> None:
    server, api_client = apis
    server.routes[PODMETRICS] = (200, load("three-ready", "podmetrics.json"))
    server.routes[PACKETS] = (200, load("custom", "pods-packets-per-second.json"))
    reader = MetricsReader(api_client)
    pods = load("three-ready", "pods.json")["items"]
    cpu, packets = reader.observe(model(), pods, selector={"matchLabels": {"run": "php-apache"}})
    assert cpu.display() == "66%/50%"
    assert packets.current == pytest.approx(1033.5)
    assert server.seen == [
        (PODMETRICS, {"labelSelector": "run=php-apache"}, f"Bearer {TOKEN}"),
        (PACKETS, {"labelSelector": "run=php-apache"}, f"Bearer {TOKEN}"),
    ]
    assert reader.requests == 2


def test_error_statuses_and_an_unreachable_server_make_metrics_unknown_with_the_servers_message(
    apis,
) -> None:
    server, api_client = apis
    server.routes[PODMETRICS] = (
        403,
        {"kind": "Status", "message": 'pods.metrics.k8s.io is forbidden: User "x" cannot list'},
    )
    reader = MetricsReader(api_client)
    pods = load("three-ready", "pods.json")["items"]
    cpu, packets = reader.observe(model(), pods, selector="run=php-apache")
    assert cpu.current is None and "forbidden; the controller's ClusterRole must allow it" in cpu.reason
    assert "cannot list" in cpu.reason
    assert packets.current is None and "custom.metrics.k8s.io is not served here" in packets.reason
    assert "could not find" in packets.reason

    server.shutdown()
    server.server_close()
    cpu, packets = reader.observe(model(), pods, selector="run=php-apache")
    assert cpu.current is None and cpu.reason.startswith("metrics.k8s.io: ")
    assert packets.current is None
