"""values.yaml, values.schema.json and the templates agree: every value is documented,
typed in the schema and used by a template, and nothing else is. Pure file reading: no helm."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import yaml

from tests.chart.helm import CHART

VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
TEMPLATES = CHART / "templates"


def _structured(node: dict) -> bool:
    """A group of the chart's options, written inline (as opposed to a free map such as
    nodeSelector, whose keys are the user's, or a Kubernetes type by $ref such as resources,
    which a template passes on whole)."""
    return node.get("type") == "object" and "properties" in node


def schema_objects(node: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """(path, schema) of every object with properties, anywhere: options, definitions, items."""
    if "properties" in node:
        yield path, node
    for key, child in node.get("properties", {}).items():
        yield from schema_objects(child, f"{path}.{key}" if path else key)
    for key, child in node.get("definitions", {}).items():
        yield from schema_objects(child, f"definitions.{key}")
    if isinstance(node.get("items"), dict):
        yield from schema_objects(node["items"], f"{path}[]")


def schema_leaves(node: dict, path: str = "") -> set[str]:
    """Paths of the options: properties that are not structured objects themselves."""
    leaves = set()
    for key, child in node.get("properties", {}).items():
        child_path = f"{path}.{key}" if path else key
        leaves |= schema_leaves(child, child_path) if _structured(child) else {child_path}
    return leaves


def values_paths(values: dict, schema: dict, path: str = "") -> set[str]:
    """Paths of values.yaml, descending only where the schema has a structured object."""
    paths = set()
    for key, value in values.items():
        child_path = f"{path}.{key}" if path else key
        child = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and _structured(child):
            paths |= values_paths(value, child, child_path)
        else:
            paths.add(child_path)
    return paths


def load():
    return yaml.safe_load(VALUES.read_text()), json.loads(SCHEMA.read_text())


def template_text() -> str:
    return "\n".join(path.read_text() for path in sorted(TEMPLATES.iterdir()) if path.is_file())


def test_schema_is_draft_07_and_closed_everywhere():
    _, schema = load()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path, node in schema_objects(schema):
        assert node.get("additionalProperties") is False, (
            f"{path or '(root)'}: additionalProperties must be false"
        )


def test_every_free_map_in_the_schema_says_what_its_values_are():
    """Free maps (labels, annotations, nodeSelector, resource lists) type their values, or
    are explicitly passed-through Kubernetes objects (affinity, tolerations)."""
    _, schema = load()
    passthrough = {
        f"{owner}.{key}"
        for owner in ("webhook", "gateway")
        for key in ("affinity", "tolerations", "topologySpreadConstraints")
    }

    def walk(node, path):
        for key, child in node.get("properties", {}).items():
            child_path = f"{path}.{key}" if path else key
            if _structured(child):
                walk(child, child_path)
            elif (
                child.get("type") == "object" and "properties" not in child and child_path not in passthrough
            ):
                assert "additionalProperties" in child, f"{child_path}: a map without a type for its values"

    walk(schema, "")


def test_every_value_is_in_the_schema_and_every_schema_option_has_a_default():
    values, schema = load()
    in_values = values_paths(values, schema)
    in_schema = schema_leaves(schema)
    assert in_values - in_schema == set(), "in values.yaml but not in values.schema.json"
    assert in_schema - in_values == set(), "in values.schema.json but without a default in values.yaml"


def test_every_value_is_used_by_a_template():
    values, schema = load()
    text = template_text()
    unused = {
        path
        for path in values_paths(values, schema)
        if not re.search(rf"\.Values\.{re.escape(path)}(?![\w.])", text)
    }
    assert unused == set(), "values no template reads as .Values.<path> (remove them or use them)"


def test_templates_read_no_value_missing_from_values_yaml():
    values, schema = load()
    known = values_paths(values, schema)
    prefixes = {".".join(p.split(".")[:i]) for p in known for i in range(1, p.count(".") + 1)}
    read = set(re.findall(r"\.Values\.([\w.]+\w)", template_text()))
    assert read - known - prefixes == set(), "templates read values that values.yaml does not define"


def test_every_key_in_values_yaml_has_a_comment_right_above_it():
    undocumented = []
    previous = ""
    for number, line in enumerate(VALUES.read_text().splitlines(), start=1):
        stripped = line.strip()
        key = re.match(r"^\s*([A-Za-z][\w-]*):", line)
        if key and not previous.startswith("#"):
            undocumented.append(f"values.yaml:{number}: {key.group(1)}")
        if stripped:
            previous = stripped
        # Keys nested in a documented free-form default (e.g. resources.requests.cpu) are
        # Kubernetes fields, documented by Kubernetes.
        if key and key.group(1) in {"requests", "limits", "cpu", "memory"}:
            undocumented = [u for u in undocumented if not u.endswith(f": {key.group(1)}")]
    assert undocumented == [], "keys without a comment line right above them"


def test_kubernetes_types_by_reference_resolve():
    _, schema = load()
    refs = re.findall(r'"\$ref": "#/definitions/(\w+)"', SCHEMA.read_text())
    assert refs and set(refs) <= set(schema["definitions"])


def test_the_agreement_checks_notice_a_stray_value():
    """The walkers above are not vacuous: an extra key and a missing option both show."""
    values, schema = load()
    values["webhook"]["replicas"] = 3
    del values["sidecar"]["proxyPort"]
    assert values_paths(values, schema) - schema_leaves(schema) == {"webhook.replicas"}
    assert schema_leaves(schema) - values_paths(values, schema) == {"sidecar.proxyPort"}


def test_the_chart_readme_values_table_is_current():
    import os

    from tests.chart.values_doc import README, readme_with_table, values_table

    values, schema = load()
    current = README.read_text()
    expected = readme_with_table(current, values_table(values_paths(values, schema)))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        README.write_text(expected)
        current = expected
    assert current == expected, (
        f"the values table in {README} is stale: run UPDATE_GOLDEN=1 python -m pytest tests/chart -k readme"
    )
