"""Where a remote backend may never be: link-local and cloud metadata addresses.

The shared stand-in gateway connects to every tenant's ``remoteBackend.host`` and
``tokenUrl`` from the installation's own network identity, with headers the tenant
chose. A remote on the cloud's instance metadata service would hand the tenant the
node's credentials (SSRF). So these are refused, by validation (the names and IP
literals written in the object) and again at connect time (what a DNS name resolves
to), by the same rules:

- IPv4 link-local ``169.254.0.0/16`` (RFC 3927): the metadata services of AWS, GCP,
  Azure, OpenStack and others listen on ``169.254.169.254`` (AWS ECS task metadata on
  ``169.254.170.2``); nothing a remote backend is served from lives there.
- IPv6 link-local ``fe80::/10`` (RFC 4291 2.5.6): never routed beyond the node's link.
- Cloud metadata and credential services outside those ranges, each a single address:
  ``fd00:ec2::254`` (AWS EC2 instance metadata over IPv6, AWS EC2 User Guide, "Instance
  metadata service endpoints"), ``fd00:ec2::23`` (the EKS Pod Identity Agent over IPv6,
  Amazon EKS User Guide; ``169.254.170.23`` over IPv4 is link-local already),
  ``fd00:c1::a9fe:a9fe`` (Oracle Cloud instance metadata over IPv6, OCI documentation,
  "Getting Instance Metadata"), ``100.100.100.200`` (Alibaba Cloud ECS metadata, "Instance
  metadata" in its ECS documentation) and ``168.63.129.16`` (Azure's WireServer, which
  hands VM agents their configuration, "What is IP address 168.63.129.16?").
- An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, RFC 4291 2.5.5.2) is judged as the
  IPv4 address it maps: a dual-stack socket connects to that address. So is an address
  in the NAT64 well-known prefix ``64:ff9b::/96`` (RFC 6052): a translator on the path
  delivers it to the IPv4 address it embeds.
- The host names ``metadata.google.internal`` and ``metadata`` (Google Compute
  Engine, "About VM metadata": both name the metadata server), in any case, with or
  without a trailing dot.

Loopback and private ranges are *not* refused: the local model is on 127.0.0.1, and a
remote inside the cluster's network is a normal setup. Pure: no I/O, no resolution.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Any

_LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")
_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
METADATA_ADDRESSES: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {
    ipaddress.IPv6Address("fd00:ec2::254"): "the AWS instance metadata service",
    ipaddress.IPv6Address("fd00:ec2::23"): "the EKS Pod Identity Agent",
    ipaddress.IPv6Address("fd00:c1::a9fe:a9fe"): "the Oracle Cloud instance metadata service",
    ipaddress.IPv4Address("100.100.100.200"): "the Alibaba Cloud instance metadata service",
    ipaddress.IPv4Address("168.63.129.16"): "Azure's WireServer (VM agent configuration)",
}
METADATA_HOST_NAMES = frozenset({"metadata.google.internal", "metadata"})

# What inet_aton (and so getaddrinfo) reads as IPv4 besides dotted quads: "2852039166",
# "0xa9.0xfe.0xa9.0xfe", "0251.0376.0251.0376", "169.254.43518".
_LOOSE_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")


class ForbiddenAddressError(OSError):
    """A remote whose host is, or resolves only to, link-local or cloud metadata
    addresses: nothing was connected to. An OSError, so callers treat it as a
    failed connect; ``str()`` is the reason alone."""

    def __init__(self, reason: str):
        super().__init__(None, reason)

    def __str__(self) -> str:
        return str(self.strerror)


def address_refusal(address: str) -> str | None:
    """Why the IP address ``address`` (text, an IPv6 one without brackets, a ``%scope``
    allowed) may not be a remote, or None when it may. Text that is no IP address is
    refused too (a resolver answer we cannot judge).

    >>> address_refusal("169.254.169.254")
    '169.254.169.254 is a link-local address (169.254.0.0/16), where cloud metadata services listen'
    >>> address_refusal("::ffff:169.254.169.254")
    '::ffff:a9fe:a9fe is a link-local address (169.254.0.0/16), where cloud metadata services listen'
    >>> address_refusal("fd00:ec2::254")
    'fd00:ec2::254 is the AWS instance metadata service'
    >>> address_refusal("64:ff9b::a9fe:a9fe")
    '64:ff9b::a9fe:a9fe is a link-local address (169.254.0.0/16), where cloud metadata services listen'
    >>> address_refusal("168.63.129.16")
    "168.63.129.16 is Azure's WireServer (VM agent configuration)"
    >>> address_refusal("fe80::1%eth0")
    'fe80::1%eth0 is an IPv6 link-local address (fe80::/10)'
    >>> address_refusal("127.0.0.1") is None, address_refusal("10.0.0.7") is None
    (True, True)
    >>> address_refusal("::1") is None, address_refusal("2001:db8::1") is None
    (True, True)
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    return _ip_refusal(ip)


def _ip_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    unscoped = ipaddress.ip_address(str(ip).partition("%")[0])  # fd00:ec2::254%eth0 is it too
    service = METADATA_ADDRESSES.get(unscoped)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            reason = _ip_refusal(embedded)
            return None if reason is None else f"{ip}{reason.removeprefix(str(embedded))}"
        if service is not None:
            return f"{ip} is {service}"
        if ip in _LINK_LOCAL_V6:
            return f"{ip} is an IPv6 link-local address (fe80::/10)"
        return None
    if service is not None:
        return f"{ip} is {service}"
    if ip in _LINK_LOCAL_V4:
        return f"{ip} is a link-local address (169.254.0.0/16), where cloud metadata services listen"
    return None


def host_refusal(host: str) -> str | None:
    """Why the host name or IP literal ``host`` (no port; an IPv6 address with or without
    brackets) may not be a remote, or None. An IPv4 address is also recognised in the
    loose forms the system resolver accepts (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``).
    A DNS name is judged by itself only: what it resolves to is checked at connect time.

    >>> host_refusal("Metadata.Google.Internal.")
    'metadata.google.internal is the cloud metadata service'
    >>> host_refusal("[fe80::1]")
    'fe80::1 is an IPv6 link-local address (fe80::/10)'
    >>> host_refusal("2852039166")
    '169.254.169.254 is a link-local address (169.254.0.0/16), where cloud metadata services listen'
    >>> host_refusal("models.example.com") is None, host_refusal("127.0.0.1") is None
    (True, True)
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ip = parse_ip(name.rstrip("."))  # "169.254.169.254." too: a resolver may take it as the address
    if ip is not None:
        return _ip_refusal(ip)
    lowered = name.lower().rstrip(".")
    if lowered in METADATA_HOST_NAMES:
        return f"{lowered} is the cloud metadata service"
    return None


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as the IP address a resolver would take it for, or None for a DNS name.

    >>> parse_ip("0xa9.0xfe.0xa9.0xfe"), parse_ip("::1"), parse_ip("abc.def")
    (IPv4Address('169.254.169.254'), IPv6Address('::1'), None)
    """
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LOOSE_IPV4.fullmatch(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            pass
    return None


def screen_addresses(what: str, infos: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The entries of ``infos`` (``socket.getaddrinfo`` results: (family, type, proto,
    canonname, sockaddr)) a remote may be connected to, in their order. Raises
    ForbiddenAddressError when there were some and none is left; its message starts
    with ``what`` (the host and what it is for, e.g. ``"remote r.example"``).

    >>> import socket as s
    >>> ok = (s.AF_INET, s.SOCK_STREAM, 6, "", ("10.1.2.3", 443))
    >>> bad = (s.AF_INET, s.SOCK_STREAM, 6, "", ("169.254.169.254", 443))
    >>> screen_addresses("remote r.example", [bad, ok]) == [ok]
    True
    >>> screen_addresses("remote r.example", [bad])
    Traceback (most recent call last):
    ...
    crds.addresses.ForbiddenAddressError: remote r.example resolves only to link-local/cloud metadata addresses: \
169.254.169.254 is a link-local address (169.254.0.0/16), where cloud metadata services listen
    """
    allowed = [info for info in infos if address_refusal(info[4][0]) is None]
    if infos and not allowed:
        reasons = dict.fromkeys(str(address_refusal(info[4][0])) for info in infos)
        raise ForbiddenAddressError(
            f"{what} resolves only to link-local/cloud metadata addresses: {'; '.join(reasons)}"
        )
    return allowed
