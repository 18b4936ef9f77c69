"""How fast the remote stands in for a workload scaled to zero: python bench/standin_bench.py

Runs on the e2e tier's control plane (tests/e2e/controlplane: real etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok; built by build.sh): offload-webhook with the
controller and a gateway selector, two kwok "gateway pods", ``offload-sidecar --mode
gateway`` as a process on loopback, a remote server, and the tutorial's php-apache with its
ModelDeployment. Each round scales php-apache to 0 and back to 1. Times are intervals on one
clock, this process's monotonic clock, each watch event stamped as it arrives:

- **slice written**: the last ready pod gone (the first pod event leaving none ready) to the
  controller's EndpointSlice seen by a watch: what kube-proxy waits for;
- **first request served by the remote**: the last ready pod gone to the answer of a request
  sent, the moment the slice is seen, to the port it names on 127.0.0.1 (the gateway process):
  what a client waits for, with kube-proxy's own reaction taken as zero (in a cluster add its
  sync, under a second with the default iptables/nftables minimum sync period of 1 s);
- **stood down**: a pod ready again to the slice's deletion seen.

Prints median, p90 and max over the rounds (default 10).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kubernetes
import yaml

from tests.e2e.controlplane import binaries
from tests.e2e.controlplane.cluster import ControlPlane
from tests.e2e.controlplane.process import wait_until
from tests.e2e.controlplane.webhook_process import start_webhook
from tests.e2e.objects import apply
from tests.e2e.paths import CRD, TUTORIAL_CLUSTER_A
from tests.e2e.standin_support import (
    GATEWAY_LABELS,
    GatewayProcess,
    Recorder,
    gateway_deployment,
    tutorial_modeldeployment,
)
from tests.integration.servers import LoopThread, Upstream
from webhook.controller.standin import HANDOVER_SECONDS

NAMESPACE = "bench"
INJECTOR = """\
configVersion: bench
image: offload:bench
proxyPort: 15080
adminPort: 15090
resources:
  requests: {cpu: 50m}
"""


def request(port: int) -> bytes:
    """One GET on a new connection (a client's first request after the switch), its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: php-apache\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def figures(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"{name:<40} median {statistics.median(ms):7.0f} ms   p90 {p90:7.0f} ms   max {ms[-1]:7.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    built = binaries.build(lambda line: None)
    with tempfile.TemporaryDirectory() as tmp, ControlPlane(built, Path(tmp) / "cp") as kube:
        work = Path(tmp)
        core = kubernetes.client.CoreV1Api(kube.api_client)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        assert kube.kubectl("apply", "-f", str(CRD)).returncode == 0
        wait_until(
            "the CRD",
            lambda: kube.kubectl("get", "mdd", "-A").returncode == 0,
            60,
            alive=kube.processes,
        )
        (work / "injector.yaml").write_text(INJECTOR)
        selector = ",".join(f"{k}={v}" for k, v in GATEWAY_LABELS.items())
        webhook = start_webhook(
            work / "webhook",
            "--injector-config", str(work / "injector.yaml"),
            "--leader-election-namespace", NAMESPACE,
            "--gateway-selector", selector,
            "--gateway-namespace", NAMESPACE,
            "--gateway-ports", "24000-24099",
            env={"KUBECONFIG": str(kube.kubeconfig)},
        )  # fmt: skip
        with LoopThread() as lt:
            remote = lt.run(Upstream.started("remote"))
            gateway = GatewayProcess(work / "gateway", kube.kubeconfig, NAMESPACE)
            alive = [webhook.process, gateway.process, *kube.processes]
            try:
                apply(kube, [gateway_deployment(2)], NAMESPACE)
                apply(kube, [tutorial_modeldeployment(NAMESPACE, remote.port)], NAMESPACE)
                apply(kube, list(yaml.safe_load_all(TUTORIAL_CLUSTER_A.read_text())), NAMESPACE)

                def status() -> dict:
                    md = kube.kubectl("get", "mdd", "my-model", "-n", NAMESPACE, "-o", "yaml")
                    return (yaml.safe_load(md.stdout) or {}).get("status") or {}

                wait_until(
                    "a gateway port", lambda: "port" in (status().get("standIn") or {}), 60, alive=alive
                )
                port = status()["standIn"]["port"]
                key = f"{NAMESPACE}/my-model"
                wait_until("the gateway listening", lambda: gateway.listening(key, port), 30, alive=alive)
                recorder = Recorder(kube.api_client, NAMESPACE, "run=php-apache").start()
                written, served, stood_down = [], [], []
                for round_ in range(args.rounds):
                    wait_until(
                        "one ready pod", lambda: bool(recorder.pods and recorder.pods[-1][1]), 60, alive=alive
                    )
                    start = time.monotonic()
                    assert (
                        kube.kubectl(
                            "scale", "deployment/php-apache", "--replicas=0", "-n", NAMESPACE
                        ).returncode
                        == 0
                    )
                    # Polled every 2 ms: acting on the slice as soon as it is seen, as kube-proxy would.
                    wait_until(
                        "the slice",
                        lambda start=start: recorder.slice_event("ADDED", start) is not None,
                        30,
                        interval=0.002,
                        alive=alive,
                    )
                    added, obj = recorder.slice_event("ADDED", start)  # type: ignore[misc]
                    answer = request(obj["ports"][0]["port"])
                    answered = time.monotonic()
                    assert b"X-Upstream: remote" in answer, answer[:200]
                    gone = recorder.no_ready_pod_since(start)
                    assert gone is not None
                    written.append(added - gone)
                    served.append(answered - gone)
                    up = time.monotonic()
                    assert (
                        kube.kubectl(
                            "scale", "deployment/php-apache", "--replicas=1", "-n", NAMESPACE
                        ).returncode
                        == 0
                    )
                    wait_until(
                        "the slice gone",
                        lambda up=up: recorder.slice_event("DELETED", up) is not None,
                        60,
                        alive=alive,
                    )
                    deleted, _ = recorder.slice_event("DELETED", up)  # type: ignore[misc]
                    ready = recorder.pod_ready_since(up)
                    assert ready is not None and ready <= deleted
                    stood_down.append(deleted - ready)
                    print(
                        f"round {round_ + 1}: slice {1000 * written[-1]:.0f} ms, served {1000 * served[-1]:.0f} ms, "
                        f"stood down {1000 * stood_down[-1]:.0f} ms",
                        flush=True,
                    )
                recorder.stop()
                print()
                print(figures("last ready pod gone -> slice written", written))
                print(figures("last ready pod gone -> remote served", served))
                handover = f"a pod ready again -> slice deleted (the handover is {HANDOVER_SECONDS:g}s by design)"
                print(figures(handover, stood_down))
                print("goal: remote served within 2 s of the slice (kube-proxy's sync comes on top)")
            finally:
                gateway.stop()
                webhook.stop()
                lt.run(remote.kill())
    return 0


if __name__ == "__main__":
    sys.exit(main())
