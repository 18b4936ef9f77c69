"""Standalone ModelDeployment documents for the sidecar tests, built as dicts.

(tests/e2e/modeldeployments.py derives cluster documents from the tutorial's.)
"""

from __future__ import annotations

from typing import Any

import yaml

CPU_AT_50_PERCENT = {
    "type": "Resource",
    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
}


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
    spec: dict[str, Any] = {"model": "my-model"}
    if enabled is not None:
        spec["enabled"] = enabled
    spec["modelSourceRef"] = {"name": "model"}
    offloading: dict[str, Any] = {
        "remoteBackend": {"host": host or f"127.0.0.1:{remote_port}", "scheme": scheme, **(remote or {})},
        "behavior": {"percentage": percentage, **(behavior or {})},
    }
    if static_split if static_split is not None else not metrics:
        offloading["behavior"]["staticSplit"] = True
    if metrics:
        offloading["metrics"] = [CPU_AT_50_PERCENT]
    spec["offloadingConfig"] = offloading
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "my-model"},
        "spec": spec,
    }


def as_yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


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
    from datetime import UTC, datetime

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
