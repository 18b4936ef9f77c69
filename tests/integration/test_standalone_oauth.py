"""Standalone mode with an OAuth2 remote: offload-sidecar gets a token from a real token
endpoint process (TLS with a test CA given by --ca-file) and sends it to the remote."""

from __future__ import annotations

import pytest

from tests.integration.fake_apiserver import LoopbackPKI
from tests.integration.test_oauth import CLIENT_ID, SECRET, TokenEndpoint
from tests.integration.test_standalone import SidecarProcess
from tests.modeldeployments import as_yaml, oauth_remote, standalone


def oauth_modeldeployment(remote_port: int, token_url: str, secret: str) -> str:
    return as_yaml(standalone(remote_port, remote=oauth_remote(CLIENT_ID, token_url, secret)))


@pytest.fixture
def token_endpoint(tmp_path):
    pki = LoopbackPKI.create(tmp_path / "pki")
    endpoint = TokenEndpoint(pki, delay=0).start()
    yield endpoint
    endpoint.stop()


def test_offloaded_requests_carry_a_fresh_token_and_the_secret_is_never_logged(
    tmp_path, token_endpoint, upstreams
):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    config.write_text(oauth_modeldeployment(remote.port, token_endpoint.url, SECRET))
    sidecar = SidecarProcess(
        tmp_path,
        "--config", str(config),
        "--upstream", str(local.port),
        "--ca-file", str(token_endpoint.pki.dir / "ca.crt"),
    )  # fmt: skip
    try:
        status = sidecar.wait_for(lambda s: s["routing"]["remote"] is not None, what="a token")
        assert status["routing"]["activePercentage"] == 100
        assert sidecar.requests(5) == [200] * 5
        assert (local.count(), remote.count()) == (0, 5)
        tokens = {r.header("authorization") for r in remote.requests}
        assert len(tokens) == 1 and next(iter(tokens)).startswith("Bearer ")
        assert local.requests == []
        log = sidecar.log_text()
        assert SECRET not in log and next(iter(tokens))[7:] not in log
        assert SECRET not in str(sidecar.status())
    finally:
        sidecar.stop()


def test_a_wrong_secret_keeps_every_request_local(tmp_path, token_endpoint, upstreams):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    config.write_text(oauth_modeldeployment(remote.port, token_endpoint.url, "not-the-secret"))
    sidecar = SidecarProcess(
        tmp_path,
        "--config", str(config),
        "--upstream", str(local.port),
        "--ca-file", str(token_endpoint.pki.dir / "ca.crt"),
    )  # fmt: skip
    try:
        sidecar.wait_for(lambda s: s["decision"]["offloading"], what="the static split")
        assert sidecar.requests(10) == [200] * 10
        assert (local.count(), remote.count()) == (10, 0)
        assert "not-the-secret" not in sidecar.log_text()
    finally:
        sidecar.stop()
