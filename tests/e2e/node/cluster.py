"""A real Kubernetes node next to the e2e control plane: containerd and runc (Debian's), a
bridge CNI network, the kubelet and kube-proxy (built from the control plane's Kubernetes
module), the images built here imported into containerd, and metrics-server registered as
the APIService v1beta1.metrics.k8s.io, fed by the kubelet's resource metrics.

`RealNodeCluster` starts all of it, control plane included (its API server listens on the
node's bridge address so that pods reach it through the `kubernetes` Service), and stops it
in reverse order; host.clean_host() then removes whatever is left (containers, mounts,
rules, the bridge) and restores the kernel settings. See tests/e2e/README.md.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import kubernetes
import yaml

from tests.e2e.controlplane.binaries import Binaries, NodeBinaries, version_of
from tests.e2e.controlplane.cluster import ControlPlane, node_ready
from tests.e2e.controlplane.kubeconfig import write_kubeconfig
from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.pki import ClusterPKI
from tests.e2e.controlplane.process import ManagedProcess, wait_until

from . import host
from .host import (
    APISERVER_PORT,
    BRIDGE,
    METRICS_SERVER_PORT,
    NODE_IP,
    POD_CIDR,
    RUN_DIR,
    STATE_DIR,
)

log = logging.getLogger(__name__)

NODE_NAME = "offload-node-0"
KUBELET_PORT = 10250
STARTUP_TIMEOUT = 120.0
CONTAINERD_SOCKET = RUN_DIR / "containerd.sock"
METRICS_API = "v1beta1.metrics.k8s.io"


class RealNodeCluster:
    """The control plane and one real node. Use as a context manager (holds the machine's
    node lock). Attributes once started: `plane` (the ControlPlane: kubeconfig, kubectl,
    api_client), `images` (reference -> OCI archive imported), `timings` (seconds per step),
    `processes` (every process, control plane first)."""

    def __init__(
        self,
        binaries: Binaries,
        node_binaries: NodeBinaries,
        images: dict[str, Path],
        workdir: Path,
        echo: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.binaries = binaries
        self.node_binaries = node_binaries
        self.images = images
        self.workdir = workdir
        self.logs_dir = workdir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.pki = ClusterPKI(workdir / "pki")
        self.plane: ControlPlane | None = None
        self.node_processes: list[ManagedProcess] = []
        self.timings: dict[str, float] = {}
        self.versions: dict[str, str] = {}
        self._lock = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._lock = host.node_lock()
        self._lock.__enter__()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        host.check_prerequisites()
        self._step(
            "clean leftovers of an earlier run", lambda: host.clean_host(self.node_binaries.kube_proxy)
        )
        self._step("bridge, routes and traffic fences", host.prepare_host)
        self._step("control plane", self._start_control_plane)
        self._step("containerd", self._start_containerd)
        self._step("image import", self._import_images)
        self._step("kubelet and node Ready", self._start_kubelet)
        self._step("kube-proxy", self._start_kube_proxy)
        self._step("metrics-server and its APIService Available", self._start_metrics_server)
        total = sum(self.timings.values())
        self.echo(f"real node {NODE_NAME} ready in {total:.1f}s: " + ", ".join(
            f"{name} {seconds:.1f}s" for name, seconds in self.timings.items()))  # fmt: skip

    def stop(self) -> None:
        """Stops everything, last started first, then cleans the machine. Safe to repeat."""
        started = time.monotonic()
        for proc in reversed(self.node_processes):
            proc.stop()
        self.node_processes.clear()
        if self.plane is not None:
            self.plane.stop()
        try:
            host.clean_host(self.node_binaries.kube_proxy)
        finally:
            if self._lock is not None:
                lock, self._lock = self._lock, None
                lock.__exit__(None, None, None)
        self.echo(
            f"real node {NODE_NAME} torn down and the machine cleaned in {time.monotonic() - started:.1f}s"
        )

    def _step(self, name: str, action: Callable[[], object]) -> None:
        started = time.monotonic()
        action()
        self.timings[name] = time.monotonic() - started
        log.info("%s: %.1fs", name, self.timings[name])

    # -- access ------------------------------------------------------------------------------

    @property
    def processes(self) -> list[ManagedProcess]:
        return [*(self.plane.processes if self.plane else []), *self.node_processes]

    def log_tails(self, lines: int = 30) -> dict[str, str]:
        return {proc.name: proc.log_tail(lines) for proc in self.processes}

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        assert self.plane is not None
        return self.plane.kubectl(*args, stdin=stdin, timeout=timeout)

    @property
    def api_client(self) -> kubernetes.client.ApiClient:
        assert self.plane is not None
        return self.plane.api_client

    # -- steps -------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.logs_dir / f"{name}.log", cwd=self.workdir)
        self.node_processes.append(proc)
        log.info("started %s (pid %d), log %s", name, proc.pid, proc.log_path)
        return proc

    def _start_control_plane(self) -> None:
        front_proxy = self.pki.client("front-proxy-client", "front-proxy-client")
        kubelet_client = self.pki.client(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        )
        ca = self.pki.ca.cert
        self.plane = ControlPlane(
            self.binaries,
            self.workdir / "controlplane",
            address=NODE_IP,
            port=APISERVER_PORT,
            fake_node=False,
            pki=self.pki,
            extra_apiserver_args=[
                # logs, exec and port-forward reach the kubelet at its InternalIP (no DNS here),
                # verified with the CA that issued its serving certificate.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={ca}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                # The aggregation layer (metrics-server) authenticates the API server's proxied
                # requests by this client certificate.
                f"--requestheader-client-ca-file={ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
            ],
        )
        self.plane.start()
        self.versions.update(self.plane.versions)

    def _kubeconfig(self, name: str, user: str, group: str | None = None) -> Path:
        assert self.plane is not None
        client = self.pki.client(f"{name}-client", user, group)
        return write_kubeconfig(
            self.workdir / f"{name}.kubeconfig",
            server=self.plane.server,
            ca=self.pki.ca.cert,
            client=client,
            user=user,
        )

    def _start_containerd(self) -> None:
        cni_conf = STATE_DIR / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-offload-e2e.conflist").write_text(json.dumps(_cni_config(), indent=2) + "\n")
        pause = next(ref for ref in self.images if ref.split("/")[-1].startswith("pause:"))
        config = STATE_DIR / "containerd.toml"
        config.write_text(_containerd_config(pause, cni_conf))
        proc = self._spawn("containerd", ["containerd", "--config", str(config)])
        wait_until(
            "containerd to answer on its socket",
            lambda: self.ctr("version").returncode == 0,
            STARTUP_TIMEOUT,
            alive=[proc],
        )
        self.versions["containerd"] = (
            self.ctr("version").stdout.split("Server:")[-1].split("Version:")[1].split()[0]
        )
        self.versions["runc"] = subprocess.run(
            ["runc", "--version"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        """ctr against the node's containerd, in the CRI's namespace k8s.io."""
        return subprocess.run(
            ["ctr", "--address", str(CONTAINERD_SOCKET), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def _import_images(self) -> None:
        for ref, archive in self.images.items():
            done = self.ctr("images", "import", "--no-unpack=false", str(archive))
            if done.returncode != 0:
                raise RuntimeError(f"ctr images import {archive} failed: {done.stderr}")
            listed = self.ctr("images", "ls", "-q")
            if ref not in listed.stdout.split():
                raise RuntimeError(
                    f"{archive} imported, but {ref} is not among containerd's images: {listed.stdout}"
                )

    def _start_kubelet(self) -> None:
        assert self.plane is not None
        kubelet_root = STATE_DIR / "kubelet"
        kubelet_root.mkdir(parents=True, exist_ok=True)
        serving = self.pki.serving("kubelet-serving", [NODE_NAME], [NODE_IP])
        kubeconfig = self._kubeconfig("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
        resolv_conf = STATE_DIR / "resolv.conf"
        # Pods resolve nothing outside: the only nameserver is their own loopback.
        resolv_conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        config = STATE_DIR / "kubelet-config.yaml"
        config.write_text(
            yaml.safe_dump(
                _kubelet_config(
                    ca=self.pki.ca.cert,
                    serving_cert=serving.cert,
                    serving_key=serving.key,
                    resolv_conf=resolv_conf,
                    healthz_port=free_port(),
                )
            )
        )
        proc = self._spawn(
            "kubelet",
            [
                str(self.node_binaries.kubelet),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_root}",
                f"--cert-dir={kubelet_root / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=2",
            ],
        )
        core = kubernetes.client.CoreV1Api(self.plane.api_client)
        wait_until(
            f"node {NODE_NAME} Ready", lambda: node_ready(core, NODE_NAME), STARTUP_TIMEOUT, alive=[proc]
        )

    def _start_kube_proxy(self) -> None:
        kubeconfig = self._kubeconfig("kube-proxy", "system:kube-proxy")  # bound to system:node-proxier
        healthz = free_port()
        config = STATE_DIR / "kube-proxy-config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "mode": "iptables",
                    "clusterCIDR": POD_CIDR,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": f"127.0.0.1:{healthz}",
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    # NodePorts only on the bridge address, never the machine's interfaces.
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Leave the machine's conntrack table settings alone.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
                }
            )
        )
        proc = self._spawn("kube-proxy", [str(self.node_binaries.kube_proxy), f"--config={config}", "--v=2"])

        def synced() -> bool:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{healthz}/healthz", timeout=2) as resp:
                return resp.status == 200

        wait_until("kube-proxy /healthz (rules synced)", synced, STARTUP_TIMEOUT, alive=[proc])
        self.versions["kube-proxy"] = version_of(self.node_binaries.kube_proxy)
        self.versions["kubelet"] = version_of(self.node_binaries.kubelet)

    def _start_metrics_server(self) -> None:
        assert self.plane is not None
        serving = self.pki.serving(
            "metrics-server", ["metrics-server.kube-system.svc", "metrics-server"], [NODE_IP]
        )
        kubeconfig = self._kubeconfig("metrics-server", "system:metrics-server", "system:masters")
        proc = self._spawn(
            "metrics-server",
            [
                str(self.node_binaries.metrics_server),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={NODE_IP}",
                f"--secure-port={METRICS_SERVER_PORT}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                "--kubelet-preferred-address-types=InternalIP",
                "--kubelet-use-node-status-port",
                f"--kubelet-certificate-authority={self.pki.ca.cert}",
                "--metric-resolution=15s",
                "--v=2",
            ],
        )
        self.versions["metrics-server"] = version_of(self.node_binaries.metrics_server)
        ca_bundle = base64.b64encode(self.pki.ca.cert.read_bytes()).decode()
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "metrics-server", "namespace": "kube-system"},
                "spec": {"ports": [{"name": "https", "port": 443, "targetPort": METRICS_SERVER_PORT}]},
            },
            {
                # metrics-server runs on the node's host, as the control plane does: its
                # Service has no selector, and this slice names the node address.
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "metrics-server-host",
                    "namespace": "kube-system",
                    "labels": {"kubernetes.io/service-name": "metrics-server"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": METRICS_SERVER_PORT, "protocol": "TCP"}],
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": METRICS_API},
                "spec": {
                    "group": "metrics.k8s.io",
                    "version": "v1beta1",
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                    "service": {"name": "metrics-server", "namespace": "kube-system", "port": 443},
                    "caBundle": ca_bundle,
                },
            },
        ]
        applied = self.plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
        if applied.returncode != 0:
            raise RuntimeError(f"registering metrics-server failed: {applied.stderr}")
        api = kubernetes.client.ApiregistrationV1Api(self.plane.api_client)

        def available() -> bool:
            conditions = api.read_api_service(METRICS_API).status.conditions or []
            return any(c.type == "Available" and c.status == "True" for c in conditions)

        wait_until(f"APIService {METRICS_API} Available", available, STARTUP_TIMEOUT, alive=[proc])


def _cni_config() -> dict[str, Any]:
    """The pods' network: veths on the node's own bridge, addresses from the pod range."""
    return {
        "cniVersion": "1.0.0",
        "name": "offload-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # nothing leaves the machine: no masquerading needed
                "hairpinMode": True,  # a pod reaching itself through its Service
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(STATE_DIR / "cni" / "ipam"),
                    "ranges": [[{"subnet": POD_CIDR, "rangeStart": "10.88.1.1", "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


def _containerd_config(pause_image: str, cni_conf: Path) -> str:
    return f"""version = 2
root = "{STATE_DIR / "containerd"}"
state = "{RUN_DIR / "containerd"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[ttrpc]
  address = "{RUN_DIR / "containerd.sock.ttrpc"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{STATE_DIR / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  # Built here (tests/e2e/node/build-images.sh): no registry is reachable.
  sandbox_image = "{pause_image}"
  # Without it runc cannot start any sandbox here ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{RUN_DIR / "runc"}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{host.CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""


def _kubelet_config(
    *, ca: Path, serving_cert: Path, serving_key: Path, resolv_conf: Path, healthz_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        # No systemd on these machines.
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "podLogsDir": str(STATE_DIR / "pod-logs"),
        "resolvConf": str(resolv_conf),
        "clusterDomain": "cluster.local",
        "failSwapOn": False,
        "serializeImagePulls": False,
        # The images are imported, not pulled: never garbage-collect them, never evict on a
        # full disk of a shared machine.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "maxPods": 110,
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "0s",
        "shutdownGracePeriod": "0s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerNode": True,
    }
