"""Starts and stops a real control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (a fake kubelet) with one fake node, all on loopback; or, for the
real node (tests/e2e/node), the same control plane without kwok and with its API server on
the node's bridge address, where pods and the kubelet reach it."""

from __future__ import annotations

import logging
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import kubernetes

from .binaries import Binaries, version_of
from .kubeconfig import write_kubeconfig
from .net import free_port, http_status
from .pki import CertPair, ClusterPKI
from .process import ManagedProcess, wait_until

log = logging.getLogger(__name__)

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/24"
NODE_NAME = "kwok-node-0"
NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
ADMIN_USER = "offload-e2e-admin"
STARTUP_TIMEOUT = 120.0

ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,PodSecurity,Priority,"
    "DefaultStorageClass,StorageObjectInUseProtection,RuntimeClass,DefaultIngressClass,"
    "MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook,ResourceQuota"
)
# The default set: deployment, replicaset, endpointslice, serviceaccount, serviceaccount-token,
# namespace, garbagecollector, statefulset, job, root-ca-certificate-publisher, ...
CONTROLLERS = "*"


@dataclass
class _Credentials:
    ca: CertPair
    admin: CertPair
    serving: CertPair
    service_account: CertPair


class ControlPlane:
    """A control plane whose state and logs live in `workdir`. Use it as a context
    manager (or start() / stop()). Once started: `server` is the API server's URL,
    `kubeconfig` an admin kubeconfig, `versions` what each binary says it is."""

    def __init__(
        self,
        binaries: Binaries,
        workdir: Path,
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        fake_node: bool = True,
        extra_apiserver_args: Sequence[str] = (),
        pki: ClusterPKI | None = None,
    ) -> None:
        """`address`: where the API server listens and what it advertises (loopback, or the
        real node's bridge address: then the `kubernetes` Service gets it as its endpoint);
        `port`: its port (a free one by default); `fake_node`: run kwok and its node;
        `pki`: the CA to issue every certificate from (a new one in workdir/pki by default)."""
        self.binaries = binaries
        self.workdir = workdir
        self.address = address
        self.port = port
        self.fake_node = fake_node
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.pki = pki
        self.logs_dir = workdir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = workdir / "kubeconfig"
        self.server = ""
        self.processes: list[ManagedProcess] = []
        self.versions: dict[str, str] = {}
        self._api_client: kubernetes.client.ApiClient | None = None

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._log_versions()
        creds = self._issue_credentials()
        etcd_url = self._start_etcd()
        self._start_apiserver(etcd_url, creds)
        write_kubeconfig(
            self.kubeconfig, server=self.server, ca=creds.ca.cert, client=creds.admin, user=ADMIN_USER
        )
        self._start_controller_manager(creds)
        self._start_scheduler()
        if self.fake_node:
            self._start_kwok()
            self._register_fake_node()
        self._wait_until_usable()

    def stop(self) -> None:
        """Stops every process, last started first. Safe to call more than once."""
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = None
        for proc in reversed(self.processes):
            proc.stop()

    # -- clients ------------------------------------------------------------------------

    @property
    def api_client(self) -> kubernetes.client.ApiClient:
        if self._api_client is None:
            self._api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api_client

    def new_api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Runs kubectl against this control plane, as a user would; never raises on failure."""
        return subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def check_running(self) -> None:
        for proc in self.processes:
            proc.check_running()

    def log_tails(self, lines: int = 30) -> dict[str, str]:
        return {proc.name: proc.log_tail(lines) for proc in self.processes}

    # -- steps ----------------------------------------------------------------------------

    def _log_versions(self) -> None:
        for name, path in self.binaries.all().items():
            self.versions[name] = version_of(path)
            log.info("%s: %s (%s)", name, self.versions[name], path)

    def _issue_credentials(self) -> _Credentials:
        pki = self.pki = self.pki or ClusterPKI(self.workdir / "pki")
        return _Credentials(
            ca=pki.ca,
            admin=pki.client("admin", ADMIN_USER, "system:masters"),
            serving=pki.serving(
                "apiserver",
                [
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
                sorted({"127.0.0.1", self.address, "10.96.0.1"}),
            ),
            service_account=pki.service_account_keys(),
        )

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.logs_dir / f"{name}.log", cwd=self.workdir)
        self.processes.append(proc)
        log.info("started %s (pid %d), log %s", name, proc.pid, proc.log_path)
        return proc

    def _start_etcd(self) -> str:
        client_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        proc = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=e2e",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=e2e={peer_url}",
                "--unsafe-no-fsync",  # a throwaway cluster: speed over durability
                "--log-level=warn",
            ],
        )
        wait_until("etcd /health", lambda: _http_ok(f"{client_url}/health"), STARTUP_TIMEOUT, alive=[proc])
        return client_url

    def _start_apiserver(self, etcd_url: str, creds: _Credentials) -> None:
        port = self.port or free_port()
        self.server = f"https://{self.address}:{port}"
        if self.address == "127.0.0.1":
            # A loopback address is no valid Endpoints entry: the `kubernetes` Service stays empty.
            endpoints = ["--endpoint-reconciler-type=none"]
        else:
            endpoints = ["--endpoint-reconciler-type=lease"]
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={port}",
                f"--tls-cert-file={creds.serving.cert}",
                f"--tls-private-key-file={creds.serving.key}",
                f"--client-ca-file={creds.ca.cert}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=false",
                f"--service-account-key-file={creds.service_account.cert}",
                f"--service-account-signing-key-file={creds.service_account.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--enable-admission-plugins={ADMISSION_PLUGINS}",
                "--allow-privileged=true",
                *endpoints,
                "--profiling=false",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                *self.extra_apiserver_args,
            ],
        )
        ssl_ctx = _client_ssl_context(creds.ca.cert, creds.admin)
        wait_until(
            "kube-apiserver /readyz",
            lambda: _http_ok(f"{self.server}/readyz", ssl_ctx),
            STARTUP_TIMEOUT,
            alive=[proc],
        )

    def _start_controller_manager(self, creds: _Credentials) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--use-service-account-credentials=true",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={creds.service_account.key}",
                f"--root-ca-file={creds.ca.cert}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--profiling=false",
            ],
        )

    def _start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--profiling=false",
            ],
        )

    def _start_kwok(self) -> None:
        key, value = NODE_ANNOTATION
        self._spawn(
            "kwok",
            [
                str(self.binaries.kwok),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                "--manage-nodes-with-label-selector=",
                f"--cidr={POD_CIDR}",
                "--node-ip=10.244.0.254",
                "--node-lease-duration-seconds=40",
            ],
        )

    def _register_fake_node(self) -> None:
        key, value = NODE_ANNOTATION
        capacity = {"cpu": "32", "memory": "256Gi", "pods": "110"}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": NODE_NAME,
                "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": NODE_NAME,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
            },
            "status": {"allocatable": capacity, "capacity": capacity},
        }
        kubernetes.client.CoreV1Api(self.api_client).create_node(node)

    def _wait_until_usable(self) -> None:
        core = kubernetes.client.CoreV1Api(self.api_client)
        if not self.fake_node:
            wait_until(
                "the default ServiceAccount in namespace default",
                lambda: core.read_namespaced_service_account("default", "default"),
                STARTUP_TIMEOUT,
                alive=self.processes,
            )
            return
        wait_until(
            f"node {NODE_NAME} Ready",
            lambda: node_ready(core, NODE_NAME),
            STARTUP_TIMEOUT,
            alive=self.processes,
        )
        wait_until(
            "the default ServiceAccount in namespace default",
            lambda: core.read_namespaced_service_account("default", "default"),
            STARTUP_TIMEOUT,
            alive=self.processes,
        )


def node_ready(core: kubernetes.client.CoreV1Api, name: str) -> bool:
    """True when the Node `name` reports condition Ready=True."""
    node = core.read_node(name)
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def _client_ssl_context(ca: Path, client: CertPair) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def _http_ok(url: str, ssl_ctx: ssl.SSLContext | None = None) -> bool:
    return http_status(url, ssl_ctx) == 200
