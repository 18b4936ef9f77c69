"""The address policy for remote backends (crds.addresses): which hosts and resolved
addresses a remote may never be, and how validation reports them."""

from __future__ import annotations

import doctest
import socket

import pytest

from crds import addresses
from crds.addresses import ForbiddenAddressError, address_refusal, host_refusal, screen_addresses
from crds.validation import validate_object
from tests import modeldeployments as md


def test_the_doctests_hold():
    assert doctest.testmod(addresses).failed == 0


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("169.254.169.254", "link-local address (169.254.0.0/16), where cloud metadata"),
        ("169.254.170.2", "link-local"),  # AWS ECS task metadata
        ("169.254.0.0", "link-local"),
        ("169.254.255.255", "link-local"),
        ("::ffff:169.254.169.254", "::ffff:a9fe:a9fe is a link-local address"),
        ("fd00:ec2::254", "AWS instance metadata service"),
        ("fe80::1", "IPv6 link-local address (fe80::/10)"),
        ("febf:ffff::1", "IPv6 link-local"),
        ("fe80::a9fe:a9fe%eth0", "IPv6 link-local"),
        ("fd00:ec2::254%eth0", "AWS instance metadata service"),
        ("fd00:ec2::23", "EKS Pod Identity Agent"),
        ("fd00:c1::a9fe:a9fe", "Oracle Cloud instance metadata"),
        ("100.100.100.200", "Alibaba Cloud instance metadata"),
        ("168.63.129.16", "Azure's WireServer"),
        ("::ffff:168.63.129.16", "Azure's WireServer"),
        ("64:ff9b::a9fe:a9fe", "link-local address (169.254.0.0/16)"),
        ("64:ff9b::169.254.169.254", "link-local address (169.254.0.0/16)"),
        ("not-an-ip", "is not an IP address"),
    ],
)
def test_forbidden_addresses(address, fragment):
    reason = address_refusal(address)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # the local model, and test remotes
        "::1",
        "10.0.0.7",
        "192.168.1.1",
        "169.253.255.255",
        "169.255.0.0",
        "fd00:ec2::253",  # not the metadata service (its neighbours are AWS's DNS and NTP)
        "fec0::1",  # just past fe80::/10
        "::ffff:10.0.0.1",
        "2001:db8::1",
        "100.64.0.1",  # shared address space (RFC 6598): pod networks use it; only 100.100.100.200 is refused
    ],
)
def test_allowed_addresses(address):
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("metadata.google.internal", True),
        ("METADATA.google.internal.", True),
        ("metadata", True),
        ("[169.254.169.254]", True),
        ("169.254.169.254", True),
        ("169.254.169.254.", True),
        ("0xa9.0xfe.0xa9.0xfe", True),
        ("0251.0376.0251.0376", True),
        ("169.254.43518", True),
        ("[::ffff:169.254.169.254]", True),
        ("fd00:ec2::254", True),
        ("[64:ff9b::a9fe:a9fe]", True),
        ("100.100.100.200", True),
        ("[64:ff9b::a00:7]", False),  # NAT64 of 10.0.0.7: a normal remote
        ("metadata.google.internal.example.com", False),
        ("my-metadata", False),
        ("localhost", False),
        ("cafe.be", False),
    ],
)
def test_hosts(host, refused):
    assert (host_refusal(host) is not None) is refused


def info(address: str, port: int = 443) -> tuple:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (address, port))


def test_screening_keeps_the_allowed_addresses_in_order():
    infos = [info("fe80::1"), info("10.0.0.2"), info("169.254.169.254"), info("2001:db8::5")]
    assert screen_addresses("remote r.example", infos) == [infos[1], infos[3]]


def test_screening_refuses_a_name_that_resolves_only_to_forbidden_addresses():
    with pytest.raises(ForbiddenAddressError) as caught:
        screen_addresses("remote evil.example", [info("169.254.169.254"), info("fd00:ec2::254")])
    assert isinstance(caught.value, OSError)  # callers' connect-failure path
    assert str(caught.value) == (
        "remote evil.example resolves only to link-local/cloud metadata addresses: "
        "169.254.169.254 is a link-local address (169.254.0.0/16), where cloud metadata services listen; "
        "fd00:ec2::254 is the AWS instance metadata service"
    )


def test_validation_names_the_field_and_the_reason():
    obj = md.variant(
        changes={
            "metadata.namespace": "default",
            "spec.offloadingConfig.remoteBackend.host": "169.254.169.254:80",
        }
    )
    result = validate_object(obj)
    assert not result.ok
    assert [e.path for e in result.errors] == ["spec.offloadingConfig.remoteBackend.host"]
    assert "link-local" in result.message() and "cloud metadata" in result.message()
