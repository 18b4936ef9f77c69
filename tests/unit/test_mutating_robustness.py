"""/mutate-pods answers every review, whatever the object holds (property tests over mutated pods).

The API server decodes pods before calling webhooks, but the webhook's Service is reachable
from inside the cluster: a review with the wrong JSON types anywhere gets an allowed answer
with a stable reason (``MalformedPod`` naming the field, or any other reason), never an
exception. Each golden pod is mutated at random places with random JSON values.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_golden import CACHE, CASES, CONFIG, load_case, patch_of, review_for
from webhook import metrics
from webhook.admission import parse_review
from webhook.injection import CONTAINER_NAME
from webhook.mutating import answer_pod
from webhook.reasons import Reason

REASONS = {r.value for r in Reason}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=12,
)


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document, the root's children first."""
    found = []
    if isinstance(node, dict):
        for key, child in node.items():
            found.append((*prefix, key))
            found += paths_of(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found.append((*prefix, i))
            found += paths_of(child, (*prefix, i))
    return found


def mutate(pod: dict, path: tuple, value: Any, delete: bool) -> None:
    node = pod
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@st.composite
def mutated_pods(draw) -> tuple[str, str, dict]:
    case = draw(st.sampled_from(CASES))
    namespace, pod = load_case(case)
    pod = copy.deepcopy(pod)
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(pod)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        mutate(pod, path, draw(json_values), draw(st.booleans()))
    return case, namespace, pod


def check_answer(case: str, namespace: str, pod: Any) -> None:
    body = review_for(case, namespace, {"metadata": {}})
    body["request"]["object"] = pod
    request = parse_review(body)
    answer = answer_pod(request, view=CACHE, config=CONFIG)
    response = answer.review["response"]
    assert response["uid"] == f"uid-{case}" and response["allowed"] is True
    assert answer.reason in REASONS and answer.reason != Reason.INTERNAL_ERROR.value
    patch = patch_of(answer.review)
    assert bool(patch) is (answer.result == metrics.INJECTED)
    if patch:
        patched = jsonpatch.apply_patch(pod, patch)  # a patch that applies to the object as sent
        # Injected only into a pod whose every field it reads is well-typed.
        spec = patched["spec"]
        containers = (spec.get("initContainers") or []) + spec["containers"]
        assert [c.get("name") for c in containers].count(CONTAINER_NAME) == 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated=mutated_pods())
def test_every_mutated_pod_gets_an_allowed_answer_with_a_stable_reason(mutated):
    check_answer(*mutated)


@settings(max_examples=100, deadline=None)
@given(obj=json_values)
def test_any_json_value_as_the_object_gets_an_allowed_answer(obj):
    check_answer("one-container", "models", obj)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda pod: pod["metadata"].__setitem__("ownerReferences", True), "metadata.ownerReferences"),
        (lambda pod: pod.__setitem__("spec", "a string"), "spec"),
        (lambda pod: pod["spec"]["containers"].__setitem__(0, "model"), "spec.containers[0]"),
        (lambda pod: pod["spec"].__setitem__("os", {"name": 7}), "spec.os.name"),
    ],
)
def test_the_issues_examples_are_malformed_pods_naming_the_field(change, field):
    namespace, pod = load_case("one-container")
    pod = copy.deepcopy(pod)
    change(pod)
    body = review_for("x", namespace, {"metadata": {}})
    body["request"]["object"] = pod
    answer = answer_pod(parse_review(body), view=CACHE, config=CONFIG)
    assert (answer.result, answer.reason) == (metrics.SKIPPED, "MalformedPod")
    (warning,) = answer.review["response"]["warnings"]
    assert warning.startswith(f"offload: sidecar not injected (MalformedPod): {field}: must be ")
    assert "patch" not in answer.review["response"]


class BrokenView:
    """A ClusterView with a bug: it fails on the admission path."""

    def synced(self) -> bool:
        return True

    def modeldeployments(self, namespace):
        raise KeyError("a bug")

    def workload(self, kind, namespace, name):
        return None

    def service(self, namespace, name):
        return None


def test_a_bug_in_injection_still_admits_the_pod_and_is_counted(caplog):
    namespace, pod = load_case("one-container")
    before = (
        metrics.REGISTRY.get_sample_value(
            "offload_webhook_injections_skipped_total", {"reason": "InternalError"}
        )
        or 0
    )
    answer = answer_pod(parse_review(review_for("bug", namespace, pod)), view=BrokenView(), config=CONFIG)
    assert answer.review["response"]["allowed"] is True and "patch" not in answer.review["response"]
    assert answer.reason == "InternalError"
    assert "KeyError: 'a bug'" in caplog.text  # the traceback is in the log
    after = metrics.REGISTRY.get_sample_value(
        "offload_webhook_injections_skipped_total", {"reason": "InternalError"}
    )
    assert after == before + 1
