"""offload-webhook: serve the admission webhooks over HTTPS."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from functools import partial

import uvicorn

from crds.validation import ValidationSettings
from webhook.app import build_app
from webhook.validating import review_modeldeployment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-webhook",
        description="Serve the ModelDeployment validating webhook (/validate-modeldeployments) "
        "and the sidecar-injecting webhook over HTTPS, with /healthz and /readyz.",
    )
    parser.add_argument("--tls-cert-file", required=True, help="PEM serving certificate (chain)")
    parser.add_argument("--tls-private-key-file", required=True, help="PEM private key of the certificate")
    parser.add_argument("--port", type=int, default=9443, help="HTTPS port (default: %(default)s)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="serve only ModelDeployment validation; needs no cluster credentials",
    )
    parser.add_argument(
        "--default-remote-backend",
        action="store_true",
        help="the installation routes ModelDeployments without remoteBackend to a default backend, "
        "so such objects are allowed",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = ValidationSettings(default_remote_backend=args.default_remote_backend)
    reviews = {"/validate-modeldeployments": partial(review_modeldeployment, settings=settings)}
    app = build_app(reviews)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.tls_cert_file,
        ssl_keyfile=args.tls_private_key_file,
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
