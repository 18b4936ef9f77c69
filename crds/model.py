"""The ModelDeployment spec as typed data, with the CRD's defaults.

Field names are the snake_case form of the CRD's camelCase fields; the test
``tests/unit/test_crd_schema.py`` fails when this module and
``crds/modeldeployment.yaml`` disagree on any field, type or default.
The autoscaling/v2 MetricSpec types mirror Kubernetes' own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crds.decode import FieldError, decode, decode_partial, type_name

GROUP = "deployment.beamlit.com"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"

# Defaults, stated once (the CRD repeats them; the schema test compares).
DEFAULT_ENVIRONMENT = "production"
DEFAULT_SCHEME = "http"
DEFAULT_PERCENTAGE = 100
# Two samples at metrics-server's finest resolution (15 s) before offloading
# starts: one hot sample is noise, two in a row is load.
DEFAULT_SUSTAIN_SECONDS = 30
# Offloading costs little to keep and a flapping split is worse than a late
# stop, so it stops only after two minutes below target (the HPA waits 5 min
# before scaling down, which would be too slow to give capacity back).
DEFAULT_COOLDOWN_SECONDS = 120
# The HPA's default tolerance (--horizontal-pod-autoscaler-tolerance).
DEFAULT_TOLERANCE = 0.1
# No cold-start hold: while no local replica is ready, the remote serves at once.
DEFAULT_COLD_START_HOLD_SECONDS = 0
MAX_COLD_START_HOLD_SECONDS = 300


@dataclass(frozen=True)
class WorkloadReference:
    """``modelSourceRef``: the workload whose pods serve the model (Deployment or StatefulSet).

    Shaped like autoscaling/v2's CrossVersionObjectReference (an HPA's ``scaleTargetRef``)
    plus a namespace, with the CRD's defaults; not core/v1's ObjectReference.
    """

    name: str
    api_version: str = "apps/v1"
    kind: str = "Deployment"
    namespace: str | None = None


@dataclass(frozen=True)
class ServiceReference:
    """The Service in front of the model, and the port of it that is captured."""

    name: str
    namespace: str | None = None
    target_port: int | None = None


@dataclass(frozen=True)
class SecretKeySelector:
    """core/v1 SecretKeySelector: one key of a Secret in the ModelDeployment's namespace."""

    name: str
    key: str


@dataclass(frozen=True)
class ClientSecretKeySelector(SecretKeySelector):
    """``oauthConfig.clientSecretRef``: a SecretKeySelector whose key defaults to
    ``clientSecret``, as the CRD (and the Beamlit controller) default it."""

    key: str = "clientSecret"


@dataclass(frozen=True)
class HeaderFromSecret:
    """A header set on offloaded requests whose value is read from a Secret (an API key)."""

    name: str
    secret_key_ref: SecretKeySelector


@dataclass(frozen=True)
class OAuthConfig:
    """OAuth2 client credentials for the remote backend."""

    client_id: str | None = None
    token_url: str | None = None
    client_secret_ref: ClientSecretKeySelector | None = None
    # The Beamlit controller's inline form; accepted, warned about.
    client_secret: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    type: str
    oauth_config: OAuthConfig | None = None


@dataclass(frozen=True)
class RemoteBackend:
    """Where offloaded requests go: ``scheme://host/pathPrefix`` + the original path.

    ``path_prefix`` is as written: ``$model`` in it stands for ``spec.model``
    (:func:`expand_path_prefix`).
    """

    host: str
    scheme: str = DEFAULT_SCHEME
    path_prefix: str | None = None
    headers_to_add: dict[str, str] = field(default_factory=dict)
    headers_from_secrets: tuple[HeaderFromSecret, ...] = ()
    auth_config: AuthConfig | None = None
    # PEM CA certificates that verify an https remote instead of the system's.
    ca_bundle: str | None = None


# pathPrefix variables, as the Beamlit controller substitutes them (plain text
# replacement, so "$models" is "<model>s" there too). Its "$workspace" is a Beamlit
# platform workspace, which does not exist here: validation refuses it, saying so.
PATH_PREFIX_MODEL = "$model"


def expand_path_prefix(prefix: str, model: str) -> str:
    """``pathPrefix`` with every ``$model`` replaced by ``model`` (``spec.model``).

    >>> expand_path_prefix("/v1/models/$model", "llama-3-8b")
    '/v1/models/llama-3-8b'
    """
    return prefix.replace(PATH_PREFIX_MODEL, model)


@dataclass(frozen=True)
class OffloadingBehavior:
    percentage: int = DEFAULT_PERCENTAGE
    sustain_seconds: int = DEFAULT_SUSTAIN_SECONDS
    cooldown_seconds: int = DEFAULT_COOLDOWN_SECONDS
    tolerance: float = DEFAULT_TOLERANCE
    # Offload `percentage` at all times, whatever the load; needs an empty metrics list.
    # Without it an empty metrics list never offloads (the Beamlit controller's meaning).
    static_split: bool = False
    # Spillover: while a pod already has this many requests in flight to its local
    # model, its sidecar sends further requests to the remote at once, whatever the
    # offloading decision. None: no spillover.
    spillover_in_flight: int | None = None
    # While no local replica is ready, the gateway holds each request up to this long for
    # one to become ready before sending it to the remote (0: to the remote at once).
    cold_start_hold_seconds: int = DEFAULT_COLD_START_HOLD_SECONDS


# --- autoscaling/v2 MetricSpec -------------------------------------------------


@dataclass(frozen=True)
class LabelSelectorRequirement:
    """One metav1.LabelSelectorRequirement: ``key``, ``operator`` (In, NotIn, Exists,
    DoesNotExist; validation refuses others) and ``values``."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        return False  # an operator validation refuses matches nothing


@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector: ``match_labels`` and ``match_expressions``, ANDed; an empty
    selector matches every label set.

    >>> LabelSelector({"app": "llm"}, (LabelSelectorRequirement("tier", "NotIn", ("gpu",)),)).matches(
    ...     {"app": "llm", "tier": "cpu"}
    ... )
    True
    """

    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        # Plain loops: this runs for every candidate of every admitted pod.
        for key, value in self.match_labels.items():
            if labels.get(key) != value:
                return False
        for requirement in self.match_expressions:
            if not requirement.matches(labels):
                return False
        return True


@dataclass(frozen=True)
class MetricTarget:
    type: str
    value: int | str | None = None
    average_value: int | str | None = None
    average_utilization: int | None = None


@dataclass(frozen=True)
class MetricIdentifier:
    name: str
    selector: LabelSelector | None = None


@dataclass(frozen=True)
class CrossVersionObjectReference:
    kind: str
    name: str
    api_version: str | None = None


@dataclass(frozen=True)
class ResourceMetricSource:
    name: str
    target: MetricTarget


@dataclass(frozen=True)
class ContainerResourceMetricSource:
    name: str
    container: str
    target: MetricTarget


@dataclass(frozen=True)
class PodsMetricSource:
    metric: MetricIdentifier
    target: MetricTarget


@dataclass(frozen=True)
class ObjectMetricSource:
    described_object: CrossVersionObjectReference
    metric: MetricIdentifier
    target: MetricTarget


@dataclass(frozen=True)
class ExternalMetricSource:
    metric: MetricIdentifier
    target: MetricTarget


@dataclass(frozen=True)
class MetricSpec:
    type: str
    resource: ResourceMetricSource | None = None
    container_resource: ContainerResourceMetricSource | None = None
    pods: PodsMetricSource | None = None
    object_: ObjectMetricSource | None = None
    external: ExternalMetricSource | None = None


# --- the spec -------------------------------------------------------------------


DEFAULT_MODEL_METRICS_PATH = "/metrics"
# Short enough to see a queue build within a second or two, long enough that parsing the
# few gauges asked for costs the sidecar nothing noticeable.
DEFAULT_MODEL_METRICS_INTERVAL = 1.0


@dataclass(frozen=True)
class ModelMetrics:
    """Where each sidecar reads its model server's Prometheus gauges, on localhost.

    ``port`` None: the model's own port (vLLM, TGI and SGLang serve /metrics there).
    ``gauges``: gauge names served to ``Pods`` metrics besides the well-known ones
    (crds/signals.py).
    """

    port: int | None = None
    path: str = DEFAULT_MODEL_METRICS_PATH
    interval_seconds: float = DEFAULT_MODEL_METRICS_INTERVAL
    gauges: tuple[str, ...] = ()


@dataclass(frozen=True)
class OffloadingConfig:
    remote_backend: RemoteBackend | None = None
    behavior: OffloadingBehavior = field(default_factory=OffloadingBehavior)
    metrics: tuple[MetricSpec, ...] = ()
    model_metrics: ModelMetrics | None = None


@dataclass(frozen=True)
class ModelDeploymentSpec:
    model: str
    model_source_ref: WorkloadReference
    enabled: bool = True
    environment: str = DEFAULT_ENVIRONMENT
    service_ref: ServiceReference | None = None
    offloading_config: OffloadingConfig | None = None
    # Accepted for compatibility with the Beamlit controller; unused here.
    metric_service_ref: ServiceReference | None = None
    policies: tuple[dict[str, Any], ...] = ()
    serverless_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelDeployment:
    """What the webhook and the sidecar need of one ModelDeployment object."""

    name: str
    namespace: str
    spec: ModelDeploymentSpec
    generation: int = 0
    resource_version: str = ""

    @property
    def workload_namespace(self) -> str:
        return self.spec.model_source_ref.namespace or self.namespace

    @property
    def service_namespace(self) -> str:
        ref = self.spec.service_ref
        return (ref.namespace if ref else None) or self.namespace


def parse_spec(data: Any) -> tuple[ModelDeploymentSpec | None, list[FieldError]]:
    """Structural decoding of ``spec`` (types, required and unknown fields, defaults)."""
    return decode(ModelDeploymentSpec, data, "spec")


def parse_object(obj: Any) -> tuple[ModelDeployment | None, list[FieldError]]:
    """Decode a whole ModelDeployment object (as the API server or a file gives it)."""
    model, errors, _ = parse_object_partial(obj)
    return (None, errors) if errors else (model, [])


def parse_object_partial(obj: Any) -> tuple[ModelDeployment | None, list[FieldError], list[str]]:
    """:func:`parse_object` as far as the object decodes: (model, errors, replaced paths),
    the model's spec as :func:`crds.decode.decode_partial` gives it. None when the spec
    cannot be built, or the namespace the rules compare against is unknown."""
    if not isinstance(obj, dict):
        return None, [FieldError("<root>", "must be an object")], []
    errors: list[FieldError] = []
    if obj.get("apiVersion") not in (None, API_VERSION):
        errors.append(FieldError("apiVersion", f"must be {API_VERSION}, got {obj.get('apiVersion')!r}"))
    if obj.get("kind") not in (None, KIND):
        errors.append(FieldError("kind", f"must be {KIND}, got {obj.get('kind')!r}"))
    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        errors.append(FieldError("metadata", f"must be an object, got {type_name(meta)}"))
        meta = {}
    # A field of the wrong type is named as such, not as missing.
    wrong = [k for k in ("name", "generateName", "namespace") if not isinstance(meta.get(k) or "", str)]
    for key in wrong:
        errors.append(FieldError(f"metadata.{key}", f"must be a string, got {type_name(meta[key])}"))
    name = next((meta[k] for k in ("name", "generateName") if k not in wrong and meta.get(k)), "")
    if not name and "name" not in wrong and "generateName" not in wrong:
        errors.append(FieldError("metadata.name", "required field is missing"))
    namespace = meta.get("namespace") or "default"
    known_namespace = isinstance(namespace, str) and isinstance(obj.get("metadata", {}), dict)
    generation = meta.get("generation") or 0
    if not isinstance(generation, int) or isinstance(generation, bool):
        errors.append(FieldError("metadata.generation", f"must be an integer, got {type_name(generation)}"))
        generation = 0
    spec, spec_errors, replaced = decode_partial(ModelDeploymentSpec, obj.get("spec"), "spec")
    errors.extend(spec_errors)
    if spec is None or not known_namespace:
        return None, errors, replaced
    model = ModelDeployment(
        name=name,
        namespace=str(namespace),
        spec=spec,
        generation=generation,
        resource_version=str(meta.get("resourceVersion") or ""),
    )
    return model, errors, replaced
