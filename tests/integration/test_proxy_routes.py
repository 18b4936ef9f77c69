"""Requests that are dangerous on one route only are kept off that route, never refused.

A path with an encoded slash or a dot segment can climb out of a remote's
pathPrefix, and TRACE would echo a remote's added credentials: on any other
route such a request is what the model would get without the sidecar, so it is
forwarded byte for byte; where a prefix (or added headers) applies, it is served
by the local model instead. Real servers on 127.0.0.1, exact bytes on raw sockets,
routing plans made from ModelDeployment documents by the sidecar's own plan_for.
"""

from __future__ import annotations

import json
import socket

import pytest

from crds.validation import validate_object
from sidecar.control.plan import plan_for
from tests.integration.servers import LoopThread, ProxyHarness, read_response
from tests.modeldeployments import standalone

# The Open Inference Protocol's readiness probe of a namespaced model.
OIP_READY = b"/v2/models/acme%2Fllama-3-8b/ready"


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture
def h(lt):
    harness = ProxyHarness(lt)
    yield harness
    harness.close()


def use(h, *, enabled: bool = True, offloading: bool = True, remote: dict | None = None) -> None:
    """Route with the plan the sidecar makes of this ModelDeployment (100% offloaded)."""
    result = validate_object(standalone(h.remote.port, percentage=100, enabled=enabled, remote=remote))
    assert result.ok, result.message()
    plan = plan_for(result.model, offloading)
    h.lt.call(lambda: h.routing.update(plan))


def send(h, request: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as sock:
        sock.sendall(request)
        status, _, body = read_response(sock)
    return status, (json.loads(body) if body.startswith(b"{") else {"text": body.decode()})


def get(target: bytes, method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n"


@pytest.mark.parametrize(
    ("setting", "served_by"),
    [
        ({"offloading": False}, "local"),
        ({"enabled": False}, "local"),  # documented as pure pass-through
        ({}, "remote"),  # a remote without pathPrefix: nothing to climb out of
    ],
    ids=["offloading off", "enabled false", "remote without pathPrefix"],
)
def test_an_encoded_slash_is_forwarded_byte_for_byte_where_no_prefix_applies(h, setting, served_by):
    use(h, **setting)
    status, seen = send(h, get(OIP_READY))
    assert status == 200 and seen["server"] == served_by
    assert seen["target"].encode("latin-1") == OIP_READY


# Paths that could leave a prefix once a remote decodes or normalises them.
CLIMBING = [
    OIP_READY,
    b"/v1/..%2Fadmin",
    b"/v1/%2e%2e%2fadmin?x=1",
    b"/v1/..%5cadmin",
    b"/v1/..\\admin",
    b"/v1/../../admin",
    b"/v1/%2E%2e/admin",
    b"/v1/..;jsessionid=x/admin",
    b"/v1/./x",
]


@pytest.mark.parametrize("target", CLIMBING)
@pytest.mark.parametrize("route", ["local", "remote without pathPrefix"])
def test_climbing_paths_reach_a_route_without_prefix_unchanged(h, target, route):
    use(h, offloading=route == "remote without pathPrefix")
    status, seen = send(h, get(target))
    assert status == 200 and seen["server"] == route.split()[0]
    assert seen["target"].encode("latin-1") == target


@pytest.mark.parametrize("target", CLIMBING)
def test_under_a_prefix_climbing_paths_are_served_locally_byte_for_byte(h, target):
    use(h, remote={"pathPrefix": "/models/$model", "headersToAdd": {"X-Api-Key": "remote-secret"}})
    status, seen = send(h, get(target))
    assert status == 200 and seen["server"] == "local"
    assert seen["target"].encode("latin-1") == target  # what the model gets without the sidecar
    assert "remote-secret" not in json.dumps(seen["headers"])
    assert h.remote.count() == 0
    assert h.proxy.stats.fallbacks_total[("remote", "local", "path-outside-prefix")] == 1
    # An ordinary path still goes under the prefix, $model replaced by spec.model.
    status, seen = send(h, get(b"/v2/models/llama/ready"))
    assert seen["server"] == "remote" and seen["target"] == "/models/my-model/v2/models/llama/ready"


def test_options_asterisk_goes_on_as_is_and_stays_local_under_a_prefix(h):
    use(h, offloading=False)
    status, seen = send(h, get(b"*", b"OPTIONS"))
    assert status == 200 and seen["server"] == "local" and seen["target"] == "*"
    use(h)  # a remote without prefix gets it as it is
    status, seen = send(h, get(b"*", b"OPTIONS"))
    assert status == 200 and seen["server"] == "remote" and seen["target"] == "*"
    use(h, remote={"pathPrefix": "/v1"})
    status, seen = send(h, get(b"*", b"OPTIONS"))
    assert status == 200 and seen["server"] == "local" and seen["target"] == "*"
    assert h.remote.count() == 1


def test_under_a_prefix_with_the_local_model_down_a_climbing_path_never_reaches_the_remote(h):
    use(h, remote={"pathPrefix": "/models/$model"})
    h.lt.run(h.local.kill())
    status, seen = send(h, get(b"/v1/..%2Fadmin"))
    assert status == 502
    assert seen["text"] == (
        "local model unavailable (connect); the remote cannot take this request (path-outside-prefix)\n"
    )
    assert h.remote.count() == 0
    # The same with an ordinary path: the remote is the last resort and serves it.
    status, seen = send(h, get(b"/v1/models"))
    assert status == 200 and seen["server"] == "remote" and seen["target"] == "/models/my-model/v1/models"


def test_trace_is_forwarded_but_never_to_a_remote_that_adds_credentials(h):
    use(h, offloading=False)
    status, seen = send(h, get(b"/echo", b"TRACE"))
    assert status == 200 and seen["server"] == "local" and seen["method"] == "TRACE"
    use(h)  # a remote adding nothing: nothing to echo back
    status, seen = send(h, get(b"/echo", b"TRACE"))
    assert status == 200 and seen["server"] == "remote"
    use(h, remote={"headersToAdd": {"Authorization": "Bearer remote-token"}})
    status, seen = send(h, get(b"/echo", b"TRACE"))
    assert status == 200 and seen["server"] == "local" and "remote-token" not in json.dumps(seen)
    assert h.proxy.stats.fallbacks_total[("remote", "local", "trace-with-credentials")] == 1


@pytest.mark.parametrize("route", ["local", "remote"])
def test_an_expectation_other_than_100_continue_is_left_to_the_model(h, route):
    use(h, offloading=route == "remote")
    status, seen = send(
        h, b"POST /echo HTTP/1.1\r\nHost: svc\r\nExpect: 200-ok\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert status == 200 and seen["server"] == route and seen["body"] == "hello"
    assert ["Expect", "200-ok"] in seen["headers"]


def test_an_empty_host_is_forwarded_as_it_came(h):
    use(h, offloading=False)
    status, seen = send(h, b"GET /echo HTTP/1.1\r\nHost: \r\n\r\n")
    assert status == 200 and ["Host", ""] in seen["headers"]
    assert not any(n.lower() == "x-forwarded-host" for n, _ in seen["headers"])


def test_an_http10_request_without_host_reaches_the_model_with_the_address_it_was_sent_to(h):
    """HTTP/1.1, which the proxy speaks upstream, requires Host: a server such as
    uvicorn on h11 would answer 400 to the request without it."""
    use(h, offloading=False)
    status, seen = send(h, b"GET /echo HTTP/1.0\r\n\r\n")
    assert status == 200 and seen["server"] == "local"
    assert [v for n, v in seen["headers"] if n.lower() == "host"] == [f"127.0.0.1:{h.local.port}"]
    assert not any(n.lower() == "x-forwarded-host" for n, _ in seen["headers"])
