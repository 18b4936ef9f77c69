"""Sidecar injection as a pure function: pod + selection + configuration -> mutated copy.

``inject`` never touches its input: it decides, builds the proxy container, makes a
mutated copy (copied along the changed paths) and diffs it against the original with
``jsonpatch`` (RFC 6902). Every pod that
is not injected gets a stable reason code (``Reason``) and a sentence; the ones a user
would want to hear about also get an admission warning.

Where the proxy goes. As a native sidecar (``nativeSidecar: true``, Kubernetes >= 1.29)
it is appended *last* to ``initContainers``: after the pod's regular init containers,
which often prepare the model (download weights) and need not wait for our image, and
after any existing native sidecar, such as a mesh proxy that must be up before ours can
reach the API server. It still starts before, and stops after, every app container. As a
regular container it is appended to ``containers``, so the model stays the first
container (``kubectl logs`` and ``exec`` keep defaulting to it).

The model's port: the ModelDeployment's ``serviceRef.targetPort`` picks the captured
Service port (by ``port``, else by a numeric ``targetPort``; without it, the Service's
first port); that port's ``targetPort`` (absent: the port itself) is the model's port,
a name being looked up in the pod's containers. Once the controller has pointed the
Service at ``offload-proxy``, the original target is read from the Service annotation
``offload.beamlit.com/original-target-port``. Without a serviceRef, or when the Service
is unknown, the first containerPort of the first container is used, with a warning.

The sidecar's credentials. The pod gets a projected volume ``offload-proxy-token`` (a
service-account token, the cluster CA from the ``kube-root-ca.crt`` ConfigMap and the
namespace: what the API server's own ``kube-api-access-*`` volume holds) mounted into the
sidecar alone at ``SERVICE_ACCOUNT_DIR``, as the Istio and Linkerd injectors do. The
sidecar so has its credentials whether or not the pod automounts the default token
(``automountServiceAccountToken: false``), and the model's containers get none they did
not have.

Pods the sidecar cannot run in are left alone: a Windows pod (``spec.os.name``, or pinned
to Windows nodes by its nodeSelector or required node affinity) would be refused by the
API server with the sidecar's Linux-only securityContext. A pod whose JSON has the wrong
types where injection reads it is ``MalformedPod``, the message naming the field.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import jsonpatch

from webhook.injector_config import (
    ADMIN_PORT_NAME,
    CONTAINER_NAME,
    PROXY_PORT_NAME,
    RUN_AS_USER,
    ConfigError,
    InjectorConfig,
    check_image,
    check_port,
    check_quantity,
    check_requests_within_limits,
)
from webhook.reasons import WARNED, Reason
from webhook.selection import Selection

PREFIX = "offload.beamlit.com/"
INJECT_ANNOTATION = PREFIX + "inject"
INJECTED_ANNOTATION = PREFIX + "injected"
CONFIG_VERSION_ANNOTATION = PREFIX + "injector-config-version"
ORIGINAL_TARGET_PORT_ANNOTATION = PREFIX + "original-target-port"
PROMETHEUS_PREFIX = "prometheus.io/"

# The sidecar's own service-account credentials (see the module's docstring). The sidecar
# reads the directory from SERVICE_ACCOUNT_DIR_ENV (sidecar.cluster.credentials agrees on both names).
TOKEN_VOLUME = "offload-proxy-token"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/offload.beamlit.com/serviceaccount"
SERVICE_ACCOUNT_DIR_ENV = "OFFLOAD_SERVICEACCOUNT_DIR"
# The node labels that carry the operating system (the beta one is still set by kubelets).
OS_LABELS = ("kubernetes.io/os", "beta.kubernetes.io/os")

# Per-pod overrides: annotation -> what it overrides. Each is validated; a bad one means
# the pod is admitted without the sidecar and a warning naming the annotation.
OVERRIDE_IMAGE = PREFIX + "proxy-image"
OVERRIDE_CPU_REQUEST = PREFIX + "proxy-cpu-request"
OVERRIDE_CPU_LIMIT = PREFIX + "proxy-cpu-limit"
OVERRIDE_MEMORY_REQUEST = PREFIX + "proxy-memory-request"
OVERRIDE_MEMORY_LIMIT = PREFIX + "proxy-memory-limit"
OVERRIDE_PROXY_PORT = PREFIX + "proxy-port"
OVERRIDE_ADMIN_PORT = PREFIX + "admin-port"
OVERRIDE_NATIVE_SIDECAR = PREFIX + "native-sidecar"
OVERRIDE_MODEL_PORT = PREFIX + "model-port"
OVERRIDES = (
    OVERRIDE_IMAGE,
    OVERRIDE_CPU_REQUEST,
    OVERRIDE_CPU_LIMIT,
    OVERRIDE_MEMORY_REQUEST,
    OVERRIDE_MEMORY_LIMIT,
    OVERRIDE_PROXY_PORT,
    OVERRIDE_ADMIN_PORT,
    OVERRIDE_NATIVE_SIDECAR,
    OVERRIDE_MODEL_PORT,
)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str | None = None  # None: same as port
    name: str = ""


@dataclass(frozen=True)
class ServiceInfo:
    """What injection needs of the captured Service."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    original_target_port: int | str | None = None  # from ORIGINAL_TARGET_PORT_ANNOTATION


@dataclass(frozen=True)
class Outcome:
    reason: Reason
    message: str
    patch: tuple[dict[str, Any], ...] = ()
    pod: dict[str, Any] | None = None  # the mutated copy, when injected
    warnings: tuple[str, ...] = ()
    modeldeployment: str = ""

    @property
    def injected(self) -> bool:
        return self.reason is Reason.INJECTED


def not_injected(reason: Reason, message: str, warnings: tuple[str, ...] = (), md: str = "") -> Outcome:
    if reason in WARNED:
        warnings = (*warnings, f"offload: sidecar not injected ({reason.value}): {message}")
    return Outcome(reason, message, warnings=warnings, modeldeployment=md)


# --- reading the pod -------------------------------------------------------------------------------


def _list(spec: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key)
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def _all_containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return _list(spec, "initContainers") + _list(spec, "containers")


def already_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return any(c.get("name") == CONTAINER_NAME for c in _all_containers(spec))


def annotations_of(pod: Mapping[str, Any]) -> dict[str, str]:
    value = (pod.get("metadata") or {}).get("annotations")
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def labels_of(pod: Mapping[str, Any]) -> dict[str, str]:
    value = (pod.get("metadata") or {}).get("labels")
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


# --- the pod's shape -------------------------------------------------------------------------------

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in (
        (bool, "boolean"),
        (int, "number"),
        (float, "number"),
        (str, "string"),
        (list, "list"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _wrong(path: str, expected: type, value: Any) -> str:
    return f"{path}: must be {_TYPE_NAMES[expected]}, got {_json_type(value)}"


def _check(node: Mapping[str, Any], key: str, expected: type, path: str) -> str | None:
    """Absent or null is fine (the API server would default it); another type is not."""
    value = node.get(key)
    if value is None:
        return None
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    return None if ok else _wrong(f"{path}.{key}" if path else key, expected, value)


def _check_string_map(node: Mapping[str, Any], key: str, path: str) -> str | None:
    problem = _check(node, key, dict, path)
    if problem is None:
        for name, value in (node.get(key) or {}).items():
            if not isinstance(value, str):
                return _wrong(f"{path}.{key}[{name}]", str, value)
    return problem


def _check_objects(node: Mapping[str, Any], key: str, path: str) -> str | None:
    """A list of objects; returns the first problem."""
    problem = _check(node, key, list, path)
    if problem is None:
        for i, item in enumerate(node.get(key) or ()):
            if not isinstance(item, dict):
                return _wrong(f"{path}.{key}[{i}]", dict, item)
    return problem


def _container_problem(container: Mapping[str, Any], path: str) -> str | None:
    expected: type
    for key, expected in (("name", str), ("image", str)):
        if problem := _check(container, key, expected, path):
            return problem
    for key in ("ports", "env", "volumeMounts"):
        if problem := _check_objects(container, key, path):
            return problem
    for i, port in enumerate(container.get("ports") or ()):
        where = f"{path}.ports[{i}]"
        for key, expected in (("containerPort", int), ("name", str), ("protocol", str)):
            if problem := _check(port, key, expected, where):
                return problem
    return None


def _affinity_problem(spec: Mapping[str, Any]) -> str | None:
    node: Any = spec
    path = "spec"
    for key in ("affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution"):
        if problem := _check(node, key, dict, path):
            return problem
        node, path = node.get(key), f"{path}.{key}"
        if node is None:
            return None
    if problem := _check_objects(node, "nodeSelectorTerms", path):
        return problem
    for i, term in enumerate(node.get("nodeSelectorTerms") or ()):
        where = f"{path}.nodeSelectorTerms[{i}]"
        if problem := _check_objects(term, "matchExpressions", where):
            return problem
        for j, expression in enumerate(term.get("matchExpressions") or ()):
            at = f"{where}.matchExpressions[{j}]"
            for key, expected in (("key", str), ("operator", str), ("values", list)):
                if problem := _check(expression, key, expected, at):
                    return problem
    return None


def shape_problem(pod: Any) -> str | None:
    """The first field injection reads whose JSON type is wrong, as ``path: must be ...``;
    None when every field injection reads has its Pod type (or is absent).

    The API server decodes pods before calling webhooks, so this only fires for a review
    that did not come from it; checking first keeps the rest of injection simple.
    """
    if not isinstance(pod, dict):
        return _wrong("request.object", dict, pod)
    if problem := _check(pod, "metadata", dict, ""):
        return problem
    meta = pod.get("metadata") or {}
    for key in ("name", "generateName", "namespace"):
        if problem := _check(meta, key, str, "metadata"):
            return problem
    for key in ("labels", "annotations"):
        if problem := _check_string_map(meta, key, "metadata"):
            return problem
    if problem := _check_objects(meta, "ownerReferences", "metadata"):
        return problem
    for i, ref in enumerate(meta.get("ownerReferences") or ()):
        where = f"metadata.ownerReferences[{i}]"
        for key, expected in (("kind", str), ("name", str), ("controller", bool)):
            if problem := _check(ref, key, expected, where):
                return problem
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return _wrong("spec", dict, spec)
    for key in ("containers", "initContainers", "volumes"):
        if problem := _check_objects(spec, key, "spec"):
            return problem
    for key in ("containers", "initContainers"):
        for i, container in enumerate(spec.get(key) or ()):
            if problem := _container_problem(container, f"spec.{key}[{i}]"):
                return problem
    for i, volume in enumerate(spec.get("volumes") or ()):
        if problem := _check(volume, "name", str, f"spec.volumes[{i}]"):
            return problem
    if problem := _check(spec, "hostNetwork", bool, "spec"):
        return problem
    if problem := _check(spec, "os", dict, "spec"):
        return problem
    if problem := _check(spec.get("os") or {}, "name", str, "spec.os"):
        return problem
    if problem := _check_string_map(spec, "nodeSelector", "spec"):
        return problem
    return _affinity_problem(spec)


def windows_only(spec: Mapping[str, Any]) -> str | None:
    """Why the pod can run on Windows nodes only, or None. Expects a well-shaped spec.

    ``spec.os.name: windows``; a nodeSelector ``kubernetes.io/os: windows``; or required
    node affinity every term of which admits only Windows (``In`` with Windows values
    only, or ``NotIn`` with ``linux``): terms are ORed, so one term admitting Linux is enough.
    """
    if (spec.get("os") or {}).get("name") == "windows":
        return "spec.os.name: windows"
    selector = spec.get("nodeSelector") or {}
    for label in OS_LABELS:
        if selector.get(label) == "windows":
            return f"spec.nodeSelector {label}: windows"
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []

    def excludes_linux(term: Mapping[str, Any]) -> bool:
        for expression in term.get("matchExpressions") or ():
            if expression.get("key") not in OS_LABELS:
                continue
            values = expression.get("values") or []
            if expression.get("operator") == "In" and values and "linux" not in values:
                return True
            if expression.get("operator") == "NotIn" and "linux" in values:
                return True
        return False

    if terms and all(excludes_linux(term) for term in terms):
        return f"every term of spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution excludes Linux by {OS_LABELS[0]}"
    return None


# --- per-pod settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The injector configuration with the pod's overrides applied."""

    config: InjectorConfig
    model_port: int | str | None = None  # the model-port override


def _bool(value: str, key: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f'{key}: must be "true" or "false", got {value!r}')


def apply_overrides(config: InjectorConfig, annotations: Mapping[str, str]) -> Settings:
    """The configuration with the pod's override annotations; ConfigError names a bad one."""
    changes: dict[str, Any] = {}
    if OVERRIDE_IMAGE in annotations:
        changes["image"] = check_image(annotations[OVERRIDE_IMAGE], OVERRIDE_IMAGE)
    if OVERRIDE_PROXY_PORT in annotations:
        changes["proxy_port"] = check_port(annotations[OVERRIDE_PROXY_PORT], OVERRIDE_PROXY_PORT)
    if OVERRIDE_ADMIN_PORT in annotations:
        changes["admin_port"] = check_port(annotations[OVERRIDE_ADMIN_PORT], OVERRIDE_ADMIN_PORT)
    if OVERRIDE_NATIVE_SIDECAR in annotations:
        changes["native_sidecar"] = _bool(annotations[OVERRIDE_NATIVE_SIDECAR], OVERRIDE_NATIVE_SIDECAR)
    amounts = {
        ("requests", "cpu"): OVERRIDE_CPU_REQUEST,
        ("limits", "cpu"): OVERRIDE_CPU_LIMIT,
        ("requests", "memory"): OVERRIDE_MEMORY_REQUEST,
        ("limits", "memory"): OVERRIDE_MEMORY_LIMIT,
    }
    if any(key in annotations for key in amounts.values()):
        resources = {part: dict(values) for part, values in config.resources.items()}
        for (part, name), key in amounts.items():
            if key in annotations:
                resources.setdefault(part, {})[name] = check_quantity(annotations[key], key)
        try:
            check_requests_within_limits(resources)
        except ConfigError as exc:
            raise ConfigError(f"{PREFIX}proxy-*: {exc}") from None
        changes["resources"] = resources
    model_port: int | str | None = None
    if OVERRIDE_MODEL_PORT in annotations:
        raw = annotations[OVERRIDE_MODEL_PORT]
        model_port = check_port(raw, OVERRIDE_MODEL_PORT) if _ASCII_DIGITS.fullmatch(raw) else _port_name(raw)
    merged = replace(config, **changes)
    if merged.proxy_port == merged.admin_port:
        raise ConfigError(f"{OVERRIDE_ADMIN_PORT}: must differ from the proxy port {merged.proxy_port}")
    return Settings(merged, model_port)


# ASCII only: str.isdigit and str.isalnum accept other scripts' digits and letters.
_ASCII_DIGITS = re.compile(r"[0-9]+")
# IANA_SVC_NAME: 1-15 lowercase ASCII letters, digits and inner '-', at least one letter.
_PORT_NAME = re.compile(r"(?=[a-z0-9-]*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?")


def _port_name(value: str) -> str:
    if not _PORT_NAME.fullmatch(value):
        raise ConfigError(
            f"{OVERRIDE_MODEL_PORT}: must be a port number or a container port name, got {value!r}"
        )
    return value


# --- the model's port ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPort:
    port: int | None
    how: str  # a sentence, for the log or the failure message
    warnings: tuple[str, ...] = ()


def _container_port_named(spec: Mapping[str, Any], name: str) -> int | None:
    # A Service's named targetPort resolves against the pod's (app) containers.
    for container in _list(spec, "containers"):
        for port in _list(container, "ports"):
            if port.get("name") == name and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def _first_container_port(spec: Mapping[str, Any]) -> int | None:
    containers = _list(spec, "containers")
    if containers:
        for port in _list(containers[0], "ports"):
            if isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def _against_pod(spec: Mapping[str, Any], target: int | str, how: str) -> ModelPort:
    if isinstance(target, int):
        return ModelPort(target, f"{how}: port {target}")
    port = _container_port_named(spec, target)
    if port is None:
        return ModelPort(None, f"{how}: named port {target!r} is declared by none of the pod's containers")
    return ModelPort(port, f"{how}: named port {target!r} = {port}")


def resolve_model_port(
    pod: Mapping[str, Any],
    service_ref_name: str | None,
    target_port: int | None,
    service: ServiceInfo | None,
    override: int | str | None = None,
) -> ModelPort:
    spec = pod.get("spec") or {}
    if override is not None:
        return _against_pod(spec, override, f"annotation {OVERRIDE_MODEL_PORT}")
    if service_ref_name is None or service is None:
        why = (
            "the ModelDeployment has no serviceRef"
            if service_ref_name is None
            else f"Service {service_ref_name!r} was not found"
        )
        port = _first_container_port(spec)
        if port is None:
            return ModelPort(None, f"{why} and the first container declares no containerPort")
        note = (
            f"offload: {why}; the model's port is taken as the first container's first containerPort, {port}"
        )
        return ModelPort(port, note, (note,))
    if not service.ports:
        return ModelPort(None, f"Service {service.name!r} has no ports")
    chosen = None
    if target_port is None:
        chosen = service.ports[0]
    else:
        chosen = next((p for p in service.ports if p.port == target_port), None) or next(
            (p for p in service.ports if p.target_port == target_port), None
        )
        if chosen is None:
            return ModelPort(
                None, f"Service {service.name!r} has no port {target_port} (serviceRef.targetPort)"
            )
    target = chosen.port if chosen.target_port is None else chosen.target_port
    how = f"Service {service.name!r} port {chosen.port}"
    if target == PROXY_PORT_NAME:
        # The controller already points this port at the proxy; the model is where it pointed before.
        if service.original_target_port is None:
            return ModelPort(
                None, f"{how} targets {PROXY_PORT_NAME!r} and has no {ORIGINAL_TARGET_PORT_ANNOTATION}"
            )
        return _against_pod(spec, service.original_target_port, f"{how} (original target)")
    return _against_pod(spec, target, how)


# --- the container ---------------------------------------------------------------------------------


def _probe(path: str, period: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": ADMIN_PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def proxy_container(config: InjectorConfig, modeldeployment: str, model_port: int) -> dict[str, Any]:
    """The sidecar container; ``restartPolicy: Always`` is added for a native sidecar."""
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        # Cluster mode: the sidecar finds its ModelDeployment from this environment.
        "command": ["offload-sidecar"],
        "ports": [
            {"name": PROXY_PORT_NAME, "containerPort": config.proxy_port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": config.admin_port, "protocol": "TCP"},
        ],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            {"name": "MODELDEPLOYMENT_NAME", "value": modeldeployment},
            {"name": "OFFLOAD_MODEL_PORT", "value": str(model_port)},
            {"name": "OFFLOAD_UPSTREAM", "value": f"127.0.0.1:{model_port}"},
            {"name": "OFFLOAD_PROXY_PORT", "value": str(config.proxy_port)},
            {"name": "OFFLOAD_ADMIN_PORT", "value": str(config.admin_port)},
            {"name": SERVICE_ACCOUNT_DIR_ENV, "value": SERVICE_ACCOUNT_DIR},
        ],
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}],
        # As a native sidecar, the kubelet starts the model only once this probe has passed:
        # the proxy listens before any request can reach the pod.
        "startupProbe": {**_probe("/readyz", 1), "failureThreshold": 30},
        "readinessProbe": _probe("/readyz", 5),
        "livenessProbe": _probe("/healthz", 10),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if config.default_remote_backend:
        # For ModelDeployments without remoteBackend, as the webhook's validation allowed them.
        container["env"].append(
            {"name": "OFFLOAD_DEFAULT_REMOTE_BACKEND", "value": config.default_remote_backend}
        )
    if config.resources:
        container["resources"] = copy.deepcopy(config.resources)
    if config.native_sidecar:
        container["restartPolicy"] = "Always"
    return container


def token_volume() -> dict[str, Any]:
    """The sidecar's credentials, as the API server's own kube-api-access-* volume holds them."""
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            # 0644, as kube-api-access-*: the sidecar runs as a user of its own.
            "defaultMode": 0o644,
            "sources": [
                # Expiry: the API server's default (1 h); the kubelet renews it at 80%, and
                # the sidecar re-reads the file every minute.
                {"serviceAccountToken": {"path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }


def _port_conflict(spec: Mapping[str, Any], config: InjectorConfig, model_port: int) -> str | None:
    if model_port in (config.proxy_port, config.admin_port):
        return f"the model's port {model_port} is the proxy's own port; set {OVERRIDE_PROXY_PORT} / {OVERRIDE_ADMIN_PORT}"
    ours = {config.proxy_port: PROXY_PORT_NAME, config.admin_port: ADMIN_PORT_NAME}
    for container in _all_containers(spec):
        for port in _list(container, "ports"):
            number, name = port.get("containerPort"), port.get("name")
            if number in ours:
                return (
                    f"container {container.get('name')!r} already uses port {number}, needed for "
                    f"{ours[number]}; set {OVERRIDE_PROXY_PORT} / {OVERRIDE_ADMIN_PORT}"
                )
            if name in (PROXY_PORT_NAME, ADMIN_PORT_NAME):
                return f"container {container.get('name')!r} already declares a port named {name!r}"
    return None


def _changed_paths(pod: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The parts of a pod injection may change: metadata.annotations, spec.<key> and spec.volumes."""
    view: dict[str, Any] = {}
    for parent, children in (("metadata", ("annotations",)), ("spec", (key, "volumes"))):
        if parent in pod:
            node = pod[parent]
            view[parent] = {c: node[c] for c in children if isinstance(node, dict) and c in node}
    return view


def in_stable_order(ops: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The patch with independent operations sorted by path.

    jsonpatch walks dict keys as sets, so sibling operations come out in an order that
    changes with the interpreter's hash seed. Adds to distinct paths, none inside another,
    commute: sorting them makes the patch (and the golden files) reproducible.
    """
    paths = [op["path"] for op in ops]
    independent = all(op["op"] == "add" for op in ops) and not any(
        other.startswith(path + "/") for path in paths for other in paths
    )
    return tuple(sorted(ops, key=lambda op: op["path"])) if independent else tuple(ops)


def prometheus_annotations(config: InjectorConfig, annotations: Mapping[str, str]) -> dict[str, str]:
    """The conventional ``prometheus.io/*`` scrape annotations for the sidecar's admin port,
    when the configuration asks for them. A pod that has any ``prometheus.io/`` annotation
    of its own (the model server's metrics) keeps it: the convention allows one endpoint
    per pod, and the model's is the user's; its sidecar is then found by the PodMonitor."""
    if not config.prometheus_annotations or any(k.startswith(PROMETHEUS_PREFIX) for k in annotations):
        return {}
    return {
        PROMETHEUS_PREFIX + "scrape": "true",
        PROMETHEUS_PREFIX + "port": str(config.admin_port),
        PROMETHEUS_PREFIX + "path": "/metrics",
    }


# --- the decision ----------------------------------------------------------------------------------


def inject(
    pod: Mapping[str, Any],
    selection: Selection,
    service: ServiceInfo | None,
    config: InjectorConfig,
) -> Outcome:
    """Decide about one pod and, when it gets the sidecar, return the patch and the patched copy."""
    annotations = annotations_of(pod)
    if already_injected(pod):
        return not_injected(
            Reason.ALREADY_INJECTED, f"a container named {CONTAINER_NAME!r} is already present"
        )
    opt = annotations.get(INJECT_ANNOTATION)
    if opt is not None and opt.lower() == "false":
        return not_injected(Reason.OPTED_OUT, f'annotation {INJECT_ANNOTATION}: "false"')
    if selection.chosen is None:
        assert selection.reason is not None  # a Selection without a choice says why
        return not_injected(selection.reason, selection.message, selection.warnings)
    md = selection.chosen.model
    warnings = selection.warnings
    if opt is not None and opt.lower() != "true":
        return not_injected(
            Reason.BAD_OVERRIDE,
            f'{INJECT_ANNOTATION}: must be "true" or "false", got {opt!r}',
            warnings,
            md.name,
        )
    spec = pod.get("spec")
    if not isinstance(spec, dict) or not _list(spec, "containers"):
        return not_injected(Reason.NO_MODEL_PORT, "the pod has no containers", warnings, md.name)
    if spec.get("hostNetwork") is True:
        return not_injected(
            Reason.HOST_NETWORK,
            "the pod uses the host's network, where the proxy's ports could collide with the node's",
            warnings,
            md.name,
        )
    windows = windows_only(spec)
    if windows:
        return not_injected(
            Reason.WINDOWS_POD,
            f"the pod runs on Windows nodes only ({windows}); the sidecar is a Linux container",
            warnings,
            md.name,
        )
    if any(v.get("name") == TOKEN_VOLUME for v in _list(spec, "volumes")):
        return not_injected(
            Reason.VOLUME_CONFLICT,
            f"the pod already has a volume named {TOKEN_VOLUME!r}, the name of the sidecar's credentials",
            warnings,
            md.name,
        )
    try:
        settings = apply_overrides(config, annotations)
    except ConfigError as exc:
        return not_injected(Reason.BAD_OVERRIDE, str(exc), warnings, md.name)
    ref = md.spec.service_ref
    resolved = resolve_model_port(
        pod, ref.name if ref else None, ref.target_port if ref else None, service, settings.model_port
    )
    if resolved.port is None:
        return not_injected(Reason.NO_MODEL_PORT, resolved.how, warnings, md.name)
    conflict = _port_conflict(spec, settings.config, resolved.port)
    if conflict:
        return not_injected(Reason.PORT_CONFLICT, conflict, warnings, md.name)

    # The mutated copy is copied along the changed paths only (pod, metadata, annotations,
    # spec, the container list); unchanged subtrees are shared with the input, which is
    # never modified. A deep copy of a large pod was half the cost of an admission.
    container = proxy_container(settings.config, md.name, resolved.port)
    key = "initContainers" if settings.config.native_sidecar else "containers"
    mutated = dict(pod)
    mutated["spec"] = new_spec = dict(spec)
    new_spec[key] = [*_list(spec, key), container] if isinstance(spec.get(key), list) else [container]
    new_spec["volumes"] = [*_list(spec, "volumes"), token_volume()]
    metadata = pod.get("metadata")
    mutated["metadata"] = new_meta = dict(metadata) if isinstance(metadata, dict) else {}
    new_meta["annotations"] = {
        **(new_meta["annotations"] if isinstance(new_meta.get("annotations"), dict) else {}),
        INJECTED_ANNOTATION: md.name,
        CONFIG_VERSION_ANNOTATION: settings.config.config_version,
        **prometheus_annotations(settings.config, annotations),
    }
    # Diff only the changed paths (the rest is shared, hence equal): the same patch as a
    # diff of the whole pods, at a fraction of the cost for a large pod.
    patch = in_stable_order(
        jsonpatch.make_patch(_changed_paths(pod, key), _changed_paths(mutated, key)).patch
    )
    return Outcome(
        Reason.INJECTED,
        f"injected for ModelDeployment {md.name} ({resolved.how})",
        patch=patch,
        pod=mutated,
        warnings=warnings + resolved.warnings,
        modeldeployment=md.name,
    )
