"""The remote standing in for a workload with no ready pod: the controller's pure plan (no I/O)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest

from crds.model import RemoteBackend
from crds.validation import ValidationSettings, validate_object
from webhook.cache import STANDIN_SLICES_SELECTOR
from webhook.controller import standin
from webhook.controller.standin import Claim, GatewaySettings, StandInWorld

GATEWAY = GatewaySettings("offload-system", {"app.kubernetes.io/component": "gateway"}, (20000, 20009))


def md(remote=True, enabled=True, hold=0, service="vllm") -> dict[str, Any]:
    config: dict[str, Any] = {
        "behavior": {"percentage": 50, "coldStartHoldSeconds": hold},
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
            }
        ],
    }
    if not remote:
        config["metrics"] = []  # with metrics, a remote is required (without a default one)
    if remote:
        config["remoteBackend"] = {
            "host": "remote.example:8080",
            "scheme": "https",
            "pathPrefix": "/v1/$model",
        }
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "vllm", "namespace": "models", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "model": "llama",
            "enabled": enabled,
            "modelSourceRef": {"kind": "Deployment", "name": "vllm"},
            "serviceRef": {"name": service, "targetPort": 80},
            "offloadingConfig": config,
        },
    }


DEFAULT = RemoteBackend(host="default.example:443", scheme="https")


def model_of(doc, default_remote=False):
    settings = ValidationSettings(default_remote_backend=DEFAULT if default_remote else None)
    result = validate_object(doc, settings)
    assert result.model is not None, result.message()
    return result.model


def workload(replicas=2) -> dict[str, Any]:
    return {"metadata": {"name": "vllm", "uid": "d-uid"}, "spec": {"replicas": replicas}}


def pod(name, ready=True, ips=("10.0.0.1",), labels=None, node="node-a") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "x",
            "uid": f"{name}-uid",
            "labels": labels or {"app": "vllm"},
        },
        "spec": {"nodeName": node},
        "status": {
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def gateway_pod(name, ip, ready=True, ips=None) -> dict[str, Any]:
    p = pod(name, ready, ips or (ip,), labels={"app.kubernetes.io/component": "gateway"})
    p["metadata"]["namespace"] = "offload-system"
    return p


def service(ports=None, **spec) -> dict[str, Any]:
    return {
        "metadata": {"name": "vllm", "namespace": "models", "uid": "svc-uid", "annotations": {}},
        "spec": {
            "selector": {"app": "vllm"},
            "clusterIP": "10.96.0.10",
            "ports": ports
            or [{"name": "http", "port": 80, "targetPort": "offload-proxy", "protocol": "TCP"}],
            **spec,
        },
    }


GATEWAYS = (gateway_pod("gw-b", "10.244.0.12"), gateway_pod("gw-a", "10.244.0.11"))


def world(doc=None, pods=(), gateways=GATEWAYS, slices=(), port=20003, svc=None, **kw) -> StandInWorld:
    doc = doc or md()
    return StandInWorld(
        doc,
        kw.pop("model", model_of(doc, kw.pop("default_remote", False))),
        workload=kw.pop("workload", workload(replicas=0 if not pods else 2)),
        workload_pods=pods,
        service=svc if svc is not None else service(),
        service_pods=pods,
        gateway_pods=gateways,
        slices=slices,
        port=port,
        **kw,
    )


def made_slice(w: StandInWorld) -> dict[str, Any]:
    (action,) = standin.plan(w, GATEWAY).actions
    assert action.verb == "create"
    return action.body


def stored(body: dict[str, Any], version="7") -> dict[str, Any]:
    obj = copy.deepcopy(body)
    obj["metadata"]["resourceVersion"] = version
    return obj


# --- the slice ---------------------------------------------------------------------------------


def test_scaled_to_zero_with_a_remote_gets_a_slice_of_the_ready_gateway_pods_on_its_port():
    plan = standin.plan(world(), GATEWAY)
    (action,) = plan.actions
    assert (action.verb, action.name) == ("create", "vllm-offload-standin")
    body = action.body
    assert body["metadata"]["labels"] == {
        "kubernetes.io/service-name": "vllm",
        "endpointslice.kubernetes.io/managed-by": "controller.offload.beamlit.com",
        "offload.beamlit.com/modeldeployment": "vllm",
    }
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Service", "name": "vllm", "uid": "svc-uid"}
    ]
    assert body["addressType"] == "IPv4"
    # The Service port's name (kube-proxy matches by it) and the gateway's listener.
    assert body["ports"] == [{"name": "http", "port": 20003, "protocol": "TCP"}]
    assert [(e["addresses"], e["targetRef"]["name"], e["nodeName"]) for e in body["endpoints"]] == [
        (["10.244.0.11"], "gw-a", "node-a"),
        (["10.244.0.12"], "gw-b", "node-a"),
    ]
    assert all(
        e["conditions"] == {"ready": True, "serving": True, "terminating": False} for e in body["endpoints"]
    )
    assert plan.active and plan.status == {"port": 20003, "active": True, "portName": "http"}
    cond = plan.condition
    assert (cond.type, cond.status, cond.reason) == ("RemoteStandingIn", True, "ScaledToZero")
    assert "Deployment vllm is scaled to zero" in cond.message
    assert (
        "2 gateway pods on port 20003" in cond.message
        and "https://remote.example:8080/v1/llama" in cond.message
    )
    assert plan.event == ("Normal", "RemoteStandingIn", cond.message)


def test_a_crash_looping_workload_is_treated_the_same():
    plan = standin.plan(world(pods=(pod("vllm-1", ready=False), pod("vllm-2", ready=False))), GATEWAY)
    assert plan.active and [a.verb for a in plan.actions] == ["create"]
    assert plan.condition.reason == "NoReadyReplica"
    assert "has 0 ready of 2 pods" in plan.condition.message


def test_one_ready_pod_removes_the_slice_and_says_so():
    existing = stored(made_slice(world()))
    plan = standin.plan(world(pods=(pod("vllm-1"), pod("vllm-2", ready=False)), slices=[existing]), GATEWAY)
    assert [(a.verb, a.name) for a in plan.actions] == [("delete", "vllm-offload-standin")]
    assert not plan.active and plan.status == {"port": 20003, "active": False, "portName": "http"}
    assert (plan.condition.status, plan.condition.reason) == (False, "LocalReplicasReady")
    assert plan.event[:2] == ("Normal", "RemoteStoodDown")
    assert "1 ready of 2 pods" in plan.event[2]


def ready_for(name: str, seconds: float, now: datetime) -> dict[str, Any]:
    """A pod whose Ready condition turned True ``seconds`` before ``now``."""
    ready = pod(name)
    ready["status"]["conditions"][0]["lastTransitionTime"] = (now - timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    return ready


def test_the_slice_stays_beside_a_pod_ready_for_less_than_the_handover_then_goes():
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    existing = stored(made_slice(world()))

    settling = standin.plan(world(pods=(ready_for("vllm-1", 2, now),), slices=[existing], now=now), GATEWAY)
    assert settling.actions == () and settling.active  # make before break: both serve meanwhile
    assert (settling.condition.status, settling.condition.reason) == (True, "HandingOver")
    assert settling.recheck_after == standin.HANDOVER_SECONDS - 2 and settling.event is None

    later = now + timedelta(seconds=settling.recheck_after)
    done = standin.plan(world(pods=(ready_for("vllm-1", 2, now),), slices=[existing], now=later), GATEWAY)
    assert [(a.verb, a.name) for a in done.actions] == [("delete", "vllm-offload-standin")]
    assert (done.condition.reason, done.recheck_after) == ("LocalReplicasReady", None)


def test_with_no_slice_a_newly_ready_pod_needs_no_handover():
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    plan = standin.plan(world(pods=(ready_for("vllm-1", 0, now),), now=now), GATEWAY)
    assert plan.actions == () and not plan.active and plan.condition.reason == "LocalReplicasReady"


def test_a_ready_pod_selected_by_the_service_but_not_the_workloads_counts_too():
    w = world(svc=service())
    w = StandInWorld(**{**w.__dict__, "service_pods": (pod("canary-1"),)})
    plan = standin.plan(w, GATEWAY)
    assert not plan.active and plan.actions == ()
    assert plan.condition.reason == "LocalReplicasReady"


def test_an_unchanged_slice_means_nothing_to_do_and_no_event():
    existing = stored(made_slice(world()))
    existing["metadata"]["generation"] = 1  # what the API server adds does not count
    plan = standin.plan(world(slices=[existing]), GATEWAY)
    assert plan.actions == () and plan.active and plan.event is None


def test_a_changed_gateway_replaces_the_slice_at_its_resource_version():
    existing = stored(made_slice(world()), version="41")
    gateways = (gateway_pod("gw-a", "10.244.0.11"), gateway_pod("gw-b", "10.244.0.12", ready=False))
    (action,) = standin.plan(world(slices=[existing], gateways=gateways), GATEWAY).actions
    assert action.verb == "patch"
    assert action.body[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "41"}
    patched = jsonpatch.apply_patch(existing, action.body)
    assert [e["targetRef"]["name"] for e in patched["endpoints"]] == ["gw-a"]
    assert (
        patched["ports"] == existing["ports"] and patched["metadata"]["name"] == existing["metadata"]["name"]
    )


def test_a_new_port_replaces_the_slice():
    existing = stored(made_slice(world()))
    existing["metadata"]["labels"]["kubernetes.io/service-name"] = "edited"  # put back too
    (action,) = standin.plan(world(slices=[existing], port=20007), GATEWAY).actions
    patched = jsonpatch.apply_patch(existing, action.body)
    assert action.verb == "patch" and patched["ports"][0]["port"] == 20007
    assert patched["metadata"]["labels"]["kubernetes.io/service-name"] == "vllm"


def test_an_ipv6_service_gets_the_gateway_pods_ipv6_addresses_and_a_new_slice():
    existing = stored(made_slice(world()))
    gateways = (gateway_pod("gw-a", "10.244.0.11", ips=("10.244.0.11", "fd00::11")),)
    plan = standin.plan(
        world(slices=[existing], gateways=gateways, svc=service(ipFamilies=["IPv6"])), GATEWAY
    )
    assert [a.verb for a in plan.actions] == ["delete", "create"]  # addressType is immutable
    body = plan.actions[1].body
    assert body["addressType"] == "IPv6" and body["endpoints"][0]["addresses"] == ["fd00::11"]


def test_an_unnamed_service_port_gives_an_unnamed_slice_port():
    svc = service(ports=[{"port": 80, "targetPort": 8000, "protocol": "TCP"}])
    body = made_slice(world(svc=svc))
    assert body["ports"] == [{"name": "", "port": 20003, "protocol": "TCP"}]


def test_no_ready_gateway_pod_means_no_slice_and_a_warning_reason():
    existing = stored(made_slice(world()))
    plan = standin.plan(
        world(slices=[existing], gateways=(gateway_pod("gw-a", "10.244.0.11", ready=False),)), GATEWAY
    )
    assert [a.verb for a in plan.actions] == ["delete"]
    assert plan.condition.reason == "NoGatewayReady" and "NoGatewayReady" in standin.WARNING_REASONS
    assert "app.kubernetes.io/component=gateway in namespace offload-system" in plan.condition.message


def test_a_gateway_pod_without_an_address_of_the_family_is_left_out():
    gateways = (gateway_pod("gw-a", "fd00::1"),)
    plan = standin.plan(world(gateways=gateways), GATEWAY)
    assert plan.actions == () and plan.condition.reason == "NoGatewayReady"
    assert "IPv4" in plan.condition.message


# --- left alone, and why -------------------------------------------------------------------------


def test_without_any_remote_nothing_stands_in_and_the_condition_says_why():
    plan = standin.plan(world(md(remote=False), port=None), GATEWAY)
    assert plan.actions == () and plan.status is None and not plan.active
    assert (plan.condition.status, plan.condition.reason) == (False, "NoRemote")
    assert "NoRemote" in standin.WARNING_REASONS
    assert (
        "no remote backend" in plan.condition.message
        and "Service vllm has no endpoint" in plan.condition.message
    )


def test_the_installations_default_remote_stands_in():
    plan = standin.plan(world(md(remote=False), default_remote=True), GATEWAY)
    assert plan.active and "https://default.example:443" in plan.condition.message


def test_without_any_remote_but_with_ready_pods_the_reason_is_not_a_warning():
    plan = standin.plan(world(md(remote=False), pods=(pod("vllm-1"),), port=None), GATEWAY)
    assert plan.condition.reason == "LocalReplicasReady" not in standin.WARNING_REASONS
    assert plan.status is None


def test_disabled_gives_up_the_port_and_the_slice():
    existing = stored(made_slice(world()))
    plan = standin.plan(world(md(enabled=False), slices=[existing], port=None), GATEWAY)
    assert [a.verb for a in plan.actions] == ["delete"] and plan.status is None
    assert plan.condition.reason == "Disabled"


@pytest.mark.parametrize(
    ("svc", "reason"),
    [
        (service(clusterIP="None"), "HeadlessService"),
        (service(type="ExternalName", externalName="x.example"), "ExternalNameService"),
        (
            {
                **service(),
                "metadata": {
                    **service()["metadata"],
                    "annotations": {"offload.beamlit.com/captured-by": "other"},
                },
            },
            "CapturedByAnother",
        ),
    ],
)
def test_a_service_that_cannot_be_stood_in_for_is_left_alone(svc, reason):
    plan = standin.plan(world(svc=svc), GATEWAY)
    assert plan.actions == () and plan.condition.reason == reason
    assert plan.status["port"] == 20003 and plan.status["active"] is False


def test_a_slice_of_that_name_held_by_another_modeldeployment_is_never_touched():
    foreign = stored(made_slice(world()))
    foreign["metadata"]["labels"]["offload.beamlit.com/modeldeployment"] = "other"
    plan = standin.plan(world(slices=[foreign]), GATEWAY)
    assert plan.actions == () and plan.condition.reason == "StandInConflict"
    assert "on behalf of ModelDeployment other" in plan.condition.message


def test_a_slice_for_a_service_no_longer_referenced_goes():
    old = stored(made_slice(world()))
    plan = standin.plan(
        world(
            md(service="vllm-v2"),
            svc={**service(), "metadata": {**service()["metadata"], "name": "vllm-v2"}},
            slices=[old],
        ),
        GATEWAY,
    )
    assert [(a.verb, a.name) for a in plan.actions] == [
        ("delete", "vllm-offload-standin"),
        ("create", "vllm-v2-offload-standin"),
    ]


@pytest.mark.parametrize("why", ["released", "invalid", "no gateway"])
def test_released_invalid_or_without_a_gateway_deletes_ours_with_no_condition(why):
    existing = stored(made_slice(world()))
    w = world(slices=[existing])
    gateway = GATEWAY
    if why == "released":
        w = StandInWorld(**{**w.__dict__, "releasing": True})
    elif why == "invalid":
        w = StandInWorld(**{**w.__dict__, "model": None})
    else:
        gateway = None
    plan = standin.plan(w, gateway)
    assert [a.verb for a in plan.actions] == ["delete"]
    assert plan.condition is None and plan.status is None
    assert plan.event[:2] == ("Normal", "RemoteStoodDown")


def test_the_hold_is_named_in_the_condition():
    plan = standin.plan(world(md(hold=30)), GATEWAY)
    assert "after holding each request up to 30s for a local pod" in plan.condition.message


def test_no_port_left_says_so():
    plan = standin.plan(world(port=None), GATEWAY)
    assert plan.actions == () and plan.condition.reason == "NoGatewayPort"
    assert "20000 to 20009" in plan.condition.message


# --- ports ---------------------------------------------------------------------------------------

RANGE = (20000, 20009)
ME = ("models", "vllm")


def test_a_port_in_range_is_kept():
    assert standin.assign_port(ME, "2026-01-02T00:00:00Z", 20005, [], RANGE) == 20005


def test_a_new_port_starts_at_a_hash_of_the_name_and_skips_taken_ones():
    first = standin.assign_port(ME, "t", None, [], RANGE)
    assert RANGE[0] <= first <= RANGE[1]
    assert standin.assign_port(ME, "t", None, [], RANGE) == first  # deterministic
    again = standin.assign_port(ME, "t", None, [Claim(first, "t0", ("a", "b"))], RANGE)
    assert again == (first + 1 if first < RANGE[1] else RANGE[0])


def test_of_two_claims_on_one_port_the_older_keeps_it():
    older = Claim(20005, "2026-01-01T00:00:00Z", ("a", "older"))
    younger = standin.assign_port(ME, "2026-01-02T00:00:00Z", 20005, [older], RANGE)
    assert younger != 20005
    keeps = standin.assign_port(ME, "2025-12-31T00:00:00Z", 20005, [older], RANGE)
    assert keeps == 20005


@pytest.mark.parametrize("current", [19999, 20010, True, "20005", None])
def test_a_port_out_of_range_or_not_a_number_is_replaced(current):
    assert RANGE[0] <= standin.assign_port(ME, "t", current, [], RANGE) <= RANGE[1]
    assert standin.assign_port(ME, "t", current, [], RANGE) is not current


def test_a_full_range_gives_none():
    claims = [Claim(p, "t0", ("a", str(p))) for p in range(20000, 20010)]
    assert standin.assign_port(ME, "t", None, claims, RANGE) is None
    assert standin.wants_port(model_of(md()))
    assert not standin.wants_port(model_of(md(remote=False)))
    assert standin.wants_port(model_of(md(remote=False), True))


# --- flags and the watch ---------------------------------------------------------------------------


def test_selector_and_port_range_parse_or_name_the_fault():
    assert standin.parse_selector("a=b, c=d") == {"a": "b", "c": "d"}
    assert standin.parse_ports("20000-29999") == (20000, 29999)
    for bad in ("", "a", "=b", "a==b"):
        with pytest.raises(ValueError):
            standin.parse_selector(bad)
    for bad in ("20000", "a-b", "0-10", "30000-20000", "1-70000", "²-³"):
        with pytest.raises(ValueError, match="20000|LOW|a-b|0-10|30000|70000|²"):
            standin.parse_ports(bad)
    with pytest.raises(ValueError, match="selector"):
        GatewaySettings("ns", {}, RANGE)


def test_every_label_of_the_slice_is_one_the_api_server_accepts():
    import re

    value = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
    for key, label in made_slice(world())["metadata"]["labels"].items():
        assert len(label) <= 63 and value.fullmatch(label), (key, label)
    assert value.fullmatch(STANDIN_SLICES_SELECTOR.split("=", 1)[1])


def test_the_controller_watches_exactly_its_own_slices():
    assert STANDIN_SLICES_SELECTOR == f"{standin.MANAGED_BY_LABEL}={standin.MANAGED_BY}"
    assert (
        standin.slice_name("x" * 253).endswith("-offload-standin")
        and len(standin.slice_name("x" * 253)) == 253
    )
