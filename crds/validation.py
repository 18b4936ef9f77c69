"""Validation of ModelDeployments beyond what the CRD schema can express.

``validate_object`` takes the object as JSON data (from an AdmissionReview or a
file) and returns every error, each with its field path, plus warnings for
input that is legal but probably not what the user meant. The same function
serves the validating webhook, the sidecar (which treats an invalid object as
absent) and standalone mode.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from crds.addresses import host_refusal
from crds.decode import FieldError, decode, touches
from crds.model import (
    MAX_COLD_START_HOLD_SECONDS,
    AuthConfig,
    LabelSelector,
    MetricSpec,
    MetricTarget,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelMetrics,
    OffloadingBehavior,
    OffloadingConfig,
    RemoteBackend,
    expand_path_prefix,
    parse_object_partial,
)
from crds.quantity import parse_quantity
from crds.signals import (
    METRIC_NAME,
    SIDECAR_SIGNALS,
    SIGNAL_PREFIX,
    describe_local_names,
    served_locally,
)


@dataclass(frozen=True)
class ValidationSettings:
    """What the installation adds to the rules."""

    # The installation's default remote backend (as the Beamlit controller has one):
    # a ModelDeployment without remoteBackend offloads there. See parse_remote_backend.
    default_remote_backend: RemoteBackend | None = None


@dataclass(frozen=True)
class ValidationResult:
    model: ModelDeployment | None
    errors: tuple[FieldError, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    def message(self) -> str:
        """All errors in one line, as the API server shows a denial."""
        return "; ".join(str(e) for e in self.errors)


def validate_object(obj: Any, settings: ValidationSettings = ValidationSettings()) -> ValidationResult:
    """Every error and warning of one object. The model returned is the one in force:
    without its own remoteBackend it carries the installation's default (when there is one).

    An object with fields of the wrong type still gets the rules' errors for the rest of it
    (the whole list at once, as ``kubectl apply`` shows it): the rules run on the object as
    if those fields were absent, and what they find in the object holding such a field (a
    rule may compare it with its siblings: caBundle with scheme) or above it is left out,
    being about the stand-in default, not the data."""
    model, decode_errors, replaced = parse_object_partial(obj)
    if decode_errors:
        if model is None:
            return ValidationResult(None, tuple(decode_errors), ())
        unsure = [_holder(path) for path in replaced]
        rules = [
            f
            for f in _check_spec(model.spec, model.namespace, settings)
            if isinstance(f, FieldError) and not any(touches(f.path, path) for path in unsure)
        ]
        return ValidationResult(None, tuple(decode_errors + rules), ())
    assert model is not None
    found = list(_check_spec(model.spec, model.namespace, settings))
    errors = [f for f in found if isinstance(f, FieldError)]
    warnings = [f for f in found if isinstance(f, str)]
    if errors:
        return ValidationResult(None, tuple(errors), tuple(warnings))
    return ValidationResult(with_default_backend(model, settings.default_remote_backend), (), tuple(warnings))


def _holder(field_path: str) -> str:
    """The object a field is in (``spec.a.b`` -> ``spec.a``); a field of spec itself stands
    for itself, so that one broken top-level field does not hide the rules' whole list."""
    holder = field_path.rsplit(".", 1)[0]
    return field_path if holder == "spec" else holder


def with_default_backend(model: ModelDeployment, default: RemoteBackend | None) -> ModelDeployment:
    """``model`` with ``default`` as its remoteBackend when it has an offloadingConfig without one."""
    config = model.spec.offloading_config
    if default is None or config is None or config.remote_backend is not None:
        return model
    spec = replace(model.spec, offloading_config=replace(config, remote_backend=default))
    return replace(model, spec=spec)


def parse_remote_backend(text: str, path: str = "defaultRemoteBackend") -> RemoteBackend:
    """The installation's default remote backend, given as a URL or as a RemoteBackend in JSON.

    ``http://host[:port][/pathPrefix]`` (``https://`` verifies with the system CAs), or
    ``{"host": "...", "scheme": "https", "headersToAdd": {...}, ...}`` with the fields of
    ``spec.offloadingConfig.remoteBackend``. Raises ValueError naming ``path`` and the field
    at fault.
    """
    text = text.strip()
    if not text:
        raise ValueError(f"{path}: must not be empty")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at character {exc.pos})") from None
        backend, errors = decode(RemoteBackend, data, path)
        if backend is None or errors:
            raise ValueError("; ".join(str(e) for e in errors))
    else:
        try:
            url = urlsplit(text)
        except ValueError:  # an unclosed IPv6 bracket
            url = urlsplit("")
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(
                f"{path}: must be a URL such as http://host:port/prefix or a JSON RemoteBackend, got {text!r}"
            )
        if url.query or url.fragment or "?" in text or "#" in text:
            raise ValueError(f"{path}: must not have a query or fragment, got {text!r}")
        prefix = url.path.rstrip("/") or None
        backend = RemoteBackend(host=url.netloc, scheme=url.scheme, path_prefix=prefix)
    problems = [str(f) for f in _check_remote_backend(path, backend, None, "") if isinstance(f, FieldError)]
    if problems:
        raise ValueError("; ".join(problems))
    return backend


Finding = FieldError | str  # a str is a warning


# --- the spec ---------------------------------------------------------------------

SUPPORTED_WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def _check_spec(spec: ModelDeploymentSpec, namespace: str, settings: ValidationSettings) -> Iterator[Finding]:
    if not spec.model.strip():
        yield FieldError("spec.model", "must not be empty")

    ref = spec.model_source_ref
    if ref.api_version != "apps/v1":
        yield FieldError("spec.modelSourceRef.apiVersion", f"must be apps/v1, got {ref.api_version!r}")
    if ref.kind not in SUPPORTED_WORKLOAD_KINDS:
        yield FieldError(
            "spec.modelSourceRef.kind",
            f"must be one of {', '.join(SUPPORTED_WORKLOAD_KINDS)}, got {ref.kind!r}",
        )
    yield from _check_name("spec.modelSourceRef.name", ref.name)
    yield from _check_same_namespace("spec.modelSourceRef.namespace", ref.namespace, namespace)

    service = spec.service_ref
    if service is not None:
        yield from _check_name("spec.serviceRef.name", service.name)
        yield from _check_same_namespace("spec.serviceRef.namespace", service.namespace, namespace)
        if service.target_port is not None and not 1 <= service.target_port <= 65535:
            yield FieldError(
                "spec.serviceRef.targetPort", f"must be between 1 and 65535, got {service.target_port}"
            )

    config = spec.offloading_config
    if config is None:
        return
    base = "spec.offloadingConfig"
    behavior = config.behavior
    yield from _check_behavior(f"{base}.behavior", behavior)
    if config.model_metrics is not None:
        yield from _check_model_metrics(f"{base}.modelMetrics", config.model_metrics)
    for i, metric in enumerate(config.metrics):
        yield from _check_metric(f"{base}.metrics[{i}]", metric, config)
    spill = behavior.spillover_in_flight
    if spill is not None and config.remote_backend is None and settings.default_remote_backend is None:
        yield FieldError(
            f"{base}.behavior.spilloverInFlight",
            "needs a remoteBackend: this installation has no default remote backend to spill over to",
        )
    if behavior.static_split and config.metrics:
        yield FieldError(
            f"{base}.behavior.staticSplit",
            "must not be true when metrics are set: a static split offloads whatever the load "
            "(remove the metrics, or staticSplit)",
        )
    if config.remote_backend is not None:
        yield from _check_remote_backend(f"{base}.remoteBackend", config.remote_backend, spec, namespace)
    elif (config.metrics or behavior.static_split) and settings.default_remote_backend is None:
        what = "metrics are set" if config.metrics else "staticSplit is true"
        yield FieldError(
            f"{base}.remoteBackend",
            f"required when {what}: this installation has no default remote backend to offload to",
        )
    elif settings.default_remote_backend is not None and settings.default_remote_backend.path_prefix:
        # $model in the default's pathPrefix becomes this spec.model.
        for finding in _check_path_prefix("", settings.default_remote_backend.path_prefix, spec.model):
            if isinstance(finding, FieldError):
                yield FieldError(
                    "spec.model", f"in the default remote backend's pathPrefix: {finding.message}"
                )
    if behavior.static_split:
        yield (
            f"{base}.behavior.staticSplit is true: {behavior.percentage}% of requests "
            "are offloaded at all times, whatever the load"
        )
    elif not config.metrics:
        yield (
            f"{base}.metrics is empty: no request is offloaded while the workload has a ready "
            "replica; set behavior.staticSplit: true to offload at all times"
        )


def _check_same_namespace(path: str, given: str | None, namespace: str) -> Iterator[Finding]:
    if given and given != namespace:
        yield FieldError(path, f"must be the ModelDeployment's own namespace {namespace!r}, got {given!r}")


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _check_name(path: str, name: str) -> Iterator[Finding]:
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        yield FieldError(path, f"must be a lowercase RFC 1123 name, got {name!r}")


def _check_behavior(path: str, behavior: OffloadingBehavior) -> Iterator[Finding]:
    if not 0 <= behavior.percentage <= 100:
        yield FieldError(f"{path}.percentage", f"must be between 0 and 100, got {behavior.percentage}")
    elif behavior.percentage == 0:
        yield f"{path}.percentage is 0: no request will ever be offloaded"
    for name, value in (
        ("sustainSeconds", behavior.sustain_seconds),
        ("cooldownSeconds", behavior.cooldown_seconds),
    ):
        if not 0 <= value <= 3600:
            yield FieldError(f"{path}.{name}", f"must be between 0 and 3600, got {value}")
    if not 0 <= behavior.tolerance <= 1:
        yield FieldError(f"{path}.tolerance", f"must be between 0 and 1, got {behavior.tolerance}")
    spill = behavior.spillover_in_flight
    if spill is not None and not 1 <= spill <= MAX_SPILLOVER_IN_FLIGHT:
        yield FieldError(
            f"{path}.spilloverInFlight", f"must be between 1 and {MAX_SPILLOVER_IN_FLIGHT}, got {spill}"
        )
    elif spill is not None and behavior.percentage == 0:
        yield (
            f"{path}.spilloverInFlight is set with percentage 0: only the requests over "
            f"{spill} in flight per pod are offloaded"
        )
    hold = behavior.cold_start_hold_seconds
    if not 0 <= hold <= MAX_COLD_START_HOLD_SECONDS:
        yield FieldError(
            f"{path}.coldStartHoldSeconds", f"must be between 0 and {MAX_COLD_START_HOLD_SECONDS}, got {hold}"
        )


MAX_SPILLOVER_IN_FLIGHT = 100_000
MAX_MODEL_GAUGES = 32
MODEL_METRICS_INTERVAL = (0.1, 60.0)  # seconds between scrapes, lowest and highest
# What a path may hold: visible ASCII, no space (it is sent as the request target).
_REQUEST_PATH = re.compile(r"/[!-~]*")
# A target starting with // reads as //authority/path (a network-path reference, RFC 3986
# 4.2) to some servers and frameworks: another host than the one connected to.
_NETWORK_PATH = "must not start with '//' (some servers read what follows as a host)"


def _check_model_metrics(path: str, config: ModelMetrics) -> Iterator[Finding]:
    if config.port is not None and not 1 <= config.port <= 65535:
        yield FieldError(f"{path}.port", f"must be between 1 and 65535, got {config.port}")
    if len(config.path) > 1024 or not _REQUEST_PATH.fullmatch(config.path) or "#" in config.path:
        yield FieldError(
            f"{path}.path",
            f"must start with / and hold visible ASCII only, without # (at most 1024), got {config.path!r}",
        )
    elif config.path.startswith("//"):
        yield FieldError(f"{path}.path", f"{_NETWORK_PATH}, got {config.path!r}")
    low, high = MODEL_METRICS_INTERVAL
    if not low <= config.interval_seconds <= high:
        yield FieldError(
            f"{path}.intervalSeconds",
            f"must be between {low:g} and {high:g}, got {config.interval_seconds:g}",
        )
    if len(config.gauges) > MAX_MODEL_GAUGES:
        yield FieldError(
            f"{path}.gauges", f"must have at most {MAX_MODEL_GAUGES} names, got {len(config.gauges)}"
        )
    seen: set[str] = set()
    for i, name in enumerate(config.gauges):
        if not METRIC_NAME.fullmatch(name):
            yield FieldError(f"{path}.gauges[{i}]", f"must be a Prometheus metric name, got {name!r}")
        elif name in seen:
            yield FieldError(f"{path}.gauges[{i}]", f"{name!r} is listed twice")
        seen.add(name)


# --- remote backend ---------------------------------------------------------------

# RFC 9110 token characters: what a header field name may contain.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Fields that describe one connection (RFC 9110 7.6.1) or framing: the proxy
# owns them, so a user-supplied value would break or smuggle requests.
FORBIDDEN_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def _check_remote_backend(
    path: str, backend: RemoteBackend, spec: ModelDeploymentSpec | None, namespace: str
) -> Iterator[Finding]:
    host_errors = list(check_host(backend.host))
    for message in host_errors:
        yield FieldError(f"{path}.host", message)
    if (
        not host_errors
        and spec is not None
        and spec.service_ref is not None
        and _is_same_service(backend.host, spec.service_ref.name, spec.service_ref.namespace or namespace)
    ):
        yield FieldError(
            f"{path}.host",
            f"{backend.host!r} is the captured Service {spec.service_ref.name!r} itself: "
            "offloaded requests would loop back to this model",
        )
    if backend.scheme not in ("http", "https"):
        yield FieldError(f"{path}.scheme", f"must be http or https, got {backend.scheme!r}")
    if backend.path_prefix is not None:
        # The installation's default is checked alone with a stand-in model name, and
        # again with each ModelDeployment's own (_check_spec).
        model = spec.model if spec is not None else "model"
        yield from _check_path_prefix(f"{path}.pathPrefix", backend.path_prefix, model)
    for name, value in backend.headers_to_add.items():
        yield from check_header(f"{path}.headersToAdd[{name}]", name, value)
    seen = {name.lower() for name in backend.headers_to_add}
    for i, header in enumerate(backend.headers_from_secrets):
        sub = f"{path}.headersFromSecrets[{i}]"
        yield from check_header(f"{sub}.name", header.name, "")
        if header.name.lower() in seen:
            yield FieldError(f"{sub}.name", f"{header.name} is already set by another header of this backend")
        seen.add(header.name.lower())
        yield from _check_name(f"{sub}.secretKeyRef.name", header.secret_key_ref.name)
        yield from _check_secret_key(f"{sub}.secretKeyRef.key", header.secret_key_ref.key)
    if backend.ca_bundle is not None:
        yield from _check_ca_bundle(f"{path}.caBundle", backend.ca_bundle, backend.scheme)
    if backend.auth_config is not None:
        yield from _check_auth(f"{path}.authConfig", backend.auth_config, backend.scheme)


def check_host(host: str) -> Iterator[str]:
    """Problems with a ``host[:port]`` authority (no scheme, path or userinfo)."""
    if not host:
        yield "must not be empty"
        return
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in host):
        yield f"must not contain whitespace or control characters, got {host!r}"
        return
    if "://" in host:
        yield f"must be host[:port] without a scheme (set scheme instead), got {host!r}"
        return
    for char, what in (
        ("@", "userinfo"),
        ("/", "a path (set pathPrefix instead)"),
        ("?", "a query"),
        ("#", "a fragment"),
    ):
        if char in host:
            yield f"must be host[:port] without {what}, got {host!r}"
            return
    name, port = _split_host_port(host)
    if name is None:
        yield f"IPv6 addresses must be in brackets, as [addr]:port, got {host!r}"
        return
    if port is not None and parse_port(port) is None:
        yield f"port must be a number between 1 and 65535, got {port!r}"
    if name.startswith("["):
        try:
            if not name.endswith("]"):
                raise ValueError(name)
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            yield f"{name!r} is not a valid IPv6 address"
            return
        yield from _check_not_metadata(name)
        return
    if not name:
        yield f"must name a host, got {host!r}"
        return
    if not name.isascii():  # before lower(): the Kelvin sign lowers to 'k'
        yield f"{name!r} is not ASCII (write an internationalised name in its xn-- form)"
        return
    lowered = name.lower().rstrip(".")
    labels = lowered.split(".")
    if len(lowered) > 253 or not all(len(label) <= 63 and _DNS_LABEL.fullmatch(label) for label in labels):
        yield f"{name!r} is not a valid DNS name or IP address"
        return
    yield from _check_not_metadata(name)


def _check_not_metadata(name: str) -> Iterator[str]:
    """A link-local or cloud metadata address is refused (crds.addresses): the shared
    stand-in gateway would call it with the installation's network identity."""
    reason = host_refusal(name)
    if reason is not None:
        yield f"{reason}: a remote may not be a link-local or cloud metadata address"


_PORT_DIGITS = re.compile(r"[0-9]{1,5}")


def parse_port(text: str) -> int | None:
    """``text`` as a TCP port (1 to 65535), written in 1 to 5 ASCII digits; None otherwise.

    Not ``str.isdigit``: it accepts '²' (which ``int`` refuses) and other scripts' digits
    ('١٨٠٠٢', which ``int`` reads as 18002 but a URL or a socket address cannot carry)."""
    if not _PORT_DIGITS.fullmatch(text):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def _split_host_port(host: str) -> tuple[str | None, str | None]:
    """``name:port`` -> (name, port); (None, None) for an unbracketed IPv6 address."""
    if host.startswith("["):
        end = host.find("]")
        if end == -1:
            return host, None
        rest = host[end + 1 :]
        if rest.startswith(":"):
            return host[: end + 1], rest[1:]
        return host[: end + 1], (rest or None)
    if host.count(":") > 1:
        return None, None
    name, sep, port = host.partition(":")
    return name, (port if sep else None)


def _is_same_service(host: str, service: str, namespace: str) -> bool:
    name, _ = _split_host_port(host)
    parts = (name or "").lower().rstrip(".").split(".")
    if parts[0] != service:
        return False
    if len(parts) == 1:
        return True  # resolved in the pod's own namespace
    return parts[1] == namespace and (len(parts) == 2 or parts[2] == "svc")


_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*|\{[^}]*\}?)?")


def _check_path_prefix(path: str, written: str, model: str) -> Iterator[Finding]:
    """``written`` is the pathPrefix as written; the rules apply once ``$model`` is
    replaced by ``model`` (spec.model), as the proxy sends it."""
    for match in _VARIABLE.finditer(written.replace("$model", "")):
        name = match[0]
        if name == "$workspace":
            yield FieldError(
                path,
                "$workspace (the Beamlit platform's workspace) has no value here: write the "
                f"workspace's name instead, got {written!r}",
            )
        else:
            what = f"unknown variable {name!r}" if name != "$" else "a '$' without a variable name"
            yield FieldError(
                path,
                f"{what}: only $model (spec.model) is replaced; write a literal $ as %24, got {written!r}",
            )
    prefix = expand_path_prefix(written, model)
    got = f"{prefix!r} ($model replaced by spec.model)" if prefix != written else repr(prefix)
    if not prefix.startswith("/"):
        yield FieldError(path, f"must start with '/', got {got}")
    elif prefix.startswith("//"):
        yield FieldError(path, f"{_NETWORK_PATH}, got {got}")
    if "?" in prefix or "#" in prefix:
        yield FieldError(path, f"must not contain a query or fragment, got {got}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        yield FieldError(path, f"must not contain whitespace or control characters, got {got}")
    elif not prefix.isascii():
        yield FieldError(path, f"must be ASCII (percent-encode other characters), got {got}")
    if "\\" in prefix or any(segment in (".", "..") for segment in prefix.split("/")):
        yield FieldError(path, f"must not contain '.' or '..' segments or backslashes, got {got}")


def check_header(path: str, name: str, value: str) -> Iterator[FieldError]:
    """A header the proxy adds to remote requests: an RFC 9110 token for a name, not one the
    proxy owns (:data:`FORBIDDEN_HEADERS`), and a value that cannot end the field or the head."""
    if not _FIELD_NAME.fullmatch(name):
        yield FieldError(path, f"{name!r} is not a valid HTTP header name")
    elif name.lower() in FORBIDDEN_HEADERS:
        yield FieldError(path, f"{name} is managed by the proxy and cannot be set")
    if any(c in value for c in "\r\n\0"):
        yield FieldError(path, "value must not contain CR, LF or NUL")
    elif any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F or ord(c) > 0xFF for c in value):
        # RFC 9110 field values: visible characters, spaces, tabs and obs-text (latin-1).
        yield FieldError(path, "value must hold only visible characters, spaces and tabs (latin-1)")


_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _check_secret_key(path: str, key: str) -> Iterator[Finding]:
    # Kubernetes refuses ".", ".." and "..x" too: they would climb out of a mounted Secret.
    if len(key) > 253 or not _SECRET_KEY.fullmatch(key) or key == "." or key.startswith(".."):
        yield FieldError(
            path, f"must be a Secret key (letters, digits, '-', '_', '.', not '..'), got {key!r}"
        )


def _check_ca_bundle(path: str, pem: str, scheme: str) -> Iterator[Finding]:
    if scheme != "https":
        yield FieldError(path, f"applies only to an https remote backend (scheme is {scheme})")
    if "-----BEGIN CERTIFICATE-----" not in pem:
        yield FieldError(path, "must hold PEM-encoded certificates (-----BEGIN CERTIFICATE-----)")
        return
    if not pem.isascii():  # ssl raises TypeError on it
        yield FieldError(path, "must hold PEM-encoded certificates, which are ASCII")
        return
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        yield FieldError(path, f"is not a valid PEM certificate bundle ({exc.__class__.__name__})")


def _check_auth(path: str, auth: AuthConfig, scheme: str) -> Iterator[Finding]:
    if auth.type != "oauth":
        yield FieldError(f"{path}.type", f"must be oauth, got {auth.type!r}")
        return
    oauth = auth.oauth_config
    if oauth is None:
        yield FieldError(f"{path}.oauthConfig", "required when type is oauth")
        return
    base = f"{path}.oauthConfig"
    if not oauth.client_id:
        yield FieldError(f"{base}.clientId", "required field is missing")
    if not oauth.token_url:
        yield FieldError(f"{base}.tokenUrl", "required field is missing")
    else:
        yield from _check_token_url(f"{base}.tokenUrl", oauth.token_url)
    if oauth.client_secret_ref is None and not oauth.client_secret:
        yield FieldError(f"{base}.clientSecretRef", "required field is missing")
    elif oauth.client_secret_ref is not None and oauth.client_secret:
        yield FieldError(f"{base}.clientSecret", "must not be set together with clientSecretRef")
    elif oauth.client_secret:
        yield f"{base}.clientSecret stores a secret in clear in the ModelDeployment; use clientSecretRef"
    if oauth.client_secret_ref is not None:
        yield from _check_name(f"{base}.clientSecretRef.name", oauth.client_secret_ref.name)
        yield from _check_secret_key(f"{base}.clientSecretRef.key", oauth.client_secret_ref.key)
    if scheme == "http":
        yield f"{path}: the access token is sent to the remote backend over plain http"


def _check_token_url(path: str, text: str) -> Iterator[Finding]:
    """An https URL the sidecar can POST to: its target goes into a request line, where
    whitespace or a control character would split or mangle it (urlsplit drops CR and LF
    silently), and its authority must be a host[:port] (urlsplit raises on a bad port)."""
    if not _VISIBLE_ASCII.fullmatch(text):
        yield FieldError(
            path,
            "must hold visible ASCII only, without whitespace or control characters "
            f"(percent-encode others), got {text!r}",
        )
        return
    try:
        url = urlsplit(text)
    except ValueError:  # an unclosed IPv6 bracket
        url = None
    if url is None or url.scheme != "https" or not url.netloc:
        yield FieldError(path, f"must be an https URL, got {text!r}")
        return
    for message in check_host(url.netloc):
        yield FieldError(path, f"its authority: {message}")
    if url.path.startswith("//"):
        yield FieldError(path, f"its path must not start with '//', got {text!r}")


_VISIBLE_ASCII = re.compile(r"[!-~]+")


# --- metrics ----------------------------------------------------------------------

# Which member each metric type sets, and which target types it admits (as the
# HorizontalPodAutoscaler admits them).
METRIC_MEMBERS = {
    "Resource": ("resource", ("Utilization", "AverageValue")),
    "ContainerResource": ("containerResource", ("Utilization", "AverageValue")),
    "Pods": ("pods", ("AverageValue",)),
    "Object": ("object", ("Value", "AverageValue")),
    "External": ("external", ("Value", "AverageValue")),
}
SUPPORTED_RESOURCES = ("cpu", "memory")


def _check_metric(path: str, metric: MetricSpec, config: OffloadingConfig | None = None) -> Iterator[Finding]:
    members = {
        "resource": metric.resource,
        "containerResource": metric.container_resource,
        "pods": metric.pods,
        "object": metric.object_,
        "external": metric.external,
    }
    given = [name for name, value in members.items() if value is not None]
    if metric.type not in METRIC_MEMBERS:
        yield FieldError(
            f"{path}.type",
            f"metric type {metric.type!r} cannot be evaluated by the sidecar; "
            f"supported: {', '.join(METRIC_MEMBERS)}",
        )
        return
    member, target_types = METRIC_MEMBERS[metric.type]
    if member not in given:
        yield FieldError(f"{path}.{member}", f"required when type is {metric.type}")
    for other in given:
        if other != member:
            yield FieldError(f"{path}.{other}", f"must not be set when type is {metric.type}")
    source = members[member]
    if source is None:
        return
    sub = f"{path}.{member}"
    if metric.resource is not None and member == "resource":
        yield from _check_resource_name(f"{sub}.name", metric.resource.name)
    if metric.container_resource is not None and member == "containerResource":
        yield from _check_resource_name(f"{sub}.name", metric.container_resource.name)
        if not metric.container_resource.container:
            yield FieldError(f"{sub}.container", "must not be empty")
    identifier = getattr(source, "metric", None)
    if identifier is not None:
        if not identifier.name:
            yield FieldError(f"{sub}.metric.name", "must not be empty")
        if identifier.selector is not None:
            yield from _check_selector(f"{sub}.metric.selector", identifier.selector)
    if metric.pods is not None and member == "pods" and identifier is not None and identifier.name:
        local = served_locally(identifier.name, config)
        extra = config.model_metrics.gauges if config is not None and config.model_metrics else ()
        if local is not None:
            # Served by the sidecars: the workload's total (Value) is as meaningful as the average.
            target_types = LOCAL_POD_TARGETS
            if local == "sidecar" and identifier.selector is not None:
                yield FieldError(
                    f"{sub}.metric.selector",
                    f"must not be set for {identifier.name!r}: the sidecar's own signal has one series",
                )
        elif identifier.name.startswith(SIGNAL_PREFIX):
            yield FieldError(
                f"{sub}.metric.name",
                f"{identifier.name!r} is not a signal the sidecar measures; it measures "
                f"{', '.join(sorted(SIDECAR_SIGNALS))}",
            )
        else:
            yield (
                f"{sub}.metric.name: {identifier.name!r} is read from the custom metrics API "
                "(custom.metrics.k8s.io, served by a metrics adapter); served by the sidecars "
                f"themselves: {describe_local_names(extra)}"
            )
    yield from _check_target(f"{sub}.target", source.target, target_types)


# Target types of a Pods metric the sidecars serve (the HPA's Pods metrics admit AverageValue only).
LOCAL_POD_TARGETS = ("AverageValue", "Value")


def _check_resource_name(path: str, name: str) -> Iterator[Finding]:
    if name not in SUPPORTED_RESOURCES:
        yield FieldError(path, f"must be one of {', '.join(SUPPORTED_RESOURCES)}, got {name!r}")


def _check_target(path: str, target: MetricTarget, allowed: tuple[str, ...]) -> Iterator[Finding]:
    if target.type not in allowed:
        yield FieldError(
            f"{path}.type", f"must be one of {', '.join(allowed)} for this metric, got {target.type!r}"
        )
        return
    values = {
        "averageUtilization": target.average_utilization,
        "averageValue": target.average_value,
        "value": target.value,
    }
    wanted = {"Utilization": "averageUtilization", "AverageValue": "averageValue", "Value": "value"}[
        target.type
    ]
    for name, value in values.items():
        if name != wanted and value is not None:
            yield FieldError(f"{path}.{name}", f"must not be set when type is {target.type}")
    value = values[wanted]
    if value is None:
        yield FieldError(f"{path}.{wanted}", f"required when type is {target.type}")
    elif wanted == "averageUtilization":
        assert isinstance(value, int)
        if value <= 0:
            yield FieldError(f"{path}.{wanted}", f"must be a positive percentage, got {value}")
    else:
        try:
            quantity = parse_quantity(value)
        except ValueError:
            yield FieldError(f"{path}.{wanted}", f"must be a quantity such as 500m or 2, got {value!r}")
        else:
            if quantity <= 0:
                yield FieldError(f"{path}.{wanted}", f"must be positive, got {value!r}")


_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _check_selector(path: str, selector: LabelSelector) -> Iterator[Finding]:
    for i, req in enumerate(selector.match_expressions):
        sub = f"{path}.matchExpressions[{i}]"
        if req.operator in ("In", "NotIn") and not req.values:
            yield FieldError(f"{sub}.values", f"must be non-empty when operator is {req.operator}")
        elif req.operator in ("Exists", "DoesNotExist") and req.values:
            yield FieldError(f"{sub}.values", f"must be empty when operator is {req.operator}")
        elif req.operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            yield FieldError(
                f"{sub}.operator", f"must be one of In, NotIn, Exists, DoesNotExist, got {req.operator!r}"
            )
    for key, value in selector.match_labels.items():
        if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            yield FieldError(f"{path}.matchLabels[{key}]", f"{value!r} is not a valid label value")
