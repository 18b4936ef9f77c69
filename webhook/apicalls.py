"""Counting the webhook process's own API requests, by verb and resource.

``classify`` names a request as the API server's audit log would (Kubernetes API
conventions): the verb (get, list, watch, create, update, patch, delete) and the resource
(plural, ``.group`` for named groups, ``/subresource`` when there is one). No object or
namespace name is kept, so the number of series stays bounded. ``count`` wraps an
``ApiClient`` so each request increments a counter: the figure behind "API requests per
minute for a ModelDeployment", measured where it is spent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def classify(method: str, url: str) -> tuple[str, str]:
    """(verb, resource) of one request.

    >>> classify("GET", "https://k/api/v1/namespaces/a/pods?labelSelector=x")
    ('list', 'pods')
    >>> classify("GET", "https://k/apis/apps/v1/deployments?watch=true")
    ('watch', 'deployments.apps')
    >>> classify("PATCH", "https://k/apis/deployment.beamlit.com/v1alpha1/namespaces/a/modeldeployments/m/status")
    ('patch', 'modeldeployments.deployment.beamlit.com/status')
    >>> classify("GET", "https://k/apis/coordination.k8s.io/v1/namespaces/a/leases/l")
    ('get', 'leases.coordination.k8s.io')
    """
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if segments[:1] == ["api"]:
        group, rest = "", segments[2:]
    elif segments[:1] == ["apis"] and len(segments) >= 3:
        group, rest = segments[1], segments[3:]
    else:
        return method.lower(), "other"
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]  # namespaced: drop namespaces/<name>
    if not rest:
        return method.lower(), "other"
    resource = rest[0] + (f".{group}" if group else "")
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource += "/" + rest[2]
    if method == "GET":
        watching = parse_qs(parts.query).get("watch", [""])[0] in ("true", "1")
        verb = "watch" if watching else ("get" if named else "list")
    else:
        verb = VERBS.get(method, method.lower())
    return verb, resource


def count(api_client: Any, increment: Callable[[str, str], None]) -> Any:
    """``api_client`` with each request counted by ``increment(verb, resource)``; returned as is."""
    call = api_client.call_api

    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        increment(*classify(method, url))
        return call(method, url, *args, **kwargs)

    api_client.call_api = counted
    return api_client
