"""The distribution (a wheel, the container image) holds every module of the product: each
directory of Python files under the top-level packages is listed in pyproject.toml, since
setuptools installs only the packages it is told (an editable install hides a missing one)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_python_directory_of_the_product_is_a_listed_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    top = {name for name in listed if "." not in name}
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for name in top
        for path in (ROOT / name).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
