"""The remote's credentials in an offload-sidecar process between real upstreams on loopback.

- headersFromSecrets in standalone mode: the values come from ``--secrets-dir``
  laid out as a mounted Secret volume (``DIR/<secret>/<key>``, replaced through a
  ``..data`` symlink swap as the kubelet does), are sent to the remote, follow the
  files, and while one is missing every request stays local and /status says why;
  without ``--secrets-dir`` the remote is unused, with the reason logged. No value
  ever appears in the log or on /status.
- caBundle: a real TLS remote whose certificate comes from a private CA
  (certs.issue): without the bundle (or with another CA's) verification fails and
  requests are served locally; with it they reach the remote.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import time
from pathlib import Path

import pytest

from certs.issue import issue_ca, issue_serving_cert
from tests.integration.servers import LoopThread, Upstream
from tests.integration.test_standalone import SidecarProcess
from tests.modeldeployments import as_yaml, standalone

API_KEY = "ak-3d9f1c27e5b0"
ROTATED_KEY = "ak-rotated-88e1"


def modeldeployment(remote_port: int, *, scheme: str = "http", remote: dict | None = None) -> str:
    return as_yaml(standalone(remote_port, scheme=scheme, remote=remote))


HEADERS_FROM_SECRETS = {
    "headersFromSecrets": [{"name": "X-Api-Key", "secretKeyRef": {"name": "remote-api", "key": "apiKey"}}]
}


def ca_bundle(pem: bytes) -> dict:
    return {"caBundle": pem.decode()}


class MountedSecret:
    """``root/<name>/<key>`` the way the kubelet mounts a Secret: keys are symlinks into
    ``..data``, itself a symlink swapped atomically to a new timestamped folder."""

    def __init__(self, root: Path, name: str):
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.generation = 0

    def write(self, **data: str) -> None:
        self.generation += 1
        stamp = self.dir / f"..{self.generation}"
        stamp.mkdir()
        for key, value in data.items():
            (stamp / key).write_text(value + "\n")
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, self.dir / "..data")
        for key in data:
            link = self.dir / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")

    def remove(self, key: str) -> None:
        (self.dir / key).unlink()


def test_headers_from_a_secrets_dir_reach_the_remote_and_follow_the_mounted_files(tmp_path, upstreams):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(remote.port, remote=HEADERS_FROM_SECRETS))
    secrets = tmp_path / "secrets"
    mounted = MountedSecret(secrets, "remote-api")
    sidecar = SidecarProcess(
        tmp_path, "--config", str(config), "--upstream", str(local.port), "--secrets-dir", str(secrets)
    )
    try:
        # The Secret's key is not there yet: the remote is unused, and /status says why.
        status = sidecar.wait_for(lambda s: s["decision"]["offloading"], what="the static split")
        assert status["routing"]["remote"] is None
        assert status["routing"]["remoteUnavailable"].startswith(
            "header X-Api-Key from Secret remote-api key 'apiKey': "
        )
        assert "no such file" in status["routing"]["remoteUnavailable"]
        assert sidecar.requests(5) == [200] * 5
        assert (local.count(), remote.count()) == (5, 0)

        mounted.write(apiKey=API_KEY)
        status = sidecar.wait_for(lambda s: s["routing"]["remote"] is not None, what="the key to be read")
        assert status["routing"]["remoteUnavailable"] is None
        assert sidecar.requests(5) == [200] * 5
        assert remote.count() == 5
        assert [r.header("x-api-key") for r in remote.requests] == [API_KEY] * 5

        mounted.write(apiKey=ROTATED_KEY)  # the kubelet swaps ..data when the Secret changes
        deadline = time.monotonic() + 10  # files are re-read every second
        while remote.requests[-1].header("x-api-key") != ROTATED_KEY:
            assert time.monotonic() < deadline, "the rotated key never reached the remote"
            assert sidecar.requests(1) == [200]
            time.sleep(0.05)
        assert {r.header("x-api-key") for r in remote.requests} == {API_KEY, ROTATED_KEY}
        assert local.count() == 5  # during the rotation every request still went to the remote

        mounted.remove("apiKey")
        status = sidecar.wait_for(lambda s: s["routing"]["remote"] is None, what="the key to be gone")
        assert "no such file" in status["routing"]["remoteUnavailable"]
        before = remote.count()
        assert sidecar.requests(5) == [200] * 5
        assert remote.count() == before

        for text in (sidecar.log_text(), str(sidecar.status())):
            assert API_KEY not in text and ROTATED_KEY not in text
        assert "Secret remote-api key 'apiKey'" in sidecar.log_text()
    finally:
        sidecar.stop()


def test_without_a_secrets_dir_the_remote_is_unused_with_the_reason_logged(tmp_path, upstreams):
    local, remote = upstreams
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(remote.port, remote=HEADERS_FROM_SECRETS))
    sidecar = SidecarProcess(tmp_path, "--config", str(config), "--upstream", str(local.port))
    try:
        status = sidecar.wait_for(lambda s: s["decision"]["offloading"], what="the static split")
        assert status["routing"]["remote"] is None
        assert "--secrets-dir" in status["routing"]["remoteUnavailable"]
        assert sidecar.requests(10) == [200] * 10
        assert (local.count(), remote.count()) == (10, 0)
        assert (
            "headersFromSecrets needs the Secrets: in standalone mode give --secrets-dir"
            in sidecar.log_text()
        )
    finally:
        sidecar.stop()


def test_a_secrets_dir_that_does_not_exist_is_refused_at_start(tmp_path):
    import subprocess
    import sys

    from tests.integration.servers import REPO

    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(1, remote=HEADERS_FROM_SECRETS))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--config", str(config), "--upstream", "1",
         "--secrets-dir", str(tmp_path / "nowhere")],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"--secrets-dir {tmp_path / 'nowhere'}: no such directory" in done.stderr


# --- caBundle ------------------------------------------------------------------------------------


@pytest.fixture
def tls_remote(tmp_path):
    """A remote on 127.0.0.1 serving TLS with a certificate from a private CA."""
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("private-remote-ca", now=now, days=1)
    serving = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
    (tmp_path / "tls.crt").write_bytes(serving.cert_pem)
    (tmp_path / "tls.key").write_bytes(serving.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    with LoopThread() as lt:
        local = lt.run(Upstream.started("local"))
        remote = Upstream("remote")
        lt.run(remote.start(0, ssl_context=context))
        yield local, remote, ca.cert_pem
        lt.run(local.kill())
        lt.run(remote.kill())


def test_a_remote_with_a_private_ca_is_not_trusted_without_its_ca_bundle(tmp_path, tls_remote):
    local, remote, _ = tls_remote
    other_ca = issue_ca("some-other-ca", now=dt.datetime.now(dt.UTC), days=1).cert_pem
    for i, (name, remote_fields) in enumerate((("none", None), ("another CA's", ca_bundle(other_ca)))):
        config = tmp_path / f"md-{i}.yaml"
        config.write_text(modeldeployment(remote.port, scheme="https", remote=remote_fields))
        sidecar = SidecarProcess(tmp_path, "--config", str(config), "--upstream", str(local.port))
        try:
            status = sidecar.wait_for(lambda s: s["routing"]["activePercentage"] == 100, what="offloading")
            assert status["routing"]["remote"] == f"https://127.0.0.1:{remote.port}"
            before = local.count()
            assert sidecar.requests(3) == [200] * 3, name
            assert local.count() == before + 3, f"caBundle {name}: verification must fail and serve locally"
            assert remote.requests == []
        finally:
            sidecar.stop()


def test_the_ca_bundle_verifies_a_remote_with_a_private_ca(tmp_path, tls_remote):
    """Needs the proxy to connect with ``target.ssl_context or settings.remote_ssl_context``."""
    local, remote, ca_pem = tls_remote
    config = tmp_path / "md.yaml"
    config.write_text(modeldeployment(remote.port, scheme="https", remote=ca_bundle(ca_pem)))
    sidecar = SidecarProcess(tmp_path, "--config", str(config), "--upstream", str(local.port))
    try:
        status = sidecar.wait_for(lambda s: s["routing"]["activePercentage"] == 100, what="offloading")
        assert status["configuration"]["offloadingConfig"]["remoteBackend"]["caBundle"] == "<1 certificate>"
        assert sidecar.requests(5) == [200] * 5
        assert (local.count(), remote.count()) == (0, 5)
        assert {r.header("host") for r in remote.requests} == {f"127.0.0.1:{remote.port}"}
    finally:
        sidecar.stop()
