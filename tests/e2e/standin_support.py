"""What the stand-in tests and benchmark share: the gateway process, a recorder of when pods
and EndpointSlices change (watch events stamped on this process's monotonic clock), and
the objects of the tutorial with a gateway beside them."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from tests.e2e.controlplane.net import free_port
from tests.e2e.controlplane.process import ManagedProcess, wait_until
from tests.e2e.controlplane.webhook_process import REPO_ROOT, _console_script

GATEWAY_LABELS = {"app": "offload-gateway-e2e"}
STANDIN_LABEL = "endpointslice.kubernetes.io/managed-by=controller.offload.beamlit.com"


class GatewayProcess:
    """``offload-sidecar --mode gateway`` on loopback, serving the ModelDeployments of one
    namespace (the e2e tier's gateway pods are kwok's: their addresses reach nothing, so the
    process runs here and is reached on 127.0.0.1 at the port the slices name)."""

    def __init__(self, workdir: Path, kubeconfig: Path, namespace: str, *extra: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.admin_port = free_port()
        argv = _console_script("offload-sidecar", "sidecar.cli") + [
            "--mode", "gateway",
            "--namespace", namespace,
            "--listen-host", "127.0.0.1",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--shutdown-grace", "0.5s",
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.process = ManagedProcess(
            "offload-gateway", argv, workdir / "gateway.log", cwd=REPO_ROOT, env=env
        )
        wait_until("the gateway's /readyz", lambda: self.get("/readyz")[0] == 200, 30, alive=[self.process])

    def get(self, path: str) -> tuple[int | None, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return None, b""

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, (code, body)
        return json.loads(body)

    def listening(self, key: str, port: int) -> bool:
        lane = self.status()["modelDeployments"].get(key)
        return lane is not None and lane["port"] == port and lane["ready"]

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Recorder:
    """Watch events of a namespace's pods (one label selector) and EndpointSlices, each
    stamped with time.monotonic() when it arrived: when the last ready pod went, when a pod
    became ready, when the controller's slice came and went."""

    api_client: Any
    namespace: str
    pod_selector: str
    pods: list[tuple[float, set[str]]] = field(default_factory=list)  # (t, names of ready pods)
    slices: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)  # (t, type, slice)
    errors: list[BaseException] = field(default_factory=list)  # a watch that failed while recording
    _stopped: bool = False
    _watches: list[Any] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Recorder:
        core = kubernetes.client.CoreV1Api(self.api_client)
        discovery = kubernetes.client.DiscoveryV1Api(self.api_client)
        ready: set[str] = set()

        def on_pod(kind: str, pod: dict[str, Any]) -> None:
            name = pod["metadata"]["name"]
            is_ready = (
                kind != "DELETED"
                and not pod["metadata"].get("deletionTimestamp")
                and any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (pod.get("status") or {}).get("conditions") or []
                )
            )
            before = set(ready)
            (ready.add if is_ready else ready.discard)(name)
            if ready != before or not self.pods:
                self.pods.append((time.monotonic(), set(ready)))

        def on_slice(kind: str, obj: dict[str, Any]) -> None:
            self.slices.append((time.monotonic(), kind, obj))

        self._follow(core.list_namespaced_pod, {"label_selector": self.pod_selector}, on_pod)
        self._follow(discovery.list_namespaced_endpoint_slice, {"label_selector": STANDIN_LABEL}, on_slice)
        return self

    def _follow(self, function: Any, kwargs: dict[str, Any], callback: Any) -> None:
        listed = function(self.namespace, _preload_content=False, **kwargs)
        page = json.loads(listed.data)
        for item in page["items"]:
            callback("ADDED", item)
        version = page["metadata"]["resourceVersion"]
        watch = kubernetes.watch.Watch(return_type=object)
        self._watches.append(watch)

        def run() -> None:
            try:
                for event in watch.stream(function, self.namespace, resource_version=version, **kwargs):
                    callback(event["type"], event["raw_object"])
            except Exception as exc:  # noqa: BLE001 - the connection cut by stop() or the namespace's deletion
                if not self._stopped:
                    self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stopped = True
        for watch in self._watches:
            watch.stop()

    # -- questions --

    def no_ready_pod_since(self, after: float) -> float | None:
        """When the last ready pod went (the first moment after ``after`` with none)."""
        return next((t for t, ready in self.pods if t >= after and not ready), None)

    def pod_ready_since(self, after: float) -> float | None:
        return next((t for t, ready in self.pods if t >= after and ready), None)

    def slice_event(self, kind: str, after: float) -> tuple[float, dict[str, Any]] | None:
        return next(((t, obj) for t, k, obj in self.slices if t >= after and k == kind), None)


def gateway_deployment(replicas: int = 2) -> dict[str, Any]:
    """The gateway's pods as kwok runs them: Ready with a pod IP, running no code."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "offload-gateway"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": GATEWAY_LABELS},
            "template": {
                "metadata": {"labels": GATEWAY_LABELS},
                "spec": {"containers": [{"name": "gateway", "image": "offload:e2e"}]},
            },
        },
    }


def tutorial_modeldeployment(namespace: str, remote_port: int, **behavior: Any) -> dict[str, Any]:
    """The tutorial's ModelDeployment in ``namespace``, its remote a real server on loopback."""
    from tests import modeldeployments as md

    doc = md.variant(
        "my-model",
        {
            "spec.modelSourceRef.namespace": namespace,
            "spec.serviceRef.namespace": namespace,
            "spec.offloadingConfig.remoteBackend.host": f"127.0.0.1:{remote_port}",
            **{f"spec.offloadingConfig.behavior.{k}": v for k, v in behavior.items()},
        },
    )
    doc["metadata"]["namespace"] = namespace
    return doc
