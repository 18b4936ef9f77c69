"""Routing: the exact percentage spread, the table the proxy asks, and the plan a configuration makes."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crds.model import RemoteBackend
from crds.validation import validate_object
from sidecar.control.plan import passthrough_reason, plan_for
from sidecar.proxy.routing import CaBundleContexts, PercentageSpread, RemoteTarget, RoutePlan, RoutingTable
from sidecar.standalone.config import parse_document

TUTORIAL = (
    Path(__file__).resolve().parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml"
).read_text()


# --- the spread ---------------------------------------------------------------------------------


@pytest.mark.parametrize("percentage", range(101))
def test_every_window_of_100_consecutive_requests_holds_exactly_the_percentage(percentage):
    spread = PercentageSpread(percentage)
    choices = [spread.next_is_remote() for _ in range(400)]
    for start in range(300):
        assert sum(choices[start : start + 100]) == percentage


@given(st.integers(0, 100), st.integers(1, 99))
def test_remote_requests_are_spread_evenly_not_bunched(percentage, window):
    # In any window of n requests the count is within one of n * p / 100.
    spread = PercentageSpread(percentage)
    choices = [spread.next_is_remote() for _ in range(300)]
    for start in range(0, 200, 7):
        count = sum(choices[start : start + window])
        assert abs(count - window * percentage / 100) < 1 + 1e-9


@pytest.mark.parametrize("percentage", [-1, 101])
def test_a_percentage_outside_0_to_100_is_refused(percentage):
    with pytest.raises(ValueError, match="between 0 and 100"):
        PercentageSpread(percentage)


# --- the table ----------------------------------------------------------------------------------

REMOTE = RemoteTarget(scheme="http", host="127.0.0.1", port=9000, authority="127.0.0.1:9000")


def test_no_remote_and_no_offloading_send_everything_local():
    assert all(RoutingTable().choose() is None for _ in range(100))
    idle = RoutingTable(RoutePlan(remote=REMOTE, percentage=100, offloading=False))
    assert all(idle.choose() is None for _ in range(100))
    no_remote = RoutingTable(RoutePlan(remote=None, percentage=100, offloading=True))
    assert all(no_remote.choose() is None for _ in range(100))


def test_offloading_sends_exactly_the_percentage_to_the_remote():
    table = RoutingTable(RoutePlan(remote=REMOTE, percentage=30, offloading=True))
    chosen = [table.choose() for _ in range(100)]
    assert chosen.count(REMOTE) == 30 and chosen.count(None) == 70


def test_turning_offloading_off_and_on_takes_effect_at_the_next_request():
    table = RoutingTable(RoutePlan(remote=REMOTE, percentage=100, offloading=True))
    assert table.choose() is REMOTE
    table.update(RoutePlan(remote=REMOTE, percentage=100, offloading=False))
    assert table.choose() is None
    table.update(RoutePlan(remote=REMOTE, percentage=100, offloading=True))
    assert table.choose() is REMOTE


def test_a_new_remote_with_the_same_share_keeps_the_spread_going():
    table = RoutingTable(RoutePlan(remote=REMOTE, percentage=50, offloading=True))
    first = [table.choose() for _ in range(3)]  # local, remote, local
    other = dataclasses.replace(REMOTE, port=9001)
    table.update(RoutePlan(remote=other, percentage=50, offloading=True))
    assert first == [None, REMOTE, None]
    assert table.choose() == other  # the spread's credit carried over


# --- remote targets from the ModelDeployment ----------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (RemoteBackend(host="model.example:8080"), ("http", "model.example", 8080, "model.example:8080", "")),
        (
            RemoteBackend(host="model.example", scheme="https"),
            ("https", "model.example", 443, "model.example", ""),
        ),
        (RemoteBackend(host="model.example"), ("http", "model.example", 80, "model.example", "")),
        (
            RemoteBackend(host="[2001:db8::1]:8443", scheme="https"),
            ("https", "2001:db8::1", 8443, "[2001:db8::1]:8443", ""),
        ),
        (RemoteBackend(host="[2001:db8::1]"), ("http", "2001:db8::1", 80, "[2001:db8::1]", "")),
        (RemoteBackend(host="m:1", path_prefix="/v1/models/"), ("http", "m", 1, "m:1", "/v1/models")),
        # $model is spec.model, as the Beamlit controller replaces it.
        (RemoteBackend(host="m:1", path_prefix="/v1/$model/"), ("http", "m", 1, "m:1", "/v1/m")),
    ],
)
def test_remote_target_from_backend(backend, expected):
    target = RemoteTarget.from_backend(backend, model="m")
    assert (target.scheme, target.host, target.port, target.authority, target.path_prefix) == expected


def test_headers_to_add_travel_with_the_target():
    target = RemoteTarget.from_backend(
        RemoteBackend(host="m", headers_to_add={"X-Api-Key": "k", "X-Tenant": "a"}), model="m"
    )
    assert target.headers == (("X-Api-Key", "k"), ("X-Tenant", "a"))


# --- caBundle: the remote's own CA ---------------------------------------------------------------


def _ca_pem(name: str = "remote-ca") -> str:
    import datetime as dt

    from certs.issue import issue_ca

    return issue_ca(name, now=dt.datetime.now(dt.UTC), days=1).cert_pem.decode()


CA_PEM = _ca_pem()
OTHER_CA_PEM = _ca_pem("other-ca")


def test_a_ca_bundle_puts_a_verifying_context_trusting_only_that_ca_on_the_target():
    target = RemoteTarget.from_backend(
        RemoteBackend(host="m.example", scheme="https", ca_bundle=CA_PEM), model="m"
    )
    context = target.ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True
    assert [dict(x[0] for x in c["subject"])["commonName"] for c in context.get_ca_certs()] == ["remote-ca"]
    assert "ssl_context" not in repr(target) and "SSLContext" not in repr(target)


def test_without_a_ca_bundle_the_target_has_no_context_of_its_own():
    assert (
        RemoteTarget.from_backend(RemoteBackend(host="m.example", scheme="https"), model="m").ssl_context
        is None
    )
    # caBundle only verifies https (validation refuses it with http): never a context for plain http.
    assert RemoteTarget.from_backend(RemoteBackend(host="m", ca_bundle=CA_PEM), model="m").ssl_context is None


def test_one_context_per_distinct_bundle_keeps_equal_targets_equal():
    contexts = CaBundleContexts(limit=2)
    backend = RemoteBackend(host="m.example", scheme="https", ca_bundle=CA_PEM)
    first = RemoteTarget.from_backend(backend, contexts, model="m")
    again = RemoteTarget.from_backend(backend, contexts, model="m")
    assert again.ssl_context is first.ssl_context and again == first and hash(again) == hash(first)
    other = RemoteTarget.from_backend(
        dataclasses.replace(backend, ca_bundle=OTHER_CA_PEM), contexts, model="m"
    )
    assert other.ssl_context is not first.ssl_context
    assert other != first  # a new bundle is a new target: the proxy opens new connections for it
    assert len(contexts) == 2


def test_the_bundle_cache_keeps_the_most_recently_used_bundles():
    built: list[str] = []

    def build(pem: str) -> ssl.SSLContext:
        built.append(pem)
        return ssl.create_default_context()

    contexts = CaBundleContexts(limit=2, build=build)
    a, b = contexts("a"), contexts("b")
    assert contexts("a") is a  # used again: now the most recent
    contexts("c")  # evicts b, the least recently used
    assert contexts("a") is a and contexts("b") is not b
    assert built == ["a", "b", "c", "b"]
    assert len(contexts) == 2


def test_a_shared_cache_makes_the_same_plan_twice():
    text = TUTORIAL.replace(
        "scheme: http",
        "scheme: https\n      caBundle: |\n" + "".join(f"        {line}\n" for line in CA_PEM.splitlines()),
    )
    model = model_of(text)
    contexts = CaBundleContexts()
    plan = plan_for(model, True, contexts)
    assert plan.remote is not None and plan.remote.ssl_context is not None
    assert plan_for(model, True, contexts) == plan


# --- the plan a configuration makes -------------------------------------------------------------


def model_of(text: str):
    loaded = parse_document(text)
    assert loaded.model is not None, loaded.errors
    return loaded.model


def test_the_tutorial_plans_half_the_requests_to_its_remote_while_offloading():
    model = model_of(TUTORIAL)
    assert passthrough_reason(model) is None
    plan = plan_for(model, True)
    assert plan.remote == RemoteTarget(
        "http", "my-model-on-another-cluster", 80, "my-model-on-another-cluster:80"
    )
    assert (plan.percentage, plan.active_percentage) == (50, 50)
    assert plan_for(model, False).active_percentage == 0


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (None, "no valid ModelDeployment"),
        (
            model_of(TUTORIAL.replace("  model: my-model\n", "  model: my-model\n  enabled: false\n")),
            "disabled",
        ),
    ],
)
def test_absent_or_disabled_is_pass_through(model, fragment):
    assert fragment in passthrough_reason(model)
    assert plan_for(model, True) == RoutePlan()
    assert RoutingTable(plan_for(model, True)).choose() is None


def test_no_remote_backend_is_pass_through():
    obj = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m"},
        "spec": {
            "model": "m",
            "modelSourceRef": {"name": "d"},
            "offloadingConfig": {"behavior": {"percentage": 10}},
        },
    }
    from crds.validation import ValidationSettings

    model = validate_object(obj, ValidationSettings()).model
    assert model is not None
    assert "no remoteBackend" in passthrough_reason(model)
    assert plan_for(model, True) == RoutePlan()


def test_the_plan_sends_offloaded_requests_under_the_prefix_with_model_replaced():
    text = TUTORIAL.replace("scheme: http", "scheme: http\n      pathPrefix: /v1/$model/")
    plan = plan_for(model_of(text), True)
    assert plan.remote is not None and plan.remote.path_prefix == "/v1/my-model"
