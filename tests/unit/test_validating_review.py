"""The validating webhook's review logic, without sockets."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from crds.validation import ValidationSettings
from tests.modeldeployments import admission_review
from webhook.admission import parse_review
from webhook.validating import review_modeldeployment

TUTORIAL = yaml.safe_load(
    (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
)
SETTINGS = ValidationSettings()


def review(obj, *, operation="CREATE", old=None, sub_resource=None, uid="7f0e-uid"):
    body = admission_review(obj, uid=uid, operation=operation, old=old, sub_resource=sub_resource)
    return parse_review(body)


def test_the_tutorial_is_allowed_and_the_uid_echoed():
    answer = review_modeldeployment(review(TUTORIAL), SETTINGS)
    assert answer == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "7f0e-uid", "allowed": True},
    }


def test_a_bad_object_is_denied_with_every_error_in_the_message():
    bad = copy.deepcopy(TUTORIAL)
    bad["spec"]["offloadingConfig"]["behavior"]["percentage"] = 150
    bad["spec"]["offloadingConfig"]["remoteBackend"]["scheme"] = "ftp"
    response = review_modeldeployment(review(bad), SETTINGS)["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert response["status"]["message"] == (
        'ModelDeployment.deployment.beamlit.com "my-model" is invalid: '
        "spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150; "
        "spec.offloadingConfig.remoteBackend.scheme: must be http or https, got 'ftp'"
    )


def test_warnings_travel_with_an_allowed_object():
    odd = copy.deepcopy(TUTORIAL)
    odd["spec"]["offloadingConfig"]["behavior"]["percentage"] = 0
    response = review_modeldeployment(review(odd), SETTINGS)["response"]
    assert response["allowed"] is True
    assert response["warnings"] == [
        "spec.offloadingConfig.behavior.percentage is 0: no request will ever be offloaded"
    ]


def test_an_update_is_validated_like_a_create():
    bad = copy.deepcopy(TUTORIAL)
    bad["spec"]["modelSourceRef"]["kind"] = "CronJob"
    response = review_modeldeployment(review(bad, operation="UPDATE", old=TUTORIAL), SETTINGS)["response"]
    assert response["allowed"] is False and "spec.modelSourceRef.kind" in response["status"]["message"]


def test_a_status_only_update_is_never_blocked_even_for_an_object_that_became_invalid():
    # The object slipped in while the webhook was down; the controller must still report on it.
    bad = copy.deepcopy(TUTORIAL)
    bad["spec"]["offloadingConfig"]["behavior"]["percentage"] = 150
    with_status = {**bad, "status": {"offloadingStatus": False}}
    assert review_modeldeployment(review(with_status, operation="UPDATE", old=bad), SETTINGS)["response"][
        "allowed"
    ]
    assert review_modeldeployment(
        review(with_status, operation="UPDATE", old=bad, sub_resource="status"), SETTINGS
    )["response"]["allowed"]


def test_a_delete_is_allowed():
    assert review_modeldeployment(review(None, operation="DELETE", old=TUTORIAL), SETTINGS)["response"][
        "allowed"
    ]


def test_the_namespace_of_the_request_is_used_when_the_object_has_none():
    obj = copy.deepcopy(TUTORIAL)
    obj["spec"]["modelSourceRef"]["namespace"] = "team-a"
    obj["spec"]["serviceRef"]["namespace"] = "team-a"
    answer = review_modeldeployment(review(obj), SETTINGS)["response"]
    assert answer["allowed"] is False
    assert (
        "must be the ModelDeployment's own namespace 'default', got 'team-a'" in answer["status"]["message"]
    )
