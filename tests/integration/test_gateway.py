"""The gateway (``offload-sidecar --mode gateway``) between real clients and real remotes on
loopback: one listener per ModelDeployment on the port its status names, the sidecar's data
path, credentials and refusals, the cold-start hold, and draining. The ModelDeployments are
given to the gateway directly (its watch of the API server runs in the e2e tier)."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from certs.issue import issue_ca, issue_serving_cert
from crds.validation import parse_remote_backend
from sidecar.gateway.process import Gateway, GatewaySettings
from sidecar.proxy.server import ProxySettings
from tests.e2e.controlplane.net import free_port
from tests.integration.fake_apiserver import LoopbackPKI
from tests.integration.servers import LoopThread, Upstream, wait_until
from tests.integration.test_oauth import CLIENT_ID, SECRET, TokenEndpoint
from tests.modeldeployments import oauth_remote

CREATED = "2026-01-01T00:00:00Z"


def md(
    name: str,
    port: int | None,
    remote: dict[str, Any] | None,
    *,
    namespace: str = "models",
    hold: int = 0,
    port_name: str | None = "http",
    enabled: bool = True,
    created: str = CREATED,
) -> dict[str, Any]:
    config: dict[str, Any] = {"behavior": {"percentage": 50, "coldStartHoldSeconds": hold}, "metrics": []}
    if remote is not None:
        config["remoteBackend"] = remote
    status: dict[str, Any] = {}
    if port is not None:
        status["standIn"] = {"port": port, "active": True}
        if port_name is not None:
            status["standIn"]["portName"] = port_name
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": {
            "model": f"{name}-model",
            "enabled": enabled,
            "modelSourceRef": {"kind": "Deployment", "name": name},
            "serviceRef": {"name": name, "targetPort": 80},
            "offloadingConfig": config,
        },
        "status": status,
    }


def remote_of(upstream: Upstream, **fields: Any) -> dict[str, Any]:
    return {"host": f"127.0.0.1:{upstream.port}", "scheme": "http", **fields}


class Running:
    """A Gateway on a LoopThread (its admin port too), fed ModelDeployments by ``update``."""

    def __init__(self, lt: LoopThread, settings: GatewaySettings):
        self.lt = lt
        self.gateway = Gateway(settings)
        self.admin = lt.run(self.gateway.admin.start("127.0.0.1", 0))

    def update(self, *objects: dict[str, Any]) -> None:
        self.lt.run(self.gateway.update(list(objects)))
        self.gateway.synced = True

    def status(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.admin}/status", timeout=5).json()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin}{path}", timeout=5)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


@pytest.fixture
def remotes(loop) -> Iterator[tuple[Upstream, Upstream]]:
    a = loop.run(Upstream.started("remote-a"))
    b = loop.run(Upstream.started("remote-b"))
    yield a, b
    loop.run(a.kill())
    loop.run(b.kill())


def settings(**proxy: Any) -> GatewaySettings:
    return GatewaySettings(
        listen_host="127.0.0.1",
        admin_listen=("127.0.0.1", 0),
        shutdown_deadline=10.0,
        proxy=ProxySettings(**{"shutdown_grace": 0.3, "connect_timeout": 1.0, **proxy}),
    )


@pytest.fixture
def gateway(loop) -> Iterator[Running]:
    running = Running(loop, settings())
    yield running
    loop.run(running.gateway.shutdown())
    loop.run(running.gateway.admin.close())


def get(port: int, path: str = "/v1/completions", **kwargs: Any) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10, **kwargs)


# --- which ModelDeployment a connection is for ------------------------------------------------


def test_each_port_serves_its_own_modeldeployments_remote_whatever_the_client_says(gateway, remotes):
    a, b = remotes
    port_a, port_b = free_port(), free_port()
    gateway.update(
        md("alpha", port_a, remote_of(a, pathPrefix="/v1/$model", headersToAdd={"X-Team": "alpha"})),
        md("beta", port_b, remote_of(b)),
    )
    answer = get(port_a, "/chat?x=1", headers={"Host": f"127.0.0.1:{b.port}", "X-Forwarded-Host": "beta"})
    assert answer.status_code == 200 and answer.headers["x-upstream"] == "remote-a"
    seen = json.loads(answer.text)
    assert seen["target"] == "/v1/alpha-model/chat?x=1"  # pathPrefix with $model
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"127.0.0.1:{a.port}"  # the remote's, never the client's
    assert headers["x-team"] == "alpha"
    assert get(port_b).headers["x-upstream"] == "remote-b"
    assert (a.count(), b.count()) == (1, 1)

    status = gateway.status()
    assert status["ready"] is True
    assert status["modelDeployments"]["models/alpha"]["port"] == port_a
    assert status["modelDeployments"]["models/alpha"]["routing"]["activePercentage"] == 100
    assert gateway.get("/readyz").status_code == 200
    metrics = gateway.get("/metrics").text
    assert "offload_gateway_listeners 2" in metrics
    assert (
        'offload_gateway_requests_total{namespace="models",modeldeployment="alpha",backend="remote",code="2xx"} 1'
        in metrics
    )


def test_the_sidecars_refusals_hold_and_nothing_reaches_the_remote(gateway, remotes):
    a, _ = remotes
    port = free_port()
    gateway.update(md("alpha", port, remote_of(a, pathPrefix="/v1")))
    for raw, status in (
        (b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(raw)
            head = sock.recv(65536).split(b"\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 4"), (raw, head)
        assert int(head.split()[1]) == status, (raw, head)
    # A path that could climb out of the prefix never goes under it: with no local pod, a 502.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v1/../admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        climbing = b""
        while chunk := sock.recv(65536):
            climbing += chunk
    assert climbing.startswith(b"HTTP/1.1 502") and b"path-outside-prefix" in climbing, climbing
    assert a.count() == 0


def test_server_sent_events_stream_through_as_they_come(gateway, remotes):
    a, _ = remotes
    port = free_port()
    gateway.update(md("alpha", port, remote_of(a)))
    arrivals = []
    with httpx.stream("GET", f"http://127.0.0.1:{port}/sse?n=5&interval_ms=200", timeout=10) as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    # One event each 200 ms, not all at the end: the stream is relayed as it is written.
    assert arrivals[-1] - arrivals[0] >= 0.6


def test_a_remote_that_is_down_gets_a_clear_502_and_a_busy_one_its_own_answer(gateway, loop, remotes):
    a, b = remotes
    port_a, port_b = free_port(), free_port()
    gateway.update(md("alpha", port_a, remote_of(a)), md("beta", port_b, remote_of(b)))
    loop.run(a.kill())
    started = time.monotonic()
    down = get(port_a)
    assert down.status_code == 502 and "unavailable" in down.text
    assert time.monotonic() - started < 5
    b.answer = (503, [("Retry-After", "7")])
    busy = get(port_b)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"


# --- credentials ---------------------------------------------------------------------------------


def test_an_oauth_remote_gets_a_token_and_a_private_ca_remote_is_verified(loop, tmp_path):
    pki = LoopbackPKI.create(tmp_path / "pki")
    endpoint = TokenEndpoint(pki, delay=0).start()
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("remote-ca", now=now, days=1)
    serving = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
    (tmp_path / "remote.crt").write_bytes(serving.cert_pem)
    (tmp_path / "remote.key").write_bytes(serving.key_pem)
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tmp_path / "remote.crt"), str(tmp_path / "remote.key"))
    oauth_remote_server = loop.run(Upstream.started("oauth-remote"))
    tls_remote = Upstream("tls-remote")
    loop.run(tls_remote.start(0, ssl_context=context))
    running = Running(loop, settings(remote_ssl_context=pki.client_context()))
    try:
        port_oauth, port_tls, port_untrusted = free_port(), free_port(), free_port()
        running.update(
            md(
                "oauth",
                port_oauth,
                remote_of(oauth_remote_server, **oauth_remote(CLIENT_ID, endpoint.url, SECRET)),
            ),
            md(
                "tls",
                port_tls,
                {"host": f"localhost:{tls_remote.port}", "scheme": "https", "caBundle": ca.cert_pem.decode()},
            ),
            md("untrusted", port_untrusted, {"host": f"localhost:{tls_remote.port}", "scheme": "https"}),
        )
        wait_until(
            "the token",
            lambda: running.status()["modelDeployments"]["models/oauth"]["routing"]["remote"] is not None,
        )
        assert get(port_oauth).status_code == 200
        (request,) = oauth_remote_server.requests
        assert (request.header("authorization") or "").startswith("Bearer ")
        assert SECRET not in json.dumps(running.status())

        verified = get(port_tls)
        assert verified.status_code == 200 and verified.headers["x-upstream"] == "tls-remote"
        refused = get(port_untrusted)  # the system CAs do not know the private CA
        assert refused.status_code == 502  # and no local pod to fall back on
        counters = running.status()["modelDeployments"]["models/untrusted"]["counters"]
        assert counters["upstreamFailures"] == {"remote/tls": 1, "local/connect": 1}
        assert tls_remote.count() == 1
    finally:
        loop.run(running.gateway.shutdown())
        loop.run(running.gateway.admin.close())
        loop.run(oauth_remote_server.kill())
        loop.run(tls_remote.kill())
        endpoint.stop()


def test_the_installations_default_remote_serves_modeldeployments_without_one(loop, remotes):
    a, _ = remotes
    default = parse_remote_backend(f"http://127.0.0.1:{a.port}/default/$model")
    running = Running(loop, GatewaySettings(**{**settings().__dict__, "default_backend": default}))
    try:
        port = free_port()
        running.update(md("plain", port, None))
        answer = get(port, "/x")
        assert answer.headers["x-upstream"] == "remote-a"
        assert json.loads(answer.text)["target"] == "/default/plain-model/x"
    finally:
        loop.run(running.gateway.shutdown())
        loop.run(running.gateway.admin.close())


# --- which ModelDeployments are served -----------------------------------------------------------


def test_only_valid_enabled_modeldeployments_with_a_port_and_a_remote_are_served(gateway, remotes):
    a, _ = remotes
    port, taken = free_port(), free_port()
    invalid = md("broken", free_port(), remote_of(a))
    invalid["spec"]["offloadingConfig"]["behavior"]["percentage"] = 150
    gateway.update(
        md("served", port, remote_of(a)),
        md("noport", None, remote_of(a)),
        md("disabled", free_port(), remote_of(a), enabled=False),
        md("noremote", free_port(), None),
        invalid,
        md("older", taken, remote_of(a), created="2025-01-01T00:00:00Z"),
        md("younger", taken, remote_of(a), created="2026-06-01T00:00:00Z"),
    )
    status = gateway.status()
    assert set(status["modelDeployments"]) == {"models/served", "models/older"}
    why = status["notServed"]
    assert "percentage" in why["models/broken"]
    assert "disabled or without a remote" in why["models/disabled"] and "models/noremote" in why
    assert "already ModelDeployment models/older's" in why["models/younger"]
    assert "models/noport" not in why
    assert get(port).status_code == 200


# --- the cold-start hold ---------------------------------------------------------------------------


class Slices:
    """Stands in for a lane's watch of its Service's EndpointSlices."""

    def __init__(self) -> None:
        self.slices: dict[str, dict[str, Any]] = {}
        self.namespace, self.service = "models", "alpha"

    def ready(self, address: str, port: int, name: str = "http") -> None:
        self.slices["alpha-abc"] = {
            "metadata": {"name": "alpha-abc"},
            "ports": [{"name": name, "port": port}, {"name": "metrics", "port": 9}],
            "endpoints": [
                {"addresses": ["10.0.0.9"], "conditions": {"ready": False}},
                {"addresses": [address], "conditions": {"ready": True}},
            ],
        }

    def stop(self) -> None:
        pass


def test_a_held_request_goes_to_the_first_local_pod_ready_else_to_the_remote_after_the_hold(
    gateway, loop, remotes
):
    remote, _ = remotes
    local = loop.run(Upstream.started("local-pod"))
    try:
        port = free_port()
        gateway.update(md("alpha", port, remote_of(remote), hold=2))
        lane = gateway.gateway.lanes[("models", "alpha")]
        slices = Slices()
        lane.endpoints = slices  # type: ignore[assignment]

        # No pod becomes ready: the request waits the whole hold, then the remote serves it.
        started = time.monotonic()
        answer = get(port)
        assert answer.headers["x-upstream"] == "remote-a"
        assert 2.0 <= time.monotonic() - started < 4.0
        assert lane.local.hold_expired_total == 1

        # A pod becomes ready while the request is held: it serves it at once.
        import threading

        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(answer=get(port, "/held")))
        started = time.monotonic()
        thread.start()
        wait_until(
            "the request to be held",
            lambda: gateway.status()["modelDeployments"]["models/alpha"]["localPods"]["held"] == 1,
        )
        slices.ready("127.0.0.1", local.port)
        loop.call(lane.local.notify)
        thread.join(5)
        assert result["answer"].headers["x-upstream"] == "local-pod"
        assert time.monotonic() - started < 2.0
        assert (local.count(), remote.count()) == (1, 1)
        # While a pod is ready nothing waits: straight to it.
        assert get(port).headers["x-upstream"] == "local-pod"
        doc = gateway.status()["modelDeployments"]["models/alpha"]["localPods"]
        assert doc["ready"] == [f"127.0.0.1:{local.port}"] and doc["heldTotal"] == 2
    finally:
        loop.run(local.kill())


# --- nothing lost at a switch ---------------------------------------------------------------------


def test_a_port_given_up_drains_its_streams_and_then_refuses(gateway, remotes):
    a, _ = remotes
    port, new_port = free_port(), free_port()
    gateway.update(md("alpha", port, remote_of(a)))
    import threading

    events: list[str] = []

    def stream() -> None:
        with httpx.stream("GET", f"http://127.0.0.1:{port}/sse?n=10&interval_ms=100", timeout=10) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=stream)
    thread.start()
    wait_until("the stream to start", lambda: a.count() == 1)
    gateway.update(md("alpha", new_port, remote_of(a)))  # the controller moved it
    assert get(new_port).status_code == 200  # the new port serves at once
    thread.join(10)
    assert len(events) == 10  # the stream in flight on the old port finished
    wait_until("the old port closed", lambda: _refused(port))


def test_shutdown_fails_readiness_at_once_and_finishes_what_is_in_flight(gateway, remotes):
    a, _ = remotes
    port = free_port()
    gateway.update(md("alpha", port, remote_of(a)))
    import threading

    events: list[str] = []

    def stream() -> None:
        with httpx.stream("GET", f"http://127.0.0.1:{port}/sse?n=8&interval_ms=100", timeout=10) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=stream)
    thread.start()
    wait_until("the stream to start", lambda: a.count() == 1)
    import asyncio

    future = asyncio.run_coroutine_threadsafe(gateway.gateway.shutdown(), gateway.lt.loop)
    wait_until("readiness to fail", lambda: gateway.get("/readyz").status_code == 503, timeout=1)
    future.result(10)
    thread.join(10)
    assert len(events) == 8
    assert _refused(port)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False
