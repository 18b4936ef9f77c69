"""Golden files of sidecar injection: tests/testdata/inject/<case>.yaml (a request namespace
and a pod) against <case>.patch.json (the JSONPatch), <case>.patched.yaml (the pod after
it) and <case>.review.json (the whole AdmissionReview answer).

The cluster (ModelDeployments, workloads, Services) is _cluster.yaml, loaded into the real
cache; the injector configuration is _injector.yaml, with a case's own ``injector:`` keys
(if it has any) on top. Cases are discovered from the
directory; a golden file without a case, or a case without its goldens, fails.

    UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden.py

rewrites every golden file from the current code (review the diff before committing).
"""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path

import jsonpatch
import pytest
import yaml

from tests.unit.podcheck import pod_problems
from webhook.admission import parse_review
from webhook.cache import DEPLOYMENTS, MODELDEPLOYMENTS, RESOURCES, SERVICES, STATEFULSETS, ClusterCache
from webhook.injection import CONTAINER_NAME
from webhook.injector_config import InjectorConfig, load_config, parse_config
from webhook.mutating import review_pod

DIR = Path(__file__).parents[1] / "testdata" / "inject"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
OUTPUTS = (".patch.json", ".patched.yaml", ".review.json")
CASES = sorted(
    p.name[: -len(".yaml")]
    for p in DIR.glob("*.yaml")
    if not p.name.startswith("_") and not p.name.endswith(".patched.yaml")
)
KINDS = {
    "ModelDeployment": MODELDEPLOYMENTS,
    "Deployment": DEPLOYMENTS,
    "StatefulSet": STATEFULSETS,
    "Service": SERVICES,
}


def cluster() -> ClusterCache:
    cache = ClusterCache()
    objects = [d for d in yaml.safe_load_all((DIR / "_cluster.yaml").read_text()) if d]
    for kind, resource in KINDS.items():
        cache.replace(resource, [o for o in objects if o["kind"] == kind])
    for resource in RESOURCES:
        cache.mark_listed(resource)
    return cache


CACHE = cluster()
CONFIG = load_config(DIR / "_injector.yaml")


def load_case(case: str) -> tuple[str, dict]:
    data = yaml.safe_load((DIR / f"{case}.yaml").read_text())
    return data["namespace"], data["pod"]


def config_for(case: str) -> InjectorConfig:
    """_injector.yaml with the case's ``injector:`` keys on top."""
    changes = yaml.safe_load((DIR / f"{case}.yaml").read_text()).get("injector")
    if not changes:
        return CONFIG
    return parse_config({**yaml.safe_load((DIR / "_injector.yaml").read_text()), **changes})


def review_for(case: str, namespace: str, pod: dict) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"uid-{case}",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "name": pod["metadata"].get("name", ""),
            "object": pod,
        },
    }


def admit(case: str, namespace: str, pod: dict) -> dict:
    return review_pod(parse_review(review_for(case, namespace, pod)), view=CACHE, config=config_for(case))


def patch_of(answer: dict) -> list:
    response = answer["response"]
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


def check_golden(path: Path, text: str) -> None:
    if UPDATE:
        path.write_text(text)
        return
    assert path.exists(), f"{path.name} is missing: run UPDATE_GOLDEN=1 python -m pytest {__file__}"
    assert path.read_text() == text, f"{path.name} is stale: run UPDATE_GOLDEN=1 python -m pytest {__file__}"


def test_there_are_cases_for_every_required_pod_shape():
    required = {
        "one-container",
        "several-containers",
        "existing-init-containers",
        "existing-native-sidecar",
        "numeric-port",
        "no-resources",
        "host-network",
        "opted-out",
        "already-injected",
        "statefulset-pod",
        "unrelated-workload",
        "other-namespace",
        "job-pod",
    }
    assert required <= set(CASES), required - set(CASES)


def test_no_golden_file_is_left_without_its_case():
    for path in DIR.iterdir():
        for suffix in OUTPUTS:
            if path.name.endswith(suffix):
                assert path.name[: -len(suffix)] in CASES, f"{path.name}: stale golden file, its case is gone"


@pytest.mark.parametrize("case", CASES)
def test_golden(case, subtests):
    namespace, pod = load_case(case)
    original = copy.deepcopy(pod)
    answer = admit(case, namespace, pod)
    assert pod == original, "the input pod must not be mutated"
    assert answer["response"]["allowed"] is True
    patch = patch_of(answer)
    patched = jsonpatch.apply_patch(pod, patch)  # RFC 6902, strict: fails on a bad path

    check_golden(DIR / f"{case}.review.json", json.dumps(answer, indent=2, sort_keys=True) + "\n")
    check_golden(DIR / f"{case}.patch.json", json.dumps(patch, indent=2) + "\n")
    check_golden(DIR / f"{case}.patched.yaml", yaml.safe_dump(patched, sort_keys=False))

    with subtests.test("the patched pod is a valid Pod"):
        assert pod_problems(patched) == []
    with subtests.test("the sidecar is there exactly once, or not at all"):
        spec = patched["spec"]
        names = [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]
        assert names.count(CONTAINER_NAME) == (1 if patch or case == "already-injected" else 0)
    with subtests.test("injecting the injected pod again changes nothing"):
        again = admit(case, namespace, patched)
        assert patch_of(again) == []
