"""Label selector matching (every operator) and which ModelDeployment selects a pod."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crds.model import (
    LabelSelector,
    LabelSelectorRequirement,
    ModelDeployment,
    ModelDeploymentSpec,
    WorkloadReference,
)
from webhook.reasons import Reason
from webhook.selection import (
    CachedModelDeployment,
    Owner,
    Workload,
    controlled_by_workload,
    parse_label_selector,
    pod_controller,
    select,
)

LABELS = {"app": "llm", "tier": "model", "empty": ""}
NO_MATCH = Reason.NO_MATCHING_MODELDEPLOYMENT


@pytest.mark.parametrize(
    "selector, matches",
    [
        ({}, True),  # metav1: an empty selector selects everything
        ({"matchLabels": {"app": "llm"}}, True),
        ({"matchLabels": {"app": "llm", "tier": "model"}}, True),
        ({"matchLabels": {"app": "web"}}, False),
        ({"matchLabels": {"missing": ""}}, False),
        ({"matchLabels": {"empty": ""}}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["model", "canary"]}]}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["canary"]}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "In", "values": ["x"]}]}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["canary"]}]}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["model"]}]}, False),
        # NotIn is satisfied by a missing key, as in Kubernetes.
        ({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["x"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "empty", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "missing", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, False),
        # Everything is ANDed.
        (
            {
                "matchLabels": {"app": "llm"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["model"]},
                    {"key": "debug", "operator": "DoesNotExist"},
                ],
            },
            True,
        ),
        (
            {"matchLabels": {"app": "llm"}, "matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
            False,
        ),
    ],
)
def test_label_selector_semantics(selector, matches):
    assert parse_label_selector(selector).matches(LABELS) is matches


@pytest.mark.parametrize(
    "selector, error",
    [
        ("app=llm", "selector: must be an object"),
        ({"matchLabels": ["app"]}, "selector.matchLabels: must be an object"),
        ({"matchLabels": {"app": 1}}, "selector.matchLabels[app]: must be a string"),
        (
            {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]},
            "selector.matchExpressions[0].operator: must be one of In, NotIn, Exists, DoesNotExist, got 'Gt'",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In"}]},
            "selector.matchExpressions[0].values: must be non-empty for In",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
            "selector.matchExpressions[0].values: must be empty for Exists",
        ),
        ({"matchExpressions": [{"operator": "Exists"}]}, "selector.matchExpressions[0].key: required string"),
    ],
)
def test_bad_selectors_are_refused_naming_the_field(selector, error):
    with pytest.raises(ValueError) as caught:
        parse_label_selector(selector)
    assert str(caught.value) == error


label_keys = st.sampled_from(["a", "b", "c"])
label_values = st.sampled_from(["x", "y", "z"])


@given(
    labels=st.dictionaries(label_keys, label_values),
    key=label_keys,
    values=st.lists(label_values, min_size=1, unique=True).map(tuple),
)
def test_in_and_notin_are_complements_and_exists_and_doesnotexist_too(labels, key, values):
    req = LabelSelectorRequirement
    assert req(key, "In", values).matches(labels) != req(key, "NotIn", values).matches(labels)
    assert req(key, "Exists").matches(labels) != req(key, "DoesNotExist").matches(labels)


@given(labels=st.dictionaries(label_keys, label_values), wanted=st.dictionaries(label_keys, label_values))
def test_match_labels_is_a_subset_test(labels, wanted):
    selector = parse_label_selector({"matchLabels": wanted})
    assert selector.matches(labels) is (wanted.items() <= labels.items())


# --- owners ------------------------------------------------------------------------------------


def test_the_controller_owner_reference_is_the_one_with_controller_true():
    pod = {
        "metadata": {
            "ownerReferences": [
                {"kind": "ConfigMap", "name": "x"},
                {"kind": "ReplicaSet", "name": "llm-5d4c", "controller": True},
            ]
        }
    }
    assert pod_controller(pod) == Owner("ReplicaSet", "llm-5d4c")
    assert pod_controller({"metadata": {}}) is None


@pytest.mark.parametrize(
    "owner, workload, expected",
    [
        (None, Workload("Deployment", "ns", "llm", None), True),
        (Owner("ReplicaSet", "llm-5d4c8b"), Workload("Deployment", "ns", "llm", None), True),
        (Owner("ReplicaSet", "llm-twin-5d4c8b"), Workload("Deployment", "ns", "llm", None), False),
        (Owner("ReplicaSet", "llm-"), Workload("Deployment", "ns", "llm", None), False),
        (Owner("ReplicaSet", "other-5d4c8b"), Workload("Deployment", "ns", "llm", None), False),
        (Owner("Job", "llm-5d4c8b"), Workload("Deployment", "ns", "llm", None), False),
        (Owner("StatefulSet", "vllm"), Workload("StatefulSet", "ns", "vllm", None), True),
        (Owner("StatefulSet", "vllm-2"), Workload("StatefulSet", "ns", "vllm", None), False),
        (Owner("DaemonSet", "vllm"), Workload("StatefulSet", "ns", "vllm", None), False),
    ],
)
def test_which_controllers_can_be_the_workloads(owner, workload, expected):
    assert controlled_by_workload(owner, workload) is expected


# --- choosing ----------------------------------------------------------------------------------


def md(
    name,
    workload="llm",
    *,
    kind="Deployment",
    namespace="models",
    created="2026-01-01T00:00:00Z",
    enabled=True,
    workload_namespace=None,
):
    spec = ModelDeploymentSpec(
        model="m",
        model_source_ref=WorkloadReference(name=workload, kind=kind, namespace=workload_namespace),
        enabled=enabled,
    )
    return CachedModelDeployment(ModelDeployment(name=name, namespace=namespace, spec=spec), created)


WORKLOADS = {
    ("Deployment", "models", "llm"): Workload(
        "Deployment", "models", "llm", parse_label_selector({"matchLabels": {"app": "llm"}})
    ),
    ("Deployment", "models", "llm2"): Workload(
        "Deployment", "models", "llm2", parse_label_selector({"matchLabels": {"app": "llm"}})
    ),
    ("StatefulSet", "models", "llm"): Workload(
        "StatefulSet", "models", "llm", parse_label_selector({"matchLabels": {"app": "sts"}})
    ),
    ("Deployment", "models", "broken"): Workload("Deployment", "models", "broken", None),
}


def lookup(kind, namespace, name):
    return WORKLOADS.get((kind, namespace, name))


def test_an_enabled_modeldeployment_whose_workload_selects_the_pod_is_chosen():
    chosen = select("models", {"app": "llm"}, None, [md("a")], lookup)
    assert chosen.selected and chosen.chosen.model.name == "a" and chosen.warnings == ()
    assert chosen.workload.name == "llm"


def test_the_workload_kind_matters():
    assert select("models", {"app": "sts"}, None, [md("a")], lookup).reason is NO_MATCH
    assert select("models", {"app": "sts"}, None, [md("a", kind="StatefulSet")], lookup).selected


def test_no_candidates_no_workload_or_an_unusable_selector_is_no_match():
    assert select("models", {"app": "llm"}, None, [], lookup).reason is NO_MATCH
    assert select("models", {"app": "llm"}, None, [md("a", "gone")], lookup).reason is NO_MATCH
    assert select("models", {"app": "llm"}, None, [md("a", "broken")], lookup).reason is NO_MATCH


def test_a_modeldeployment_of_another_namespace_never_selects():
    other = md("a", namespace="elsewhere")
    assert select("models", {"app": "llm"}, None, [other], lookup).reason is NO_MATCH
    cross = md("a", workload_namespace="elsewhere")  # invalid anyway; never a pod of this namespace
    assert select("models", {"app": "llm"}, None, [cross], lookup).reason is NO_MATCH


def test_several_matches_pick_the_oldest_then_the_name_and_warn():
    cands = [
        md("young", "llm", created="2026-03-01T00:00:00Z"),
        md("b-old", "llm2", created="2026-01-01T00:00:00Z"),
        md("a-old", "llm", created="2026-01-01T00:00:00Z"),
    ]
    for order in (cands, cands[::-1]):
        chosen = select("models", {"app": "llm"}, None, order, lookup)
        assert chosen.chosen.model.name == "a-old"
        assert chosen.warnings == (
            "offload: several ModelDeployments select this pod; using the oldest, 'a-old' (also: b-old, young)",
        )


def test_a_disabled_match_is_reported_as_such_and_an_enabled_one_wins_over_it():
    off = md("off", enabled=False)
    assert select("models", {"app": "llm"}, None, [off], lookup).reason is Reason.MODELDEPLOYMENT_DISABLED
    chosen = select(
        "models", {"app": "llm"}, None, [off, md("on", "llm2", created="2027-01-01T00:00:00Z")], lookup
    )
    assert chosen.selected and chosen.chosen.model.name == "on" and chosen.warnings == ()


def test_a_pod_controlled_by_something_else_is_not_the_workloads():
    job = Owner("Job", "llm-bench")
    chosen = select("models", {"app": "llm"}, job, [md("a")], lookup)
    assert chosen.reason is Reason.OWNED_BY_ANOTHER_CONTROLLER
    assert chosen.message == (
        "labels match Deployment 'llm' of ModelDeployment 'a', but the pod is controlled by Job 'llm-bench'"
    )
    rs = Owner("ReplicaSet", "llm2-7f8e9d")
    chosen = select(
        "models", {"app": "llm"}, rs, [md("a"), md("b", "llm2", created="2027-01-01T00:00:00Z")], lookup
    )
    assert chosen.chosen.model.name == "b" and chosen.warnings == ()


def test_a_parsed_selector_is_the_api_type_and_its_key_order_does_not_matter():
    one = parse_label_selector({"matchLabels": {"a": "1", "b": "2"}})
    two = parse_label_selector({"matchLabels": {"b": "2", "a": "1"}})
    assert one == two and isinstance(one, LabelSelector)
