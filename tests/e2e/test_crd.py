"""The ModelDeployment CRD on a real API server: it is accepted and Established, the
tutorial's ModelDeployment applies unchanged, and the API server itself (no webhook
registered here) rejects what the schema forbids, with the field path in the message."""

from __future__ import annotations

import json

import kubernetes
import pytest

from tests import modeldeployments as md
from tests.e2e.objects import modeldeployment_absent
from tests.e2e.paths import TUTORIAL_MODELDEPLOYMENT

pytestmark = pytest.mark.e2e


def test_crd_is_established_with_its_names(kube, modeldeployment_crd):
    crd = kubernetes.client.ApiextensionsV1Api(kube.api_client).read_custom_resource_definition(
        modeldeployment_crd
    )
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd.status.accepted_names.kind == "ModelDeployment"
    listed = kube.kubectl("get", "mdd", "-A")  # the short name resolves through discovery
    assert listed.returncode == 0, listed.stderr


def test_tutorial_modeldeployment_applies_unchanged(kube, modeldeployment_crd, tutorial_in_default_namespace):
    applied = kube.kubectl("apply", "-f", str(TUTORIAL_MODELDEPLOYMENT))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == "modeldeployment.deployment.beamlit.com/my-model created"

    stored = kubernetes.client.CustomObjectsApi(kube.api_client).get_namespaced_custom_object(
        md.GROUP, md.VERSION, "default", md.PLURAL, "my-model"
    )
    written = md.tutorial()["spec"]
    assert stored["spec"]["modelSourceRef"] == written["modelSourceRef"]
    assert stored["spec"]["serviceRef"] == written["serviceRef"]
    assert stored["spec"]["offloadingConfig"]["remoteBackend"] == written["offloadingConfig"]["remoteBackend"]
    assert stored["spec"]["offloadingConfig"]["metrics"] == written["offloadingConfig"]["metrics"]
    assert stored["spec"]["offloadingConfig"]["behavior"]["percentage"] == 50
    assert stored["spec"]["enabled"] is True, "the schema defaults enabled to true"

    shown = kube.kubectl("get", "modeldeployment", "my-model", "-n", "default")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "MODEL"]
    assert row.split()[:2] == ["my-model", "my-model"]


# (what is changed, the field path the API server names, words of its message)
SCHEMA_VIOLATIONS = {
    "percentage-150": (
        {"spec.offloadingConfig.behavior.percentage": 150},
        "spec.offloadingConfig.behavior.percentage",
        "should be less than or equal to 100",
    ),
    "percentage-negative": (
        {"spec.offloadingConfig.behavior.percentage": -1},
        "spec.offloadingConfig.behavior.percentage",
        "should be greater than or equal to 0",
    ),
    "percentage-not-a-number": (
        {"spec.offloadingConfig.behavior.percentage": "fifty"},
        "spec.offloadingConfig.behavior.percentage",
        'Invalid value: "string"',
    ),
    "scheme-ftp": (
        {"spec.offloadingConfig.remoteBackend.scheme": "ftp"},
        "spec.offloadingConfig.remoteBackend.scheme",
        'Unsupported value: "ftp"',
    ),
    "model-not-a-string": ({"spec.model": 42}, "spec.model", "must be of type string"),
    "target-port-not-a-number": (
        {"spec.serviceRef.targetPort": "http"},
        "spec.serviceRef.targetPort",
        "must be of type integer",
    ),
    "metrics-not-a-list": (
        {"spec.offloadingConfig.metrics": "cpu"},
        "spec.offloadingConfig.metrics",
        "must be of type array",
    ),
    "resource-metric-without-resource": (
        {"spec.offloadingConfig.metrics": [{"type": "Resource"}]},
        "spec.offloadingConfig.metrics[0]",
        "type Resource requires the resource field",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_VIOLATIONS), ids=list(SCHEMA_VIOLATIONS))
def test_api_server_rejects_schema_violations_as_kubectl_shows_them(
    kube, modeldeployment_crd, namespace, case
):
    changes, field, words = SCHEMA_VIOLATIONS[case]
    doc = md.variant("bad", changes)

    applied = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=md.as_yaml(doc))
    assert applied.returncode != 0, f"kubectl apply accepted {case}: {applied.stdout}"
    assert 'The ModelDeployment "bad" is invalid: ' in applied.stderr
    assert f"{field}: " in applied.stderr and words in applied.stderr, applied.stderr

    status = _create_expecting_error(kube, namespace, doc)
    assert status["code"] == 422 and status["reason"] == "Invalid"
    assert field in [cause.get("field") for cause in status["details"]["causes"]], status
    assert modeldeployment_absent(kube.api_client, namespace, "bad")


def test_api_server_rejects_missing_required_fields(kube, modeldeployment_crd, namespace):
    doc = md.variant("bad", {}, remove=("spec.modelSourceRef",))
    applied = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=md.as_yaml(doc))
    assert applied.returncode != 0
    assert "spec.modelSourceRef: Required value" in applied.stderr, applied.stderr


def test_api_server_rejects_unknown_fields_under_strict_validation(kube, modeldeployment_crd, namespace):
    doc = md.variant("bad", {"spec.offloadingConfig.remoteBackend.hots": "typo:80"})
    applied = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=md.as_yaml(doc))
    assert applied.returncode != 0
    assert 'unknown field "spec.offloadingConfig.remoteBackend.hots"' in applied.stderr, applied.stderr


def test_schema_accepts_the_edges_it_allows(kube, modeldeployment_crd, namespace):
    """The bounds are inclusive: 0 and 100 percent and https are stored as given."""
    api = kubernetes.client.CustomObjectsApi(kube.api_client)
    for name, changes in {
        "zero": {"spec.offloadingConfig.behavior.percentage": 0},
        "all": {
            "spec.offloadingConfig.behavior.percentage": 100,
            "spec.offloadingConfig.remoteBackend.scheme": "https",
        },
    }.items():
        doc = md.variant(name, changes)
        doc["spec"]["modelSourceRef"]["namespace"] = namespace
        doc["spec"]["serviceRef"]["namespace"] = namespace
        created = api.create_namespaced_custom_object(md.GROUP, md.VERSION, namespace, md.PLURAL, doc)
        behavior = created["spec"]["offloadingConfig"]["behavior"]
        assert behavior["percentage"] == changes["spec.offloadingConfig.behavior.percentage"]


def _create_expecting_error(kube, namespace: str, doc: dict) -> dict:
    """Creates through the Python client; returns the API server's Status for the refusal."""
    api = kubernetes.client.CustomObjectsApi(kube.api_client)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        api.create_namespaced_custom_object(md.GROUP, md.VERSION, namespace, md.PLURAL, doc)
    return json.loads(refused.value.body)
