"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.servers import LoopThread, Upstream


@pytest.fixture
def upstreams():
    """A local and a remote Upstream on loopback, killed after the test."""
    with LoopThread() as lt:
        local = lt.run(Upstream.started("local"))
        remote = lt.run(Upstream.started("remote"))
        yield local, remote
        lt.run(local.kill())
        lt.run(remote.kill())
