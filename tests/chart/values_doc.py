"""The chart README's values table, made from values.yaml (the comment above each key) and
values.schema.json (its type): one source, checked by test_values.py, rewritten with
UPDATE_GOLDEN=1."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.chart.helm import CHART

README = CHART / "README.md"
BEGIN = "<!-- values table: generated from values.yaml by tests/chart/values_doc.py -->"
END = "<!-- end of values table -->"

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z][\w-]*):")


def key_comments(values_text: str) -> dict[str, str]:
    """Dotted path of every key in values.yaml -> the comment block right above it."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match["key"]))
            comments[".".join(k for _, k in stack)] = " ".join(block).strip()
        block = []
    return comments


def _lookup(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[part]
    return node


def _schema_node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node


def _type(node: dict[str, Any]) -> str:
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "object")
    if kind == "integer" and ("minimum" in node or "maximum" in node):
        return f"integer ({node.get('minimum', '')}..{node.get('maximum', '')})"
    return kind


def _default(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def values_table(paths: set[str]) -> str:
    values_text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    comments = key_comments(values_text)
    order = list(comments)  # file order
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for path in sorted(paths, key=order.index):
        description = comments[path].replace("|", "\\|")
        rows.append(
            f"| `{path}` | {_type(_schema_node(schema, path))} | {_default(_lookup(values, path))} | {description} |"
        )
    return "\n".join(rows) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    before, _, rest = readme.partition(BEGIN)
    _, _, after = rest.partition(END)
    return f"{before}{BEGIN}\n{table}{END}{after}"
