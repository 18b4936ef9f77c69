"""The offload Helm chart, rendered by the real helm: lint, a golden snapshot of the default
render, and targeted asserts on what must hold whatever the snapshot says (hardened pods,
least-privilege RBAC, failure policies, a certificate the API server will trust, guards
against contradicting values)."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import socket
import ssl
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.chart.helm import CHART, GOLDEN, NAMESPACE, RELEASE, REPO_ROOT, by_kind, documents, mask_volatile
from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.process import ManagedProcess, wait_until

pytestmark = pytest.mark.helm

WEBHOOK = "offload-webhook"
GATEWAY = "offload-gateway"
SERVICE_DNS_NAMES = [
    WEBHOOK,
    f"{WEBHOOK}.{NAMESPACE}",
    f"{WEBHOOK}.{NAMESPACE}.svc",
    f"{WEBHOOK}.{NAMESPACE}.svc.cluster.local",
]


def pod_specs(docs):
    """(owner, pod spec) of every workload the chart renders."""
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


# ---- lint and snapshot -------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "webhook.mutating.enabled=false", "--set", "webhook.replicaCount=1"],
        [
            "--set",
            "webhook.certs.existingSecret=my-tls",
            "--set",
            "webhook.certs.certManagerInjectCAFrom=ns/my-cert",
        ],
    ],
    ids=["defaults", "validation-only", "cert-manager"],
)
def test_helm_lint_strict_passes(helm, values):
    linted = helm.run("lint", "--strict", "--kube-version", "v1.34.4", str(CHART), *values)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "[WARNING]" not in linted.stdout and "[ERROR]" not in linted.stdout, linted.stdout


def test_default_render_matches_the_golden_snapshot(default_render):
    golden = GOLDEN / "default.yaml"
    masked = mask_volatile(default_render)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(masked)
    assert golden.is_file(), (
        f"{golden} is missing: run UPDATE_GOLDEN=1 python -m pytest tests/chart -k golden"
    )
    assert masked == golden.read_text(), (
        f"the chart's default render differs from {golden}; if the change is intended, run "
        "UPDATE_GOLDEN=1 python -m pytest tests/chart -k golden and review the diff"
    )


def test_the_golden_snapshot_hides_every_generated_secret(default_render):
    masked = mask_volatile(default_render)
    assert "LS0tLS1CRUdJTi" not in masked  # base64 of "-----BEGIN": no PEM survives
    # tls.crt, tls.key, ca.crt and not-after in the Secret, two caBundles, checksum/tls.
    assert masked.count("<generated>") == 7


def test_two_renders_differ_only_in_generated_material(helm, default_render):
    assert mask_volatile(helm.render()) == mask_volatile(default_render)


def test_the_chart_crd_is_byte_identical_to_the_api_definition():
    chart_copy = CHART / "crds" / "modeldeployment.yaml"
    source = REPO_ROOT / "crds" / "modeldeployment.yaml"
    assert chart_copy.read_bytes() == source.read_bytes(), (
        f"{chart_copy} differs from {source} (Helm's crds/ folder cannot read outside the chart); "
        f"re-copy it: cp {source.relative_to(REPO_ROOT)} {chart_copy.relative_to(REPO_ROOT)}"
    )


# ---- what the default render installs ----------------------------------------------------


def test_default_render_installs_the_webhook_and_its_supporting_objects(default_render):
    objects = by_kind(documents(default_render))
    assert set(objects) == {
        ("ServiceAccount", WEBHOOK),
        ("Secret", f"{WEBHOOK}-tls"),
        ("ConfigMap", WEBHOOK),
        ("ClusterRole", WEBHOOK),
        ("ClusterRoleBinding", WEBHOOK),
        ("Service", WEBHOOK),
        ("Deployment", WEBHOOK),
        ("PodDisruptionBudget", WEBHOOK),
        ("MutatingWebhookConfiguration", WEBHOOK),
        ("ValidatingWebhookConfiguration", WEBHOOK),
        ("Role", f"{WEBHOOK}-leader-election"),
        ("RoleBinding", f"{WEBHOOK}-leader-election"),
        ("Lease", f"{RELEASE}-controller"),
        ("Job", f"{WEBHOOK}-release"),
        ("ServiceAccount", GATEWAY),
        ("ClusterRole", GATEWAY),
        ("ClusterRoleBinding", GATEWAY),
        ("Deployment", GATEWAY),
        ("PodDisruptionBudget", GATEWAY),
    } | (
        {("ClusterRole", f"{RELEASE}-sidecar")}
        if (CHART / "files" / "sidecar-role.yaml").is_file()
        else set()
    )
    for (kind, name), obj in objects.items():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "offload", (kind, name)
        assert labels["app.kubernetes.io/instance"] == RELEASE, (kind, name)
        assert labels["app.kubernetes.io/managed-by"] == "Helm", (kind, name)
        if kind not in {
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        }:
            assert obj["metadata"]["namespace"] == NAMESPACE, (kind, name)


def test_webhook_deployment_runs_two_spread_replicas_with_a_disruption_budget(default_render):
    objects = by_kind(documents(default_render))
    deployment = objects["Deployment", WEBHOOK]
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert spec["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    pdb = objects["PodDisruptionBudget", WEBHOOK]
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    service = objects["Service", WEBHOOK]
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}
    ]
    container = spec["containers"][0]
    assert {"name": "https", "containerPort": 9443, "protocol": "TCP"} in container["ports"]


def test_a_single_replica_gets_no_disruption_budget_that_would_block_drains(helm):
    objects = by_kind(documents(helm.render("--set", "webhook.replicaCount=1")))
    assert ("PodDisruptionBudget", WEBHOOK) not in objects
    assert objects["Deployment", WEBHOOK]["spec"]["replicas"] == 1


def test_webhook_container_runs_offload_webhook_with_the_mounted_certificate_and_config(default_render):
    objects = by_kind(documents(default_render))
    spec = objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["image"] == "localhost/offload:0.1.0"  # tag defaults to appVersion
    assert container["command"] == ["offload-webhook"]
    assert container["args"] == [
        "--tls-cert-file=/tls/tls.crt",
        "--tls-private-key-file=/tls/tls.key",
        "--port=9443",
        "--log-level=info",
        "--injector-config=/config/injector.yaml",
        "--controller=on",
        f"--sidecar-cluster-role={RELEASE}-sidecar",
        "--evaluation-period=15",
        f"--leader-election-namespace={NAMESPACE}",
        f"--leader-election-lease={RELEASE}-controller",
        (
            "--gateway-selector=app.kubernetes.io/component=gateway,app.kubernetes.io/instance=offload,"
            "app.kubernetes.io/name=offload"
        ),
        f"--gateway-namespace={NAMESPACE}",
        "--gateway-ports=20000-29999",
    ]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["tls"]["mountPath"] == "/tls" and mounts["config"]["mountPath"] == "/config"
    assert volumes["tls"]["secret"]["secretName"] == f"{WEBHOOK}-tls"
    # The pod gets the serving key, never the CA certificate's companion data it does not need.
    assert [item["key"] for item in volumes["tls"]["secret"]["items"]] == ["tls.crt", "tls.key"]
    assert volumes["config"]["configMap"]["name"] == WEBHOOK
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}


def test_the_injector_configuration_is_what_offload_webhook_loads(default_render):
    """The rendered injector.yaml passes the webhook's own loader, with the chart's defaults."""
    import yaml

    from webhook.injector_config import InjectorConfig, parse_config

    text = by_kind(documents(default_render))["ConfigMap", WEBHOOK]["data"]["injector.yaml"]
    assert parse_config(yaml.safe_load(text)) == InjectorConfig(
        image="localhost/offload:0.1.0",
        config_version="0.1.0",
        image_pull_policy="IfNotPresent",
        proxy_port=15080,
        admin_port=15090,
        native_sidecar=True,
        resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
    )


def test_webhook_args_are_accepted_by_offload_webhook(default_render):
    """The rendered command line parses with the webhook's own argument parser."""
    from webhook.cli import build_parser

    container = by_kind(documents(default_render))["Deployment", WEBHOOK]["spec"]["template"]["spec"][
        "containers"
    ][0]
    args = build_parser().parse_args(container["args"])
    assert args.port == 9443 and args.tls_cert_file == "/tls/tls.crt"
    assert args.injector_config == "/config/injector.yaml" and not args.validation_only


def test_image_digest_pins_the_image_and_sidecar_image_follows_it(helm):
    digest = "sha256:" + "a" * 64
    objects = by_kind(
        documents(
            helm.render("--set", f"image.digest={digest}", "--set", "image.repository=reg.example/offload")
        )
    )
    container = objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"reg.example/offload@{digest}"
    assert f"reg.example/offload@{digest}" in objects["ConfigMap", WEBHOOK]["data"]["injector.yaml"]


# ---- hardening ---------------------------------------------------------------------------

ALLOWED_VOLUME_TYPES = {
    "configMap",
    "secret",
    "emptyDir",
    "projected",
    "downwardAPI",
    "persistentVolumeClaim",
    "csi",
    "ephemeral",
}


def restricted_violations(owner: str, spec: dict) -> list[str]:
    """Where a pod spec breaks the Pod Security Standards' restricted profile, or this
    project's hardening on top of it (fixed non-root uid, read-only root filesystem)."""
    problems = []
    pod_ctx = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{owner}: {field} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"{owner}: volume {volume['name']} of type {kinds - ALLOWED_VOLUME_TYPES}")
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        where = f"{owner} container {container['name']}"
        ctx = container.get("securityContext", {})

        def effective(field, ctx=ctx):
            return ctx.get(field, pod_ctx.get(field))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if effective("runAsUser") != 65532:
            problems.append(f"{where}: runAsUser is {effective('runAsUser')!r}, not 65532")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if ctx.get("privileged"):
            problems.append(f"{where}: privileged")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        capabilities = ctx.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
            problems.append(f"{where}: capabilities are {capabilities}, not drop [ALL]")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        if not container.get("resources", {}).get("requests"):
            problems.append(f"{where}: no resource requests")
        for port in container.get("ports", []):
            if "hostPort" in port:
                problems.append(f"{where}: hostPort {port['hostPort']}")
    return problems


def test_the_hardening_check_catches_a_weak_container():
    weak = {
        "containers": [{"name": "c", "securityContext": {"privileged": True}, "ports": [{"hostPort": 80}]}]
    }
    problems = "\n".join(restricted_violations("Pod/weak", weak))
    for expected in (
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "privileged",
        "readOnlyRootFilesystem",
        "capabilities",
        "seccompProfile",
        "hostPort",
        "requests",
    ):
        assert expected in problems


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "webhook.mutating.enabled=false"],
        ["--set", "webhook.replicaCount=3", "--set", "webhook.podDisruptionBudget.minAvailable=2"],
    ],
    ids=["defaults", "validation-only", "three-replicas"],
)
def test_every_container_is_hardened(helm, values):
    docs = documents(helm.render(*values))
    specs = list(pod_specs(docs))
    assert specs, "the chart renders no workload"
    problems = [p for owner, spec in specs for p in restricted_violations(owner, spec)]
    assert not problems, "\n".join(problems)


def test_service_account_tokens_are_mounted_only_where_the_api_is_used(helm, default_render):
    objects = by_kind(documents(default_render))
    assert objects["ServiceAccount", WEBHOOK]["automountServiceAccountToken"] is False
    # Injection needs watches on the API server; validation alone does not.
    assert objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    validation_only = by_kind(documents(helm.render("--set", "webhook.mutating.enabled=false")))
    spec = validation_only["Deployment", WEBHOOK]["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert "--validation-only" in spec["containers"][0]["args"]
    assert ("ClusterRole", WEBHOOK) not in validation_only and (
        "ClusterRoleBinding",
        WEBHOOK,
    ) not in validation_only
    assert ("MutatingWebhookConfiguration", WEBHOOK) not in validation_only


# ---- RBAC --------------------------------------------------------------------------------


# The metrics APIs authorize a metric as the (sub)resource it names (pods/<metric>,
# <kind>/<name>/<metric>), and RBAC cannot match "pods/*": reading metrics by the names a
# ModelDeployment chooses needs resources ["*"], there and only there, read-only.
METRICS_GROUPS = {"custom.metrics.k8s.io", "external.metrics.k8s.io"}


# The writes the controller needs (webhook/controller/): everything else is read-only.
CONTROLLER_WRITES = {
    ("deployment.beamlit.com", "modeldeployments"): {"patch"},  # its finalizer
    ("deployment.beamlit.com", "modeldeployments/status"): {"patch"},
    ("", "services"): {"patch"},  # the captured port
    ("", "events"): {"create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "clusterroles"): {"bind"},  # only with resourceNames
    ("discovery.k8s.io", "endpointslices"): {"create", "patch", "delete"},  # the stand-in slice
    ("coordination.k8s.io", "leases"): {"update"},  # only with resourceNames
}


def rbac_problems(roles, allowed_writes=None) -> list[str]:
    allowed_writes = allowed_writes or {}
    problems = []
    for role in roles:
        name = role["metadata"]["name"]
        for rule in role["rules"]:
            writes = set(rule["verbs"]) - {"get", "list", "watch"}
            if writes and not all(
                writes <= allowed_writes.get((g, r), set())
                for g in rule["apiGroups"]
                for r in rule["resources"]
            ):
                problems.append(f"{name}: verbs beyond reading: {rule}")
            if writes & {"bind", "update"} and not rule.get("resourceNames"):
                problems.append(f"{name}: {sorted(writes)} without resourceNames: {rule}")
            for field in ("apiGroups", "verbs", "resourceNames", "nonResourceURLs"):
                if "*" in rule.get(field, []):
                    problems.append(f"{name}: wildcard in {field}: {rule}")
            if "*" in rule.get("resources", []) and not set(rule["apiGroups"]) <= METRICS_GROUPS:
                problems.append(f"{name}: wildcard resources outside the metrics APIs: {rule}")
    return problems


def test_rbac_grants_no_wildcards_and_no_writes_but_the_controllers(default_render):
    roles = [d for d in documents(default_render) if d["kind"] in {"ClusterRole", "Role"}]
    assert len(roles) == 4
    assert rbac_problems(roles, CONTROLLER_WRITES) == []


def test_the_rbac_check_catches_wildcards_and_writes():
    role = {
        "metadata": {"name": "too-much"},
        "rules": [
            {"apiGroups": [""], "resources": ["*"], "verbs": ["get"]},
            {"apiGroups": ["*"], "resources": ["pods"], "verbs": ["*"]},
            {"apiGroups": ["custom.metrics.k8s.io"], "resources": ["*"], "verbs": ["create"]},
        ],
    }
    problems = "\n".join(rbac_problems([role]))
    assert "wildcard resources outside the metrics APIs" in problems
    assert "wildcard in apiGroups" in problems and "wildcard in verbs" in problems
    assert problems.count("verbs beyond reading") == 2


def test_webhook_cluster_role_is_exactly_what_the_cache_and_the_metric_evaluation_read(default_render):
    objects = by_kind(documents(default_render))
    rules = objects["ClusterRole", WEBHOOK]["rules"]
    granted = {
        (group, resource, tuple(rule["verbs"]))
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    # webhook/cache.py and the controller's store list and watch these, cluster-wide; the
    # controller writes only what CONTROLLER_WRITES names, and binds only the sidecar's role.
    # Its metric evaluation (webhook/controller/evaluation.py) reads what the HPA controller
    # reads: PodMetrics, and any custom or external metric a ModelDeployment names (their
    # names are the users', hence the wildcard).
    read = ("list", "watch")
    assert granted == {
        ("deployment.beamlit.com", "modeldeployments", (*read, "patch")),
        ("deployment.beamlit.com", "modeldeployments/status", ("patch",)),
        ("deployment.beamlit.com", "modeldeployments", ("get",)),
        ("apps", "deployments", read),
        ("apps", "statefulsets", read),
        ("apps", "replicasets", read),
        ("", "services", (*read, "patch")),
        ("", "pods", read),
        ("", "events", ("create",)),
        ("rbac.authorization.k8s.io", "rolebindings", (*read, "create", "patch", "delete")),
        ("rbac.authorization.k8s.io", "clusterroles", ("bind",)),
        ("metrics.k8s.io", "pods", ("list",)),
        ("custom.metrics.k8s.io", "*", ("get", "list")),
        ("external.metrics.k8s.io", "*", ("list",)),
        ("discovery.k8s.io", "endpointslices", (*read, "create", "patch", "delete")),
    }
    [bind] = [r for r in rules if "bind" in r["verbs"]]
    assert bind["resourceNames"] == [f"{RELEASE}-sidecar"]
    binding = objects["ClusterRoleBinding", WEBHOOK]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": WEBHOOK,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": WEBHOOK, "namespace": NAMESPACE}]


def test_the_gateway_reads_modeldeployments_and_slices_and_only_the_secrets_it_is_given(helm, default_render):
    objects = by_kind(documents(default_render))
    rules = objects["ClusterRole", GATEWAY]["rules"]
    assert rules == [
        {
            "apiGroups": ["deployment.beamlit.com"],
            "resources": ["modeldeployments"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    assert objects["ClusterRoleBinding", GATEWAY]["subjects"] == [
        {"kind": "ServiceAccount", "name": GATEWAY, "namespace": NAMESPACE}
    ]
    assert not any(d["kind"] == "Role" and "secrets" in str(d["rules"]) for d in objects.values())
    granted = documents(
        helm.render(
            "--set", "gateway.secrets[0].namespace=models",
            "--set", "gateway.secrets[0].names={remote-oauth,remote-api}",
            "--set", "gateway.secrets[1].namespace=team-b",
            "--set", "gateway.secrets[1].names={b-key}",
        )
    )  # fmt: skip
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in granted if d["kind"] == "Role"}
    assert roles["models", f"{GATEWAY}-secrets"]["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": ["remote-oauth", "remote-api"],
        }
    ]
    assert roles["team-b", f"{GATEWAY}-secrets"]["rules"][0]["resourceNames"] == ["b-key"]
    bindings = [
        d for d in granted if d["kind"] == "RoleBinding" and d["metadata"]["name"] == f"{GATEWAY}-secrets"
    ]
    assert {b["metadata"]["namespace"] for b in bindings} == {"models", "team-b"}
    assert all(b["subjects"][0]["name"] == GATEWAY and b["roleRef"]["kind"] == "Role" for b in bindings)
    assert (
        rbac_problems([d for d in granted if d["kind"] in {"ClusterRole", "Role"}], CONTROLLER_WRITES) == []
    )


def test_the_gateway_runs_two_spread_replicas_that_drain_within_their_grace_period(default_render):
    from sidecar.gateway.cli import build_parser

    objects = by_kind(documents(default_render))
    deployment = objects["Deployment", GATEWAY]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "gateway"
    assert objects["PodDisruptionBudget", GATEWAY]["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": selector},
    }
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == GATEWAY and spec["automountServiceAccountToken"] is True
    assert objects["ServiceAccount", GATEWAY]["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["command"] == ["offload-sidecar"]
    args = build_parser({}).parse_args(container["args"])
    assert (args.mode, args.admin_listen, args.shutdown_grace, args.shutdown_deadline) == (
        "gateway",
        ("0.0.0.0", 9090),
        5.0,
        30.0,
    )
    assert spec["terminationGracePeriodSeconds"] > args.shutdown_grace + args.shutdown_deadline
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}
    # The controller finds exactly these pods: its selector is the pods' own labels.
    webhook_args = objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]["containers"][0]["args"]
    selector_arg = next(a for a in webhook_args if a.startswith("--gateway-selector="))
    from webhook.controller.standin import parse_selector

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert parse_selector(selector_arg.split("=", 1)[1]).items() <= labels.items()


def test_the_default_remote_backend_reaches_the_gateway_as_the_webhook_gets_it(helm):
    from sidecar.gateway.cli import build_parser, settings_from

    url = "https://models.example:8443/v1/$model"
    objects = by_kind(documents(helm.render("--set", f"defaultRemoteBackend={url}")))
    gateway_args = objects["Deployment", GATEWAY]["spec"]["template"]["spec"]["containers"][0]["args"]
    webhook_args = objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (
        f"--default-remote-backend={url}" in gateway_args
        and f"--default-remote-backend={url}" in webhook_args
    )
    parser = build_parser({})
    backend = settings_from(parser.parse_args(gateway_args), parser).default_backend
    assert (backend.scheme, backend.host, backend.path_prefix) == (
        "https",
        "models.example:8443",
        "/v1/$model",
    )


@pytest.mark.parametrize(
    "values",
    [["gateway.enabled=false"], ["controller.enabled=false"], ["webhook.mutating.enabled=false"]],
    ids=["gateway-off", "controller-off", "validation-only"],
)
def test_without_the_gateway_or_its_controller_nothing_of_it_renders(helm, values):
    docs = documents(helm.render(*[arg for value in values for arg in ("--set", value)]))
    assert not [d for d in docs if d["metadata"]["name"].startswith(GATEWAY)]
    for owner, spec in pod_specs(docs):
        for container in spec["containers"]:
            assert not [a for a in container.get("args", []) if a.startswith("--gateway")], owner


def test_sidecar_cluster_role_carries_the_rules_of_the_sidecar_role_file(default_render):
    import yaml

    role_file = CHART / "files" / "sidecar-role.yaml"
    assert role_file.is_file(), f"{role_file} (the sidecar's minimal Role) is missing"
    objects = by_kind(documents(default_render))
    assert (
        objects["ClusterRole", f"{RELEASE}-sidecar"]["rules"]
        == yaml.safe_load(role_file.read_text())["rules"]
    )
    # The sidecar reads its ModelDeployment (spec and published decision) and nothing else.
    assert objects["ClusterRole", f"{RELEASE}-sidecar"]["rules"] == [
        {
            "apiGroups": ["deployment.beamlit.com"],
            "resources": ["modeldeployments"],
            "verbs": ["get", "list", "watch"],
        }
    ]


def webhook_args(rendered: str) -> list[str]:
    deployment = by_kind(documents(rendered))["Deployment", WEBHOOK]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]


@pytest.mark.parametrize(
    "value",
    ["https://models.example:8443/v1", '{"host": "models.example:443", "scheme": "https"}'],
)
def test_the_default_remote_backend_reaches_the_webhook(helm, value, tmp_path):
    import yaml

    assert not any(a.startswith("--default-remote-backend") for a in webhook_args(helm.render()))
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"defaultRemoteBackend": value}))
    assert f"--default-remote-backend={value}" in webhook_args(helm.render("-f", str(values)))
    # Validation only (no injection) needs it too.
    args = webhook_args(helm.render("-f", str(values), "--set", "webhook.mutating.enabled=false"))
    assert f"--default-remote-backend={value}" in args


@pytest.mark.parametrize("value", ["models.example:80", "ftp://models.example", "http://a b"])
def test_the_schema_refuses_a_default_remote_backend_that_is_no_url_or_json(helm, value):
    result = helm.template("--set-string", f"defaultRemoteBackend={value}")
    assert result.returncode != 0 and "at '/defaultRemoteBackend'" in result.stderr, result.stderr


# ---- webhook configurations --------------------------------------------------------------


def test_modeldeployment_validation_fails_closed_and_pod_injection_fails_open(default_render):
    objects = by_kind(documents(default_render))
    (validating,) = objects["ValidatingWebhookConfiguration", WEBHOOK]["webhooks"]
    (mutating,) = objects["MutatingWebhookConfiguration", WEBHOOK]["webhooks"]
    assert validating["failurePolicy"] == "Fail"
    assert mutating["failurePolicy"] == "Ignore"
    for hook in (validating, mutating):
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["timeoutSeconds"] == 5
        assert hook["clientConfig"]["service"]["name"] == WEBHOOK
        assert hook["clientConfig"]["service"]["namespace"] == NAMESPACE
        assert hook["clientConfig"]["service"]["port"] == 443
    assert validating["clientConfig"]["service"]["path"] == "/validate-modeldeployments"
    assert validating["rules"] == [
        {
            "apiGroups": ["deployment.beamlit.com"],
            "apiVersions": ["v1alpha1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["modeldeployments"],
            "scope": "Namespaced",
        }
    ]
    assert mutating["clientConfig"]["service"]["path"] == "/mutate-pods"
    assert mutating["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert mutating["reinvocationPolicy"] == "IfNeeded"
    assert mutating["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]}
        ]
    }


def test_excluded_namespaces_add_to_the_system_and_release_namespaces(helm):
    rendered = helm.render("--set", "webhook.mutating.excludedNamespaces={monitoring,kube-system}")
    (mutating,) = by_kind(documents(rendered))["MutatingWebhookConfiguration", WEBHOOK]["webhooks"]
    assert mutating["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "kube-system",
        NAMESPACE,
        "monitoring",
    ]


# ---- certificates ------------------------------------------------------------------------


def generated_tls(docs):
    objects = by_kind(docs)
    data = objects["Secret", f"{WEBHOOK}-tls"]["data"]
    pem = {key: base64.b64decode(value) for key, value in data.items()}
    bundles = [
        base64.b64decode(objects[kind, WEBHOOK]["webhooks"][0]["clientConfig"]["caBundle"])
        for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
        if (kind, WEBHOOK) in objects
    ]
    return objects, pem, bundles


def test_the_ca_bundle_of_both_configurations_verifies_the_serving_certificate(default_render):
    objects, pem, bundles = generated_tls(documents(default_render))
    assert objects["Secret", f"{WEBHOOK}-tls"]["type"] == "kubernetes.io/tls"
    assert bundles[0] == bundles[1], "the two webhook configurations trust different CAs"
    (ca,) = x509.load_pem_x509_certificates(bundles[0])
    assert ca.public_bytes(serialization.Encoding.PEM) == pem["ca.crt"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert = x509.load_pem_x509_certificate(pem["tls.crt"])
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer do not match
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(SERVICE_DNS_NAMES)
    key = serialization.load_pem_private_key(pem["tls.key"], password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365)
    not_after = objects["Secret", f"{WEBHOOK}-tls"]["metadata"]["annotations"][
        "offload.beamlit.com/not-after"
    ]
    recorded = dt.datetime.fromisoformat(not_after)
    assert abs(recorded - cert.not_valid_after_utc) < dt.timedelta(minutes=5)


def test_certificate_validity_follows_the_values(helm):
    rendered = helm.render(
        "--set", "webhook.certs.durationDays=30", "--set", "webhook.certs.renewBeforeDays=7"
    )
    _, pem, _ = generated_tls(documents(rendered))
    cert = x509.load_pem_x509_certificate(pem["tls.crt"])
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)


def test_pods_restart_when_the_certificate_changes(helm, default_render):
    def checksum(rendered):
        deployment = by_kind(documents(rendered))["Deployment", WEBHOOK]
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]

    # `helm template` cannot look up the existing Secret, so each render is a new certificate.
    assert checksum(default_render) != checksum(helm.render())


def _handshake(port: int, ca_pem: bytes, server_name: str) -> str:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
    return reply.decode(errors="replace")


def test_offload_webhook_serves_the_generated_certificate_to_a_client_trusting_the_ca_bundle(helm, tmp_path):
    """The rendered Secret, mounted as the Deployment mounts it, served by the real
    offload-webhook with the rendered arguments, verified as the API server verifies it:
    against caBundle, for the Service's name."""
    docs = documents(helm.render("--set", "webhook.mutating.enabled=false"))
    objects, pem, bundles = generated_tls(docs)
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for key in ("tls.crt", "tls.key"):
        (tls_dir / key).write_bytes(pem[key])
        (tls_dir / key).chmod(0o400)
    container = objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    args = [a.replace("/tls/", f"{tls_dir}/") for a in container["args"] if not a.startswith("--port=")]
    exe = shutil.which(container["command"][0])
    argv = [exe] if exe else [sys.executable, "-m", "webhook.cli"]
    process = ManagedProcess(
        WEBHOOK,
        [*argv, *args, "--host", "127.0.0.1", f"--port={port}"],
        tmp_path / "webhook.log",
        cwd=REPO_ROOT,
    )
    try:
        wait_until("offload-webhook to listen", lambda: _can_connect(port), 60, alive=[process])
        for name in SERVICE_DNS_NAMES[2:]:
            reply = _handshake(port, bundles[0], name)
            assert reply.startswith("HTTP/1.1 200"), reply
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(port, bundles[0], "some-other-service.default.svc")
    finally:
        process.stop()


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_bring_your_own_certificate_with_a_ca_bundle(helm):
    ca_bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
    objects = by_kind(
        documents(
            helm.render(
                "--set", "webhook.certs.existingSecret=my-tls", "--set", f"webhook.certs.caBundle={ca_bundle}"
            )
        )
    )
    assert not [key for key in objects if key[0] == "Secret"], (
        "the chart must not generate a Secret of its own"
    )
    spec = objects["Deployment", WEBHOOK]["spec"]["template"]["spec"]
    assert next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "my-tls"
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        assert objects[kind, WEBHOOK]["webhooks"][0]["clientConfig"]["caBundle"] == ca_bundle


def test_bring_your_own_certificate_from_cert_manager(helm):
    rendered = helm.render(
        "--set",
        "webhook.certs.existingSecret=my-tls",
        "--set",
        "webhook.certs.certManagerInjectCAFrom=offload-system/webhook-cert",
    )
    objects = by_kind(documents(rendered))
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        config = objects[kind, WEBHOOK]
        assert config["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": "offload-system/webhook-cert"
        }
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]


# ---- values that are refused -------------------------------------------------------------


def test_schema_rejects_an_unknown_key(helm):
    result = helm.template("--set", "webhook.replicas=3")
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert "at '/webhook': additional properties 'replicas' not allowed" in result.stderr


def test_schema_rejects_a_bad_type(helm):
    result = helm.template("--set", "webhook.replicaCount=two")
    assert result.returncode != 0
    assert "at '/webhook/replicaCount': got string, want integer" in result.stderr


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (["webhook.validating.failurePolicy=Never"], "at '/webhook/validating/failurePolicy'"),
        (["webhook.validating.timeoutSeconds=31"], "at '/webhook/validating/timeoutSeconds'"),
        (["webhook.replicaCount=0"], "at '/webhook/replicaCount'"),
        (["sidecar.proxyPort=70000"], "at '/sidecar/proxyPort'"),
        (["image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
        (["gateway.portRange=20000"], "at '/gateway/portRange'"),
        (["gateway.secrets[0].namespace=models"], "at '/gateway/secrets/0'"),
    ],
)
def test_schema_rejects_values_out_of_range(helm, values, error):
    result = helm.template(*[arg for value in values for arg in ("--set", value)])
    assert result.returncode != 0 and error in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            ["webhook.mutating.failurePolicy=Fail"],
            "webhook.mutating.failurePolicy: Fail blocks every pod creation",
        ),
        (
            ["webhook.replicaCount=2", "webhook.podDisruptionBudget.minAvailable=2"],
            "webhook.podDisruptionBudget.minAvailable: 2 would block every node drain",
        ),
        (["webhook.serviceAccount.create=false"], "webhook.serviceAccount.name: required"),
        (["sidecar.adminPort=15080"], "sidecar.adminPort: must differ from sidecar.proxyPort (15080)"),
        (["sidecar.resources.requests.cpu=null"], "sidecar.resources.requests.cpu: required"),
        (["sidecar.resources=null"], "sidecar.resources.requests.cpu: required"),
        (
            ["webhook.certs.existingSecret=my-tls"],
            "webhook.certs.existingSecret: also give webhook.certs.caBundle",
        ),
        (
            [
                "webhook.certs.existingSecret=my-tls",
                "webhook.certs.caBundle=QUJD",
                "webhook.certs.certManagerInjectCAFrom=a/b",
            ],
            "give either caBundle or certManagerInjectCAFrom",
        ),
        (
            [
                "webhook.certs.existingSecret=my-tls",
                "webhook.certs.caBundle=QUJD",
                "webhook.certs.regenerate=true",
            ],
            "webhook.certs.regenerate: the chart generates no certificate",
        ),
        (["webhook.certs.caBundle=QUJD"], "only apply with webhook.certs.existingSecret"),
        (
            ["webhook.certs.caDurationDays=10"],
            "webhook.certs.caDurationDays: 10 is shorter than webhook.certs.durationDays 365",
        ),
        (
            ["webhook.certs.renewBeforeDays=365"],
            "webhook.certs.renewBeforeDays: 365 must be lower than webhook.certs.durationDays 365",
        ),
        (["gateway.portRange=30000-20000"], "gateway.portRange: must be FIRST-LAST with 1 <= FIRST <= LAST"),
        (["gateway.portRange=1-70000"], "gateway.portRange: must be FIRST-LAST"),
        (["gateway.adminPort=20001"], "gateway.adminPort: 20001 is inside gateway.portRange 20000-29999"),
        (
            ["gateway.replicaCount=2", "gateway.podDisruptionBudget.minAvailable=2"],
            "gateway.podDisruptionBudget.minAvailable: 2 would block every node drain",
        ),
        (["gateway.serviceAccount.create=false"], "gateway.serviceAccount.name: required"),
    ],
)
def test_contradicting_values_fail_with_the_field_named(helm, values, error):
    result = helm.template(*[arg for value in values for arg in ("--set", value)])
    assert result.returncode != 0, f"{values} rendered"
    assert error in result.stderr, result.stderr


def test_the_guards_hold_without_schema_validation(helm):
    result = helm.template("--skip-schema-validation", "--set", "webhook.replicaCount=0")
    assert result.returncode != 0
    assert "webhook.replicaCount: must be at least 1, got 0" in result.stderr


def test_failure_policy_fail_for_pods_renders_once_acknowledged(helm):
    rendered = helm.render(
        "--set",
        "webhook.mutating.failurePolicy=Fail",
        "--set",
        "webhook.mutating.failurePolicyAcknowledged=true",
    )
    (mutating,) = by_kind(documents(rendered))["MutatingWebhookConfiguration", WEBHOOK]["webhooks"]
    assert mutating["failurePolicy"] == "Fail"


def test_names_stay_valid_for_a_long_release_name(helm):
    release = "a-release-name-at-helms-limit-of-fifty-three-characte"  # 53, helm's maximum
    docs = documents(helm.render(release=release))
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-"), name
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63, value
    names = [doc["metadata"]["name"] for doc in docs if doc["kind"] in {"Deployment", "Service"}]
    assert all(name.endswith(("-webhook", "-gateway")) for name in names), names


def test_clusters_older_than_1_29_are_refused(helm):
    result = helm.run("template", RELEASE, str(CHART), "--kube-version", "v1.28.9")
    assert result.returncode != 0
    assert (
        "chart requires kubeVersion: >=1.29.0-0 which is incompatible with Kubernetes v1.28.9"
        in result.stderr
    )


def test_sidecar_settings_reach_the_injector_configuration(helm):
    rendered = helm.render(
        "--set",
        "sidecar.imageRepository=reg.example/sidecar",
        "--set",
        "sidecar.imageTag=1.2.3",
        "--set",
        "sidecar.nativeSidecar=false",
        "--set",
        "sidecar.proxyPort=18080",
        "--set",
        "sidecar.configVersion=v7",
    )
    import yaml

    config = yaml.safe_load(by_kind(documents(rendered))["ConfigMap", WEBHOOK]["data"]["injector.yaml"])
    assert config["image"] == "reg.example/sidecar:1.2.3"
    assert (
        config["nativeSidecar"] is False and config["proxyPort"] == 18080 and config["configVersion"] == "v7"
    )
