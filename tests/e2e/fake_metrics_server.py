"""FAKE metrics-server: serves metrics.k8s.io/v1beta1 PodMetrics that the test sets.

There are no kubelets in the e2e control plane (kwok only pretends to run pods),
so nothing could measure real usage; this stand-in serves usage the test
chooses, over HTTPS, and is registered with the real kube-apiserver as the
APIService v1beta1.metrics.k8s.io, so that clients reach it exactly as they reach
metrics-server: through the API server's aggregation layer, with its
authentication and RBAC in front.

Registration: an ExternalName Service pointing at "localhost" (the aggregator
resolves ExternalName services to externalName:port, while an Endpoints object
may not hold a loopback address), and the APIService with the fake's CA bundle;
its serving certificate carries the name the aggregator verifies,
``<service>.<namespace>.svc``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from certs.issue import issue_ca, issue_serving_cert

GROUP_VERSION = "metrics.k8s.io/v1beta1"


class FakeMetricsServer:
    def __init__(self, workdir: Path, service: str = "fake-metrics-server", namespace: str = "kube-system"):
        self.service = service
        self.namespace = namespace
        now = dt.datetime.now(dt.UTC)
        self.ca = issue_ca("fake-metrics-server-ca", now=now, days=1)
        pair = issue_serving_cert(
            self.ca, dns_names=[f"{service}.{namespace}.svc"], ip_addresses=[], now=now, days=1
        )
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "tls.crt").write_bytes(pair.cert_pem)
        (workdir / "tls.key").write_bytes(pair.key_pem)
        self._lock = threading.Lock()
        # namespace -> pod name -> (labels, {container: {"cpu": "250m", "memory": "64Mi"}})
        self._usage: dict[str, dict[str, tuple[dict[str, str], dict[str, dict[str, str]]]]] = {}
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(workdir / "tls.crt"), str(workdir / "tls.key"))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-metrics-server", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_usage(
        self, namespace: str, pod: str, labels: dict[str, str], containers: dict[str, dict[str, str]]
    ) -> None:
        with self._lock:
            self._usage.setdefault(namespace, {})[pod] = (labels, containers)

    # -- registration with the API server -------------------------------------------------------

    def registration(self) -> list[dict[str, Any]]:
        """The Service and APIService that route metrics.k8s.io to this server."""
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": self.service, "namespace": self.namespace},
                "spec": {"type": "ExternalName", "externalName": "localhost"},
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": "v1beta1.metrics.k8s.io"},
                "spec": {
                    "group": "metrics.k8s.io",
                    "version": "v1beta1",
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                    "service": {"name": self.service, "namespace": self.namespace, "port": self.port},
                    "caBundle": base64.b64encode(self.ca.cert_pem).decode(),
                },
            },
        ]

    # -- serving ------------------------------------------------------------------------------------

    def _pod_metrics(self, namespace: str, selector: str) -> dict[str, Any]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        items = []
        with self._lock:
            pods = dict(self._usage.get(namespace, {}))
        for name, (labels, containers) in sorted(pods.items()):
            if any(labels.get(k) != v for k, v in wanted.items()):
                continue
            items.append(
                {
                    "metadata": {"name": name, "namespace": namespace, "labels": labels},
                    "timestamp": now.isoformat().replace("+00:00", "Z"),
                    "window": "1s",
                    "containers": [{"name": c, "usage": u} for c, u in containers.items()],
                }
            )
        return {"kind": "PodMetricsList", "apiVersion": GROUP_VERSION, "metadata": {}, "items": items}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                fake.requests.append(url.path)
                parts = url.path.strip("/").split("/")
                if url.path == "/apis":
                    version = {"groupVersion": GROUP_VERSION, "version": "v1beta1"}
                    group = {"name": "metrics.k8s.io", "versions": [version], "preferredVersion": version}
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})
                if url.path == f"/apis/{GROUP_VERSION}":
                    resources = [
                        {"name": "pods", "singularName": "", "namespaced": True, "kind": "PodMetrics", "verbs": ["get", "list"]},
                        {"name": "nodes", "singularName": "", "namespaced": False, "kind": "NodeMetrics", "verbs": ["get", "list"]},
                    ]  # fmt: skip
                    return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION, "resources": resources})  # fmt: skip
                if (
                    len(parts) == 6
                    and parts[:3] == ["apis", "metrics.k8s.io", "v1beta1"]
                    and parts[5] == "pods"
                ):
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    return self._send(200, fake._pod_metrics(parts[4], selector))
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"})  # fmt: skip

        return Handler
