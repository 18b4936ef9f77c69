"""/status: the configuration in force, the decision and why, the routing and the counters,
as one JSON document. Pure. Secrets never appear: added headers show their names only,
client secrets and CA bundles are summarised.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from crds.model import MetricSpec, ModelDeployment
from sidecar.control.view import ControlView
from sidecar.proxy.stats import ProxyStats


def _redacted_headers(headers: dict[str, str]) -> dict[str, str]:
    # Values of added headers are often credentials (API keys): names only.
    return {name: "<redacted>" for name in headers}


def _metric_dict(metric: MetricSpec) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {_camel(k): clean(v) for k, v in value.items() if v not in (None, (), {})}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(asdict(metric))


def _camel(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(part.title() for part in rest)


def configuration_document(model: ModelDeployment | None) -> dict[str, Any] | None:
    """The configuration in effect, as the user wrote it, without any secret."""
    if model is None:
        return None
    spec = model.spec
    doc: dict[str, Any] = {
        "name": model.name,
        "namespace": model.namespace,
        "generation": model.generation,
        "model": spec.model,
        "enabled": spec.enabled,
        "environment": spec.environment,
    }
    config = spec.offloading_config
    if config is not None:
        behavior = config.behavior
        offloading: dict[str, Any] = {
            "behavior": {
                "percentage": behavior.percentage,
                "sustainSeconds": behavior.sustain_seconds,
                "cooldownSeconds": behavior.cooldown_seconds,
                "tolerance": behavior.tolerance,
                "staticSplit": behavior.static_split,
                "spilloverInFlight": behavior.spillover_in_flight,
                "coldStartHoldSeconds": behavior.cold_start_hold_seconds,
            },
            "metrics": [_metric_dict(m) for m in config.metrics],
        }
        gauges = config.model_metrics
        if gauges is not None:
            offloading["modelMetrics"] = {
                "port": gauges.port,
                "path": gauges.path,
                "intervalSeconds": gauges.interval_seconds,
                "gauges": list(gauges.gauges),
            }
        backend = config.remote_backend
        if backend is not None:
            remote: dict[str, Any] = {"scheme": backend.scheme, "host": backend.host}
            if backend.path_prefix:
                remote["pathPrefix"] = backend.path_prefix
            if backend.headers_to_add:
                remote["headersToAdd"] = _redacted_headers(backend.headers_to_add)
            if backend.headers_from_secrets:
                remote["headersFromSecrets"] = [
                    {
                        "name": h.name,
                        "secretKeyRef": {"name": h.secret_key_ref.name, "key": h.secret_key_ref.key},
                    }
                    for h in backend.headers_from_secrets
                ]
            if backend.ca_bundle is not None:
                n = backend.ca_bundle.count("-----BEGIN CERTIFICATE-----")
                remote["caBundle"] = f"<{n} certificate{'' if n == 1 else 's'}>"
            if backend.auth_config is not None:
                auth: dict[str, Any] = {"type": backend.auth_config.type}
                oauth = backend.auth_config.oauth_config
                if oauth is not None:
                    auth["oauthConfig"] = {
                        "clientId": oauth.client_id,
                        "tokenUrl": oauth.token_url,
                        "clientSecret": "<redacted>" if oauth.client_secret else None,
                        "clientSecretRef": (
                            {"name": oauth.client_secret_ref.name, "key": oauth.client_secret_ref.key}
                            if oauth.client_secret_ref
                            else None
                        ),
                    }
                remote["authConfig"] = auth
            offloading["remoteBackend"] = remote
        doc["offloadingConfig"] = offloading
    return doc


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def status_document(view: ControlView, stats: ProxyStats, *, ready: bool) -> dict[str, Any]:
    plan = view.plan
    remote = plan.remote
    requests: dict[str, dict[str, int]] = {}
    for (backend, code), n in sorted(stats.requests_total.items()):
        requests.setdefault(backend, {})[code] = n
    return {
        "ready": ready,
        "mode": view.mode,
        "source": view.source,
        "listen": view.listen,
        "upstream": view.upstream,
        "configuration": configuration_document(view.model),
        "configurationErrors": list(view.config_errors),
        "observations": [
            {
                "metric": o.metric,
                "current": o.current,
                "target": o.target,
                "ratio": None if o.ratio is None else round(o.ratio, 4),
                "display": o.display(),
                "reason": o.reason,
            }
            for o in view.observations
        ],
        "decision": {
            "offloading": plan.offloading,
            "reason": view.reason,
            "code": view.decision.code if view.decision is not None else None,
            "stale": bool(view.published and view.published["stale"]),
            "controller": view.published,
            "offloadingSince": _iso(view.offloading_since),
            "transitions": dict(view.transitions),
        },
        "routing": {
            "remote": None if remote is None else f"{remote.scheme}://{remote.authority}{remote.path_prefix}",
            "percentage": plan.percentage,
            "activePercentage": plan.active_percentage,
            "remoteUnavailable": view.remote_unavailable,
        },
        "counters": {
            "requests": requests,
            "local": stats.total("local"),
            "remote": stats.total("remote"),
            "fallbacks": {"/".join(k): n for k, n in sorted(stats.fallbacks_total.items())},
            "upstreamFailures": {"/".join(k): n for k, n in sorted(stats.upstream_failures_total.items())},
            "rejected": {str(k): n for k, n in sorted(stats.rejected_total.items())},
            "clientAborts": stats.client_aborts_total,
            "inFlight": stats.in_flight,
            "localInFlight": stats.local_in_flight,
            "localWaiting": stats.local_waiting,
            "spillovers": view.spillovers,
            "openConnections": stats.open_connections,
            "breaker": stats.breaker_state,
        },
    }
