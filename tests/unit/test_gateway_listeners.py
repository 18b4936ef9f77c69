"""The gateway's pure parts: which ModelDeployments get a listener, and which local pods are ready."""

from __future__ import annotations

from typing import Any

import pytest

from crds.model import RemoteBackend
from crds.validation import ValidationSettings
from sidecar.gateway.listeners import listeners_from, ready_endpoints
from tests.integration.test_gateway import md

REMOTE = {"host": "remote.example:80", "scheme": "http"}


def slice_(ports, endpoints) -> dict[str, Any]:
    return {"ports": ports, "endpoints": endpoints}


def test_ready_endpoints_by_port_name_skipping_unready_and_terminating():
    slices = [
        slice_(
            [{"name": "http", "port": 15080}, {"name": "metrics", "port": 9090}],
            [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.3"], "conditions": {}},  # ready left out: ready
                {"addresses": ["10.0.0.4"], "conditions": {"ready": True, "terminating": True}},
                {"addresses": [], "conditions": {"ready": True}},
            ],
        ),
        slice_([{"name": "http", "port": 15080}], [{"addresses": ["10.0.0.1"]}]),  # the same pod twice
    ]
    assert ready_endpoints(slices, "http") == [("10.0.0.1", 15080), ("10.0.0.3", 15080)]
    assert ready_endpoints(slices, "metrics") == [("10.0.0.1", 9090), ("10.0.0.3", 9090)]
    assert ready_endpoints(slices, "grpc") == []


def test_an_unknown_port_name_takes_the_only_port_there_is_and_never_guesses_among_several():
    one = [slice_([{"name": "", "port": 8000}], [{"addresses": ["10.0.0.1"]}])]
    assert ready_endpoints(one, None) == [("10.0.0.1", 8000)]
    assert ready_endpoints(one, "") == [("10.0.0.1", 8000)]
    two = [slice_([{"name": "a", "port": 1}, {"name": "b", "port": 2}], [{"addresses": ["10.0.0.1"]}])]
    assert ready_endpoints(two, None) == []


@pytest.mark.parametrize("port", [0, 70000, "20001", True, None])
def test_a_port_that_is_not_a_port_number_is_reported_not_served(port):
    doc = md("a", 20001, REMOTE)
    doc["status"]["standIn"]["port"] = port
    wanted, problems = listeners_from([doc], ValidationSettings())
    assert wanted == {} and "status.standIn.port" in problems[("models", "a")]


def test_a_listener_carries_the_port_name_the_hold_and_the_service():
    wanted, problems = listeners_from([md("a", 20001, REMOTE, hold=30, port_name="")], ValidationSettings())
    listener = wanted[("models", "a")]
    assert (listener.port, listener.port_name, listener.hold, listener.service) == (20001, "", 30, "a")
    assert problems == {}
    no_status = md("b", None, REMOTE)
    del no_status["status"]
    assert listeners_from([no_status], ValidationSettings()) == ({}, {})


def test_the_default_remote_serves_where_there_is_none():
    default = RemoteBackend(host="default.example:443", scheme="https")
    wanted, _ = listeners_from(
        [md("own", 20001, REMOTE), md("none", 20002, None)],
        ValidationSettings(default_remote_backend=default),
    )
    assert wanted[("models", "own")].model.spec.offloading_config.remote_backend.host == "remote.example:80"
    assert wanted[("models", "none")].model.spec.offloading_config.remote_backend == default
    assert listeners_from([md("none", 20002, None)], ValidationSettings())[0] == {}
