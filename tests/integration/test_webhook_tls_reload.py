"""The serving certificate rotates under a running webhook, as cert-manager and the kubelet
rotate it: a new certificate and key land in a new directory of the Secret volume and the
``..data`` symlink is swapped. Real TLS clients check what the server presents: new
handshakes get the new certificate, connections already open keep working, a broken pair
is refused while the old certificate is still served, and the expiry is exported."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import os
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certs.issue import KeyPair, issue_ca, issue_serving_cert
from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.process import ManagedProcess
from tests.e2e.controlplane.webhook_process import REPO_ROOT, _console_script
from tests.integration.servers import wait_until
from webhook import metrics
from webhook.app import build_app
from webhook.cli import tls_server
from webhook.tls import CertificateError, ReloadingCertificate

NOW = dt.datetime.now(dt.UTC)


class SecretVolume:
    """A directory laid out as the kubelet lays out a Secret volume: tls.crt -> ..data/tls.crt,
    ..data -> ..<version>; an update writes a new version and swaps ..data atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0
        root.mkdir(parents=True, exist_ok=True)

    def publish(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.versions += 1
        version = f"..2026_11_30_{self.versions:02d}"
        (self.root / version).mkdir()
        (self.root / version / "tls.crt").write_bytes(cert_pem)
        (self.root / version / "tls.key").write_bytes(key_pem)
        tmp = self.root / "..data_tmp"
        os.symlink(version, tmp)
        os.replace(tmp, self.root / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)

    @property
    def cert(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key(self) -> Path:
        return self.root / "tls.key"


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return issue_ca("rotation-test-ca", now=NOW, days=30)


def serving(ca: KeyPair, days: int) -> KeyPair:
    return issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=NOW, days=days)


def der(pair: KeyPair) -> bytes:
    return x509.load_pem_x509_certificate(pair.cert_pem).public_bytes(Encoding.DER)


def not_after(pair: KeyPair) -> float:
    return x509.load_pem_x509_certificate(pair.cert_pem).not_valid_after_utc.timestamp()


def client_context(ca: KeyPair, tmp_path: Path) -> ssl.SSLContext:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    return ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))


def connect(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> http.client.HTTPSConnection:
    """A keep-alive HTTPS connection; host "127.0.0.1" sends no SNI, "localhost" does."""
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    conn.connect()
    return conn


def get(conn: http.client.HTTPSConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def presented(conn: http.client.HTTPSConnection) -> bytes:
    return conn.sock.getpeercert(binary_form=True)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


class InProcess:
    """offload-webhook's own TLS wiring (webhook.cli.tls_server) in a thread, on a free port."""

    def __init__(self, certificate: ReloadingCertificate) -> None:
        self.server = tls_server(build_app({}), certificate, host="127.0.0.1", port=0, log_level="warning")
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> InProcess:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            self.thread.join(0.01)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_a_rotation_serves_the_new_certificate_to_new_handshakes_and_keeps_open_connections(ca, tmp_path):
    volume = SecretVolume(tmp_path / "tls")
    first, second = serving(ca, days=10), serving(ca, days=20)
    volume.publish(first.cert_pem, first.key_pem)
    certificate = ReloadingCertificate(volume.cert, volume.key)
    context = client_context(ca, tmp_path)
    reloads = sample("offload_webhook_serving_certificate_reloads_total", {"result": "success"})
    with InProcess(certificate) as server:
        assert sample("offload_webhook_serving_certificate_expiry_timestamp_seconds") == not_after(first)
        before = connect(server.port, context)
        assert get(before, "/healthz") == (200, b"ok") and presented(before) == der(first)

        volume.publish(second.cert_pem, second.key_pem)
        assert certificate.check() is True
        assert certificate.check() is False  # nothing new since

        for host in ("127.0.0.1", "localhost"):  # without and with SNI
            after = connect(server.port, context, host)
            assert presented(after) == der(second), host
            assert get(after, "/healthz") == (200, b"ok")
            after.close()
        # The connection opened before the rotation was not dropped and keeps its certificate.
        assert get(before, "/healthz") == (200, b"ok") and presented(before) == der(first)
        before.close()
    assert sample("offload_webhook_serving_certificate_expiry_timestamp_seconds") == not_after(second)
    assert sample("offload_webhook_serving_certificate_reloads_total", {"result": "success"}) == reloads + 1


def test_a_broken_pair_is_refused_and_the_certificate_in_use_kept_until_a_good_one_lands(ca, tmp_path):
    volume = SecretVolume(tmp_path / "tls")
    first, second, third = serving(ca, days=10), serving(ca, days=20), serving(ca, days=25)
    volume.publish(first.cert_pem, first.key_pem)
    certificate = ReloadingCertificate(volume.cert, volume.key)
    context = client_context(ca, tmp_path)
    errors = sample("offload_webhook_serving_certificate_reloads_total", {"result": "error"})
    with InProcess(certificate) as server:
        # A certificate with another certificate's key (a writer that got half-way).
        volume.publish(second.cert_pem, first.key_pem)
        assert certificate.check() is False
        assert certificate.check() is False  # the same broken pair is not retried, nor counted twice
        assert sample("offload_webhook_serving_certificate_reloads_total", {"result": "error"}) == errors + 1
        volume.publish(b"not a certificate", second.key_pem)
        assert certificate.check() is False
        conn = connect(server.port, context)
        assert presented(conn) == der(first) and get(conn, "/healthz")[0] == 200
        conn.close()
        assert sample("offload_webhook_serving_certificate_expiry_timestamp_seconds") == not_after(first)

        volume.publish(third.cert_pem, third.key_pem)
        assert certificate.check() is True
        conn = connect(server.port, context)
        assert presented(conn) == der(third)
        conn.close()
    assert sample("offload_webhook_serving_certificate_reloads_total", {"result": "error"}) == errors + 2


def test_a_certificate_that_cannot_be_loaded_at_start_names_the_file(ca, tmp_path):
    volume = SecretVolume(tmp_path / "tls")
    pair = serving(ca, days=10)
    volume.publish(pair.cert_pem, ca.key_pem)  # the CA's key: not this certificate's
    with pytest.raises(CertificateError, match=f"{volume.cert}, {volume.key}: cannot load"):
        ReloadingCertificate(volume.cert, volume.key)
    with pytest.raises(CertificateError, match=f"{tmp_path}/absent.crt: cannot read"):
        ReloadingCertificate(tmp_path / "absent.crt", volume.key)


# --- the process ----------------------------------------------------------------------------------


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_webhook_process_picks_up_a_rotated_secret_volume_without_a_restart(ca, tmp_path):
    volume = SecretVolume(tmp_path / "tls")
    first, second = serving(ca, days=10), serving(ca, days=20)
    volume.publish(first.cert_pem, first.key_pem)
    port = free_port()
    argv = _console_script("offload-webhook", "webhook.cli") + [
        "--tls-cert-file",
        str(volume.cert),
        "--tls-private-key-file",
        str(volume.key),
        "--tls-reload-interval",
        "0.2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--validation-only",
    ]
    process = ManagedProcess(
        "offload-webhook", argv, tmp_path / "webhook.log", cwd=REPO_ROOT, env=dict(os.environ)
    )
    context = client_context(ca, tmp_path)

    def serving_now() -> bytes | None:
        try:
            conn = connect(port, context)
        except OSError:
            return None
        try:
            return presented(conn)
        finally:
            conn.close()

    try:
        wait_until("the webhook to listen", lambda: serving_now() is not None, 15)
        before = connect(port, context)
        assert presented(before) == der(first) and get(before, "/healthz")[0] == 200
        status, body = get(before, "/metrics")
        assert status == 200
        expiry = metric_value(body.decode(), "offload_webhook_serving_certificate_expiry_timestamp_seconds")
        assert expiry == not_after(first)

        volume.publish(second.cert_pem, second.key_pem)
        wait_until("the rotated certificate to be served", lambda: serving_now() == der(second), 15)
        assert process.exit_code() is None  # the same process: no restart
        status, body = get(before, "/metrics")  # over the connection opened before the rotation
        assert status == 200 and presented(before) == der(first)
        expiry = metric_value(body.decode(), "offload_webhook_serving_certificate_expiry_timestamp_seconds")
        assert expiry == not_after(second)
        before.close()
    finally:
        process.stop()
    assert "serving certificate reloaded from" in (tmp_path / "webhook.log").read_text()


def test_the_process_refuses_to_start_without_a_usable_certificate_naming_the_file(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "webhook.cli", "--validation-only", "--tls-private-key-file", str(tmp_path)]
    result = subprocess.run(
        [*argv, "--tls-cert-file", str(tmp_path / "absent.crt")],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--tls-cert-file/--tls-private-key-file: {tmp_path}/absent.crt: cannot read" in result.stderr
    result = subprocess.run(
        [*argv, "--tls-cert-file", "x", "--tls-reload-interval", "0"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "--tls-reload-interval: must be more than zero" in result.stderr
