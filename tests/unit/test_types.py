"""The pure cores type-check: mypy over the files pyproject's [tool.mypy] names, with its
settings, as CI runs it (part of python -m pytest, so nothing runs it separately)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_pure_cores_type_check() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert checked.returncode == 0, f"mypy found problems:\n{checked.stdout}{checked.stderr}"
    assert checked.stdout.startswith("Success: no issues found in "), checked.stdout
