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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dns-name", "bad name!"],
            "--dns-name: 'bad name!' is not a valid DNS name (an RFC 1123 subdomain",
        ),
        (["--dns-name", "ok", "--dns-name", "a..b"], "--dns-name: 'a..b' is not a valid DNS name"),
        (["--dns-name=-a.example"], "--dns-name: '-a.example' is not a valid DNS name"),
        (["--dns-name", "a" * 64 + ".example"], "is not a valid DNS name"),
        (["--dns-name", "x.*.example"], "--dns-name: 'x.*.example' is not a valid DNS name"),
        (["--dns-name", "h\u00f4te.example"], "--dns-name: 'h\u00f4te.example' is not a valid DNS name"),
        (["--ip-address", "1.2.3"], "--ip-address: '1.2.3' is not an IPv4 or IPv6 address"),
        (["--service", "wh!", "--namespace", "ns"], "--service: 'wh!' is not a valid name"),
        (["--service", "wh", "--namespace", "a.b"], "--namespace: 'a.b' is not a valid name"),
        (["--service", "wh", "--namespace", "ns", "--cluster-domain", "x y"], "--cluster-domain: 'x y'"),
    ],
)
def test_a_name_a_certificate_cannot_carry_is_refused_naming_its_flag(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out-dir", str(tmp_path / "tls"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()


def test_wildcard_names_are_issued_and_bad_names_refused_by_the_issuer_too():
    ca = issue_ca("test-ca", now=NOW, days=5)
    serving = issue_serving_cert(
        ca, dns_names=["*.models.example", "localhost"], ip_addresses=[], now=NOW, days=1
    )
    sans = serving.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["*.models.example", "localhost"]
    with pytest.raises(ValueError, match="'bad name!' is not a valid DNS name"):
        issue_serving_cert(ca, dns_names=["bad name!"], ip_addresses=[], now=NOW, days=1)
