"""ModelDeployment documents for the tests: the tutorial's, and variations of it."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from paths import TUTORIAL_MODELDEPLOYMENT

GROUP = "deployment.beamlit.com"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"


def tutorial() -> dict[str, Any]:
    return yaml.safe_load(TUTORIAL_MODELDEPLOYMENT.read_text())


def variant(name: str, changes: dict[str, Any], remove: tuple[str, ...] = ()) -> dict[str, Any]:
    """The tutorial's ModelDeployment named `name`, with dotted paths set to new values
    (e.g. {"spec.offloadingConfig.behavior.percentage": 150}) and others removed."""
    doc = copy.deepcopy(tutorial())
    doc["metadata"] = {"name": name}
    for path, value in changes.items():
        parent, key = _parent(doc, path)
        parent[key] = value
    for path in remove:
        parent, key = _parent(doc, path)
        del parent[key]
    return doc


def to_yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def _parent(doc: dict[str, Any], path: str) -> tuple[Any, Any]:
    *head, last = path.split(".")
    node: Any = doc
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, (int(last) if isinstance(node, list) else last)
