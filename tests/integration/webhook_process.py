"""Run `offload-webhook` as a real process with fresh certificates, on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class WebhookProcess:
    url: str  # https://127.0.0.1:PORT
    ca_file: Path
    process: subprocess.Popen[bytes]
    log_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def issue_certs(directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "certs.cli", "--out-dir", str(directory),
         "--dns-name", "localhost", "--ip-address", "127.0.0.1"],
        check=True, capture_output=True,
    )
    return directory


@contextlib.contextmanager
def running_webhook(workdir: Path, *extra_args: str, env: dict[str, str] | None = None) -> Iterator[WebhookProcess]:
    """Start the webhook over TLS, wait until /healthz answers, stop it afterwards."""
    certs = issue_certs(workdir / "certs")
    port = free_port()
    log_file = workdir / "webhook.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "webhook.cli", "--tls-cert-file", str(certs / "tls.crt"),
             "--tls-private-key-file", str(certs / "tls.key"), "--host", "127.0.0.1", "--port", str(port),
             *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
    webhook = WebhookProcess(f"https://127.0.0.1:{port}", certs / "ca.crt", process, log_file)
    try:
        _wait_healthy(webhook)
        yield webhook
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(webhook: WebhookProcess, timeout: float = 20.0) -> None:
    host, port = webhook.url.removeprefix("https://").split(":")
    context = webhook.ssl_context()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if webhook.process.poll() is not None:
            raise RuntimeError(f"offload-webhook exited early:\n{webhook.log_file.read_text()}")
        try:
            with socket.create_connection((host, int(port)), timeout=1) as raw:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    if tls.recv(64).startswith(b"HTTP/1.1 200"):
                        return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"offload-webhook did not become healthy:\n{webhook.log_file.read_text()}")
