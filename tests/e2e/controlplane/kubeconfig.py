"""Kubeconfig files for the control plane's clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .pki import CertPair


def write_kubeconfig(path: Path, *, server: str, ca: Path, client: CertPair, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "offload-e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}
        ],
        "contexts": [{"name": "offload-e2e", "context": {"cluster": "offload-e2e", "user": user}}],
        "current-context": "offload-e2e",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def write_service_account_kubeconfig(
    path: Path, plane: Any, namespace: str, account: str, *, duration: str = "1h"
) -> Path:
    """A kubeconfig for `plane`'s API server (anything with ``kubeconfig`` and ``kubectl``)
    that signs in as the ServiceAccount `namespace`/`account` with a token ``kubectl create
    token`` issues for `duration`: what that account's RBAC allows is all it may do."""
    token = plane.kubectl("create", "token", account, "-n", namespace, f"--duration={duration}")
    assert token.returncode == 0, token.stderr
    admin = yaml.safe_load(Path(plane.kubeconfig).read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "offload-e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token.stdout.strip()}}],
        "contexts": [{"name": "offload-e2e", "context": {"cluster": "offload-e2e", "user": account}}],
        "current-context": "offload-e2e",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
