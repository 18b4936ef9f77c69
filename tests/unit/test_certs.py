"""The webhook certificates: names, key usage, chain, and file permissions."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.cli import main
from certs.issue import issue_ca, issue_serving_cert, service_dns_names

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def test_the_serving_certificate_names_the_service_and_chains_to_the_ca():
    ca = issue_ca("test-ca", now=NOW, days=30)
    names = service_dns_names("offload-webhook", "offload-system")
    serving = issue_serving_cert(ca, dns_names=names, ip_addresses=["127.0.0.1"], now=NOW, days=10)
    cert = serving.certificate
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "offload-webhook",
        "offload-webhook.offload-system",
        "offload-webhook.offload-system.svc",
        "offload-webhook.offload-system.svc.cluster.local",
    ]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_serving_certificate_never_outlives_its_ca():
    ca = issue_ca("test-ca", now=NOW, days=5)
    serving = issue_serving_cert(ca, dns_names=["x"], ip_addresses=[], now=NOW, days=365)
    assert serving.certificate.not_valid_after_utc <= ca.certificate.not_valid_after_utc


def test_a_certificate_without_names_is_refused():
    ca = issue_ca("test-ca", now=NOW, days=5)
    with pytest.raises(ValueError, match="at least one"):
        issue_serving_cert(ca, dns_names=[], ip_addresses=[], now=NOW, days=1)


def test_the_cli_writes_pem_files_with_a_private_key_only_the_owner_can_read(tmp_path, capsys):
    out = tmp_path / "tls"
    assert (
        main(["--out-dir", str(out), "--service", "wh", "--namespace", "ns", "--ip-address", "127.0.0.1"])
        == 0
    )
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "tls.crt").stat().st_mode) == 0o644
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert "wh.ns.svc" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--out-dir", "x"],
        ["--out-dir", "x", "--service", "wh"],
        ["--out-dir", "x", "--ip-address", "not-an-ip"],
        ["--out-dir", "x", "--dns-name", "a", "--days", "0"],
    ],
)
def test_bad_command_lines_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "offload-certs" in capsys.readouterr().err
