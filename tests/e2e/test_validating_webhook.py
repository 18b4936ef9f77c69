"""The validating webhook as the API server really calls it: offload-webhook runs as a
local process with a certificate from offload-certs, registered by a
ValidatingWebhookConfiguration whose clientConfig.url points at it on loopback with the
matching caBundle and failurePolicy Fail."""

from __future__ import annotations

import json
from collections.abc import Iterator

import kubernetes
import pytest

from tests import modeldeployments as md
from tests.e2e.controlplane.admission import (
    MODELDEPLOYMENT_RULE,
    apply_validating_webhook_configuration,
    delete_validating_webhook_configuration,
    validating_webhook_configuration,
)
from tests.e2e.controlplane.process import wait_until
from tests.e2e.controlplane.webhook_process import WebhookServer
from tests.e2e.objects import modeldeployment_absent
from tests.e2e.paths import TUTORIAL_MODELDEPLOYMENT

pytestmark = pytest.mark.e2e

CONFIG_NAME = "offload-e2e-validation"
WEBHOOK_NAME = f"{CONFIG_NAME}.deployment.beamlit.com"
HOST_WITH_SCHEME = "http://my-model-on-another-cluster:80"


@pytest.fixture
def validating_webhook(kube, modeldeployment_crd, run_webhook) -> Iterator[WebhookServer]:
    """offload-webhook --validation-only, registered with the API server for ModelDeployments."""
    server = run_webhook("--validation-only")
    body = validating_webhook_configuration(
        CONFIG_NAME,
        server.url("/validate-modeldeployments"),
        server.ca_bundle,
        [MODELDEPLOYMENT_RULE],
        failure_policy="Fail",
    )
    apply_validating_webhook_configuration(kube.api_client, body)
    try:
        _wait_until_webhook_is_called(kube)
        yield server
    finally:
        delete_validating_webhook_configuration(kube.api_client, CONFIG_NAME)


def test_api_server_denies_a_bad_modeldeployment_with_our_field_path(kube, validating_webhook, namespace):
    """The schema allows any string as host; our webhook says why this one is wrong."""
    doc = _bad_host(namespace)
    applied = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=md.as_yaml(doc))
    assert applied.returncode != 0, applied.stdout
    assert f'admission webhook "{WEBHOOK_NAME}" denied the request' in applied.stderr, applied.stderr
    assert "spec.offloadingConfig.remoteBackend.host: must be host[:port] without a scheme" in applied.stderr
    assert modeldeployment_absent(kube.api_client, namespace, "bad-host")


def test_api_server_denies_the_tutorial_in_another_namespace(kube, validating_webhook, namespace):
    """The tutorial's modelSourceRef names namespace default: applied elsewhere it is refused."""
    applied = kube.kubectl("apply", "-n", namespace, "-f", str(TUTORIAL_MODELDEPLOYMENT))
    assert applied.returncode != 0, applied.stdout
    assert f'admission webhook "{WEBHOOK_NAME}" denied the request' in applied.stderr, applied.stderr
    assert "spec.modelSourceRef.namespace" in applied.stderr


def test_api_server_allows_the_tutorials_modeldeployment(
    kube, validating_webhook, tutorial_in_default_namespace
):
    applied = kube.kubectl("apply", "-f", str(TUTORIAL_MODELDEPLOYMENT))
    assert applied.returncode == 0, applied.stderr
    assert "modeldeployment.deployment.beamlit.com/my-model created" in applied.stdout

    # An update goes through the webhook too: a valid change is allowed, a bad one denied.
    patched = kube.kubectl(
        "patch",
        "modeldeployment",
        "my-model",
        "-n",
        "default",
        "--type=merge",
        "-p",
        '{"spec":{"offloadingConfig":{"behavior":{"percentage":30}}}}',
    )
    assert patched.returncode == 0, patched.stderr
    bad_host = {"spec": {"offloadingConfig": {"remoteBackend": {"host": HOST_WITH_SCHEME}}}}
    broken = kube.kubectl(
        "patch", "modeldeployment", "my-model", "-n", "default", "--type=merge", "-p", json.dumps(bad_host)
    )
    assert broken.returncode != 0
    assert "spec.offloadingConfig.remoteBackend.host" in broken.stderr, broken.stderr


def test_failure_policy_fail_refuses_modeldeployments_while_the_webhook_is_down(
    kube, validating_webhook, namespace
):
    validating_webhook.stop()
    applied = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=md.as_yaml(_good(namespace)))
    assert applied.returncode != 0, applied.stdout
    assert f'failed calling webhook "{WEBHOOK_NAME}"' in applied.stderr, applied.stderr


# -- helpers -------------------------------------------------------------------------------


def _good(namespace: str) -> dict:
    doc = md.variant(
        "good", {"spec.modelSourceRef.namespace": namespace, "spec.serviceRef.namespace": namespace}
    )
    return doc


def _bad_host(namespace: str) -> dict:
    doc = _good(namespace)
    doc["metadata"]["name"] = "bad-host"
    doc["spec"]["offloadingConfig"]["remoteBackend"]["host"] = HOST_WITH_SCHEME
    return doc


def _wait_until_webhook_is_called(kube) -> None:
    """The API server picks up a new webhook configuration asynchronously: probe with a
    server-side dry run until our webhook answers."""
    api = kubernetes.client.CustomObjectsApi(kube.api_client)
    probe = _bad_host("default")
    probe["metadata"]["name"] = "probe"

    def denied_by_webhook() -> bool:
        try:
            api.create_namespaced_custom_object(
                md.GROUP, md.VERSION, "default", md.PLURAL, probe, dry_run="All"
            )
        except kubernetes.client.ApiException as exc:
            return WEBHOOK_NAME in (exc.body or "")
        return False

    wait_until("the API server to call the validating webhook", denied_by_webhook, 30, alive=kube.processes)
