"""/mutate-pods over real TLS: the golden answers through the real HTTP stack, bad requests,
readiness tied to the cache, and the offload-webhook process wired with --injector-config."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import socket
import ssl
import threading
from functools import partial
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from hypothesis import HealthCheck, given, settings

from certs.issue import issue_ca, issue_serving_cert
from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.webhook_process import start_webhook
from tests.unit.test_golden import CASES, CONFIG, DIR, cluster, config_for, load_case, review_for
from tests.unit.test_mutating_robustness import json_values, mutated_pods
from webhook.app import build_app
from webhook.cache import ClusterCache
from webhook.mutating import review_pod

TUTORIAL = yaml.safe_load(
    (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
)


class InProcessWebhook:
    """The real starlette app under uvicorn with TLS on a loopback port, in a thread."""

    def __init__(self, app, cert_dir: Path) -> None:
        self.cert_dir = cert_dir
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            ssl_certfile=str(cert_dir / "tls.crt"),
            ssl_keyfile=str(cert_dir / "tls.key"),
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> InProcessWebhook:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            self.thread.join(0.01)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=ctx, timeout=10)


def write_certs(directory: Path) -> Path:
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("mutate-test-ca", now=now, days=1)
    serving = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    (directory / "tls.crt").write_bytes(serving.cert_pem)
    (directory / "tls.key").write_bytes(serving.key_pem)
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return write_certs(tmp_path_factory.mktemp("mutate-certs"))


OWN_CONFIG = {case: config_for(case) for case in CASES if config_for(case) is not CONFIG}


@pytest.fixture(scope="module")
def webhook(certs):
    cache = cluster()
    app = build_app({"/mutate-pods": partial(review_pod, view=cache, config=CONFIG)}, ready=cache.synced)
    with InProcessWebhook(app, certs) as server:
        yield server


@pytest.fixture(scope="module")
def client(webhook):
    with webhook.client() as c:
        yield c


@pytest.fixture(scope="module")
def own_config_clients(certs):
    """case -> a client of a webhook with that case's own injector configuration."""
    cache = cluster()
    with contextlib.ExitStack() as stack:
        clients = {}
        for case, config in OWN_CONFIG.items():
            app = build_app(
                {"/mutate-pods": partial(review_pod, view=cache, config=config)}, ready=cache.synced
            )
            clients[case] = stack.enter_context(stack.enter_context(InProcessWebhook(app, certs)).client())
        yield clients


@pytest.mark.parametrize("case", CASES)
def test_every_golden_answer_comes_back_over_tls(client, own_config_clients, case):
    namespace, pod = load_case(case)
    answer = own_config_clients.get(case, client).post("/mutate-pods", json=review_for(case, namespace, pod))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == json.loads((DIR / f"{case}.review.json").read_text())


def test_one_keep_alive_connection_serves_many_reviews(webhook):
    namespace, pod = load_case("one-container")
    connects = []

    def trace(name, info):
        if name == "connection.connect_tcp.complete":
            connects.append(name)

    with webhook.client() as c:
        for i in range(50):
            response = c.post(
                "/mutate-pods", json=review_for(f"k{i}", namespace, pod), extensions={"trace": trace}
            )
            assert response.json()["response"]["uid"] == f"uid-k{i}"
            assert "patch" in response.json()["response"]
    assert connects == ["connection.connect_tcp.complete"]


@pytest.mark.parametrize(
    "content_type, body, status, message",
    [
        ("text/plain", b"{}", 415, "Content-Type: must be application/json"),
        ("application/json", b"{not json", 400, "body: not valid JSON"),
        ("application/json", b"[]", 400, "body must be a JSON object"),
        (
            "application/json",
            json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).encode(),
            400,
            "apiVersion must be admission.k8s.io/v1",
        ),
        (
            "application/json",
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u"}}
            ).encode(),
            400,
            "request.kind: required",
        ),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_fault(client, content_type, body, status, message):
    response = client.post("/mutate-pods", content=body, headers={"content-type": content_type})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_a_lone_surrogate_in_the_pod_is_echoed_escaped_never_a_500(client):
    """The owner's kind, quoted in the warning, is a lone surrogate (valid as a JSON escape,
    not encodable as UTF-8): the pod is allowed in ASCII JSON reading back the same string."""
    namespace, pod = load_case("one-container")
    body = json.dumps(review_for("one-container", namespace, pod))
    assert '"kind": "ReplicaSet"' in body
    body = body.replace('"kind": "ReplicaSet"', '"kind": "\\u202e\\ud800"')
    response = client.post("/mutate-pods", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.content.isascii()
    answer = response.json()["response"]
    assert answer["allowed"] is True
    assert any("\u202e\ud800" in warning for warning in answer["warnings"])


def test_an_oversized_body_is_refused_before_it_is_read(webhook):
    with socket.create_connection(("127.0.0.1", webhook.port)) as raw:
        ctx = ssl.create_default_context(cafile=str(webhook.cert_dir / "ca.crt"))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                b"POST /mutate-pods HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 99999999\r\n\r\n"
            )
            assert tls.recv(100).startswith(b"HTTP/1.1 413")


def test_a_review_of_something_else_is_allowed_untouched_with_a_warning(client):
    review = review_for("dep", "models", {"metadata": {"name": "x"}})
    review["request"]["resource"] = {"group": "apps", "version": "v1", "resource": "deployments"}
    response = client.post("/mutate-pods", json=review).json()["response"]
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        "offload: this webhook injects pods on CREATE; CREATE of deployments is left alone"
    ]
    update = review_for("upd", "models", load_case("one-container")[1])
    update["request"]["operation"] = "UPDATE"
    assert client.post("/mutate-pods", json=update).json()["response"] == {"uid": "uid-upd", "allowed": True}


def test_a_pod_reaching_an_unsynced_webhook_is_allowed_with_a_warning_and_readyz_says_no(certs):
    cache = ClusterCache()  # never listed
    app = build_app({"/mutate-pods": partial(review_pod, view=cache, config=CONFIG)}, ready=cache.synced)
    with InProcessWebhook(app, certs) as server, server.client() as c:
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").status_code == 200
        namespace, pod = load_case("one-container")
        response = c.post("/mutate-pods", json=review_for("x", namespace, pod)).json()["response"]
        assert response["allowed"] is True and "patch" not in response
        expected = (
            "offload: sidecar not injected (CacheNotSynced): the webhook has not synced its view of "
            "ModelDeployments yet"
        )
        assert response["warnings"] == [expected]


def test_readyz_is_200_once_synced(client):
    assert client.get("/readyz").status_code == 200


# --- the process --------------------------------------------------------------------------------


def unreachable_kubeconfig(path: Path, ca: Path) -> Path:
    port = free_port()  # nothing listens there
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": f"https://127.0.0.1:{port}",
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_process_serves_both_webhooks_and_is_not_ready_until_its_cache_syncs(tmp_path, certs):
    kubeconfig = unreachable_kubeconfig(tmp_path / "kubeconfig", certs / "ca.crt")
    server = start_webhook(
        tmp_path, "--injector-config", str(DIR / "_injector.yaml"), "--kubeconfig", str(kubeconfig)
    )
    try:
        ctx = ssl.create_default_context(cafile=str(server.cert_dir / "ca.crt"))
        with httpx.Client(base_url=server.url(""), verify=ctx, timeout=10) as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 503
            namespace, pod = load_case("one-container")
            answer = c.post("/mutate-pods", json=review_for("p", namespace, pod)).json()["response"]
            assert answer["allowed"] is True and "patch" not in answer
            assert "(CacheNotSynced)" in answer["warnings"][0]
            review = {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "v",
                    "operation": "CREATE",
                    "namespace": "default",
                    "name": "my-model",
                    "object": TUTORIAL,
                    "kind": {
                        "group": "deployment.beamlit.com",
                        "version": "v1alpha1",
                        "kind": "ModelDeployment",
                    },
                    "resource": {
                        "group": "deployment.beamlit.com",
                        "version": "v1alpha1",
                        "resource": "modeldeployments",
                    },
                },
            }
            assert c.post("/validate-modeldeployments", json=review).json()["response"] == {
                "uid": "v",
                "allowed": True,
            }
    finally:
        server.stop()
    log = server.process.log_path.read_text()
    assert "watch of modeldeployments failed" in log
    assert "Bearer t" not in log


def test_validation_only_serves_no_mutation_and_needs_no_credentials(tmp_path):
    server = start_webhook(
        tmp_path,
        "--validation-only",
        "--injector-config",
        str(DIR / "_injector.yaml"),
        env={"KUBECONFIG": str(tmp_path / "absent")},
    )
    try:
        ctx = ssl.create_default_context(cafile=str(server.cert_dir / "ca.crt"))
        with httpx.Client(base_url=server.url(""), verify=ctx, timeout=10) as c:
            assert c.get("/readyz").status_code == 200
            assert c.post("/mutate-pods", json={}).status_code == 404
    finally:
        server.stop()


def test_a_bad_injector_config_stops_the_process_with_the_key_named(tmp_path, certs):
    import subprocess
    import sys

    bad = tmp_path / "injector.yaml"
    bad.write_text("image: offload:1\nproxyPort: 0\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "webhook.cli",
            "--tls-cert-file",
            str(certs / "tls.crt"),
            "--tls-private-key-file",
            str(certs / "tls.key"),
            "--injector-config",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        f"--injector-config: {bad}: proxyPort: must be a port number between 1 and 65535, got 0"
        in result.stderr
    )


# --- whatever the object holds ------------------------------------------------------------------

JSON = {"content-type": "application/json"}  # bodies as json.dumps writes them (Infinity included)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated=mutated_pods())
def test_mutated_pods_over_tls_always_get_an_allowed_answer(client, mutated):
    case, namespace, pod = mutated
    body = review_for(case, namespace, {"metadata": {}})
    body["request"]["object"] = pod
    response = client.post("/mutate-pods", content=json.dumps(body), headers=JSON)
    assert response.status_code == 200
    answer = response.json()["response"]
    assert answer["uid"] == f"uid-{case}" and answer["allowed"] is True


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=json_values)
def test_a_mutated_envelope_gets_an_answer_or_a_400_naming_the_field(client, request):
    namespace, pod = load_case("one-container")
    body = review_for("env", namespace, pod)
    body["request"] = {**body["request"], **request} if isinstance(request, dict) else request
    response = client.post("/mutate-pods", content=json.dumps(body), headers=JSON)
    assert response.status_code in (200, 400)
    if response.status_code == 400:
        assert response.json()["error"].startswith("request")
    else:
        assert response.json()["response"]["allowed"] is True


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("models.example:80", "--default-remote-backend: must be a URL such as http://host:port/prefix"),
        (
            '{"host": "models.example", "scheme": "ftp"}',
            "--default-remote-backend.scheme: must be http or https",
        ),
    ],
)
def test_a_bad_default_remote_backend_stops_the_process_with_the_field_named(tmp_path, certs, value, message):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "webhook.cli",
            "--tls-cert-file",
            str(certs / "tls.crt"),
            "--tls-private-key-file",
            str(certs / "tls.key"),
            "--validation-only",
            "--default-remote-backend",
            value,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
