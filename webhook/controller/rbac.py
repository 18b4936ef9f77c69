"""The sidecar's RoleBinding: which one a ModelDeployment wants, and what to do about the one there.

Each ModelDeployment gets a RoleBinding ``<name>-offload-sidecar`` in its namespace, binding
the chart's sidecar ClusterRole (read ModelDeployments) to its workload's service account,
owned by the ModelDeployment (so the garbage collector removes it too). A RoleBinding of
that name that the ModelDeployment does not own is never touched. ``roleRef`` is
immutable, so a changed ClusterRole name means delete and create.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crds.model import GROUP, VERSION

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "offload-controller"
MODELDEPLOYMENT_LABEL = "offload.beamlit.com/modeldeployment"
SUFFIX = "-offload-sidecar"


def binding_name(modeldeployment: str) -> str:
    # Object names may be 253 characters; keep the suffix whole.
    return modeldeployment[: 253 - len(SUFFIX)] + SUFFIX


def service_account_of(workload: Mapping[str, Any]) -> str:
    template = ((workload.get("spec") or {}).get("template") or {}).get("spec") or {}
    return str(template.get("serviceAccountName") or template.get("serviceAccount") or "default")


def desired(md: Mapping[str, Any], cluster_role: str, service_account: str) -> dict[str, Any]:
    meta = md.get("metadata") or {}
    name, namespace = str(meta.get("name")), str(meta.get("namespace"))
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": binding_name(name),
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, MODELDEPLOYMENT_LABEL: name[:63]},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ModelDeployment",
                    "name": name,
                    "uid": meta.get("uid"),
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def owned_by(binding: Mapping[str, Any], md: Mapping[str, Any]) -> bool:
    uid = (md.get("metadata") or {}).get("uid")
    refs = (binding.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(isinstance(r, Mapping) and r.get("uid") == uid for r in refs)


@dataclass(frozen=True)
class Action:
    """``verb`` is create, recreate (delete then create), patch-subjects, delete or conflict."""

    verb: str
    body: dict[str, Any] | None = None


def plan(
    existing: Mapping[str, Any] | None, want: dict[str, Any] | None, md: Mapping[str, Any]
) -> Action | None:
    """What to do so that the binding is ``want`` (None: gone); None when nothing."""
    if existing is not None and not owned_by(existing, md):
        return Action("conflict") if want is not None else None
    if want is None:
        return Action("delete") if existing is not None else None
    if existing is None:
        return Action("create", want)
    if existing.get("roleRef") != want["roleRef"]:
        return Action("recreate", want)
    if existing.get("subjects") != want["subjects"]:
        return Action("patch-subjects", want)
    return None
