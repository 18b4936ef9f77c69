"""What happened to a pod at admission: one stable code per outcome (pure).

The codes are CamelCase, as Kubernetes reasons are; they label the webhook's metrics
(``offload_webhook_injections_skipped_total{reason}``), its log lines and, for the ones in
``WARNED``, an admission warning. Selection (webhook/selection.py) and injection
(webhook/injection.py) both speak this vocabulary.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Stable codes for what happened to a pod, for logs, metrics and tests."""

    INJECTED = "Injected"
    ALREADY_INJECTED = "AlreadyInjected"
    OPTED_OUT = "OptedOut"
    NO_MATCHING_MODELDEPLOYMENT = "NoMatchingModelDeployment"
    MODELDEPLOYMENT_DISABLED = "ModelDeploymentDisabled"
    OWNED_BY_ANOTHER_CONTROLLER = "OwnedByAnotherController"
    HOST_NETWORK = "HostNetwork"
    NO_MODEL_PORT = "NoModelPort"
    PORT_CONFLICT = "PortConflict"
    BAD_OVERRIDE = "BadOverride"
    CACHE_NOT_SYNCED = "CacheNotSynced"
    NOT_A_POD_CREATE = "NotAPodCreate"
    WINDOWS_POD = "WindowsPod"
    VOLUME_CONFLICT = "VolumeConflict"
    MALFORMED_POD = "MalformedPod"
    INTERNAL_ERROR = "InternalError"


# Reasons a user should hear about (as an admission warning); the others are the normal
# state of most pods in a cluster, logged only.
WARNED = frozenset(
    {
        Reason.OWNED_BY_ANOTHER_CONTROLLER,
        Reason.HOST_NETWORK,
        Reason.NO_MODEL_PORT,
        Reason.PORT_CONFLICT,
        Reason.BAD_OVERRIDE,
        Reason.CACHE_NOT_SYNCED,
        Reason.WINDOWS_POD,
        Reason.VOLUME_CONFLICT,
        Reason.MALFORMED_POD,
        Reason.INTERNAL_ERROR,
    }
)
