"""The injector's configuration: what the injected sidecar looks like.

Read from a YAML file (``offload-webhook --injector-config``) that the Helm chart writes
from its ``sidecar`` values (ConfigMap key ``injector.yaml``)::

    configVersion: "0.1.0"        # recorded on every injected pod
    image: ghcr.io/model-offloading/offload:0.1.0
    imagePullPolicy: IfNotPresent
    proxyPort: 15080              # the named port ``offload-proxy``
    adminPort: 15090              # /healthz, /readyz, /metrics
    nativeSidecar: true           # an init container with restartPolicy: Always (k8s >= 1.29)
    resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 128Mi}}
    prometheusAnnotations: false  # prometheus.io/scrape, /port, /path on injected pods

Every key is optional except ``image`` and ``resources.requests.cpu``; unknown keys and
bad values are errors naming the key, so a typo in the chart's values fails the webhook's
start, not a pod. The cpu request is required because the HorizontalPodAutoscaler's rule
(which this product follows) makes a pod's cpu Utilization invalid when any of its
containers, native sidecars included, has no cpu request: without it offloading could never
start and an HPA on the same workload would stop scaling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crds.quantity import parse_quantity
from crds.validation import parse_port

CONTAINER_NAME = "offload-proxy"
PROXY_PORT_NAME = "offload-proxy"
ADMIN_PORT_NAME = "offload-admin"
DEFAULT_PROXY_PORT = 15080
DEFAULT_ADMIN_PORT = 15090
# The distroless "nonroot" user: no shell account, no privileges.
RUN_AS_USER = 65532
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# An image reference: [registry[:port]/]path[:tag][@digest], no whitespace or scheme.
_IMAGE = re.compile(
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?",
    re.IGNORECASE,
)


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key at fault."""


@dataclass(frozen=True)
class InjectorConfig:
    image: str
    config_version: str = ""
    image_pull_policy: str = "IfNotPresent"
    proxy_port: int = DEFAULT_PROXY_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    native_sidecar: bool = True
    # {"requests": {"cpu": "50m"}, "limits": {...}}, quantities as given (strings).
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    # offload-webhook --default-remote-backend, validated; passed to sidecars as
    # OFFLOAD_DEFAULT_REMOTE_BACKEND. Not a key of the file.
    default_remote_backend: str = ""
    # Annotate injected pods for a Prometheus without the Operator (its conventional
    # kubernetes-pods job): scrape the sidecar's admin port at /metrics.
    prometheus_annotations: bool = False


def check_image(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 512 or not _IMAGE.fullmatch(value):
        raise ConfigError(f"{key}: not a valid image reference: {value!r}")
    return value


def check_port(value: Any, key: str) -> int:
    """A port number (1 to 65535) given as an integer or in ASCII digits (an annotation's
    string); ConfigError naming ``key`` otherwise."""
    if isinstance(value, str):
        port = parse_port(value)
        if port is not None:
            return port
    elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    if isinstance(value, str) and len(value) > 64:
        value = f"{value[:64]}..."  # a 5000-digit annotation need not be echoed whole
    raise ConfigError(f"{key}: must be a port number between 1 and 65535, got {value!r}")


def check_quantity(value: Any, key: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    try:
        amount = parse_quantity(value)
    except ValueError:
        raise ConfigError(f"{key}: not a valid quantity: {value!r}") from None
    if amount <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return value


def check_resources(value: Any, key: str = "resources") -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be an object with requests and limits")
    out: dict[str, dict[str, str]] = {}
    for part, amounts in value.items():
        if part not in ("requests", "limits"):
            raise ConfigError(f"{key}.{part}: unknown key (requests, limits)")
        if amounts is None:
            continue
        if not isinstance(amounts, dict):
            raise ConfigError(f"{key}.{part}: must be an object of quantities")
        out[part] = {str(name): check_quantity(q, f"{key}.{part}.{name}") for name, q in amounts.items()}
    check_requests_within_limits(out, key)
    return out


def check_requests_within_limits(resources: dict[str, dict[str, str]], key: str = "resources") -> None:
    limits = resources.get("limits", {})
    for name, request in resources.get("requests", {}).items():
        if name in limits and parse_quantity(request) > parse_quantity(limits[name]):
            raise ConfigError(f"{key}.requests.{name}: {request} is above the limit {limits[name]}")


_KEYS = {
    "configVersion",
    "image",
    "imagePullPolicy",
    "proxyPort",
    "adminPort",
    "nativeSidecar",
    "resources",
    "prometheusAnnotations",
}


def parse_config(data: Any) -> InjectorConfig:
    if not isinstance(data, dict):
        raise ConfigError("the injector configuration must be a YAML mapping")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    if "image" not in data:
        raise ConfigError("image: required key is missing")
    version = data.get("configVersion", "")
    if not isinstance(version, (str, int, float)) or isinstance(version, bool):
        raise ConfigError(f"configVersion: must be a string, got {version!r}")
    policy = data.get("imagePullPolicy", "IfNotPresent")
    if policy not in PULL_POLICIES:
        raise ConfigError(f"imagePullPolicy: must be one of {', '.join(PULL_POLICIES)}, got {policy!r}")
    native = data.get("nativeSidecar", True)
    if not isinstance(native, bool):
        raise ConfigError(f"nativeSidecar: must be true or false, got {native!r}")
    annotate = data.get("prometheusAnnotations", False)
    if not isinstance(annotate, bool):
        raise ConfigError(f"prometheusAnnotations: must be true or false, got {annotate!r}")
    config = InjectorConfig(
        image=check_image(data["image"], "image"),
        config_version=str(version),
        image_pull_policy=policy,
        proxy_port=check_port(data.get("proxyPort", DEFAULT_PROXY_PORT), "proxyPort"),
        admin_port=check_port(data.get("adminPort", DEFAULT_ADMIN_PORT), "adminPort"),
        native_sidecar=native,
        resources=check_resources(data.get("resources")),
        prometheus_annotations=annotate,
    )
    if config.proxy_port == config.admin_port:
        raise ConfigError(f"adminPort: must differ from proxyPort ({config.proxy_port})")
    # A cpu limit alone is fine: the API server defaults the request to it.
    if "cpu" not in config.resources.get("requests", {}) and "cpu" not in config.resources.get("limits", {}):
        raise ConfigError(
            "resources.requests.cpu: required: a container without a cpu request makes every cpu "
            "Utilization metric of its pod invalid (the HPA's rule), for offloading and for an HPA alike"
        )
    return config


def load_config(path: str | Path) -> InjectorConfig:
    """Read and check the file; ConfigError (with the path) when it is unusable."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
