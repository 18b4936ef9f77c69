"""Fixtures of the e2e tier: a real control plane (built by controlplane/build.sh, never
skipped: a missing Go toolchain or a failed build is an error), a namespace per test,
and the project's webhook run as a local process."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator

import kubernetes
import pytest

from tests.e2e.controlplane import binaries
from tests.e2e.controlplane.cluster import ControlPlane
from tests.e2e.controlplane.process import wait_until
from tests.e2e.controlplane.webhook_process import WebhookServer, start_webhook
from tests.e2e.node.cluster import RealNodeCluster
from tests.e2e.node.images import build_images
from tests.e2e.node.release import HelmRelease, create_restricted_namespace
from tests.e2e.paths import CRD

log = logging.getLogger("e2e")

_RUNNING_KEY = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: needs the real control plane built by tests/e2e/controlplane/build.sh"
    )
    config.stash[_RUNNING_KEY] = []


def _running(config: pytest.Config) -> list:
    """Control planes and webhook servers running now, for the failure report."""
    return config.stash[_RUNNING_KEY]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        for thing in _running(item.config):
            for name, tail in _log_tails(thing).items():
                report.sections.append((f"{name} log (last lines)", tail))
    return report


def _log_tails(thing) -> dict[str, str]:
    if isinstance(thing, ControlPlane | RealNodeCluster):
        return thing.log_tails()
    if isinstance(thing, WebhookServer):
        return {thing.process.name: thing.process.log_tail()}
    return {}


def _echo(config: pytest.Config) -> Callable[[str], None]:
    """Writes a progress line to the terminal, outside output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def echo(line: str) -> None:
        log.info("%s", line)
        if reporter is not None and capture is not None and "go: downloading" not in line:
            with capture.global_and_fixture_disabled():
                reporter.write_line(line)

    return echo


@pytest.fixture(scope="session")
def control_plane_binaries(pytestconfig) -> binaries.Binaries:
    """Builds (or finds in the cache) every control-plane binary, showing build.sh's
    progress live: a first build takes many minutes."""
    return binaries.build(_echo(pytestconfig))


@pytest.fixture(scope="session")
def real_node(control_plane_binaries, tmp_path_factory, pytestconfig) -> Iterator[RealNodeCluster]:
    """A control plane of its own with one real node (containerd, kubelet, kube-proxy, a
    bridge CNI network, metrics-server), the images built here imported: see node/cluster.py.
    Builds what is missing first (kubelet, kube-proxy, metrics-server, the images). A missing
    prerequisite (root, a Debian package, a kernel feature) fails, naming it; never a skip.
    Holds the machine's real-node lock for the session."""
    echo = _echo(pytestconfig)
    node_binaries = binaries.build_node(echo)
    images = build_images(lambda line: echo(f"[images] {line}"))
    cluster = RealNodeCluster(
        control_plane_binaries,
        node_binaries,
        images,
        tmp_path_factory.mktemp("realnode"),
        echo=lambda line: echo(f"[e2e] {line}"),
    )
    _running(pytestconfig).append(cluster)
    try:
        with cluster:
            yield cluster
    finally:
        _running(pytestconfig).remove(cluster)


@pytest.fixture(scope="session")
def kube(control_plane_binaries, tmp_path_factory, pytestconfig) -> Iterator[ControlPlane]:
    """The running control plane: .kubeconfig, .server, .api_client, .binaries."""
    workdir = tmp_path_factory.mktemp("controlplane")
    plane = ControlPlane(control_plane_binaries, workdir)
    _running(pytestconfig).append(plane)
    try:
        with plane:
            _announce(pytestconfig, plane)
            yield plane
    finally:
        _running(pytestconfig).remove(plane)


def _announce(config: pytest.Config, plane: ControlPlane) -> None:
    """Shows, outside output capture, which binaries really run and where their logs are."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    lines = [f"control plane up at {plane.server} (kubeconfig {plane.kubeconfig}, logs {plane.logs_dir})"]
    lines += [f"  {name}: {version}" for name, version in plane.versions.items()]
    for line in lines:
        log.info(line)
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(f"[e2e] {line}")


@pytest.fixture
def core(kube) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube.api_client)


def _fresh_namespace(
    api_client: kubernetes.client.ApiClient, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A namespace named after the test (plus a random suffix), deleted afterwards."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    api = kubernetes.client.CoreV1Api(api_client)
    api.create_namespace({"metadata": {"name": name, "labels": {"offload-e2e": "true"}}})
    yield name
    try:
        api.delete_namespace(name, propagation_policy="Background")
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:  # a test may have deleted it
            raise


@pytest.fixture
def namespace(kube, request) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    yield from _fresh_namespace(kube.api_client, request)


@pytest.fixture
def run_webhook(tmp_path_factory, pytestconfig) -> Iterator[Callable[..., WebhookServer]]:
    """Factory: run_webhook(*cli_args, env=None) starts offload-webhook with fresh certificates
    from offload-certs on a free loopback port (extra environment in `env`, e.g.
    {"KUBECONFIG": str(kube.kubeconfig)}); every server started is stopped after the test."""
    started: list[WebhookServer] = []

    def start(*extra_args: str, env: dict[str, str] | None = None) -> WebhookServer:
        server = start_webhook(tmp_path_factory.mktemp("webhook"), *extra_args, env=env)
        started.append(server)
        _running(pytestconfig).append(server)
        return server

    yield start
    for server in started:
        _running(pytestconfig).remove(server)
        server.stop()


@pytest.fixture(scope="session")
def modeldeployment_crd(kube) -> str:
    """crds/modeldeployment.yaml applied with kubectl and Established; returns the CRD name."""
    if not CRD.is_file():
        pytest.fail(f"{CRD} is missing: the e2e tier needs the ModelDeployment CRD")
    applied = kube.kubectl("apply", "-f", str(CRD))
    assert applied.returncode == 0, f"kubectl apply -f {CRD} failed:\n{applied.stderr}"
    name = "modeldeployments.deployment.beamlit.com"
    api = kubernetes.client.ApiextensionsV1Api(kube.api_client)

    def established() -> bool:
        conditions = api.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_until(f"CRD {name} to be Established", established, 60, alive=kube.processes)
    return name


@pytest.fixture
def tutorial_in_default_namespace(kube) -> Iterator[None]:
    """The tutorial's objects live in namespace default (its ModelDeployment says so):
    deletes them after the test, whatever the test created."""
    yield
    for kind, name in [
        ("modeldeployments.deployment.beamlit.com", "my-model"),
        ("deployment", "php-apache"),
        ("service", "php-apache"),
    ]:
        deleted = kube.kubectl("delete", "-n", "default", kind, name, "--ignore-not-found", "--wait=false")
        assert deleted.returncode == 0, deleted.stderr


@pytest.fixture
def node_namespace(real_node, request) -> Iterator[str]:
    """A fresh namespace on the real node's cluster for one test, deleted afterwards."""
    yield from _fresh_namespace(real_node.api_client, request)


@pytest.fixture(scope="session")
def node_release(real_node, control_plane_binaries) -> Iterator[HelmRelease]:
    """The chart installed on the real node with its default values (the image
    localhost/offload:<appVersion>, built here and present on the node), into offload-system,
    which enforces the restricted Pod Security Standard. Uninstalled at the end."""
    release = HelmRelease(control_plane_binaries.helm, real_node.plane.kubeconfig)
    create_restricted_namespace(real_node.api_client, release.namespace)
    try:
        release.install()
        yield release
    finally:
        release.uninstall()
        kubernetes.client.CoreV1Api(real_node.api_client).delete_namespace(
            release.namespace, propagation_policy="Background"
        )


@pytest.fixture(scope="session")
def report(pytestconfig) -> Callable[[str], None]:
    """report(line): shows a line on the terminal as the test runs (outside output capture)."""
    return _echo(pytestconfig)
