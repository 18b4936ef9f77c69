"""The layering the README states, checked on the source: which package may import which.

- crds/ is the API shared by both products: it imports neither webhook/ nor sidecar/.
- webhook/ and sidecar/ never import each other.
- The sidecar never imports the `kubernetes` package (70 MiB of RSS; it has its own client).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("crds", "webhook", "sidecar", "certs")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Modules imported anywhere in the file (also inside functions), absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def test_imports_keep_the_stated_boundaries():
    forbidden = {
        "crds": {"webhook", "sidecar"},
        "webhook": {"sidecar"},
        "sidecar": {"webhook", "kubernetes"},
        "certs": {"webhook", "sidecar"},
    }
    problems = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        for imported in imports(path, name)
        if top(imported) in forbidden[top(name)]
    ]
    assert problems == []


def test_the_checks_catch_a_forbidden_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from webhook.cache import ClusterCache\nimport kubernetes\n")
    assert {"webhook.cache", "kubernetes"} <= imports(bad, "sidecar.x")
