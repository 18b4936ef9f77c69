"""ModelDeployment documents for every test tier, built one way: a base document (the
tutorial's, or the standalone sidecar's minimal one) copied, renamed and edited by dotted
paths with `variant`. `standalone` names the edits the sidecar tests make most."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from crds.model import API_VERSION, GROUP, KIND, PLURAL, VERSION

__all__ = [
    "API_VERSION",
    "CPU_AT_50_PERCENT",
    "GROUP",
    "KIND",
    "PLURAL",
    "STANDALONE",
    "TUTORIAL_FILE",
    "VERSION",
    "admission_review",
    "as_yaml",
    "oauth_remote",
    "published",
    "standalone",
    "tutorial",
    "variant",
]

TUTORIAL_FILE = Path(__file__).parent / "testdata" / "modeldeployments" / "tutorial.yaml"

CPU_AT_50_PERCENT = {
    "type": "Resource",
    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
}

# my-model as a standalone sidecar reads it from a file: no serviceRef, no namespace.
STANDALONE: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": KIND,
    "metadata": {"name": "my-model"},
    "spec": {
        "model": "my-model",
        "modelSourceRef": {"name": "model"},
        "offloadingConfig": {"remoteBackend": {"scheme": "http"}, "behavior": {"percentage": 100}},
    },
}


def tutorial() -> dict[str, Any]:
    """The README tutorial's ModelDeployment (tests/testdata/modeldeployments/tutorial.yaml)."""
    return yaml.safe_load(TUTORIAL_FILE.read_text())


def variant(
    name: str | None = None,
    changes: Mapping[str, Any] | None = None,
    remove: Iterable[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A copy of `base` (the tutorial's by default) named `name` (metadata reduced to the
    name; kept as it is when None), with dotted paths set to new values (e.g.
    {"spec.offloadingConfig.behavior.percentage": 150}; a number indexes a list) and the
    paths in `remove` deleted. Missing keys on the way to a new value are added."""
    doc = copy.deepcopy(dict(base) if base is not None else tutorial())
    if name is not None:
        doc["metadata"] = {"name": name}
    for path, value in (changes or {}).items():
        parent, key = _parent(doc, path)
        parent[key] = copy.deepcopy(value)
    for path in remove:
        parent, key = _parent(doc, path)
        del parent[key]
    return doc


def standalone(
    remote_port: int | None = None,
    *,
    host: str | None = None,
    scheme: str = "http",
    percentage: int = 100,
    enabled: bool | None = None,
    behavior: dict[str, Any] | None = None,
    metrics: bool = False,
    remote: dict[str, Any] | None = None,
    static_split: bool | None = None,
) -> dict[str, Any]:
    """my-model offloading to `host` (default 127.0.0.1:`remote_port`); `remote` adds
    remoteBackend fields, `behavior` behavior fields, `metrics` a CPU target of 50%.
    Without metrics it is a static split (behavior.staticSplit, offloading at all times)
    unless `static_split` is False (then it never offloads)."""
    backend = "spec.offloadingConfig.remoteBackend"
    changes: dict[str, Any] = {
        f"{backend}.host": host or f"127.0.0.1:{remote_port}",
        f"{backend}.scheme": scheme,
        **{f"{backend}.{key}": value for key, value in (remote or {}).items()},
        "spec.offloadingConfig.behavior.percentage": percentage,
        **{f"spec.offloadingConfig.behavior.{key}": value for key, value in (behavior or {}).items()},
    }
    if enabled is not None:
        changes["spec.enabled"] = enabled
    if static_split if static_split is not None else not metrics:
        changes["spec.offloadingConfig.behavior.staticSplit"] = True
    if metrics:
        changes["spec.offloadingConfig.metrics"] = [CPU_AT_50_PERCENT]
    return variant(changes=changes, base=STANDALONE)


def admission_review(
    obj: Any,
    *,
    uid: str = "uid-1",
    operation: str = "CREATE",
    old: Any = None,
    sub_resource: str | None = None,
    namespace: str = "default",
    name: str = "my-model",
) -> dict[str, Any]:
    """The AdmissionReview the API server sends /validate-modeldeployments for `obj`."""
    request: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": GROUP, "version": VERSION, "kind": KIND},
        "resource": {"group": GROUP, "version": VERSION, "resource": PLURAL},
        "operation": operation,
        "namespace": namespace,
        "name": name,
        "object": obj,
    }
    if old is not None:
        request["oldObject"] = old
    if sub_resource:
        request["subResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def as_yaml(doc: Mapping[str, Any]) -> str:
    """`doc` as YAML, keys in the order written."""
    return yaml.safe_dump(dict(doc), sort_keys=False)


def oauth_remote(client_id: str, token_url: str, secret: str) -> dict[str, Any]:
    """remoteBackend fields for an OAuth2 remote with an inline client secret."""
    return {
        "authConfig": {
            "type": "oauth",
            "oauthConfig": {"clientId": client_id, "tokenUrl": token_url, "clientSecret": secret},
        }
    }


def published(offloading: bool = True, reason: str = "StaticSplit") -> dict[str, Any]:
    """A ``status`` as the controller publishes it (crds/status.py), evaluated just now:
    what a cluster-mode sidecar follows."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "observedGeneration": 1,
        "offloading": offloading,
        "offloadingStatus": offloading,
        "utilization": "",
        "decision": {
            "reason": reason,
            "message": "published by the test",
            "lastTransitionTime": now,
            "lastEvaluationTime": now,
            "evaluationPeriodSeconds": 15,
            "metrics": [],
        },
    }


def _parent(doc: dict[str, Any], path: str) -> tuple[Any, Any]:
    *head, last = path.split(".")
    node: Any = doc
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    return node, (int(last) if isinstance(node, list) else last)
