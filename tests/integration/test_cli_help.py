"""Every console script installs and explains itself with --help."""

import shutil
import subprocess

import pytest


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        ("offload-webhook", "--tls-cert-file"),
        ("offload-sidecar", "usage: offload-sidecar"),
        ("offload-certs", "--out-dir"),
    ],
)
def test_console_script_help(script, fragment):
    path = shutil.which(script)
    assert path, f"{script} is not installed: run pip install -e '.[test]'"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert fragment in result.stdout
