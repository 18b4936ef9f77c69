"""What an injected sidecar may read, beyond the static ClusterRole.

The ClusterRole ``<release>-sidecar`` (charts/offload/files/sidecar-role.yaml) lets a
sidecar get, list and watch ModelDeployments in the namespace it is bound in; it reads
only its own. The Secrets its remote's authentication reads are named here, one rule
per ModelDeployment, never by wildcard: the controller puts them in a Role of their own
next to the RoleBinding of that ClusterRole.
"""

from __future__ import annotations

from typing import Any

from crds.model import ModelDeployment


def secret_names_for(model: ModelDeployment) -> list[str]:
    """The Secrets the remote's authentication reads (OAuth client secret, headersFromSecrets),
    each once, in order of first reference. Pass the model in force (with the installation's
    default remote backend filled in, as crds.validation.validate_object returns it)."""
    config = model.spec.offloading_config
    backend = config.remote_backend if config else None
    if backend is None:
        return []
    names = []
    auth = backend.auth_config
    if auth is not None and auth.oauth_config is not None and auth.oauth_config.client_secret_ref is not None:
        names.append(auth.oauth_config.client_secret_ref.name)
    names.extend(h.secret_key_ref.name for h in backend.headers_from_secrets)
    return list(dict.fromkeys(names))


def sidecar_rules_for(model: ModelDeployment) -> list[dict[str, Any]]:
    """The RBAC rules one ModelDeployment adds for its sidecars: get on exactly the Secrets
    :func:`secret_names_for` names ([] when there are none)."""
    secrets = secret_names_for(model)
    if not secrets:
        return []
    return [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets, "verbs": ["get"]}]
