"""Naming the webhook's own API requests by verb and resource (bounded labels)."""

from __future__ import annotations

import doctest

import pytest

from webhook import apicalls


@pytest.mark.parametrize(
    ("method", "url", "expected"),
    [
        ("GET", "https://k/api/v1/pods?limit=500", ("list", "pods")),
        ("GET", "https://k/api/v1/pods?watch=true&resourceVersion=5", ("watch", "pods")),
        (
            "GET",
            "https://k/apis/metrics.k8s.io/v1beta1/namespaces/a/pods?labelSelector=app%3Dx",
            ("list", "pods.metrics.k8s.io"),
        ),
        ("PATCH", "https://k/api/v1/namespaces/a/services/vllm", ("patch", "services")),
        (
            "POST",
            "https://k/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings",
            ("create", "rolebindings.rbac.authorization.k8s.io"),
        ),
        (
            "DELETE",
            "https://k/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings/b",
            ("delete", "rolebindings.rbac.authorization.k8s.io"),
        ),
        (
            "PUT",
            "https://k/apis/coordination.k8s.io/v1/namespaces/a/leases/l",
            ("update", "leases.coordination.k8s.io"),
        ),
        ("GET", "https://k/version", ("get", "other")),
    ],
)
def test_requests_are_named_by_verb_and_resource_without_object_names(method, url, expected):
    assert apicalls.classify(method, url) == expected


def test_the_docstring_examples_hold():
    assert doctest.testmod(apicalls).failed == 0


def test_count_wraps_the_client_and_still_calls_it():
    seen, calls = [], []

    class Client:
        def call_api(self, method, url, *args, **kwargs):
            calls.append((method, url))
            return "response"

    client = apicalls.count(Client(), lambda verb, resource: seen.append((verb, resource)))
    assert client.call_api("GET", "https://k/api/v1/namespaces/a/pods/p") == "response"
    assert seen == [("get", "pods")] and calls == [("GET", "https://k/api/v1/namespaces/a/pods/p")]
