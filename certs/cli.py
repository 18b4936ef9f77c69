"""offload-certs: write a CA and a webhook serving certificate as PEM files."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from certs.issue import dns_name_problem, issue_ca, issue_serving_cert, service_dns_names


def _write(path: Path, data: bytes, mode: int) -> None:
    # Create with the final mode so a private key is never readable by others,
    # not even for an instant; replace atomically so readers see old or new.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-certs",
        description="Issue a CA and a serving certificate for the offloading webhooks. "
        "Writes ca.crt, tls.crt and tls.key (mode 0600) into --out-dir.",
    )
    parser.add_argument("--out-dir", required=True, type=Path, help="directory to write the PEM files into")
    parser.add_argument(
        "--dns-name", action="append", default=[], help="a DNS name for the certificate (repeatable)"
    )
    parser.add_argument(
        "--ip-address", action="append", default=[], help="an IP address for the certificate (repeatable)"
    )
    parser.add_argument("--service", help="add the in-cluster DNS names of this Service (needs --namespace)")
    parser.add_argument("--namespace", help="namespace of --service")
    parser.add_argument(
        "--cluster-domain", default="cluster.local", help="cluster DNS domain (default: %(default)s)"
    )
    parser.add_argument(
        "--days", type=int, default=365, help="validity of the serving certificate (default: %(default)s)"
    )
    parser.add_argument("--ca-days", type=int, default=3650, help="validity of the CA (default: %(default)s)")
    return parser


def _name_problems(args: argparse.Namespace) -> Iterator[str]:
    """Each name or address on the command line that a certificate cannot carry, with its flag."""
    for name in args.dns_name:
        if problem := dns_name_problem(name):
            yield f"--dns-name: {problem}"
    for address in args.ip_address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            yield f"--ip-address: {address!r} is not an IPv4 or IPv6 address"
    if args.service:
        for flag, value in (("--service", args.service), ("--namespace", args.namespace)):
            if "." in value or "*" in value or dns_name_problem(value):
                yield f"{flag}: {value!r} is not a valid name (lowercase letters, digits, inner '-'; 63 at most)"
        if "*" in args.cluster_domain or dns_name_problem(args.cluster_domain):
            yield f"--cluster-domain: {args.cluster_domain!r} is not a valid DNS name"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    dns_names = list(args.dns_name)
    if args.service and not args.namespace:
        parser.error("--service needs --namespace")
    for problem in _name_problems(args):
        parser.error(problem)  # exits
    if args.service:
        dns_names += service_dns_names(args.service, args.namespace, args.cluster_domain)
    if not dns_names and not args.ip_address:
        parser.error("give at least one --dns-name, --ip-address or --service")
    if args.days < 1 or args.ca_days < args.days:
        parser.error("--days must be at least 1 and --ca-days at least --days")
    now = dt.datetime.now(dt.timezone.utc)
    ca = issue_ca("offloading-webhook-ca", now=now, days=args.ca_days)
    try:
        serving = issue_serving_cert(
            ca, dns_names=dns_names, ip_addresses=args.ip_address, now=now, days=args.days
        )
    except ValueError as exc:
        parser.error(str(exc))
    args.out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(args.out_dir / "ca.crt", ca.cert_pem, 0o644)
    _write(args.out_dir / "tls.crt", serving.cert_pem, 0o644)
    _write(args.out_dir / "tls.key", serving.key_pem, 0o600)
    print(f"wrote ca.crt, tls.crt, tls.key to {args.out_dir} for {', '.join(dns_names + args.ip_address)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
