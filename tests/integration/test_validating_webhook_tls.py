"""The validating webhook over real TLS, as the API server talks to it."""

from __future__ import annotations

import copy
import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.controlplane.webhook_process import start_webhook
from tests.integration.servers import read_until_closed
from tests.modeldeployments import admission_review

TUTORIAL = yaml.safe_load(
    (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
)
PATH = "/validate-modeldeployments"


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    server = start_webhook(tmp_path_factory.mktemp("validating"), "--validation-only")
    yield server
    server.stop()


def tls_context(webhook) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(webhook.cert_dir / "ca.crt"))


def address(webhook) -> tuple[str, int]:
    return "127.0.0.1", webhook.port


@pytest.fixture(scope="module")
def client(webhook):
    with httpx.Client(base_url=webhook.url(""), verify=tls_context(webhook), timeout=10) as c:
        yield c


def test_the_server_certificate_verifies_against_the_generated_ca_and_nothing_else(webhook):
    with socket.create_connection(address(webhook)) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(address(webhook)) as raw:
        with tls_context(webhook).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_the_tutorial_is_allowed(client):
    answer = client.post(PATH, json=admission_review(TUTORIAL, uid="abc")).json()
    assert answer["response"] == {"uid": "abc", "allowed": True}


def test_a_bad_object_is_denied_with_the_field_path(client):
    bad = copy.deepcopy(TUTORIAL)
    bad["spec"]["offloadingConfig"]["remoteBackend"]["host"] = "http://remote/v1"
    answer = client.post(PATH, json=admission_review(bad)).json()["response"]
    assert answer["allowed"] is False
    assert (
        "spec.offloadingConfig.remoteBackend.host: must be host[:port] without a scheme"
        in answer["status"]["message"]
    )


def test_health_and_readiness(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        (b"not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"[]", {"content-type": "application/json"}, 400, "AdmissionReview"),
        (
            b'{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}',
            {"content-type": "application/json"},
            400,
            "apiVersion",
        ),
        (
            b'{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}',
            {"content-type": "application/json"},
            400,
            "kind",
        ),
        (
            b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}',
            {"content-type": "application/json"},
            400,
            "request",
        ),
        (b"{}", {"content-type": "text/plain"}, 415, "Content-Type"),
        (b"{}", {}, 415, "Content-Type"),
        (b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}, 400, "JSON"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_reason(client, content, headers, status, fragment):
    response = client.post(PATH, content=content, headers=headers)
    assert response.status_code == status
    assert fragment in response.json()["error"]


@pytest.mark.parametrize("operation", ["DELETE", "CREATE"])
def test_a_lone_surrogate_is_echoed_escaped_never_a_500(client, operation):
    """A lone surrogate (valid as a JSON escape, not encodable as UTF-8) in the uid and in a
    field the denial quotes: the answer is ASCII JSON that reads back as the same strings."""
    bad = copy.deepcopy(TUTORIAL)
    bad["spec"]["offloadingConfig"]["remoteBackend"]["host"] = "\ud800:80"
    review = admission_review(bad, uid="\ud800")
    review["request"]["operation"] = operation
    response = client.post(PATH, content=json.dumps(review), headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.content.isascii()
    answer = response.json()["response"]
    assert answer["uid"] == "\ud800"
    if operation == "CREATE":
        assert answer["allowed"] is False
        assert "spec.offloadingConfig.remoteBackend.host" in answer["status"]["message"]
    else:
        assert answer["allowed"] is True


def test_a_problem_with_a_lone_surrogate_renders():
    from webhook.app import _problem

    response = _problem(400, "request.uid: \ud800")
    assert json.loads(response.body) == {"error": "request.uid: \ud800"}


def test_an_oversized_body_is_refused_without_reading_it_all(client):
    response = client.post(
        PATH, content=b" " * (9 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_wrong_method_and_unknown_path(client):
    assert client.get(PATH).status_code == 405
    assert client.post("/nope", json={}).status_code == 404


def test_the_server_survives_a_client_that_hangs_up_mid_body(webhook, client):
    with socket.create_connection(address(webhook)) as raw:
        with tls_context(webhook).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"apiVersion"'
            )
    assert client.post(PATH, json=admission_review(TUTORIAL)).json()["response"]["allowed"] is True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _mutations():
    paths = [
        ("request",),
        ("request", "uid"),
        ("request", "object"),
        ("request", "object", "spec"),
        ("request", "object", "spec", "offloadingConfig"),
        ("request", "object", "spec", "offloadingConfig", "metrics"),
        ("request", "object", "spec", "offloadingConfig", "remoteBackend"),
        ("request", "object", "metadata"),
        ("request", "operation"),
        ("request", "kind"),
        ("request", "oldObject"),
        ("request", "object", "spec", "offloadingConfig", "behavior", "percentage"),
        ("request", "object", "spec", "serviceRef", "targetPort"),
    ]
    return st.tuples(st.sampled_from(paths), json_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations(), operation=st.sampled_from(["CREATE", "UPDATE"]))
def test_mutated_admission_reviews_never_get_a_5xx(client, mutation, operation):
    path, value = mutation
    body = admission_review(copy.deepcopy(TUTORIAL))
    body["request"]["operation"] = operation
    node = body
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    response = client.post(
        PATH, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code < 500
    if response.status_code == 200:
        assert response.json()["response"]["uid"] == body["request"]["uid"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_bodies_never_get_a_5xx(client, body):
    response = client.post(PATH, content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_the_beamlit_sample_is_allowed_where_the_installation_has_a_default_remote_backend(client, tmp_path):
    sample = yaml.safe_load(
        (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "beamlit-sample.yaml").read_text()
    )
    denied = client.post(PATH, json=admission_review(sample)).json()["response"]
    assert denied["allowed"] is False
    assert "spec.offloadingConfig.remoteBackend: required when metrics are set" in denied["status"]["message"]
    server = start_webhook(
        tmp_path, "--validation-only", "--default-remote-backend", "https://models.example:8443/v1"
    )
    try:
        ctx = ssl.create_default_context(cafile=str(server.cert_dir / "ca.crt"))
        with httpx.Client(base_url=server.url(""), verify=ctx, timeout=10) as c:
            answer = c.post(PATH, json=admission_review(sample, uid="b")).json()["response"]
    finally:
        server.stop()
    assert answer["uid"] == "b" and answer["allowed"] is True


# --- connection limits and deadlines (a process with small ones) --------------------------------


@pytest.fixture(scope="module")
def tight_webhook(tmp_path_factory):
    server = start_webhook(
        tmp_path_factory.mktemp("tight"),
        "--validation-only",
        "--max-connections",
        "4",
        "--body-timeout",
        "0.5",
        "--head-timeout",
        "3",
    )
    yield server
    server.stop()


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_closed(tight_webhook):
    with socket.create_connection(address(tight_webhook), timeout=10) as raw:
        with tls_context(tight_webhook).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            received = read_until_closed(tls)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body) == {"error": "body: not received within 0.5 s"}


def test_a_keep_alive_connection_serves_requests_then_is_closed_at_the_head_deadline(tight_webhook):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(address(tight_webhook), timeout=10) as raw:
        with tls_context(tight_webhook).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            first = tls.recv(65536)
            tls.sendall(request)  # the deadline re-armed by the first response is for this head
            received = first + read_until_closed(tls)
    assert received.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize("sent", [b"", b"POST /validate-modeldeployments HTTP/1.1\r\nX-Slow: "])
def test_a_connection_without_a_whole_head_is_closed_at_the_head_deadline(tight_webhook, sent):
    with socket.create_connection(address(tight_webhook), timeout=10) as raw:
        with tls_context(tight_webhook).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(sent)
            assert read_until_closed(tls) == b""  # closed (3 s), before the 10 s read timeout


def test_idle_connections_at_the_limit_make_room_for_a_request_the_oldest_first(tight_webhook):
    """4 connections at most: 8 idle ones (TLS done, nothing sent) never get a request a 503;
    each newcomer closes the one that has waited longest for its head."""

    def status() -> int:
        with httpx.Client(verify=tls_context(tight_webhook), timeout=10) as c:
            return c.get(tight_webhook.url("/healthz")).status_code

    idle = []
    try:
        for _ in range(8):
            raw = socket.create_connection(address(tight_webhook), timeout=10)
            idle.append(tls_context(tight_webhook).wrap_socket(raw, server_hostname="127.0.0.1"))
        assert [status() for _ in range(3)] == [200, 200, 200]
        oldest = idle[0]
        oldest.settimeout(1.0)  # evicted: closed already, well before its 3 s head deadline
        assert read_until_closed(oldest) == b""
    finally:
        for tls in idle:
            tls.close()
