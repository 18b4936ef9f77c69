"""sidecar/cluster/ (credentials, client, informer) and the cluster ConfigSource over real TLS, against a stand-in API
server on loopback that can expire watches, rotate tokens and go away on cue
(tests/e2e/test_sidecar_cluster.py runs the same code against kube-apiserver)."""

from __future__ import annotations

import asyncio
import copy
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from crds.backoff import Backoff
from crds.model import GROUP, PLURAL, VERSION
from sidecar.cluster.client import ApiError, KubeClient, WatchEvent
from sidecar.cluster.config import ClusterConfigSource
from sidecar.cluster.credentials import ClusterConfig, CredentialsError, in_cluster_config, load_kubeconfig
from sidecar.cluster.informer import Listed, list_and_watch
from tests.integration.fake_apiserver import FakeApiServer, LoopbackPKI

NAMESPACE = "models"
COLLECTION = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
TUTORIAL = yaml.safe_load(
    (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
)
STEP = 10.0  # seconds any single step may take before the test fails


def modeldeployment(name: str = "my-model", percentage: int = 50) -> dict[str, Any]:
    obj = copy.deepcopy(TUTORIAL)
    obj["metadata"] = {"name": name, "namespace": NAMESPACE, "generation": 1}
    obj["spec"]["modelSourceRef"]["namespace"] = NAMESPACE
    obj["spec"]["serviceRef"]["namespace"] = NAMESPACE
    obj["spec"]["offloadingConfig"]["behavior"]["percentage"] = percentage
    return obj


def run(scenario: Callable[[FakeApiServer, Path], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        server = FakeApiServer(LoopbackPKI.create(tmp_path / "pki"), COLLECTION)
        await server.start()
        try:
            await scenario(server, tmp_path)
        finally:
            await server.stop()

    asyncio.run(main())


def client_for(server: FakeApiServer, tmp_path: Path, **kwargs: Any) -> RecordingClient:
    return RecordingClient(load_kubeconfig(server.kubeconfig(tmp_path / "kubeconfig", **kwargs)))


class RecordingClient(KubeClient):
    """The real client, also noting the resourceVersion of every watch event it receives
    (bookmarks included), so that a test can wait until one has arrived."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.versions_seen: list[str] = []

    async def watch(self, *args: Any, **kwargs: Any) -> AsyncIterator[WatchEvent]:
        async for event in super().watch(*args, **kwargs):
            self.versions_seen.append(event.resource_version)
            yield event


class Collector:
    """Runs an async iterator in a task; ``next()`` awaits its next item."""

    def __init__(self, source: AsyncIterator[Any]):
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump(source))

    async def _pump(self, source: AsyncIterator[Any]) -> None:
        async for item in source:
            await self.queue.put(item)

    async def next(self) -> Any:
        return await asyncio.wait_for(self.queue.get(), STEP)

    async def nothing_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.queue.empty(), f"unexpected: {self.queue.get_nowait()!r}"

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(what: str, condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(STEP):
        while not condition():
            await asyncio.sleep(0.01)


def fast_backoff() -> Backoff:
    return Backoff(base=0.05, cap=0.2)


# --- credentials -----------------------------------------------------------------------------------


def test_get_verifies_the_server_against_the_kubeconfig_ca_and_sends_the_token(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        await server.put(modeldeployment())
        client = client_for(server, tmp)
        listing = await client.get(COLLECTION)
        again = await client.get(COLLECTION, {"fieldSelector": "metadata.name=other"})
        await client.close()
        assert [i["metadata"]["name"] for i in listing["items"]] == ["my-model"]
        assert again["items"] == []
        assert [s.authorization for s in server.seen] == ["Bearer token-1"] * 2
        assert server.seen[1].query == {"fieldSelector": "metadata.name=other"}

    run(scenario, tmp_path)


def test_a_server_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        other = LoopbackPKI.create(tmp / "other")
        context = ssl.create_default_context(cadata=other.ca.cert_pem.decode())
        client = KubeClient(ClusterConfig(server.url, context, token="token-1"))
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.get(COLLECTION)
        assert server.seen == []

    run(scenario, tmp_path)


def test_errors_carry_the_status_and_the_servers_message(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        client = client_for(server, tmp)
        with pytest.raises(ApiError, match="404 NotFound: /api/v1/nothing not found") as caught:
            await client.get("/api/v1/nothing")
        assert caught.value.status == 404
        wrong = client_for(server, tmp, token="stolen")
        with pytest.raises(ApiError, match="401"):
            await wrong.get(COLLECTION)
        await client.close()
        await wrong.close()

    run(scenario, tmp_path)


def test_a_rotated_token_file_is_read_again_when_the_server_refuses_the_old_one(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        token_file = tmp / "token"
        token_file.write_text("token-1\n")
        client = client_for(server, tmp, token_file=token_file)
        await client.get(COLLECTION)
        # The kubelet rotates the projected token; the API server stops taking the old one.
        token_file.write_text("token-2\n")
        server.token = "token-2"
        await client.get(COLLECTION)
        await client.close()
        assert [s.authorization for s in server.seen] == [
            "Bearer token-1",
            "Bearer token-1",
            "Bearer token-2",
        ]

    run(scenario, tmp_path)


def test_in_cluster_config_reads_the_service_account_files(tmp_path: Path) -> None:
    pki = LoopbackPKI.create(tmp_path / "pki")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(pki.ca.cert_pem)
    (account / "token").write_text("abc")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    config = in_cluster_config(env, account)
    assert config.server == "https://10.96.0.1:443"
    assert config.token_file == account / "token"
    assert "abc" not in repr(config)
    v6 = in_cluster_config({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, account)
    assert v6.server == "https://[fd00::1]:443"
    with pytest.raises(CredentialsError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_config({}, account)
    (account / "token").unlink()
    with pytest.raises(CredentialsError, match="token: missing"):
        in_cluster_config(env, account)


def test_kubeconfig_problems_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({"current-context": "x", "contexts": []}))
    with pytest.raises(CredentialsError, match="contexts: no entry named 'x'"):
        load_kubeconfig(path)
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "x",
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
            }
        )
    )
    with pytest.raises(CredentialsError, match="exec and auth-provider plugins are not supported"):
        load_kubeconfig(path)


# --- list and watch -----------------------------------------------------------------------------------


def test_watch_follows_changes_resumes_from_bookmarks_and_relists_after_410(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        await server.put(modeldeployment())
        client = client_for(server, tmp)
        events = Collector(
            list_and_watch(client, COLLECTION, backoff=fast_backoff(), watch_timeout=lambda: 60)
        )
        listed = await events.next()
        assert isinstance(listed, Listed)
        assert [i["metadata"]["name"] for i in listed.items] == ["my-model"]

        await server.put(modeldeployment(percentage=70))
        modified = await events.next()
        assert isinstance(modified, WatchEvent) and modified.type == "MODIFIED"
        assert modified.object["spec"]["offloadingConfig"]["behavior"]["percentage"] == 70

        # A bookmark moves the resourceVersion on without an event for the caller...
        await server.bookmark()
        bookmark_version = str(server.version)
        await until("the bookmark reaches the client", lambda: bookmark_version in client.versions_seen)
        # ... and a dropped watch resumes from it, without listing again.
        server.drop_watches()
        await until("a second watch", lambda: len(server.watches_seen()) >= 2)
        assert server.watches_seen()[-1].query["resourceVersion"] == bookmark_version
        assert server.watches_seen()[-1].query["allowWatchBookmarks"] == "true"
        assert len(server.lists_seen()) == 1
        await events.nothing_for(0.2)

        # The API server goes away; meanwhile the object changes and history is compacted.
        port = server.port
        await server.stop()
        await server.put(modeldeployment(percentage=90))
        await server.compact()
        await until("the client finds the server gone", lambda: bool(client.failures))
        await server.start(port)
        relisted = await events.next()
        assert isinstance(relisted, Listed), relisted
        assert relisted.items[0]["spec"]["offloadingConfig"]["behavior"]["percentage"] == 90
        assert len(server.lists_seen()) == 2
        await server.delete("my-model")
        deleted = await events.next()
        assert deleted.type == "DELETED"
        await events.close()
        await client.close()

    run(scenario, tmp_path)


def test_a_watch_the_server_ends_is_resumed_without_a_relist(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        client = client_for(server, tmp)
        events = Collector(
            list_and_watch(client, COLLECTION, backoff=fast_backoff(), watch_timeout=lambda: 1)
        )
        assert isinstance(await events.next(), Listed)
        await until("the third watch", lambda: len(server.watches_seen()) >= 3)
        assert {s.query["timeoutSeconds"] for s in server.watches_seen()} == {"1"}
        await server.put(modeldeployment())
        assert (await events.next()).type == "ADDED"
        assert len(server.lists_seen()) == 1
        await events.close()
        await client.close()

    run(scenario, tmp_path)


# --- the cluster ConfigSource ------------------------------------------------------------------------------


def test_cluster_source_follows_its_modeldeployment_and_keeps_the_last_one_while_the_server_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        await server.put(modeldeployment("someone-else", 10))
        client = client_for(server, tmp)
        source = ClusterConfigSource(client, NAMESPACE, "my-model", backoff=fast_backoff())
        updates = Collector(source.updates())
        assert await updates.next() is None  # absent: pass-through
        assert server.lists_seen()[0].query == {"fieldSelector": "metadata.name=my-model"}

        await server.put(modeldeployment(percentage=50))
        model = await updates.next()
        assert model.spec.offloading_config.behavior.percentage == 50
        assert source.current == model

        # The controller's decision in the status comes through with the same configuration.
        with_status = modeldeployment(percentage=50)
        with_status["status"] = {
            "offloading": True,
            "decision": {"reason": "AboveTarget", "lastEvaluationTime": "2025-06-01T12:00:00Z"},
        }
        await server.put(with_status)
        assert (await updates.next()).spec == model.spec
        assert source.published is not None
        assert (source.published.offloading, source.published.code) == (True, "AboveTarget")
        # Other status fields change the resourceVersion, not the configuration or the decision.
        with_status["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        await server.put(with_status)
        await updates.nothing_for(0.3)

        # Invalid (the webhook was down): treated as absent, errors logged with field paths.
        await server.put(modeldeployment(percentage=150))
        assert await updates.next() is None
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(
            "spec.offloadingConfig.behavior.percentage: must be between 0 and 100" in e for e in errors
        )

        await server.put(modeldeployment(percentage=30))
        assert (await updates.next()).spec.offloading_config.behavior.percentage == 30

        # The API server goes away: no update (the last configuration stays), reconnects.
        port = server.port
        await server.stop()
        await updates.nothing_for(0.5)
        assert source.current.spec.offloading_config.behavior.percentage == 30
        await server.start(port)
        await server.put(modeldeployment(percentage=40))
        assert (await updates.next()).spec.offloading_config.behavior.percentage == 40

        await server.delete("my-model")
        assert await updates.next() is None
        assert any("deleted" in r.getMessage() for r in caplog.records)
        await updates.close()
        await client.close()

    run(scenario, tmp_path)


def test_the_token_never_appears_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(server: FakeApiServer, tmp: Path) -> None:
        client = client_for(server, tmp, token="very-secret-token")
        events = Collector(list_and_watch(client, COLLECTION, backoff=fast_backoff()))
        await until("a few refused attempts", lambda: len(server.seen) >= 3)
        await events.close()
        await client.close()

    run(scenario, tmp_path)
    assert "401" in caplog.text
    assert "very-secret-token" not in caplog.text


def test_cluster_mode_is_chosen_by_the_injectors_environment(tmp_path: Path) -> None:
    from sidecar.cluster.config import cluster_mode_from_env

    assert cluster_mode_from_env({"POD_NAMESPACE": "models"}) is None
    pki = LoopbackPKI.create(tmp_path / "pki")
    server = FakeApiServer(pki, COLLECTION)
    server.port = 1
    kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
    env = {"POD_NAMESPACE": "models", "MODELDEPLOYMENT_NAME": "my-model", "KUBECONFIG": str(kubeconfig)}
    mode = cluster_mode_from_env(env)
    assert mode is not None
    assert (mode.config.namespace, mode.config.name) == ("models", "my-model")
    assert mode.client.config.server == "https://127.0.0.1:1"
    assert mode.config.validation.default_remote_backend is None
    # The installation's default remote backend, as the injector passes it.
    mode = cluster_mode_from_env({**env, "OFFLOAD_DEFAULT_REMOTE_BACKEND": "https://models.example/v1"})
    assert mode is not None
    backend = mode.config.validation.default_remote_backend
    assert (backend.host, backend.scheme, backend.path_prefix) == ("models.example", "https", "/v1")
    # A value that does not parse is ignored (logged), never a sidecar that cannot start.
    mode = cluster_mode_from_env({**env, "OFFLOAD_DEFAULT_REMOTE_BACKEND": "models.example"})
    assert mode is not None and mode.config.validation.default_remote_backend is None
    with pytest.raises(CredentialsError, match="KUBERNETES_SERVICE_HOST"):
        cluster_mode_from_env({"POD_NAMESPACE": "models", "MODELDEPLOYMENT_NAME": "my-model"})
