"""Webhook configurations that point the API server at a local webhook server."""

from __future__ import annotations

from typing import Any

import kubernetes

MODELDEPLOYMENT_RULE = {
    "apiGroups": ["deployment.beamlit.com"],
    "apiVersions": ["v1alpha1"],
    "operations": ["CREATE", "UPDATE"],
    "resources": ["modeldeployments"],
    "scope": "Namespaced",
}


def validating_webhook_configuration(
    name: str,
    url: str,
    ca_bundle: str,
    rules: list[dict[str, Any]],
    *,
    failure_policy: str = "Fail",
    namespace_selector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    webhook: dict[str, Any] = {
        "name": f"{name}.deployment.beamlit.com",
        "clientConfig": {"url": url, "caBundle": ca_bundle},
        "rules": rules,
        "failurePolicy": failure_policy,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 10,
    }
    if namespace_selector is not None:
        webhook["namespaceSelector"] = namespace_selector
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [webhook],
    }


def apply_validating_webhook_configuration(
    api_client: kubernetes.client.ApiClient, body: dict[str, Any]
) -> None:
    api = kubernetes.client.AdmissionregistrationV1Api(api_client)
    api.create_validating_webhook_configuration(body)


def delete_validating_webhook_configuration(api_client: kubernetes.client.ApiClient, name: str) -> None:
    api = kubernetes.client.AdmissionregistrationV1Api(api_client)
    try:
        api.delete_validating_webhook_configuration(name)
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise


def mutating_webhook_configuration(name: str, url: str, ca_bundle: str, namespace: str) -> dict:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "inject.pods.deployment.beamlit.com",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded",
                "matchPolicy": "Equivalent",
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                # Only this test's namespace: other tests' pods on the shared control plane are
                # none of this webhook's business (the chart excludes kube-system and its own).
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                # Pods that opt out are never even sent.
                "objectSelector": {
                    "matchExpressions": [
                        {"key": "offload.beamlit.com/inject", "operator": "NotIn", "values": ["false"]},
                    ]
                },
                "clientConfig": {"url": url, "caBundle": ca_bundle},
            }
        ],
    }
