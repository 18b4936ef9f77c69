"""The controller's plan for one ModelDeployment, as a table of worlds (no API server)."""

from __future__ import annotations

import jsonpatch
import pytest

from crds.validation import validate_object
from webhook.controller import reconcile
from webhook.controller.reconcile import FINALIZER, World

SETTINGS = reconcile.Settings("offload-sidecar")


def md(enabled=True, finalizers=(FINALIZER,), deleting=False, service="vllm"):
    doc = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "vllm",
            "namespace": "models",
            "uid": "md-uid",
            "generation": 3,
            "finalizers": list(finalizers),
        },
        "spec": {
            "model": "llama",
            "enabled": enabled,
            "modelSourceRef": {"kind": "Deployment", "name": "vllm"},
            "serviceRef": {"name": service, "targetPort": 80},
            "offloadingConfig": {
                "remoteBackend": {"host": "remote.example:80", "scheme": "http"},
                "behavior": {"percentage": 50},
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 50},
                        },
                    }
                ],
            },
        },
    }
    if deleting:
        doc["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    return doc


WORKLOAD = {
    "metadata": {"name": "vllm", "uid": "d-uid"},
    "spec": {"template": {"spec": {"serviceAccountName": "vllm"}}},
}


def pod(name, ready=True, sidecar=True, labels=None):
    init = (
        [{"name": "offload-proxy", "ports": [{"name": "offload-proxy", "containerPort": 15080}]}]
        if sidecar
        else []
    )
    return {
        "metadata": {"name": name, "labels": labels or {"app": "vllm"}},
        "spec": {
            "initContainers": init,
            "containers": [{"name": "model", "ports": [{"containerPort": 8000}]}],
        },
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def service(target=8000, annotations=None):
    return {
        "metadata": {
            "name": "vllm",
            "namespace": "models",
            "resourceVersion": "5",
            "annotations": annotations or {},
        },
        "spec": {
            "selector": {"app": "vllm"},
            "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}],
        },
    }


def world(doc=None, pods=(pod("a"), pod("b")), svc=None, workload=WORKLOAD, **kw):
    doc = doc or md()
    result = validate_object(doc)
    svc = service() if svc is None else svc
    return World(
        doc,
        result.model,
        result.message(),
        workload=workload,
        workload_pods=pods,
        service=svc,
        service_pods=pods,
        rolebinding=kw.pop("rolebinding", None),
        **kw,
    )


def captured_service():
    svc = service()
    p = reconcile.plan(world(svc=svc), SETTINGS)
    return jsonpatch.apply_patch(svc, p.service_patch)


def conditions(plan):
    return {c.type: (c.status, c.reason) for c in plan.conditions}


def test_all_ready_pods_injected_captures_binds_and_is_ready():
    p = reconcile.plan(world(), SETTINGS)
    assert p.service_patch_why == "capture" and p.captured and p.injected == "2/2" and p.without_sidecar == 0
    assert p.rolebinding.verb == "create"
    assert p.rolebinding.body["subjects"] == [
        {"kind": "ServiceAccount", "name": "vllm", "namespace": "models"}
    ]
    assert conditions(p)["TrafficCaptured"] == (True, "Captured")
    assert conditions(p)["Ready"] == (True, "Ready")
    assert not p.add_finalizer


def test_the_finalizer_comes_first():
    assert reconcile.plan(world(md(finalizers=())), SETTINGS).add_finalizer


def test_a_ready_pod_without_the_sidecar_blocks_capture_and_is_named():
    p = reconcile.plan(world(pods=(pod("a"), pod("old", sidecar=False))), SETTINGS)
    assert p.service_patch is None and not p.captured
    assert conditions(p)["TrafficCaptured"] == (False, "PodsWithoutSidecar")
    assert conditions(p)["Injected"] == (False, "PodsWithoutSidecar")
    assert "old" in next(c.message for c in p.conditions if c.type == "Injected")
    assert p.injected == "1/2" and p.without_sidecar == 1


def test_an_unready_pod_without_the_sidecar_does_not_block():
    p = reconcile.plan(world(pods=(pod("a"), pod("starting", ready=False, sidecar=False))), SETTINGS)
    assert p.service_patch_why == "capture"


def test_captured_and_a_bare_ready_pod_appears_restores():
    svc = captured_service()
    p = reconcile.plan(world(svc=svc, pods=(pod("a"), pod("bare", sidecar=False))), SETTINGS)
    assert p.service_patch_why == "restore"
    assert jsonpatch.apply_patch(svc, p.service_patch)["spec"]["ports"][0]["targetPort"] == 8000


def test_no_pod_with_the_sidecar_waits():
    p = reconcile.plan(world(pods=()), SETTINGS)
    assert p.service_patch is None and conditions(p)["TrafficCaptured"] == (False, "WaitingForInjection")


def test_already_captured_is_left_alone():
    p = reconcile.plan(world(svc=captured_service()), SETTINGS)
    assert p.service_patch is None and p.captured


def test_a_reverted_service_is_captured_again():
    svc = captured_service()
    svc["spec"]["ports"][0]["targetPort"] = 8000
    p = reconcile.plan(world(svc=svc), SETTINGS)
    assert p.service_patch_why == "capture"


def test_opt_out_touches_nothing():
    svc = service(annotations={"offload.beamlit.com/capture": "false"})
    p = reconcile.plan(world(svc=svc), SETTINGS)
    assert p.service_patch is None and conditions(p)["TrafficCaptured"] == (False, "CaptureOptedOut")


@pytest.mark.parametrize(
    ("doc", "svc", "workload", "reason"),
    [
        (md(service="missing"), None, WORKLOAD, "ServiceNotFound"),
        (md(), None, None, "WorkloadNotFound"),
    ],
)
def test_bad_references_touch_nothing(doc, svc, workload, reason):
    w = world(doc, workload=workload)
    if svc is None and reason == "ServiceNotFound":
        w = World(w.md, w.model, workload=workload, workload_pods=w.workload_pods, service=None)
    p = reconcile.plan(w, SETTINGS)
    assert p.service_patch is None
    assert conditions(p)["Ready"] == (False, reason)


def test_disabled_restores_and_keeps_the_binding():
    svc = captured_service()
    p = reconcile.plan(world(md(enabled=False), svc=svc), SETTINGS)
    assert p.service_patch_why == "restore"
    assert conditions(p)["Ready"] == (False, "Disabled")
    assert p.rolebinding.verb == "create"


def test_deleting_restores_deletes_our_binding_and_removes_the_finalizer():
    svc = captured_service()
    ours = reconcile.plan(world(), SETTINGS).rolebinding.body
    p = reconcile.plan(world(md(deleting=True), svc=svc, rolebinding=ours), SETTINGS)
    assert p.service_patch_why == "restore" and p.remove_finalizer
    assert p.rolebinding.verb == "delete"


def test_deleting_leaves_a_binding_that_is_not_ours():
    theirs = {
        "metadata": {"name": "vllm-offload-sidecar", "ownerReferences": []},
        "roleRef": {},
        "subjects": [],
    }
    p = reconcile.plan(world(md(deleting=True), rolebinding=theirs), SETTINGS)
    assert p.rolebinding is None and p.remove_finalizer


def test_a_binding_of_the_same_name_that_is_not_ours_is_a_condition_not_an_update():
    theirs = {"metadata": {"name": "vllm-offload-sidecar"}, "roleRef": {"name": "x"}, "subjects": []}
    p = reconcile.plan(world(rolebinding=theirs), SETTINGS)
    assert p.rolebinding is None
    assert conditions(p)["SidecarRBACReady"] == (False, "RoleBindingConflict")


def test_a_renamed_cluster_role_recreates_and_a_new_service_account_patches():
    ours = reconcile.plan(world(), SETTINGS).rolebinding.body
    assert (
        reconcile.plan(world(rolebinding=ours), reconcile.Settings("renamed")).rolebinding.verb == "recreate"
    )
    moved = {
        "metadata": {"name": "vllm", "uid": "d-uid"},
        "spec": {"template": {"spec": {"serviceAccountName": "other"}}},
    }
    assert (
        reconcile.plan(world(rolebinding=ours, workload=moved), SETTINGS).rolebinding.verb == "patch-subjects"
    )
    assert reconcile.plan(world(rolebinding=ours), SETTINGS).rolebinding is None


def test_release_undoes_everything_and_creates_nothing():
    svc = captured_service()
    p = reconcile.plan(world(svc=svc), reconcile.Settings("offload-sidecar", release=True))
    assert p.service_patch_why == "restore" and p.remove_finalizer and p.rolebinding is None


def test_an_invalid_modeldeployment_is_reported_and_nothing_touched():
    doc = md()
    doc["spec"]["offloadingConfig"]["behavior"]["percentage"] = 150
    p = reconcile.plan(world(doc), SETTINGS)
    assert p.service_patch is None and p.rolebinding is None
    assert conditions(p)["Valid"] == (False, "Invalid")
    assert "percentage" in next(c.message for c in p.conditions if c.type == "Valid")


def test_a_service_captured_by_another_modeldeployment_is_not_taken():
    svc = service(annotations={"offload.beamlit.com/captured-by": "other"})
    p = reconcile.plan(world(svc=svc), SETTINGS)
    assert p.service_patch is None and conditions(p)["TrafficCaptured"] == (False, "CapturedByAnother")
