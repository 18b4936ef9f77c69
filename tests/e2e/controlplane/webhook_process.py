"""Runs this project's webhook server (`offload-webhook`) as a local process, with a fresh
CA and serving certificate from `offload-certs`, so that a real API server can call it
on loopback through a webhook configuration's `clientConfig.url`."""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .net import free_port, http_status
from .process import ManagedProcess, wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]
LOOPBACK = "127.0.0.1"


def _console_script(name: str, module: str) -> list[str]:
    """The installed console script, or the same entry point through this interpreter."""
    path = shutil.which(name)
    return [path] if path else [sys.executable, "-m", module]


def injector_config(version: str, *, memory_limit: str | None = "128Mi") -> str:
    """The injector config (``offload-webhook --injector-config``) of the e2e tier's
    webhooks: the e2e image, native sidecars, small requests. `version` is its
    configVersion, `memory_limit` the sidecar's memory limit (None: no limit)."""
    text = f"""\
configVersion: "{version}"
image: ghcr.io/model-offloading/offload:e2e
proxyPort: 15080
adminPort: 15090
nativeSidecar: true
resources:
  requests: {{cpu: 50m, memory: 64Mi}}
"""
    return text + (f"  limits: {{memory: {memory_limit}}}\n" if memory_limit else "")


def issue_certificates(out_dir: Path) -> None:
    """offload-certs: ca.crt, tls.crt and tls.key valid for 127.0.0.1 and localhost."""
    argv = _console_script("offload-certs", "certs.cli") + [
        "--out-dir",
        str(out_dir),
        "--dns-name",
        "localhost",
        "--ip-address",
        LOOPBACK,
    ]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"offload-certs failed ({result.returncode}): {result.stderr}{result.stdout}")


@dataclass
class WebhookServer:
    process: ManagedProcess
    port: int
    cert_dir: Path

    @property
    def ca_bundle(self) -> str:
        """base64 of the CA certificate, as a webhook configuration's caBundle wants it."""
        return base64.b64encode((self.cert_dir / "ca.crt").read_bytes()).decode()

    def url(self, path: str) -> str:
        return f"https://{LOOPBACK}:{self.port}{path}"

    def get(self, path: str) -> int:
        ctx = ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))
        return http_status(self.url(path), ctx)

    def text(self, path: str) -> str:
        """The body of a GET (e.g. /metrics) over verified TLS."""
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))
        with urllib.request.urlopen(self.url(path), timeout=5, context=ctx) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        self.process.stop()


def start_webhook(
    workdir: Path, *extra_args: str, env: dict[str, str] | None = None, startup_timeout: float = 60.0
) -> WebhookServer:
    """Issues fresh certificates into workdir/certs and starts offload-webhook on a free
    loopback port with them; returns once /healthz answers 200 over verified TLS.
    `env` is added to this process's environment (e.g. KUBECONFIG for the mutating webhook)."""
    cert_dir = workdir / "certs"
    issue_certificates(cert_dir)
    port = free_port()
    argv = _console_script("offload-webhook", "webhook.cli") + [
        "--tls-cert-file",
        str(cert_dir / "tls.crt"),
        "--tls-private-key-file",
        str(cert_dir / "tls.key"),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        *extra_args,
    ]
    process = ManagedProcess(
        "offload-webhook",
        argv,
        workdir / "offload-webhook.log",
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    server = WebhookServer(process, port, cert_dir)
    try:
        wait_until(
            "offload-webhook /healthz",
            lambda: server.get("/healthz") == 200,
            startup_timeout,
            alive=[process],
        )
    except BaseException:
        server.stop()
        raise
    return server
