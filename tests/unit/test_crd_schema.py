"""The CRD in crds/modeldeployment.yaml and the typed spec in crds/model.py agree."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from crds import model
from crds.decode import default_of, is_required, json_fields, json_name

CRD_PATH = Path(model.__file__).with_name("modeldeployment.yaml")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


def _schema_kind(hint: Any) -> str:
    """The JSON schema type a Python annotation stands for."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if members == [int, str]:
            return "int-or-string"
        (member,) = members
        return _schema_kind(member)
    if origin is tuple:
        return "array"
    if origin is dict:
        return "object"
    if dataclasses.is_dataclass(hint):
        return "object"
    return {str: "string", bool: "boolean", int: "integer", float: "number"}[hint]


def _unwrap(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return members[0] if len(members) == 1 else hint
    return hint


def _compare(cls: type, schema: dict[str, Any], path: str, problems: list[str]) -> None:
    props = schema.get("properties", {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    py = json_fields(cls)
    if set(py) != set(props):
        problems.append(
            f"{path}: python has {sorted(set(py) - set(props))}, CRD has {sorted(set(props) - set(py))}"
        )
    required_crd = set(schema.get("required", []))
    for pname, field in fields.items():
        jname = json_name(pname)
        if jname not in props:
            continue
        sub = props[jname]
        child = f"{path}.{jname}"
        if is_required(field) != (jname in required_crd):
            problems.append(
                f"{child}: required in python={is_required(field)}, in CRD={jname in required_crd}"
            )
        hint = py[jname]
        kind = _schema_kind(hint)
        crd_kind = "int-or-string" if sub.get("x-kubernetes-int-or-string") else sub.get("type")
        if kind != crd_kind:
            problems.append(f"{child}: python type {kind}, CRD type {crd_kind}")
            continue
        default = default_of(field)
        crd_default = sub.get("default", dataclasses.MISSING)
        if kind == "object" and dataclasses.is_dataclass(_unwrap(hint)):
            if default is not dataclasses.MISSING and default is not None and crd_default != {}:
                problems.append(f"{child}: python defaults the object, the CRD does not (default: {{}})")
        elif default not in (dataclasses.MISSING, None, (), {}) and crd_default != default:
            problems.append(f"{child}: python default {default!r}, CRD default {crd_default!r}")
        elif default in (dataclasses.MISSING, None, (), {}) and crd_default not in (dataclasses.MISSING, {}):
            problems.append(f"{child}: CRD default {crd_default!r} missing in python")
        target = _unwrap(hint)
        if typing.get_origin(target) is tuple:
            item = typing.get_args(target)[0]
            if dataclasses.is_dataclass(item):
                _compare(item, sub["items"], f"{child}[]", problems)
        elif dataclasses.is_dataclass(target):
            _compare(target, sub, child, problems)


def test_the_python_spec_and_the_crd_schema_agree_on_every_field_type_and_default(version):
    problems: list[str] = []
    _compare(
        model.ModelDeploymentSpec,
        version["schema"]["openAPIV3Schema"]["properties"]["spec"],
        "spec",
        problems,
    )
    assert problems == []


def test_the_comparison_notices_a_field_the_crd_lacks(version):
    @dataclasses.dataclass(frozen=True)
    class Drifted(model.OffloadingBehavior):
        burst: int = 3

    problems: list[str] = []
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["offloadingConfig"]
    _compare(Drifted, schema["properties"]["behavior"], "behavior", problems)
    assert problems and "burst" in problems[0]


def _walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_spec_and_status_field_has_a_description_for_kubectl_explain(version):
    root = version["schema"]["openAPIV3Schema"]
    missing = [
        path
        for part in ("spec", "status")
        for path, sub in _walk(root["properties"][part], part)
        if "description" not in sub and not path.endswith("{}") and not path.endswith("[]")
    ]
    assert missing == []


def test_the_schema_is_structural(version):
    """Every node has a type (or is int-or-string / preserve-unknown-fields)."""
    untyped = [
        path
        for path, sub in _walk(version["schema"]["openAPIV3Schema"], "")
        if "type" not in sub and not sub.get("x-kubernetes-int-or-string") and path != ""
    ]
    assert untyped == []


def test_names_group_scope_and_status_subresource(crd, version):
    assert crd["metadata"]["name"] == f"{model.PLURAL}.{model.GROUP}"
    assert crd["spec"]["group"] == model.GROUP
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == model.KIND
    assert crd["spec"]["names"]["shortNames"]
    assert version["name"] == model.VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".spec.model",
        "Offloading": ".status.offloadingStatus",
        "Utilization": ".status.utilization",
        "Captured": ".status.captured",
        "Injected": ".status.injected",
        "Stand-In": ".status.standIn.active",
        "Age": ".metadata.creationTimestamp",
    }
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "observedGeneration", "offloadingStatus", "utilization"} <= set(status)
