"""Where the Kubernetes API server is and how to authenticate to it.

- :func:`in_cluster_config`: the pod's service account, as client-go's InClusterConfig reads
  it: the token (re-read by the client, because it rotates) and the cluster CA, from the
  sidecar's own projected volume named by ``OFFLOAD_SERVICEACCOUNT_DIR``, else the pod's
  default token;
- :func:`load_kubeconfig`: a kubeconfig file's context (CA, client certificate or token),
  for tests and development.

Either gives a :class:`ClusterConfig`, or raises :class:`CredentialsError` naming the file,
variable or field at fault.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Set by the injector: the sidecar's own projected token, CA and namespace, mounted into the
# sidecar alone, present even when the pod sets automountServiceAccountToken: false.
SERVICE_ACCOUNT_DIR_ENV = "OFFLOAD_SERVICEACCOUNT_DIR"


class CredentialsError(ValueError):
    """The credentials are missing or unusable; the message names the file or field."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the API server is and how to authenticate to it."""

    server: str  # https://host:port
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # None for http://
    token: str | None = field(default=None, repr=False)  # a static bearer token
    token_file: Path | None = None  # a rotating one, re-read by the client every minute

    def __post_init__(self) -> None:
        url = urlsplit(self.server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise CredentialsError(f"server: must be an https:// URL, got {self.server!r}")


def in_cluster_config(env: Mapping[str, str] | None = None, account_dir: Path | None = None) -> ClusterConfig:
    """The pod's service account, as client-go's InClusterConfig reads it: from
    ``account_dir``, else ``$OFFLOAD_SERVICEACCOUNT_DIR`` (the injector's volume), else the
    default token's directory. CredentialsError names the variable or file at fault."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise CredentialsError("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set in a pod")
    if account_dir is None:
        own = env.get(SERVICE_ACCOUNT_DIR_ENV)
        account_dir = Path(own) if own else SERVICE_ACCOUNT_DIR
        hint = (
            f"is the volume at {SERVICE_ACCOUNT_DIR_ENV} mounted?"
            if own
            else "is automountServiceAccountToken false? the injector mounts a token of the sidecar's own"
        )
    else:
        hint = "the service account's files"
    token_file, ca_file = account_dir / "token", account_dir / "ca.crt"
    for path in (token_file, ca_file):
        if not path.is_file():
            raise CredentialsError(f"{path}: missing ({hint})")
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise CredentialsError(f"{ca_file}: not a usable CA bundle: {why}") from None
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ClusterConfig(server=f"https://{netloc}", ssl_context=context, token_file=token_file)


def load_kubeconfig(path: Path, context: str | None = None) -> ClusterConfig:
    """A kubeconfig's current (or named) context: server, CA, client cert/key or token."""
    import yaml  # only here: in-cluster mode never pays for it

    where = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CredentialsError(f"{where}: cannot read kubeconfig: {exc}") from exc
    if not isinstance(doc, dict):
        raise CredentialsError(f"{where}: not a kubeconfig")
    base = Path(path).parent
    name = context or doc.get("current-context")
    if not name:
        raise CredentialsError(f"{where}: current-context: not set")
    ctx = _named(doc, "contexts", "context", name, where)
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), where)
    user = _named(doc, "users", "user", ctx.get("user"), where) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str):
        raise CredentialsError(f"{where}: clusters[{ctx.get('cluster')}].cluster.server: required")
    if cluster.get("insecure-skip-tls-verify"):
        raise CredentialsError(
            f"{where}: insecure-skip-tls-verify is not supported: give certificate-authority"
        )
    if "exec" in user or "auth-provider" in user:
        raise CredentialsError(
            f"{where}: users[{ctx.get('user')}]: exec and auth-provider plugins are not supported"
        )
    context_ssl = None
    if server.startswith("https://"):
        cadata = _data_or_file(cluster, "certificate-authority", base, where)
        context_ssl = ssl.create_default_context(cadata=cadata.decode() if cadata else None)
        cert = _data_or_file(user, "client-certificate", base, where)
        key = _data_or_file(user, "client-key", base, where)
        if cert and key:
            _load_cert_chain(context_ssl, cert, key)
    token = user.get("token")
    token_file = user.get("tokenFile")
    return ClusterConfig(
        server=server.rstrip("/"),
        ssl_context=context_ssl,
        token=token if isinstance(token, str) else None,
        token_file=(base / token_file) if isinstance(token_file, str) else None,
    )


def _named(doc: dict[str, Any], section: str, member: str, name: Any, where: str) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(member) or {}
            if isinstance(value, dict):
                return value
    raise CredentialsError(f"{where}: {section}: no entry named {name!r}")


def _data_or_file(section: dict[str, Any], key: str, base: Path, where: str) -> bytes | None:
    data = section.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise CredentialsError(f"{where}: {key}-data: not base64") from exc
    filename = section.get(key)
    if filename:
        try:
            return (base / filename).read_bytes()
        except OSError as exc:
            raise CredentialsError(f"{where}: {key}: {exc}") from exc
    return None


def _load_cert_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # ssl wants files: write them where only we can read, load, remove.
    with tempfile.TemporaryDirectory(prefix="kube-") as tmp:
        cert_path, key_path = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(str(cert_path), str(key_path))
