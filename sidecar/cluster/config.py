"""ConfigSource of cluster mode: the sidecar's own ModelDeployment, watched, and the
offloading decision the controller publishes in its status.

The sidecar knows its ModelDeployment by name (the injector sets
MODELDEPLOYMENT_NAME and POD_NAMESPACE). This source lists that one object
(fieldSelector on the name), then watches it, and yields the validated model
every time its spec or its published decision (``status.offloading`` and the rest of
crds/status.py) changes; :attr:`ClusterConfigSource.published` holds the latter. The
sidecar reads nothing else: no pods, no metrics, whatever the workload's size.

- deleted or absent -> None (pass-through to the local model);
- invalid (it slipped in while the webhook was down) -> None, and the errors
  are logged once per resourceVersion, each with its field path;
- the API server gone -> nothing is yielded: the last known configuration and
  decision stay in force while :func:`sidecar.cluster.informer.list_and_watch` reconnects with
  jittered backoff; an expired watch (410) is resumed by listing again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crds.backoff import Backoff
from crds.model import GROUP, PLURAL, VERSION, ModelDeployment
from crds.status import PublishedDecision
from crds.validation import ValidationSettings, parse_remote_backend, validate_object
from sidecar.cluster.client import KubeClient, WatchEvent
from sidecar.cluster.credentials import in_cluster_config, load_kubeconfig
from sidecar.cluster.informer import RETRY, Listed, list_and_watch

log = logging.getLogger("sidecar.cluster.config")


class ClusterConfigSource:
    """Yields the sidecar's ModelDeployment (or None) on every change."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        *,
        validation: ValidationSettings | None = None,
        backoff: Backoff = RETRY,
    ):
        self.client = client
        self.namespace = namespace
        self.name = name
        self.validation = validation or ValidationSettings()
        self.backoff = backoff
        self.current: ModelDeployment | None = None  # the last configuration yielded
        self.published: PublishedDecision | None = None  # the decision in its status, if any
        self._reported_invalid: str | None = None

    @property
    def path(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"

    async def updates(self) -> AsyncIterator[ModelDeployment | None]:
        params = {"fieldSelector": f"metadata.name={self.name}"}
        first = True
        last_key: Any = None
        async for change in list_and_watch(self.client, self.path, params, backoff=self.backoff):
            obj = self._object_of(change)
            model = self.model_of(obj)
            published = PublishedDecision.from_status(obj.get("status")) if obj is not None else None
            # The spec and the published decision matter; the resourceVersion alone does not.
            key = (None if model is None else dataclasses.replace(model, resource_version=""), published)
            if first or key != last_key:
                first = False
                last_key = key
                self.current = model
                self.published = published
                yield model

    def _object_of(self, change: Listed | WatchEvent) -> dict[str, Any] | None:
        if isinstance(change, Listed):
            return next((i for i in change.items if (i.get("metadata") or {}).get("name") == self.name), None)
        if change.type == "DELETED":
            log.info(
                "ModelDeployment %s/%s deleted: pass-through to the local model", self.namespace, self.name
            )
            return None
        return change.object

    def model_of(self, obj: dict[str, Any] | None) -> ModelDeployment | None:
        """The validated model of one object, or None (absent or invalid, logged)."""
        if obj is None:
            return None
        result = validate_object(obj, self.validation)
        if result.ok:
            self._reported_invalid = None
            return result.model
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if version != self._reported_invalid:
            self._reported_invalid = version
            log.error(
                "ModelDeployment %s/%s (resourceVersion %s) is invalid and treated as absent: %s",
                self.namespace,
                self.name,
                version,
                result.message(),
            )
        return None


@dataclass
class ClusterMode:
    """The cluster-mode source, wired to one client (close it on shutdown)."""

    client: KubeClient
    config: ClusterConfigSource


DEFAULT_REMOTE_BACKEND_ENV = "OFFLOAD_DEFAULT_REMOTE_BACKEND"


def validation_from_env(env: Mapping[str, str]) -> ValidationSettings:
    """The installation's default remote backend, as the injector passes it
    (OFFLOAD_DEFAULT_REMOTE_BACKEND: a URL or a JSON RemoteBackend). A value that does not
    parse is logged and ignored: ModelDeployments without remoteBackend then pass through,
    rather than a sidecar that fails to start and holds its model pod back."""
    text = env.get(DEFAULT_REMOTE_BACKEND_ENV, "").strip()
    if not text:
        return ValidationSettings()
    try:
        return ValidationSettings(
            default_remote_backend=parse_remote_backend(text, DEFAULT_REMOTE_BACKEND_ENV)
        )
    except ValueError as exc:
        log.error("%s ignored: %s", DEFAULT_REMOTE_BACKEND_ENV, exc)
        return ValidationSettings()


def cluster_mode_from_env(env: Mapping[str, str] | None = None) -> ClusterMode | None:
    """Cluster mode when the injector's environment says so, else None (standalone).

    POD_NAMESPACE and MODELDEPLOYMENT_NAME select it; credentials come from
    KUBECONFIG when set (tests, development), else from the pod's service account.
    Raises sidecar.cluster.credentials.CredentialsError when the credentials are unusable.
    """
    env = os.environ if env is None else env
    namespace, name = env.get("POD_NAMESPACE"), env.get("MODELDEPLOYMENT_NAME")
    if not namespace or not name:
        return None
    kubeconfig = env.get("KUBECONFIG")
    credentials = load_kubeconfig(Path(kubeconfig)) if kubeconfig else in_cluster_config(env)
    client = KubeClient(credentials)
    config = ClusterConfigSource(client, namespace, name, validation=validation_from_env(env))
    return ClusterMode(client, config)
