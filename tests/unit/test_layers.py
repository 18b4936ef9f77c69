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


def test_the_data_path_imports_nothing_of_the_sidecars_control_side():
    """sidecar/proxy/ is the request path: it may use crds/ and itself, nothing else of the
    product, so that what decides never runs on (or slows) a request. Its developer command
    line (``python -m sidecar.proxy``, never on a request) parses flags as the product's do."""
    allowed = {"sidecar.proxy.cli": "sidecar.options"}
    problems = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        if name.startswith("sidecar.proxy")
        for imported in imports(path, name)
        if top(imported) in PACKAGES
        and top(imported) != "crds"
        and not (imported == "sidecar.proxy" or imported.startswith("sidecar.proxy."))
        and not (name in allowed and (imported + ".").startswith(allowed[name] + "."))
    ]
    assert problems == []


def test_the_checks_catch_a_forbidden_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from webhook.cache import ClusterCache\nimport kubernetes\n")
    assert {"webhook.cache", "kubernetes"} <= imports(bad, "sidecar.x")


# --- no import circle ---------------------------------------------------------------------
# Imports under `if TYPE_CHECKING:` count: they record what a module knows of another,
# which is the point, not the order modules happen to load in.


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Each product module -> the product modules it imports (itself excluded)."""
    found = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: (imports(path, name) & found.keys()) - {name} for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_product_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_the_circle_check_catches_a_planted_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text("from pkg.client import Client\n")
    (package / "client.py").write_text("from pkg.exchange import Exchange\n")
    (package / "exchange.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.client import Client\n"
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert find_cycle(graph) == ["pkg.client", "pkg.exchange", "pkg.client"]
    (package / "exchange.py").write_text("import pkg.types\n")
    (package / "types.py").write_text("")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None
