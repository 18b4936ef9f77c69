"""Capture and restore of a Service port: pure JSON Patches, applied here with jsonpatch as the
API server applies them."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from webhook.controller import capture


def service(ports, **spec):
    return {
        "metadata": {"name": "vllm", "namespace": "models", "resourceVersion": "7"},
        "spec": {"selector": {"app": "vllm"}, "ports": ports, **spec},
    }


def round_trip(svc, target_port):
    chosen = capture.choose_port(svc, target_port)
    assert isinstance(chosen, capture.ChosenPort)
    captured = jsonpatch.apply_patch(svc, capture.capture_patch(svc, chosen, "vllm"))
    restored = jsonpatch.apply_patch(captured, capture.restore_patch(captured))
    return chosen, captured, restored


@pytest.mark.parametrize(
    "original", [8000, "http"], ids=["integer target stays an integer", "named target stays a name"]
)
def test_restore_puts_back_exactly_what_was_there(original):
    ports = [
        {
            "name": "http",
            "port": 80,
            "targetPort": original,
            "nodePort": 30080,
            "appProtocol": "http",
            "protocol": "TCP",
        },
        {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"},
    ]
    svc = service(copy.deepcopy(ports), type="NodePort")
    _, captured, restored = round_trip(svc, 80)
    assert captured["spec"]["ports"][0] == {**ports[0], "targetPort": "offload-proxy"}
    assert captured["spec"]["ports"][1] == ports[1]
    assert captured["metadata"]["annotations"]["offload.beamlit.com/original-target-port"] == str(original)
    assert restored["spec"]["ports"] == ports
    assert restored["metadata"]["annotations"] == {}


def test_two_ports_with_the_same_number_only_the_tcp_one_is_captured():
    ports = [
        {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
        {"name": "h3", "port": 443, "targetPort": 8443, "protocol": "UDP"},
    ]
    svc = service(copy.deepcopy(ports))
    chosen, captured, restored = round_trip(svc, 443)
    assert chosen.index == 0
    assert [p["targetPort"] for p in captured["spec"]["ports"]] == ["offload-proxy", 8443]
    assert restored["spec"]["ports"] == ports


def test_the_udp_port_is_never_chosen_even_first():
    svc = service([{"port": 443, "protocol": "UDP"}, {"port": 443, "targetPort": 8443, "protocol": "TCP"}])
    assert capture.choose_port(svc, 443).index == 1


def test_a_target_port_matching_targetPort_is_accepted_for_compatibility():
    svc = service([{"port": 80, "targetPort": 8000}])
    assert capture.choose_port(svc, 8000).index == 0


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "None"}, "HeadlessService"),
        ({"type": "ExternalName", "externalName": "x.example"}, "ExternalNameService"),
        ({"selector": {}}, "ServiceWithoutSelector"),
    ],
)
def test_services_that_cannot_be_captured_say_why(spec, reason):
    svc = service([{"port": 80, "targetPort": 8000}], **spec)
    result = capture.choose_port(svc, 80)
    assert isinstance(result, capture.Uncapturable) and result.reason == reason


def test_a_missing_port_names_the_ports_there_are():
    result = capture.choose_port(service([{"port": 80}, {"port": 81}]), 8080)
    assert isinstance(result, capture.Uncapturable)
    assert result.reason == "ServicePortNotFound" and "80, 81" in result.message


def test_patches_test_the_resource_version_first():
    svc = service([{"port": 80, "targetPort": 8000}])
    patch = capture.capture_patch(svc, capture.choose_port(svc, 80), "vllm")
    assert patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "7"}
    moved = {**svc, "metadata": {**svc["metadata"], "resourceVersion": "8"}}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(moved, patch)


def test_nothing_to_restore_is_none():
    assert capture.restore_patch(service([{"port": 80, "targetPort": 8000}])) is None


def test_opt_out_annotation():
    svc = service([{"port": 80}])
    svc["metadata"]["annotations"] = {"offload.beamlit.com/capture": "false"}
    assert capture.opted_out(svc)


def test_a_recorded_target_port_that_is_no_ascii_number_stays_a_name():
    # The annotation is on a user's object: '²' passes str.isdigit() but not int().
    for text, expected in (("8080", 8080), ("http", "http"), ("²", "²"), ("9" * 5000, "9" * 5000)):
        service = {"metadata": {"annotations": {capture.ORIGINAL_TARGET_PORT_ANNOTATION: text}}}
        assert capture.original_target(service) == expected
