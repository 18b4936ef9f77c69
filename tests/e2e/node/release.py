"""The offload chart installed with the real helm on the real node's cluster."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import kubernetes

from tests.e2e.paths import REPO_ROOT

CHART = REPO_ROOT / "charts" / "offload"
RELEASE = "offload"
NAMESPACE = "offload-system"
WEBHOOK = "offload-webhook"


@dataclass
class HelmRelease:
    helm_binary: Path
    kubeconfig: Path
    namespace: str = NAMESPACE
    install_output: str = ""

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(self.helm_binary),
                *args,
                "--namespace",
                self.namespace,
                "--kubeconfig",
                str(self.kubeconfig),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def install(self, *values: str) -> None:
        installed = self.helm("install", RELEASE, str(CHART), "--wait", "--timeout", "240s", *values)
        if installed.returncode != 0:
            raise RuntimeError(f"helm install failed:\n{installed.stderr}\n{installed.stdout}")
        self.install_output = installed.stdout

    def uninstall(self) -> None:
        self.helm("uninstall", RELEASE, "--wait", "--ignore-not-found")


def create_restricted_namespace(api_client: kubernetes.client.ApiClient, name: str) -> None:
    """A namespace that enforces (and warns and audits) the restricted Pod Security Standard."""
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    kubernetes.client.CoreV1Api(api_client).create_namespace(
        {"metadata": {"name": name, "labels": {"offload-e2e": "true", **labels}}}
    )
