"""Kubeconfig files for the control plane's clients."""

from __future__ import annotations

from pathlib import Path

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
