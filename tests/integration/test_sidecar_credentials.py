"""offload-sidecar in cluster mode as the injector starts it (its command and environment, no
flags), as a real process: whatever goes wrong with its credentials or configuration (no
token, a broken environment, an API server that is down or refuses it with 403), it stays
up, ready, as pure pass-through to the local model, with /status saying why, and exits 0
on SIGTERM. With the injector's own token volume it reads its ModelDeployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from crds.model import GROUP, PLURAL, VERSION
from tests.e2e.controlplane.net import free_port
from tests.integration.fake_apiserver import FakeApiServer, LoopbackPKI
from tests.integration.servers import LoopThread
from tests.modeldeployments import published, standalone
from webhook.injection import SERVICE_ACCOUNT_DIR_ENV

NAMESPACE = "models"
COLLECTION = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
REPO = Path(__file__).resolve().parents[2]


class InjectedSidecar:
    """offload-sidecar started like the injected container: ``offload-sidecar`` and the
    injector's environment (plus what the kubelet adds), nothing inherited about clusters."""

    def __init__(self, tmp_path: Path, upstream_port: int, **env: str):
        self.port, self.admin_port = free_port(), free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "POD_", "OFFLOAD_"))}
        base.pop("MODELDEPLOYMENT_NAME", None)
        self.env = {
            **base,
            "POD_NAME": "llm-0",
            "POD_NAMESPACE": NAMESPACE,
            "MODELDEPLOYMENT_NAME": "my-model",
            "OFFLOAD_MODEL_PORT": str(upstream_port),
            "OFFLOAD_UPSTREAM": f"127.0.0.1:{upstream_port}",
            "OFFLOAD_PROXY_PORT": str(self.port),
            "OFFLOAD_ADMIN_PORT": str(self.admin_port),
            **env,
        }
        self.env = {k: v for k, v in self.env.items() if v is not None and v != "<unset>"}
        self.log_path = tmp_path / "sidecar.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli"],
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> InjectedSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5)

    def status(self) -> dict[str, Any]:
        return self.admin("/status").json()

    def send(self, path: str = "/hello") -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"offload-sidecar exited ({self.proc.returncode}):\n{self.log()}"
            try:
                if check():
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log()}"
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self.wait_for("/readyz 200", lambda: self.admin("/readyz").status_code == 200)

    def errors(self) -> list[str]:
        return self.status()["configurationErrors"]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["server"]


def passes_through(sidecar: InjectedSidecar) -> None:
    """Every request reaches the local model; /status shows pass-through."""
    assert {served_by(sidecar.send()) for _ in range(5)} == {"local"}
    status = sidecar.status()
    assert status["mode"] == "cluster" and status["configuration"] is None
    assert status["routing"]["remote"] is None
    assert status["decision"]["offloading"] is False


@pytest.fixture
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


def my_model(remote_port: int) -> dict[str, Any]:
    """my-model, a static 100% split to the remote, with the controller's decision (on)."""
    return {
        **standalone(remote_port),
        "metadata": {"name": "my-model", "namespace": NAMESPACE},
        "status": published(True),
    }


@pytest.fixture
def api(lt, tmp_path, upstreams):
    """A fake API server holding my-model (offloading 100% to the remote upstream)."""
    _, remote = upstreams
    server = FakeApiServer(LoopbackPKI.create(tmp_path / "pki"), COLLECTION)
    lt.run(server.start())
    lt.run(server.put(my_model(remote.port)))
    yield server
    lt.run(server.stop())


def token_volume(directory: Path, pki: LoopbackPKI, token: str) -> Path:
    """The injector's projected volume as the kubelet fills it: token, ca.crt, namespace."""
    directory.mkdir(parents=True)
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(pki.ca.cert_pem)
    (directory / "namespace").write_text(NAMESPACE)
    return directory


def test_without_a_token_the_sidecar_passes_through_and_says_why(tmp_path, upstreams):
    local, _ = upstreams
    empty = tmp_path / "serviceaccount"
    empty.mkdir()
    env = {
        SERVICE_ACCOUNT_DIR_ENV: str(empty),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "1",
    }
    with InjectedSidecar(tmp_path, local.port, **env) as sidecar:
        sidecar.wait_ready()
        passes_through(sidecar)
        (error,) = sidecar.errors()
        assert error == f"{empty}/token: missing (is the volume at {SERVICE_ACCOUNT_DIR_ENV} mounted?)"
        assert "no valid ModelDeployment" in sidecar.status()["decision"]["reason"]
        assert sidecar.stop() == 0


def test_the_sidecar_reads_its_own_token_volume_even_without_the_pods_default_token(
    tmp_path, lt, api, upstreams
):
    local, _ = upstreams
    volume = token_volume(tmp_path / "offload-token", api.pki, "projected-token")
    api.token = "projected-token"
    env = {
        SERVICE_ACCOUNT_DIR_ENV: str(volume),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
    }
    with InjectedSidecar(tmp_path, local.port, **env) as sidecar:
        sidecar.wait_ready()
        sidecar.wait_for(
            "the ModelDeployment", lambda: (sidecar.status()["configuration"] or {}).get("name") == "my-model"
        )
        assert served_by(sidecar.send()) == "remote"  # a static 100% split
        assert sidecar.errors() == []
        assert sidecar.stop() == 0
    assert {s.authorization for s in api.seen} == {"Bearer projected-token"}


def test_an_api_server_that_is_down_then_up_pass_through_first_then_the_configuration(
    tmp_path, lt, upstreams
):
    local, remote = upstreams
    pki = LoopbackPKI.create(tmp_path / "pki")
    port = free_port()  # nothing listens yet
    volume = token_volume(tmp_path / "offload-token", pki, "token-1")
    env = {
        SERVICE_ACCOUNT_DIR_ENV: str(volume),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(port),
    }
    with InjectedSidecar(tmp_path, local.port, **env) as sidecar:
        sidecar.wait_ready()
        passes_through(sidecar)
        sidecar.wait_for(
            "the outage in /status", lambda: any("ConnectionRefusedError" in e for e in sidecar.errors())
        )
        assert all(e.startswith(f"API server: {COLLECTION}: ") for e in sidecar.errors())

        server = FakeApiServer(pki, COLLECTION)
        lt.run(server.start(port))
        try:
            lt.run(server.put(my_model(remote.port)))
            sidecar.wait_for("recovery", lambda: served_by(sidecar.send()) == "remote", timeout=60)
            sidecar.wait_for("the errors to clear", lambda: sidecar.errors() == [])
            assert sidecar.stop() == 0
        finally:
            lt.run(server.stop())


def test_an_rbac_refusal_is_pass_through_with_the_403_in_status_until_the_role_is_bound(
    tmp_path, lt, api, upstreams
):
    local, _ = upstreams
    api.forbidden = True
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    with InjectedSidecar(tmp_path, local.port, KUBECONFIG=str(kubeconfig)) as sidecar:
        sidecar.wait_ready()
        passes_through(sidecar)
        sidecar.wait_for("the 403 in /status", lambda: any("403 Forbidden" in e for e in sidecar.errors()))
        (error,) = sidecar.errors()
        assert error.startswith(f"API server: {COLLECTION}: ApiError: 403 Forbidden: ")
        assert "cannot list" in error

        api.forbidden = False  # the RoleBinding is created
        sidecar.wait_for("recovery", lambda: served_by(sidecar.send()) == "remote", timeout=60)
        sidecar.wait_for("the errors to clear", lambda: sidecar.errors() == [])
        assert sidecar.stop() == 0


@pytest.mark.parametrize(
    "env, error",
    [
        # The injector always sets both; a pod edited by hand may lose one.
        ({"MODELDEPLOYMENT_NAME": "<unset>"}, "POD_NAMESPACE and MODELDEPLOYMENT_NAME must both be set"),
        (
            {"KUBERNETES_SERVICE_HOST": "<unset>"},
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set",
        ),
        ({"KUBECONFIG": "/nonexistent/kubeconfig"}, "/nonexistent/kubeconfig: cannot read kubeconfig"),
    ],
)
def test_a_broken_environment_is_pass_through_with_the_variable_named(tmp_path, upstreams, env, error):
    local, _ = upstreams
    with InjectedSidecar(tmp_path, local.port, **env) as sidecar:
        sidecar.wait_ready()
        passes_through(sidecar)
        assert any(error in e for e in sidecar.errors()), sidecar.errors()
        assert sidecar.stop() == 0


def test_a_malformed_upstream_variable_falls_back_to_the_model_port_and_says_so(tmp_path, upstreams):
    local, _ = upstreams
    env = {"OFFLOAD_UPSTREAM": "127.0.0.1:http", "KUBERNETES_SERVICE_HOST": "<unset>"}
    with InjectedSidecar(tmp_path, local.port, **env) as sidecar:
        sidecar.wait_ready()
        passes_through(sidecar)
        errors = sidecar.errors()
        assert errors[0] == (
            f"OFFLOAD_UPSTREAM: not host:port: '127.0.0.1:http'; using OFFLOAD_MODEL_PORT: 127.0.0.1:{local.port}"
        )
        assert sidecar.stop() == 0
