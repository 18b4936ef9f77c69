"""Injection decisions as table tests: overrides, the model's port, conflicts, reasons."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from crds.model import ModelDeployment, ModelDeploymentSpec, ServiceReference, WorkloadReference
from tests.unit.podcheck import pod_problems
from webhook.injection import (
    CONFIG_VERSION_ANNOTATION,
    INJECTED_ANNOTATION,
    SERVICE_ACCOUNT_DIR,
    SERVICE_ACCOUNT_DIR_ENV,
    TOKEN_VOLUME,
    ServiceInfo,
    ServicePort,
    apply_overrides,
    in_stable_order,
    inject,
    resolve_model_port,
    shape_problem,
    windows_only,
)
from webhook.injector_config import ConfigError, InjectorConfig
from webhook.reasons import WARNED, Reason
from webhook.selection import CachedModelDeployment, Selection, Workload

CONFIG = InjectorConfig(
    image="reg.example/offload:1",
    config_version="v1",
    resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
)


def pod(*, ports=({"name": "http", "containerPort": 8080},), annotations=None, **spec):
    meta = {"generateName": "llm-5d4c-", "labels": {"app": "llm"}}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "model", "image": "model:1", "ports": list(ports)}], **spec},
    }


LLM_SERVICE_REF = ServiceReference(name="llm", target_port=80)


def selection(service_ref=LLM_SERVICE_REF):
    spec = ModelDeploymentSpec(
        model="m", model_source_ref=WorkloadReference(name="llm"), service_ref=service_ref
    )
    chosen = CachedModelDeployment(ModelDeployment(name="my-md", namespace="models", spec=spec))
    return Selection(None, chosen, Workload("Deployment", "models", "llm", None), "selected")


SERVICE = ServiceInfo("models", "llm", (ServicePort(80, "http"),))


def sidecar_of(outcome):
    spec = outcome.pod["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "offload-proxy"]
    assert len(found) == 1
    return found[0]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- the injected container --------------------------------------------------------------------


def test_the_injected_sidecar_is_a_hardened_native_sidecar_with_its_environment():
    outcome = inject(pod(), selection(), SERVICE, CONFIG)
    assert outcome.reason is Reason.INJECTED and outcome.warnings == ()
    c = sidecar_of(outcome)
    assert outcome.pod["spec"]["initContainers"][-1] is c and c["restartPolicy"] == "Always"
    assert c["image"] == "reg.example/offload:1" and c["command"] == ["offload-sidecar"]
    assert c["ports"] == [
        {"name": "offload-proxy", "containerPort": 15080, "protocol": "TCP"},
        {"name": "offload-admin", "containerPort": 15090, "protocol": "TCP"},
    ]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "offload-admin", "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "offload-admin", "scheme": "HTTP"}
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert env_of(c) == {
        "POD_NAME": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
        "POD_NAMESPACE": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
        "MODELDEPLOYMENT_NAME": "my-md",
        "OFFLOAD_MODEL_PORT": "8080",
        "OFFLOAD_UPSTREAM": "127.0.0.1:8080",
        "OFFLOAD_PROXY_PORT": "15080",
        "OFFLOAD_ADMIN_PORT": "15090",
        "OFFLOAD_SERVICEACCOUNT_DIR": "/var/run/secrets/offload.beamlit.com/serviceaccount",
    }
    assert c["volumeMounts"] == [
        {
            "name": "offload-proxy-token",
            "mountPath": "/var/run/secrets/offload.beamlit.com/serviceaccount",
            "readOnly": True,
        }
    ]
    assert c["resources"] == CONFIG.resources
    assert outcome.pod["metadata"]["annotations"] == {
        INJECTED_ANNOTATION: "my-md",
        CONFIG_VERSION_ANNOTATION: "v1",
    }
    assert pod_problems(outcome.pod) == []


def test_the_installations_default_remote_backend_is_passed_to_the_sidecar():
    import dataclasses

    backend = '{"host": "models.example:443", "scheme": "https"}'
    config = dataclasses.replace(CONFIG, default_remote_backend=backend)
    env = env_of(sidecar_of(inject(pod(), selection(), SERVICE, config)))
    assert env["OFFLOAD_DEFAULT_REMOTE_BACKEND"] == backend
    assert "OFFLOAD_DEFAULT_REMOTE_BACKEND" not in env_of(
        sidecar_of(inject(pod(), selection(), SERVICE, CONFIG))
    )


def test_the_patch_turns_the_original_into_the_mutated_copy_and_the_input_is_untouched():
    original = pod(annotations={"keep": "me"}, initContainers=[{"name": "init", "image": "busybox"}])
    before = copy.deepcopy(original)
    outcome = inject(original, selection(), SERVICE, CONFIG)
    assert original == before
    assert jsonpatch.apply_patch(original, list(outcome.patch)) == outcome.pod
    assert [c["name"] for c in outcome.pod["spec"]["initContainers"]] == ["init", "offload-proxy"]
    assert outcome.pod["metadata"]["annotations"]["keep"] == "me"


def test_without_native_sidecars_the_proxy_is_the_last_regular_container():
    outcome = inject(
        pod(), selection(), SERVICE, InjectorConfig(image="reg.example/offload:1", native_sidecar=False)
    )
    assert [c["name"] for c in outcome.pod["spec"]["containers"]] == ["model", "offload-proxy"]
    assert "restartPolicy" not in sidecar_of(outcome) and "initContainers" not in outcome.pod["spec"]
    assert "resources" not in sidecar_of(outcome)  # none configured, none invented


def test_the_sidecar_alone_gets_its_own_token_even_when_the_pod_automounts_none():
    original = pod(
        automountServiceAccountToken=False,
        volumes=[{"name": "weights", "emptyDir": {}}],
    )
    original["spec"]["containers"][0]["volumeMounts"] = [{"name": "weights", "mountPath": "/weights"}]
    outcome = inject(original, selection(), SERVICE, CONFIG)
    assert outcome.reason is Reason.INJECTED
    spec = outcome.pod["spec"]
    assert spec["automountServiceAccountToken"] is False  # the pod's choice stands for its containers
    assert [v["name"] for v in spec["volumes"]] == ["weights", TOKEN_VOLUME]
    assert spec["volumes"][1]["projected"]["sources"] == [
        {"serviceAccountToken": {"path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {
            "downwardAPI": {
                "items": [
                    {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                ]
            }
        },
    ]
    # Mounted into the sidecar and nowhere else: the model gets no credentials it did not have.
    assert spec["containers"][0]["volumeMounts"] == [{"name": "weights", "mountPath": "/weights"}]
    assert sidecar_of(outcome)["volumeMounts"][0]["mountPath"] == SERVICE_ACCOUNT_DIR
    assert jsonpatch.apply_patch(original, list(outcome.patch)) == outcome.pod
    assert pod_problems(outcome.pod) == []


def test_the_sidecar_reads_its_credentials_where_the_injector_mounts_them():
    from sidecar.cluster import credentials

    assert credentials.SERVICE_ACCOUNT_DIR_ENV == SERVICE_ACCOUNT_DIR_ENV


# --- pods the sidecar cannot run in ------------------------------------------------------------


def required_os_terms(*terms):
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/os", "operator": op, "values": values}]}
                    for op, values in terms
                ]
            }
        }
    }


@pytest.mark.parametrize(
    "spec, windows",
    [
        ({"os": {"name": "windows"}}, True),
        ({"nodeSelector": {"kubernetes.io/os": "windows"}}, True),
        ({"nodeSelector": {"beta.kubernetes.io/os": "windows"}}, True),
        ({"affinity": required_os_terms(("In", ["windows"]))}, True),
        ({"affinity": required_os_terms(("NotIn", ["linux"]))}, True),
        ({"affinity": required_os_terms(("In", ["windows"]), ("NotIn", ["linux"]))}, True),
        ({"os": {"name": "linux"}}, False),
        ({"nodeSelector": {"kubernetes.io/os": "linux"}}, False),
        ({"nodeSelector": {"kubernetes.io/hostname": "windows"}}, False),
        # Terms are ORed: one that admits Linux nodes is enough.
        ({"affinity": required_os_terms(("In", ["windows"]), ("In", ["linux"]))}, False),
        ({"affinity": required_os_terms(("In", ["windows", "linux"]))}, False),
        ({"affinity": required_os_terms(("NotIn", ["windows"]))}, False),
        ({"affinity": required_os_terms(("Exists", []))}, False),
        # Only a preference: the scheduler may still pick a Linux node.
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "preference": required_os_terms(("In", ["windows"]))}
                        ]
                    }
                }
            },
            False,
        ),
    ],
)
def test_windows_pods_are_skipped_with_a_warning(spec, windows):
    assert (windows_only(spec) is not None) is windows
    outcome = inject(pod(**spec), selection(), SERVICE, CONFIG)
    if windows:
        assert outcome.reason is Reason.WINDOWS_POD and outcome.patch == ()
        assert outcome.warnings[0].startswith("offload: sidecar not injected (WindowsPod): ")
    else:
        assert outcome.reason is Reason.INJECTED


def test_a_pod_with_a_volume_named_like_the_sidecars_credentials_is_skipped():
    outcome = inject(pod(volumes=[{"name": TOKEN_VOLUME, "emptyDir": {}}]), selection(), SERVICE, CONFIG)
    assert outcome.reason is Reason.VOLUME_CONFLICT and "(VolumeConflict)" in outcome.warnings[0]


# --- the pod's shape ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"metadata": {"ownerReferences": True}}, "metadata.ownerReferences: must be a list, got boolean"),
        ({"spec": "a string"}, "spec: must be an object, got string"),
        ({"spec": {"containers": ["model"]}}, "spec.containers[0]: must be an object, got string"),
        ({"metadata": "x"}, "metadata: must be an object, got string"),
        ({"metadata": {"labels": {"app": 1}}}, "metadata.labels[app]: must be a string, got number"),
        ({"metadata": {"annotations": []}}, "metadata.annotations: must be an object, got list"),
        (
            {"metadata": {"ownerReferences": [{"controller": "yes"}]}},
            "metadata.ownerReferences[0].controller: must be a boolean, got string",
        ),
        (
            {"spec": {"containers": [{"name": "m", "ports": [{"containerPort": "80"}]}]}},
            "spec.containers[0].ports[0].containerPort: must be an integer, got string",
        ),
        (
            {"spec": {"containers": [{"name": "m", "ports": [{"containerPort": True}]}]}},
            "spec.containers[0].ports[0].containerPort: must be an integer, got boolean",
        ),
        (
            {"spec": {"containers": [], "initContainers": {}}},
            "spec.initContainers: must be a list, got object",
        ),
        ({"spec": {"containers": [], "volumes": [None]}}, "spec.volumes[0]: must be an object, got null"),
        (
            {"spec": {"containers": [], "hostNetwork": "true"}},
            "spec.hostNetwork: must be a boolean, got string",
        ),
        ({"spec": {"containers": [], "os": "windows"}}, "spec.os: must be an object, got string"),
        (
            {"spec": {"containers": [], "nodeSelector": {"kubernetes.io/os": ["windows"]}}},
            "spec.nodeSelector[kubernetes.io/os]: must be a string, got list",
        ),
        (
            {
                "spec": {
                    "containers": [],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}, 3]}
                        }
                    },
                }
            },
            (
                "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                ".nodeSelectorTerms[1]: must be an object, got number"
            ),
        ),
    ],
)
def test_wrong_json_types_are_named_by_their_field(change, problem):
    base = {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": []}}
    assert shape_problem({**base, **change}) == problem


def test_well_typed_pods_have_no_shape_problem():
    assert shape_problem(pod()) is None
    assert shape_problem(inject(pod(), selection(), SERVICE, CONFIG).pod) is None
    # Absent and null fields are what the API server would default, not wrong types.
    assert shape_problem({"metadata": None, "spec": {"containers": None, "nodeSelector": None}}) is None


# --- the model's port --------------------------------------------------------------------------


def svc(*ports, original=None):
    return ServiceInfo("models", "llm", tuple(ports), original)


@pytest.mark.parametrize(
    "ref_port, service, containers_ports, expected",
    [
        (80, svc(ServicePort(80, "http")), [{"name": "http", "containerPort": 8080}], 8080),
        (80, svc(ServicePort(80, 8000)), [], 8000),  # numeric: no declaration needed
        (80, svc(ServicePort(80)), [], 80),  # no targetPort: the port itself
        (None, svc(ServicePort(81, 8001), ServicePort(80, 8000)), [], 8001),  # no targetPort in ref: first
        (80, svc(ServicePort(9000, 9001), ServicePort(80, 8000)), [], 8000),  # picks by port
        (8000, svc(ServicePort(80, 8000)), [], 8000),  # else by numeric targetPort
        (81, svc(ServicePort(80, 8000)), [], None),
        (80, svc(ServicePort(80, "http")), [{"name": "api", "containerPort": 8080}], None),
        (80, svc(), [], None),
        # Already captured by the controller: the original target is in the annotation.
        (
            80,
            svc(ServicePort(80, "offload-proxy"), original="http"),
            [{"name": "http", "containerPort": 7070}],
            7070,
        ),
        (80, svc(ServicePort(80, "offload-proxy"), original=8000), [], 8000),
        (80, svc(ServicePort(80, "offload-proxy")), [], None),
    ],
)
def test_model_port_resolution(ref_port, service, containers_ports, expected):
    p = pod(ports=containers_ports)
    assert resolve_model_port(p, "llm", ref_port, service).port == expected


def test_a_named_port_resolves_in_any_app_container_but_not_in_init_containers():
    p = pod(ports=[])
    p["spec"]["containers"].append(
        {"name": "b", "image": "b", "ports": [{"name": "http", "containerPort": 9}]}
    )
    assert resolve_model_port(p, "llm", 80, svc(ServicePort(80, "http"))).port == 9
    q = pod(
        ports=[],
        initContainers=[{"name": "i", "image": "i", "ports": [{"name": "http", "containerPort": 9}]}],
    )
    assert resolve_model_port(q, "llm", 80, svc(ServicePort(80, "http"))).port is None


def test_without_service_the_first_container_port_is_used_and_said():
    p = pod(ports=[{"containerPort": 5000}, {"containerPort": 5001}])
    no_ref = resolve_model_port(p, None, None, None)
    assert no_ref.port == 5000 and "has no serviceRef" in no_ref.warnings[0]
    missing = resolve_model_port(p, "llm", 80, None)
    assert missing.port == 5000 and "Service 'llm' was not found" in missing.warnings[0]
    assert resolve_model_port(pod(ports=[]), None, None, None).port is None


def test_the_model_port_annotation_wins():
    p = pod(ports=[{"name": "alt", "containerPort": 6000}])
    assert resolve_model_port(p, "llm", 80, SERVICE, override=7000).port == 7000
    assert resolve_model_port(p, "llm", 80, SERVICE, override="alt").port == 6000


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_apply_and_keep_what_they_do_not_name():
    settings = apply_overrides(
        CONFIG,
        {
            "offload.beamlit.com/proxy-image": "other.example/x@sha256:" + "a" * 64,
            "offload.beamlit.com/proxy-cpu-limit": "1",
            "offload.beamlit.com/proxy-memory-request": "100Mi",
            "offload.beamlit.com/native-sidecar": "False",
            "offload.beamlit.com/proxy-port": "18080",
            "offload.beamlit.com/model-port": "http",
            "unrelated.example/x": "y",
        },
    )
    assert settings.config.image.startswith("other.example/x@sha256:")
    assert settings.config.resources == {
        "requests": {"cpu": "50m", "memory": "100Mi"},
        "limits": {"memory": "128Mi", "cpu": "1"},
    }
    assert settings.config.native_sidecar is False and settings.config.proxy_port == 18080
    assert settings.model_port == "http"
    assert CONFIG.resources["requests"]["memory"] == "64Mi"  # the shared config is untouched


@pytest.mark.parametrize(
    "annotation, value, message",
    [
        ("proxy-image", "http://evil/x", "offload.beamlit.com/proxy-image: not a valid image reference"),
        ("proxy-image", "a b", "offload.beamlit.com/proxy-image: not a valid image reference"),
        ("proxy-cpu-request", "lots", "offload.beamlit.com/proxy-cpu-request: not a valid quantity: 'lots'"),
        ("proxy-cpu-request", "0", "offload.beamlit.com/proxy-cpu-request: must be positive"),
        ("proxy-memory-request", "1Gi", "requests.memory: 1Gi is above the limit 128Mi"),
        ("proxy-port", "0", "offload.beamlit.com/proxy-port: must be a port number between 1 and 65535"),
        ("proxy-port", "65536", "offload.beamlit.com/proxy-port: must be a port number"),
        ("proxy-port", "15090", "offload.beamlit.com/admin-port: must differ from the proxy port 15090"),
        ("admin-port", "x", "offload.beamlit.com/admin-port: must be a port number"),
        # Digits of other scripts: '²'.isdigit() is true but int() refuses it; int() reads
        # Arabic-Indic digits; int() refuses more than 4300 digits.
        ("admin-port", "\u00b2", "offload.beamlit.com/admin-port: must be a port number"),
        (
            "proxy-port",
            "\u0661\u0668\u0660\u0668\u0660",
            "offload.beamlit.com/proxy-port: must be a port number",
        ),
        ("proxy-port", "9" * 5000, "offload.beamlit.com/proxy-port: must be a port number"),
        ("model-port", "\u00b2", "offload.beamlit.com/model-port: must be a port number or a container port"),
        (
            "model-port",
            "\u0668\u0660",
            "offload.beamlit.com/model-port: must be a port number or a container port",
        ),
        (
            "model-port",
            "9" * 5000,
            "offload.beamlit.com/model-port: must be a port number between 1 and 65535",
        ),
        (
            "model-port",
            "h\u00e9",
            "offload.beamlit.com/model-port: must be a port number or a container port",
        ),
        ("native-sidecar", "yes", 'offload.beamlit.com/native-sidecar: must be "true" or "false"'),
        (
            "model-port",
            "Not_A_Name",
            "offload.beamlit.com/model-port: must be a port number or a container port",
        ),
    ],
)
def test_a_bad_override_is_not_injected_with_a_warning_naming_it(annotation, value, message):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(CONFIG, {f"offload.beamlit.com/{annotation}": value})
    assert message in str(caught.value)
    outcome = inject(
        pod(annotations={f"offload.beamlit.com/{annotation}": value}), selection(), SERVICE, CONFIG
    )
    assert outcome.reason is Reason.BAD_OVERRIDE and outcome.patch == ()
    assert (
        len(outcome.warnings) == 1
        and message in outcome.warnings[0]
        and "(BadOverride)" in outcome.warnings[0]
    )


# --- reasons -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "the_pod, reason",
    [
        (pod(annotations={"offload.beamlit.com/inject": "false"}), Reason.OPTED_OUT),
        (pod(annotations={"offload.beamlit.com/inject": "FALSE"}), Reason.OPTED_OUT),
        (pod(annotations={"offload.beamlit.com/inject": "true"}), Reason.INJECTED),
        (pod(annotations={"offload.beamlit.com/inject": "maybe"}), Reason.BAD_OVERRIDE),
        (pod(hostNetwork=True), Reason.HOST_NETWORK),
        (pod(hostNetwork=False), Reason.INJECTED),
        (pod(os={"name": "windows"}), Reason.WINDOWS_POD),
        (pod(ports=[{"name": "web", "containerPort": 8080}]), Reason.NO_MODEL_PORT),
        (
            pod(ports=[{"name": "http", "containerPort": 15080}]),
            Reason.PORT_CONFLICT,
        ),  # the model is on our port
        (
            pod(ports=[{"name": "http", "containerPort": 8080}, {"containerPort": 15090}]),
            Reason.PORT_CONFLICT,
        ),
        (
            pod(
                ports=[{"name": "http", "containerPort": 8080}, {"name": "offload-admin", "containerPort": 1}]
            ),
            Reason.PORT_CONFLICT,
        ),
        (pod(initContainers=[{"name": "offload-proxy", "image": "x"}]), Reason.ALREADY_INJECTED),
        ({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}}, Reason.NO_MODEL_PORT),
    ],
)
def test_reasons(the_pod, reason):
    outcome = inject(the_pod, selection(), SERVICE, CONFIG)
    assert outcome.reason is reason
    assert bool(outcome.patch) is (reason is Reason.INJECTED)
    warned = any("sidecar not injected" in w for w in outcome.warnings)
    assert warned is (reason in WARNED)


def test_already_injected_wins_over_everything_else():
    injected = inject(pod(), selection(), SERVICE, CONFIG).pod
    injected["spec"]["hostNetwork"] = True
    assert inject(injected, selection(), SERVICE, CONFIG).reason is Reason.ALREADY_INJECTED


def test_a_port_conflict_can_be_resolved_by_annotation():
    p = pod(
        ports=[{"name": "http", "containerPort": 8080}, {"containerPort": 15080}],
        annotations={"offload.beamlit.com/proxy-port": "16080"},
    )
    outcome = inject(p, selection(), SERVICE, CONFIG)
    assert outcome.reason is Reason.INJECTED and sidecar_of(outcome)["ports"][0]["containerPort"] == 16080
    assert pod_problems(outcome.pod) == []


def test_selection_reasons_pass_through_unchanged():
    for reason in (
        Reason.NO_MATCHING_MODELDEPLOYMENT,
        Reason.MODELDEPLOYMENT_DISABLED,
        Reason.OWNED_BY_ANOTHER_CONTROLLER,
    ):
        outcome = inject(pod(), Selection(reason, message="why"), SERVICE, CONFIG)
        assert outcome.reason is reason and outcome.patch == () and outcome.message == "why"


# --- the patch ---------------------------------------------------------------------------------


def test_the_patch_equals_a_diff_of_the_whole_pods_for_every_golden_case():
    from tests.unit.test_golden import CACHE, CASES, load_case, review_for
    from webhook.admission import parse_review
    from webhook.mutating import decide

    injected = 0
    for case in CASES:
        namespace, p = load_case(case)
        outcome = decide(parse_review(review_for(case, namespace, p)), CACHE, CONFIG)
        if outcome.injected:
            injected += 1
            whole = jsonpatch.make_patch(p, outcome.pod).patch
            assert sorted(whole, key=lambda op: op["path"]) == list(outcome.patch), case
    assert injected >= 10


def test_only_independent_adds_are_reordered():
    adds = [{"op": "add", "path": "/b", "value": 1}, {"op": "add", "path": "/a", "value": 2}]
    assert in_stable_order(adds) == (adds[1], adds[0])
    nested = [
        {"op": "add", "path": "/b", "value": {}},
        {"op": "add", "path": "/b/c", "value": 1},
        {"op": "add", "path": "/a", "value": 2},
    ]
    assert in_stable_order(nested) == tuple(nested)
    mixed = [{"op": "remove", "path": "/b"}, {"op": "add", "path": "/a", "value": 2}]
    assert in_stable_order(mixed) == tuple(mixed)
