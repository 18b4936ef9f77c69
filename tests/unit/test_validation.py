"""Validation of ModelDeployments: every error, with its field path, at once."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from certs.issue import issue_ca
from crds.decode import touches
from crds.validation import ValidationSettings, check_host, parse_remote_backend, validate_object
from tests import modeldeployments as md

DATA = Path(__file__).parents[1] / "testdata" / "modeldeployments"
TUTORIAL = md.tutorial()
BEAMLIT_SAMPLE = yaml.safe_load((DATA / "beamlit-sample.yaml").read_text())

RB = "spec.offloadingConfig.remoteBackend"
MET = "spec.offloadingConfig.metrics[0]"
OAUTH_OK = {
    "type": "oauth",
    "oauthConfig": {
        "clientId": "offloader",
        "tokenUrl": "https://auth.example.com/oauth/token",
        "clientSecretRef": {"name": "remote-credentials"},
    },
}

TOKEN_URL = f"{RB}.authConfig.oauthConfig.tokenUrl"


def oauth(**config: Any) -> dict[str, Any]:
    """OAUTH_OK with oauthConfig's fields changed."""
    return {**OAUTH_OK, "oauthConfig": {**OAUTH_OK["oauthConfig"], **config}}


def edited(**changes: Any) -> dict[str, Any]:
    """The tutorial's ModelDeployment in namespace default with edits: ``spec__model="x"``
    sets spec.model (``__`` separates the path's keys), None deletes the field."""
    paths = {key.replace("__", "."): value for key, value in changes.items()}
    return md.variant(
        changes={"metadata.namespace": "default", **{p: v for p, v in paths.items() if v is not None}},
        remove=[path for path, value in paths.items() if value is None],
    )


def metric(member: str, body: dict[str, Any], type_: str | None = None) -> list[dict[str, Any]]:
    return [{"type": type_ or member[0].upper() + member[1:], member: body}]


CA_PEM = issue_ca("remote-ca", now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), days=30).cert_pem.decode()
CPU_50 = {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}
EXTERNAL = {"metric": {"name": "queue_depth"}, "target": {"type": "Value", "value": "30"}}

SPEC = "spec"
OC = "spec__offloadingConfig"
RBK = f"{OC}__remoteBackend"

INVALID: list[tuple[str, dict[str, Any], str]] = [
    # id, edits, expected path at fault
    ("model missing", {f"{SPEC}__model": None}, "spec.model"),
    ("model empty", {f"{SPEC}__model": " "}, "spec.model"),
    ("model not a string", {f"{SPEC}__model": 12}, "spec.model"),
    # A YAML file (standalone --config) may have keys of other types; JSON cannot.
    ("header name not a string", {f"{RBK}__headersToAdd": {1: "x"}}, f"{RB}.headersToAdd[1]"),
    ("host with a Kelvin sign", {f"{RBK}__host": "\u212aube.example:80"}, f"{RB}.host"),
    ("enabled not a boolean", {f"{SPEC}__enabled": "yes"}, "spec.enabled"),
    ("unknown spec field", {f"{SPEC}__replicas": 3}, "spec.replicas"),
    ("modelSourceRef missing", {f"{SPEC}__modelSourceRef": None}, "spec.modelSourceRef"),
    ("workload kind", {f"{SPEC}__modelSourceRef__kind": "DaemonSet"}, "spec.modelSourceRef.kind"),
    (
        "workload apiVersion",
        {f"{SPEC}__modelSourceRef__apiVersion": "apps/v1beta1"},
        "spec.modelSourceRef.apiVersion",
    ),
    ("workload name", {f"{SPEC}__modelSourceRef__name": "Php_Apache"}, "spec.modelSourceRef.name"),
    ("workload elsewhere", {f"{SPEC}__modelSourceRef__namespace": "other"}, "spec.modelSourceRef.namespace"),
    ("service elsewhere", {f"{SPEC}__serviceRef__namespace": "other"}, "spec.serviceRef.namespace"),
    ("targetPort 0", {f"{SPEC}__serviceRef__targetPort": 0}, "spec.serviceRef.targetPort"),
    ("targetPort 70000", {f"{SPEC}__serviceRef__targetPort": 70000}, "spec.serviceRef.targetPort"),
    ("targetPort a string", {f"{SPEC}__serviceRef__targetPort": "http"}, "spec.serviceRef.targetPort"),
    ("percentage 150", {f"{OC}__behavior__percentage": 150}, "spec.offloadingConfig.behavior.percentage"),
    ("percentage -1", {f"{OC}__behavior__percentage": -1}, "spec.offloadingConfig.behavior.percentage"),
    ("percentage 50.5", {f"{OC}__behavior__percentage": 50.5}, "spec.offloadingConfig.behavior.percentage"),
    (
        "sustain too long",
        {f"{OC}__behavior__sustainSeconds": 86400},
        "spec.offloadingConfig.behavior.sustainSeconds",
    ),
    (
        "cooldown negative",
        {f"{OC}__behavior__cooldownSeconds": -5},
        "spec.offloadingConfig.behavior.cooldownSeconds",
    ),
    ("tolerance 2", {f"{OC}__behavior__tolerance": 2}, "spec.offloadingConfig.behavior.tolerance"),
    (
        "hold too long",
        {f"{OC}__behavior__coldStartHoldSeconds": 301},
        "spec.offloadingConfig.behavior.coldStartHoldSeconds",
    ),
    (
        "hold negative",
        {f"{OC}__behavior__coldStartHoldSeconds": -1},
        "spec.offloadingConfig.behavior.coldStartHoldSeconds",
    ),
    (
        "hold not an integer",
        {f"{OC}__behavior__coldStartHoldSeconds": "10s"},
        "spec.offloadingConfig.behavior.coldStartHoldSeconds",
    ),
    ("host with scheme", {f"{RBK}__host": "http://remote:80"}, f"{RB}.host"),
    ("host with path", {f"{RBK}__host": "remote:80/v1"}, f"{RB}.host"),
    ("host with userinfo", {f"{RBK}__host": "user:pw@remote"}, f"{RB}.host"),
    ("host with whitespace", {f"{RBK}__host": "remote host"}, f"{RB}.host"),
    ("host with newline", {f"{RBK}__host": "remote\r\nX: y"}, f"{RB}.host"),
    ("host port 0", {f"{RBK}__host": "remote:0"}, f"{RB}.host"),
    ("host port 65536", {f"{RBK}__host": "remote:65536"}, f"{RB}.host"),
    ("host port not a number", {f"{RBK}__host": "remote:http"}, f"{RB}.host"),
    # Only ASCII digits: '²'.isdigit() is true (int() refuses it), int() reads Arabic-Indic
    # digits as a port a URL cannot carry, and refuses more than 4300 digits.
    ("host port superscript", {f"{RBK}__host": "remote:\u00b2"}, f"{RB}.host"),
    ("host IPv6 port superscript", {f"{RBK}__host": "[fd00::1]:\u00b9"}, f"{RB}.host"),
    (
        "host port Arabic-Indic digits",
        {f"{RBK}__host": "127.0.0.1:\u0661\u0668\u0660\u0660\u0662"},
        f"{RB}.host",
    ),
    ("host port 5000 digits", {f"{RBK}__host": "remote:" + "9" * 5000}, f"{RB}.host"),
    ("host bare IPv6", {f"{RBK}__host": "fd00::1:8080"}, f"{RB}.host"),
    ("host bad IPv6", {f"{RBK}__host": "[fd00::zz]:80"}, f"{RB}.host"),
    ("host bad name", {f"{RBK}__host": "-remote-.example"}, f"{RB}.host"),
    ("host empty", {f"{RBK}__host": ""}, f"{RB}.host"),
    ("host with query", {f"{RBK}__host": "remote?x=1"}, f"{RB}.host"),
    ("loop to own service", {f"{RBK}__host": "php-apache:80"}, f"{RB}.host"),
    ("loop to own service FQDN", {f"{RBK}__host": "php-apache.default.svc.cluster.local"}, f"{RB}.host"),
    ("scheme ftp", {f"{RBK}__scheme": "ftp"}, f"{RB}.scheme"),
    ("pathPrefix relative", {f"{RBK}__pathPrefix": "v1"}, f"{RB}.pathPrefix"),
    ("pathPrefix with query", {f"{RBK}__pathPrefix": "/v1?a=b"}, f"{RB}.pathPrefix"),
    ("pathPrefix with fragment", {f"{RBK}__pathPrefix": "/v1#x"}, f"{RB}.pathPrefix"),
    ("header bad name", {f"{RBK}__headersToAdd": {"X Bad": "1"}}, f"{RB}.headersToAdd[X Bad]"),
    (
        "header CRLF value",
        {f"{RBK}__headersToAdd": {"X-Team": "a\r\nHost: evil"}},
        f"{RB}.headersToAdd[X-Team]",
    ),
    (
        "header value beyond latin-1",
        {f"{RBK}__headersToAdd": {"X-Key": "tök€n"}},
        f"{RB}.headersToAdd[X-Key]",
    ),
    (
        "header value with a control character",
        {f"{RBK}__headersToAdd": {"X-Key": "a\x01b"}},
        f"{RB}.headersToAdd[X-Key]",
    ),
    ("pathPrefix not ASCII", {f"{RBK}__pathPrefix": "/模型"}, f"{RB}.pathPrefix"),
    ("pathPrefix with dot segment", {f"{RBK}__pathPrefix": "/v1/../admin"}, f"{RB}.pathPrefix"),
    ("pathPrefix with backslash", {f"{RBK}__pathPrefix": "/v1\\admin"}, f"{RB}.pathPrefix"),
    # //x reads as an authority (a network-path reference) to some servers.
    ("pathPrefix network path", {f"{RBK}__pathPrefix": "//evil/x"}, f"{RB}.pathPrefix"),
    (
        "pathPrefix network path via model",
        {f"{RBK}__pathPrefix": "/$model/x", f"{SPEC}__model": "/evil"},
        f"{RB}.pathPrefix",
    ),
    (
        "modelMetrics path network path",
        {f"{OC}__modelMetrics": {"path": "//evil/x"}},
        f"{OC.replace('__', '.')}.modelMetrics.path",
    ),
    ("metadata name a number", {"metadata__name": 12}, "metadata.name"),
    ("metadata namespace an object", {"metadata__namespace": {"a": 1}}, "metadata.namespace"),
    ("header Host", {f"{RBK}__headersToAdd": {"Host": "evil"}}, f"{RB}.headersToAdd[Host]"),
    (
        "header Content-Length",
        {f"{RBK}__headersToAdd": {"content-length": "0"}},
        f"{RB}.headersToAdd[content-length]",
    ),
    (
        "header Transfer-Encoding",
        {f"{RBK}__headersToAdd": {"Transfer-Encoding": "chunked"}},
        f"{RB}.headersToAdd[Transfer-Encoding]",
    ),
    (
        "header Connection",
        {f"{RBK}__headersToAdd": {"Connection": "close"}},
        f"{RB}.headersToAdd[Connection]",
    ),
    ("header value not a string", {f"{RBK}__headersToAdd": {"X-N": 1}}, f"{RB}.headersToAdd[X-N]"),
    ("auth type basic", {f"{RBK}__authConfig": {"type": "basic"}}, f"{RB}.authConfig.type"),
    ("oauth without config", {f"{RBK}__authConfig": {"type": "oauth"}}, f"{RB}.authConfig.oauthConfig"),
    (
        "oauth http tokenUrl",
        {
            f"{RBK}__authConfig": {
                **OAUTH_OK,
                "oauthConfig": {**OAUTH_OK["oauthConfig"], "tokenUrl": "http://auth/token"},
            }
        },
        f"{RB}.authConfig.oauthConfig.tokenUrl",
    ),
    (
        "oauth tokenUrl with CR LF",
        {f"{RBK}__authConfig": oauth(tokenUrl="https://auth/t\r\nX: y")},
        TOKEN_URL,
    ),
    ("oauth tokenUrl with a space", {f"{RBK}__authConfig": oauth(tokenUrl="https://auth/t x")}, TOKEN_URL),
    ("oauth tokenUrl with a tab", {f"{RBK}__authConfig": oauth(tokenUrl="https://auth/\tt")}, TOKEN_URL),
    ("oauth tokenUrl with NUL", {f"{RBK}__authConfig": oauth(tokenUrl="https://auth/t\x00")}, TOKEN_URL),
    ("oauth tokenUrl not ASCII", {f"{RBK}__authConfig": oauth(tokenUrl="https://auth/t\u00e9")}, TOKEN_URL),
    ("oauth tokenUrl bad port", {f"{RBK}__authConfig": oauth(tokenUrl="https://auth:99999/t")}, TOKEN_URL),
    ("oauth tokenUrl open bracket", {f"{RBK}__authConfig": oauth(tokenUrl="https://[::1/t")}, TOKEN_URL),
    (
        "oauth tokenUrl network path",
        {f"{RBK}__authConfig": oauth(tokenUrl="https://auth//evil/t")},
        TOKEN_URL,
    ),
    (
        "oauth clientSecretRef key climbing",
        {f"{RBK}__authConfig": oauth(clientSecretRef={"name": "s", "key": "../../etc/shadow"})},
        f"{RB}.authConfig.oauthConfig.clientSecretRef.key",
    ),
    (
        "oauth clientSecretRef key a path",
        {f"{RBK}__authConfig": oauth(clientSecretRef={"name": "s", "key": "/etc/shadow"})},
        f"{RB}.authConfig.oauthConfig.clientSecretRef.key",
    ),
    (
        "oauth no clientId",
        {
            f"{RBK}__authConfig": {
                **OAUTH_OK,
                "oauthConfig": {k: v for k, v in OAUTH_OK["oauthConfig"].items() if k != "clientId"},
            }
        },
        f"{RB}.authConfig.oauthConfig.clientId",
    ),
    (
        "oauth no secret",
        {
            f"{RBK}__authConfig": {
                **OAUTH_OK,
                "oauthConfig": {k: v for k, v in OAUTH_OK["oauthConfig"].items() if k != "clientSecretRef"},
            }
        },
        f"{RB}.authConfig.oauthConfig.clientSecretRef",
    ),
    (
        "oauth both secret forms",
        {
            f"{RBK}__authConfig": {
                **OAUTH_OK,
                "oauthConfig": {**OAUTH_OK["oauthConfig"], "clientSecret": "s3cr3t"},
            }
        },
        f"{RB}.authConfig.oauthConfig.clientSecret",
    ),
    (
        "secret header bad name",
        {f"{RBK}__headersFromSecrets": [{"name": "X Key", "secretKeyRef": {"name": "k", "key": "v"}}]},
        f"{RB}.headersFromSecrets[0].name",
    ),
    (
        "secret header twice",
        {
            f"{RBK}__headersToAdd": {"X-Api-Key": "a"},
            f"{RBK}__headersFromSecrets": [{"name": "x-api-key", "secretKeyRef": {"name": "k", "key": "v"}}],
        },
        f"{RB}.headersFromSecrets[0].name",
    ),
    (
        "secret header bad key",
        {f"{RBK}__headersFromSecrets": [{"name": "X-Api-Key", "secretKeyRef": {"name": "k", "key": "a/b"}}]},
        f"{RB}.headersFromSecrets[0].secretKeyRef.key",
    ),
    (
        "secret header key dot-dot",
        {f"{RBK}__headersFromSecrets": [{"name": "X-Api-Key", "secretKeyRef": {"name": "k", "key": ".."}}]},
        f"{RB}.headersFromSecrets[0].secretKeyRef.key",
    ),
    (
        "secret header without key",
        {f"{RBK}__headersFromSecrets": [{"name": "X-Api-Key", "secretKeyRef": {"name": "k"}}]},
        f"{RB}.headersFromSecrets[0].secretKeyRef.key",
    ),
    ("caBundle not PEM", {f"{RBK}__scheme": "https", f"{RBK}__caBundle": "hello"}, f"{RB}.caBundle"),
    (
        "caBundle garbage PEM",
        {
            f"{RBK}__scheme": "https",
            f"{RBK}__caBundle": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        },
        f"{RB}.caBundle",
    ),
    ("caBundle for http", {f"{RBK}__caBundle": CA_PEM}, f"{RB}.caBundle"),
    (
        "caBundle not ASCII",
        {f"{RBK}__scheme": "https", f"{RBK}__caBundle": CA_PEM.replace("\n-----END", "\u00e9\n-----END")},
        f"{RB}.caBundle",
    ),
    ("metrics without remote", {f"{RBK}": None}, "spec.offloadingConfig.remoteBackend"),
    ("metric type unknown", {f"{OC}__metrics": [{"type": "Queue", "resource": CPU_50}]}, f"{MET}.type"),
    ("metric type mismatch", {f"{OC}__metrics": metric("resource", CPU_50, "External")}, f"{MET}.external"),
    (
        "metric two members",
        {f"{OC}__metrics": [{"type": "Resource", "resource": CPU_50, "external": EXTERNAL}]},
        f"{MET}.external",
    ),
    (
        "resource gpu",
        {f"{OC}__metrics": metric("resource", {**CPU_50, "name": "nvidia.com/gpu"})},
        f"{MET}.resource.name",
    ),
    (
        "utilization zero",
        {
            f"{OC}__metrics": metric(
                "resource", {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 0}}
            )
        },
        f"{MET}.resource.target.averageUtilization",
    ),
    (
        "utilization missing",
        {
            f"{OC}__metrics": metric(
                "resource", {"name": "cpu", "target": {"type": "Utilization", "averageValue": "1"}}
            )
        },
        f"{MET}.resource.target.averageUtilization",
    ),
    (
        "averageValue bad quantity",
        {
            f"{OC}__metrics": metric(
                "resource", {"name": "memory", "target": {"type": "AverageValue", "averageValue": "lots"}}
            )
        },
        f"{MET}.resource.target.averageValue",
    ),
    (
        "averageValue negative",
        {
            f"{OC}__metrics": metric(
                "resource", {"name": "memory", "target": {"type": "AverageValue", "averageValue": "-1Gi"}}
            )
        },
        f"{MET}.resource.target.averageValue",
    ),
    (
        "value zero",
        {f"{OC}__metrics": metric("external", {**EXTERNAL, "target": {"type": "Value", "value": "0"}})},
        f"{MET}.external.target.value",
    ),
    (
        "utilization for external",
        {
            f"{OC}__metrics": metric(
                "external", {**EXTERNAL, "target": {"type": "Utilization", "averageUtilization": 50}}
            )
        },
        f"{MET}.external.target.type",
    ),
    (
        "pods metric with Value",
        {
            f"{OC}__metrics": metric(
                "pods", {"metric": {"name": "rps"}, "target": {"type": "Value", "value": "10"}}
            )
        },
        f"{MET}.pods.target.type",
    ),
    (
        "container missing",
        {f"{OC}__metrics": metric("containerResource", {"name": "cpu", "target": CPU_50["target"]})},
        f"{MET}.containerResource.container",
    ),
    (
        "selector In without values",
        {
            f"{OC}__metrics": metric(
                "external",
                {
                    **EXTERNAL,
                    "metric": {
                        "name": "q",
                        "selector": {"matchExpressions": [{"key": "a", "operator": "In"}]},
                    },
                },
            )
        },
        f"{MET}.external.metric.selector.matchExpressions[0].values",
    ),
    (
        "target type unknown",
        {
            f"{OC}__metrics": metric(
                "resource", {"name": "cpu", "target": {"type": "Percent", "averageUtilization": 50}}
            )
        },
        f"{MET}.resource.target.type",
    ),
    ("metrics not a list", {f"{OC}__metrics": {"type": "Resource"}}, "spec.offloadingConfig.metrics"),
    ("remote on the metadata IP", {f"{RBK}__host": "169.254.169.254"}, f"{RB}.host"),
    ("remote on a link-local IPv4", {f"{RBK}__host": "169.254.10.1:8080"}, f"{RB}.host"),
    ("remote on the metadata IP as a number", {f"{RBK}__host": "2852039166"}, f"{RB}.host"),
    ("remote on IPv4-mapped metadata", {f"{RBK}__host": "[::ffff:169.254.169.254]:80"}, f"{RB}.host"),
    ("remote on AWS IPv6 metadata", {f"{RBK}__host": "[fd00:ec2::254]"}, f"{RB}.host"),
    ("remote on IPv6 link-local", {f"{RBK}__host": "[fe80::1]:443"}, f"{RB}.host"),
    ("remote on GCP metadata name", {f"{RBK}__host": "metadata.google.internal"}, f"{RB}.host"),
    ("remote on metadata short name", {f"{RBK}__host": "Metadata:80"}, f"{RB}.host"),
    (
        "oauth tokenUrl on the metadata IP",
        {f"{RBK}__authConfig": oauth(tokenUrl="https://169.254.169.254/latest/api/token")},
        TOKEN_URL,
    ),
    (
        "oauth tokenUrl on GCP metadata name",
        {f"{RBK}__authConfig": oauth(tokenUrl="https://metadata.google.internal./token")},
        TOKEN_URL,
    ),
    (
        "oauth tokenUrl on AWS IPv6 metadata",
        {f"{RBK}__authConfig": oauth(tokenUrl="https://[fd00:ec2::254]:443/t")},
        TOKEN_URL,
    ),
]


@pytest.mark.parametrize(("edits", "path"), [(e, p) for _, e, p in INVALID], ids=[i for i, _, _ in INVALID])
def test_an_invalid_modeldeployment_is_refused_naming_the_field_at_fault(edits, path):
    result = validate_object(edited(**edits))
    assert not result.ok
    paths = [e.path for e in result.errors]
    assert path in paths, result.message()
    assert result.model is None


def test_the_table_has_at_least_forty_cases():
    assert len(INVALID) >= 40


VALID: list[tuple[str, dict[str, Any]]] = [
    ("the tutorial as written", {}),
    (
        "https remote with prefix and headers",
        {
            f"{RBK}__scheme": "https",
            f"{RBK}__pathPrefix": "/v1/models",
            f"{RBK}__headersToAdd": {"X-Team": "ml", "Authorization": "Bearer abc"},
        },
    ),
    (
        "latin-1 header value and encoded prefix",
        {f"{RBK}__pathPrefix": "/mod%C3%A8les", f"{RBK}__headersToAdd": {"X-Team": "équipe\tA"}},
    ),
    ("IPv6 remote", {f"{RBK}__host": "[fd00::10]:8443"}),
    ("IPv4 remote without port", {f"{RBK}__host": "10.0.0.7"}),
    ("oauth with a secret reference", {f"{RBK}__scheme": "https", f"{RBK}__authConfig": OAUTH_OK}),
    ("StatefulSet workload", {f"{SPEC}__modelSourceRef__kind": "StatefulSet"}),
    ("no serviceRef", {f"{SPEC}__serviceRef": None}),
    ("disabled", {f"{SPEC}__enabled": False}),
    (
        "memory average value",
        {
            f"{OC}__metrics": metric(
                "resource", {"name": "memory", "target": {"type": "AverageValue", "averageValue": "1.5Gi"}}
            )
        },
    ),
    (
        "container resource",
        {
            f"{OC}__metrics": metric(
                "containerResource", {"name": "cpu", "container": "php-apache", "target": CPU_50["target"]}
            )
        },
    ),
    (
        "pods metric",
        {
            f"{OC}__metrics": metric(
                "pods", {"metric": {"name": "rps"}, "target": {"type": "AverageValue", "averageValue": 100}}
            )
        },
    ),
    (
        "object metric",
        {
            f"{OC}__metrics": metric(
                "object",
                {
                    "describedObject": {
                        "kind": "Ingress",
                        "name": "main",
                        "apiVersion": "networking.k8s.io/v1",
                    },
                    "metric": {"name": "rps"},
                    "target": {"type": "Value", "value": "2k"},
                },
            )
        },
    ),
    (
        "several metrics",
        {
            f"{OC}__metrics": [
                {"type": "Resource", "resource": CPU_50},
                {"type": "External", "external": EXTERNAL},
            ]
        },
    ),
    ("no offloadingConfig", {f"{SPEC}__offloadingConfig": None}),
    ("remote named like another service", {f"{RBK}__host": "php-apache.other-ns.svc:80"}),
    (
        "API key from a Secret and a private CA",
        {
            f"{RBK}__scheme": "https",
            f"{RBK}__caBundle": CA_PEM,
            f"{RBK}__headersFromSecrets": [
                {"name": "X-Api-Key", "secretKeyRef": {"name": "remote-key", "key": "apiKey"}}
            ],
        },
    ),
    (
        "Beamlit compatibility fields",
        {
            f"{SPEC}__policies": [{"refType": "remotePolicy", "name": "p"}],
            f"{SPEC}__serverlessConfig": {"minNumReplicas": 0},
        },
    ),
]


@pytest.mark.parametrize("edits", [e for _, e in VALID], ids=[i for i, _ in VALID])
def test_a_valid_modeldeployment_is_allowed(edits):
    result = validate_object(edited(**edits))
    assert result.ok, result.message()
    assert result.model is not None


def json_paths(data: Any) -> Iterator[tuple[str | int, ...]]:
    """The keys leading to every value inside ``data``, depth first."""
    if isinstance(data, dict):
        items: Iterable[tuple[str | int, Any]] = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return
    for key, value in items:
        yield (key,)
        for rest in json_paths(value):
            yield (key, *rest)


def dotted(path: str) -> str:
    """An error's path with map keys and indices as plain steps: ``a[b][0]`` -> ``a.b.0``."""
    return path.replace("[", ".").replace("]", "")


def test_a_field_of_the_wrong_type_is_the_only_error_of_an_otherwise_valid_object():
    """Every field of every valid example, in turn, given a value no field accepts: the rules
    still run on the rest, and none of them may report anything about the rest (it is
    valid), whatever default stood in for the broken field."""
    checked = 0
    for _, edits in VALID:
        valid = edited(**edits)
        for keys in json_paths(valid["spec"]):
            broken = copy.deepcopy(valid)
            parent = broken["spec"]
            for key in keys[:-1]:
                parent = parent[key]
            parent[keys[-1]] = [[]]  # an array of an array: no field of the API takes it
            where = ".".join(["spec", *map(str, keys)])
            result = validate_object(broken)
            strays = [str(e) for e in result.errors if not touches(dotted(e.path), where)]
            assert strays == [], f"{where}: {result.message()}"
            checked += 1
    assert checked > 300


# Strings no field should take, each of which once crashed a check or slipped through one:
# digits int() refuses ('²') or reads from another script, a NUL, more digits than int()
# accepts, a lone surrogate (not encodable as UTF-8), and right-to-left marks.
HOSTILE_STRINGS = (
    "\u00b2",
    "\u0661\u0668\u0660\u0660\u0662",
    "\x00",
    "9" * 5000,
    "\ud800",
    "\u200f\u202e",
)


def hostile_variants(value: str) -> Iterator[str]:
    """Hostile strings alone and after ``value`` (so that a host keeps its name before a
    bad port, a path its leading '/')."""
    for bad in HOSTILE_STRINGS:
        yield bad
        yield f"{value}:{bad}"
        yield f"{value}/{bad}"


def test_no_string_field_makes_validation_raise_whatever_it_holds():
    """Every string field and map key of every valid example, in turn, given each hostile
    string: validation answers (a denial naming fields is fine) and never raises."""
    checked = 0
    for _, edits in VALID:
        valid = edited(**edits)
        for keys in json_paths(valid):
            parent = valid
            for key in keys[:-1]:
                parent = parent[key]
            value = parent[keys[-1]]
            for bad in hostile_variants(value if isinstance(value, str) else ""):
                broken = copy.deepcopy(valid)
                holder = broken
                for key in keys[:-1]:
                    holder = holder[key]
                if isinstance(value, str):
                    holder[keys[-1]] = bad
                elif isinstance(holder, dict):  # the key of a map (or of an object: unknown field)
                    holder[bad] = holder.pop(keys[-1])
                else:
                    continue
                result = validate_object(broken)
                assert result.ok or all(e.path for e in result.errors), result.message()
                result.message()
                checked += 1
    assert checked > 2000


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"name": ["x"]}, "metadata.name: must be a string, got array"),
        ({"name": 12}, "metadata.name: must be a string, got integer"),
        ({"generateName": True}, "metadata.generateName: must be a string, got boolean"),
        ({"name": "x", "namespace": {"a": 1}}, "metadata.namespace: must be a string, got object"),
        ({"name": "x", "generation": "2"}, "metadata.generation: must be an integer, got string"),
        ({"name": ""}, "metadata.name: required field is missing"),
        ({}, "metadata.name: required field is missing"),
    ],
)
def test_metadata_of_the_wrong_type_is_named_as_such_not_as_missing(metadata, message):
    result = validate_object({**TUTORIAL, "metadata": metadata})
    assert [str(e) for e in result.errors] == [message]


def test_metadata_that_is_not_an_object_says_what_it_is():
    result = validate_object({**TUTORIAL, "metadata": ["x"]})
    assert "metadata: must be an object, got array" in [str(e) for e in result.errors]


def test_the_rules_errors_come_with_the_type_errors_all_at_once():
    result = validate_object(
        edited(
            **{
                f"{SPEC}__enabled": "yes",  # a type error
                f"{OC}__behavior__percentage": 150,  # the rules' errors, elsewhere
                f"{RBK}__host": "bad host:99999",
            }
        )
    )
    assert [e.path for e in result.errors] == [
        "spec.enabled",  # the types first, then the rules
        "spec.offloadingConfig.behavior.percentage",
        "spec.offloadingConfig.remoteBackend.host",
    ], result.message()
    assert result.model is None


def test_a_rule_about_a_field_that_did_not_decode_is_left_out():
    # metrics[0] is broken: the metrics stand in as none, and the rules about metrics or
    # about what needs them (a remote, staticSplit) say nothing; spec.model still counts.
    result = validate_object(
        edited(**{f"{OC}__metrics": [{"type": "Resource", "resource": "cpu"}], f"{SPEC}__model": " "})
    )
    assert sorted(str(e) for e in result.errors) == [
        "spec.model: must not be empty",
        "spec.offloadingConfig.metrics[0].resource: must be an object, got string",
    ]


def test_the_tutorial_is_allowed_unchanged_with_the_crd_defaults_applied():
    result = validate_object(TUTORIAL)
    assert result.ok and result.warnings == ()
    spec = result.model.spec
    assert spec.enabled is True and spec.environment == "production"
    assert spec.offloading_config.remote_backend.scheme == "http"
    assert spec.offloading_config.behavior.percentage == 50
    assert spec.offloading_config.metrics[0].resource.target.average_utilization == 50


def test_the_beamlit_sample_needs_a_default_remote_backend():
    refused = validate_object(BEAMLIT_SAMPLE)
    assert [str(e) for e in refused.errors] == [
        "spec.offloadingConfig.remoteBackend: required when metrics are set: "
        "this installation has no default remote backend to offload to"
    ]
    default = parse_remote_backend("https://models.example:8443/v1")
    allowed = validate_object(BEAMLIT_SAMPLE, ValidationSettings(default_remote_backend=default))
    assert allowed.ok
    # The model in force carries the default; an object's own remoteBackend wins over it.
    assert allowed.model.spec.offloading_config.remote_backend == default
    own = validate_object(TUTORIAL, ValidationSettings(default_remote_backend=default))
    assert own.model.spec.offloading_config.remote_backend.host == "my-model-on-another-cluster:80"


def test_a_static_split_without_a_remote_needs_the_default_and_never_comes_with_metrics():
    no_remote = edited(
        **{f"{OC}__remoteBackend": None, f"{OC}__metrics": [], f"{OC}__behavior__staticSplit": True}
    )
    assert [str(e) for e in validate_object(no_remote).errors] == [
        "spec.offloadingConfig.remoteBackend: required when staticSplit is true: "
        "this installation has no default remote backend to offload to"
    ]
    with_metrics = validate_object(edited(**{f"{OC}__behavior__staticSplit": True}))
    assert [e.path for e in with_metrics.errors] == ["spec.offloadingConfig.behavior.staticSplit"]
    assert "must not be true when metrics are set" in with_metrics.message()
    # No metrics and no remote: nothing is ever offloaded, nothing is needed.
    quiet = validate_object(edited(**{f"{OC}__remoteBackend": None, f"{OC}__metrics": []}))
    assert quiet.ok and quiet.model.spec.offloading_config.remote_backend is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://remote.example:8080", ("remote.example:8080", "http", None)),
        ("https://remote.example/v1/models/", ("remote.example", "https", "/v1/models")),
        ("  https://[fd00::1]:8443  ", ("[fd00::1]:8443", "https", None)),
        (
            '{"host": "r.example:443", "scheme": "https", "pathPrefix": "/m"}',
            ("r.example:443", "https", "/m"),
        ),
        ('{"host": "r.example"}', ("r.example", "http", None)),
    ],
)
def test_default_remote_backend_forms(text, expected):
    backend = parse_remote_backend(text)
    assert (backend.host, backend.scheme, backend.path_prefix) == expected


def test_default_remote_backend_json_keeps_every_remote_backend_field():
    backend = parse_remote_backend(
        '{"host": "r.example", "scheme": "https", "headersToAdd": {"X-Tenant": "a"},'
        ' "headersFromSecrets": [{"name": "X-Api-Key", "secretKeyRef": {"name": "k", "key": "apiKey"}}]}'
    )
    assert backend.headers_to_add == {"X-Tenant": "a"}
    assert backend.headers_from_secrets[0].secret_key_ref.name == "k"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "flag: must not be empty"),
        ("remote.example:80", "flag: must be a URL such as http://host:port/prefix or a JSON RemoteBackend"),
        ("ftp://remote.example", "flag: must be a URL"),
        ("http://[::1", "flag: must be a URL"),  # urlsplit raises on the open bracket
        ("http://remote.example//evil", "flag.pathPrefix: must not start with '//'"),
        ("http://remote.example/a?b=c", "flag: must not have a query or fragment"),
        ("http://user@remote.example", "flag.host: must be host[:port] without userinfo"),
        ("http://remote.example:99999", "flag.host: port must be a number between 1 and 65535"),
        ("http://remote.example:\u00b2", "flag.host: port must be a number between 1 and 65535"),
        ("http://remote.example:\u0668\u0660", "flag.host: port must be a number between 1 and 65535"),
        ("http://remote.example/a/../b", "flag.pathPrefix: must not contain '.' or '..' segments"),
        ("{not json", "flag: not valid JSON"),
        ('{"scheme": "https"}', "flag.host: required field is missing"),
        ('{"host": "r", "scheme": "ftp"}', "flag.scheme: must be http or https, got 'ftp'"),
        ('{"host": "r", "colour": "red"}', "flag.colour: unknown field"),
        (
            "http://169.254.169.254/latest",
            "flag.host: 169.254.169.254 is a link-local address (169.254.0.0/16)",
        ),
        ("https://metadata.google.internal", "flag.host: metadata.google.internal is the cloud metadata"),
        ('{"host": "[fd00:ec2::254]"}', "flag.host: fd00:ec2::254 is the AWS instance metadata service"),
    ],
)
def test_a_bad_default_remote_backend_is_refused_naming_the_field(text, message):
    with pytest.raises(ValueError) as caught:
        parse_remote_backend(text, "flag")
    assert message in str(caught.value)


def test_every_error_of_an_object_is_reported_at_once():
    result = validate_object(
        edited(
            **{
                f"{OC}__behavior__percentage": 150,
                f"{RBK}__host": "http://x",
                f"{RBK}__pathPrefix": "v1",
                f"{SPEC}__modelSourceRef__kind": "Job",
            }
        )
    )
    assert sorted(e.path for e in result.errors) == sorted(
        [
            "spec.offloadingConfig.behavior.percentage",
            f"{RB}.host",
            f"{RB}.pathPrefix",
            "spec.modelSourceRef.kind",
        ]
    )
    assert "spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150" in result.message()


def test_dollar_model_in_the_path_prefix_is_spec_model_as_in_the_beamlit_controller():
    from crds.model import expand_path_prefix

    result = validate_object(edited(**{f"{RBK}__pathPrefix": "/v1/$model/models/$model"}))
    assert result.ok, result.message()
    backend = result.model.spec.offloading_config.remote_backend
    assert backend.path_prefix == "/v1/$model/models/$model"  # kept as written
    assert expand_path_prefix(backend.path_prefix, result.model.spec.model) == "/v1/my-model/models/my-model"
    # Plain text replacement, as the Beamlit controller's: "$models" is "<model>s".
    assert expand_path_prefix("/$models", "m") == "/ms"


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [
        ("/ws/$workspace/$model", "$workspace (the Beamlit platform's workspace) has no value here"),
        ("/v1/$modle", "unknown variable '$modle': only $model (spec.model) is replaced"),
        ("/v1/${model}", "unknown variable '${model}'"),
        ("/v1/$", "a '$' without a variable name"),
        ("/price/$5", "a '$' without a variable name"),
    ],
)
def test_unknown_dollar_variables_in_the_path_prefix_are_refused_with_the_field_path(prefix, fragment):
    result = validate_object(edited(**{f"{RBK}__pathPrefix": prefix}))
    assert [e.path for e in result.errors] == [f"{RB}.pathPrefix"], result.message()
    assert fragment in result.message()
    assert (
        "write the workspace's name" if "workspace" in prefix else "write a literal $ as %24"
    ) in result.message()


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("../other", "'.' or '..' segments"),
        ("llama 3", "whitespace"),
        ("modèle", "ASCII"),
        ("m?x=1", "query"),
    ],
)
def test_the_path_prefix_rules_hold_once_model_is_replaced(model, fragment):
    result = validate_object(edited(**{"spec__model": model, f"{RBK}__pathPrefix": "/v1/$model"}))
    errors = [e for e in result.errors if e.path == f"{RB}.pathPrefix"]
    assert len(errors) == 1 and fragment in errors[0].message
    assert "($model replaced by spec.model)" in errors[0].message


@pytest.mark.parametrize(
    ("edits", "fragment"),
    [
        ({f"{OC}__behavior__percentage": 0}, "percentage is 0"),
        ({f"{OC}__metrics": []}, "no request is offloaded while the workload has a ready replica"),
        ({f"{OC}__metrics": [], f"{OC}__behavior__staticSplit": True}, "offloaded at all times"),
        (
            {
                f"{RBK}__authConfig": {
                    **OAUTH_OK,
                    "oauthConfig": {
                        **{k: v for k, v in OAUTH_OK["oauthConfig"].items() if k != "clientSecretRef"},
                        "clientSecret": "s3cr3t",
                    },
                }
            },
            "clientSecretRef",
        ),
    ],
)
def test_legal_but_suspicious_input_is_allowed_with_a_warning(edits, fragment):
    result = validate_object(edited(**edits))
    assert result.ok, result.message()
    assert any(fragment in w for w in result.warnings), result.warnings


def test_an_inline_client_secret_never_appears_in_messages():
    auth = {**OAUTH_OK, "oauthConfig": {**OAUTH_OK["oauthConfig"], "clientSecret": "hunter2-secret"}}
    result = validate_object(edited(**{f"{RBK}__authConfig": auth, f"{RBK}__host": "bad host"}))
    assert "hunter2" not in result.message() and not any("hunter2" in w for w in result.warnings)


@pytest.mark.parametrize(
    "obj", [None, [], "spec", 3, {"spec": None}, {"spec": []}, {"metadata": "x", "spec": {}}]
)
def test_objects_of_the_wrong_shape_are_refused_not_crashed_on(obj):
    assert not validate_object(obj).ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("remote", True),
        ("remote.example.com:8443", True),
        ("[::1]:80", True),
        ("[::1]", True),
        ("192.168.1.10:1", True),
        ("REMOTE.Example.com", True),
        ("remote:", False),
        ("[::1", False),
        ("[::1]x", False),
        ("a" * 64 + ".com", False),
        ("remote:99999", False),
        ("169.254.169.254:80", False),
        ("[fe80::1]", False),
        ("metadata.google.internal.", False),
        ("127.0.0.1:8000", True),
        ("metadata.example.com", True),
    ],
)
def test_host_forms(host, ok):
    assert (list(check_host(host)) == []) is ok


def test_model_in_the_default_remote_backends_prefix_is_each_modeldeployments_spec_model():
    default = parse_remote_backend("https://models.example/v1/$model")
    assert default.path_prefix == "/v1/$model"
    settings = ValidationSettings(default_remote_backend=default)
    assert validate_object(BEAMLIT_SAMPLE, settings).ok
    odd = copy.deepcopy(BEAMLIT_SAMPLE)
    odd["spec"]["model"] = "a/../b"
    refused = validate_object(odd, settings)
    assert [e.path for e in refused.errors] == ["spec.model"]
    assert "in the default remote backend's pathPrefix: must not contain '.' or '..'" in refused.message()
    with pytest.raises(ValueError, match="defaultRemoteBackend.pathPrefix: .workspace"):
        parse_remote_backend("https://models.example/v1/$workspace/x")


def test_the_cabundle_rule_names_the_scheme_it_got():
    result = validate_object(edited(**{f"{RBK}__scheme": "ftp", f"{RBK}__caBundle": CA_PEM}))
    assert "caBundle: applies only to an https remote backend (scheme is ftp)" in result.message()
