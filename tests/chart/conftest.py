"""Fixtures of the chart tests: the cached helm binary and the chart's default render."""

from __future__ import annotations

import pytest

from tests.chart.helm import Helm, find_helm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "helm: runs the helm binary cached by tests/e2e/controlplane/build.sh (built if missing)"
    )


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(find_helm())


@pytest.fixture(scope="session")
def default_render(helm: Helm) -> str:
    return helm.render()
