"""sidecar/credentials/oauth.py against a real OAuth2 token endpoint process on loopback (over TLS
with a custom CA): caching, single-flight refresh under concurrency, expiry, an
endpoint that is down or hangs, a changed client secret, and no secret in logs."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.credentials.oauth import OAuthClient, with_authorization
from sidecar.proxy.routing import RemoteTarget
from tests.integration.fake_apiserver import LoopbackPKI
from tests.integration.token_endpoint import EURO_TOKEN

CLIENT_ID = "offloader"
SECRET = "s3cret-with/odd:chars"


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenEndpoint:
    """The token endpoint process (tests/integration/token_endpoint.py)."""

    def __init__(self, pki: LoopbackPKI, **options: Any):
        self.pki = pki
        self.options = {"expires-in": 100, "delay": 0.2, **options}
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> TokenEndpoint:
        args = [
            sys.executable, "-m", "tests.integration.token_endpoint",
            "--port", str(self.port), "--cert", str(self.pki.dir / "tls.crt"), "--key", str(self.pki.dir / "tls.key"),
            "--client-id", CLIENT_ID, "--secret", SECRET,
        ]  # fmt: skip
        for name, value in self.options.items():
            args += [f"--{name}", str(value)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening "), line
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    def _call(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        import http.client

        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.pki.client_context(), timeout=10
        )
        try:
            conn.request(method, path, body=body)
            return json.loads(conn.getresponse().read() or b"{}")
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def set_secret(self, secret: str) -> None:
        self._call("POST", "/admin/secret", secret.encode())

    def set_mode(self, mode: str) -> None:
        """How /token answers: ok, nested, huge, garbage or euro (see token_endpoint.py)."""
        self._call("POST", "/admin/mode", mode.encode())


@pytest.fixture
def pki(tmp_path: Path) -> LoopbackPKI:
    return LoopbackPKI.create(tmp_path / "pki")


@pytest.fixture
def endpoint(pki: LoopbackPKI) -> Iterator[TokenEndpoint]:
    server = TokenEndpoint(pki).start()
    yield server
    server.stop()


def client(endpoint: TokenEndpoint, clock: ManualClock | None = None, **kwargs: Any) -> OAuthClient:
    options: dict[str, Any] = {"ssl_context": endpoint.pki.client_context(), "timeout": 5.0}
    if clock is not None:
        options["clock"] = clock
    options.update(kwargs)
    return OAuthClient(endpoint.url, CLIENT_ID, kwargs.pop("secret", SECRET), **options)


async def many(oauth: OAuthClient, n: int = 50) -> list[str | None]:
    return await asyncio.gather(*(oauth.authorization() for _ in range(n)))


def test_one_token_request_serves_every_concurrent_caller_and_the_token_is_cached(
    endpoint: TokenEndpoint,
) -> None:
    oauth = client(endpoint, ManualClock())
    first = asyncio.run(many(oauth))
    again = asyncio.run(many(oauth))
    assert len(set(first + again)) == 1
    header = first[0]
    assert header is not None and header.startswith("Bearer ")
    stats = endpoint.stats()
    assert (stats["requests"], stats["issued"]) == (1, 1)
    assert header.removeprefix("Bearer ") in stats["valid"]  # the endpoint issued exactly this token
    assert oauth.current() == header


def test_the_token_is_refreshed_once_shortly_before_expiry_under_concurrency(endpoint: TokenEndpoint) -> None:
    clock = ManualClock()
    oauth = client(endpoint, clock)

    async def scenario() -> None:
        [old] = await many(oauth, 1)
        clock.now += 89  # expires_in 100: kept until 10 s (a tenth) before expiry
        assert set(await many(oauth)) == {old}
        assert endpoint.stats()["requests"] == 1
        clock.now += 2
        fresh = await many(oauth)
        assert len(set(fresh)) == 1 and fresh[0] != old
        assert endpoint.stats()["requests"] == 2

    asyncio.run(scenario())


def test_an_endpoint_that_is_down_means_serving_locally_until_it_is_back(
    endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    oauth = client(endpoint, clock, retry_min=5.0)

    async def scenario() -> None:
        [held] = await many(oauth, 1)
        endpoint.stop()
        # Inside the refresh window the endpoint fails, but the token still works: keep it.
        clock.now += 95
        assert set(await many(oauth, 10)) == {held}
        fetches = oauth.fetches
        # Expired and the endpoint is down: no token, serve locally; the next attempt backs off.
        clock.now += 10
        assert set(await many(oauth, 10)) == {None}
        assert oauth.fetches == fetches + 1
        assert await oauth.authorization() is None
        assert oauth.fetches == fetches + 1  # not asked again within the backoff
        assert oauth.current() is None
        endpoint.start()  # back, on the same port
        clock.now += 30
        header = await oauth.authorization()
        assert header is not None and header != held

    asyncio.run(scenario())
    assert "serving locally" in caplog.text


def test_a_hanging_endpoint_times_out_into_serving_locally(pki: LoopbackPKI) -> None:
    slow = TokenEndpoint(pki, delay=5).start()
    try:
        oauth = client(slow, ManualClock(), timeout=0.3)
        assert asyncio.run(many(oauth, 5)) == [None] * 5
        assert oauth.fetches == 1
    finally:
        slow.stop()


def test_a_changed_client_secret_is_used_at_once(
    endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = ManualClock()
    oauth = OAuthClient(
        endpoint.url, CLIENT_ID, "old-secret", ssl_context=endpoint.pki.client_context(), clock=clock
    )

    async def scenario() -> None:
        assert await oauth.authorization() is None  # refused: 401 invalid_client
        oauth.set_secret(SECRET)  # the referenced Secret was updated
        header = await oauth.authorization()
        assert header is not None
        # Rotated again at the endpoint and in the Secret: the held token is dropped.
        endpoint.set_secret("rotated")
        oauth.set_secret("rotated")
        assert oauth.current() is None
        renewed = await oauth.authorization()
        assert renewed is not None and renewed != header

    asyncio.run(scenario())
    assert "401 (invalid_client)" in caplog.text
    for secret in ("old-secret", SECRET, "rotated"):
        assert secret not in caplog.text
    assert "Bearer" not in caplog.text
    assert SECRET not in repr(oauth)


def test_client_secret_post_is_supported(endpoint: TokenEndpoint) -> None:
    oauth = client(endpoint, ManualClock(), auth_method="post")
    assert asyncio.run(oauth.authorization()) is not None


def test_an_endpoint_certificate_from_an_unknown_ca_gives_no_token(endpoint: TokenEndpoint) -> None:
    oauth = OAuthClient(endpoint.url, CLIENT_ID, SECRET, ssl_context=ssl.create_default_context())
    assert asyncio.run(oauth.authorization()) is None
    assert endpoint.stats()["requests"] == 0


def test_the_refresher_publishes_each_new_header_for_the_remote_target(pki: LoopbackPKI) -> None:
    short = TokenEndpoint(pki, **{"expires-in": 2, "delay": 0}).start()
    target = RemoteTarget("https", "remote.example", 443, "remote.example", headers=(("X-Team", "a"),))
    published: list[RemoteTarget] = []
    try:
        oauth = client(short)

        async def scenario() -> None:
            task = asyncio.ensure_future(
                oauth.run_refresher(lambda h: published.append(with_authorization(target, h)))
            )
            async with asyncio.timeout(10):
                while len(published) < 2:
                    await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(scenario())
    finally:
        short.stop()
    first, second = published[:2]
    assert first.headers[0] == ("X-Team", "a") and first.headers[1][0] == "Authorization"
    assert first.headers[1] != second.headers[1]
    assert len(second.headers) == 2


BROKEN_ANSWERS = {
    "nested": "not a JSON object",  # 30,000-deep arrays: RecursionError in the JSON parser
    "huge": "too large",  # 400 KB: not read past 64 KiB
    "garbage": "not a JSON object",
    "euro": "not usable in a header",
}


@pytest.mark.parametrize("mode", sorted(BROKEN_ANSWERS))
def test_a_token_endpoint_answering_nonsense_means_serving_locally_until_it_is_fixed(
    endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    clock = ManualClock()
    oauth = client(endpoint, clock, retry_min=5.0)

    async def scenario() -> None:
        [held] = await many(oauth, 1)
        assert held is not None
        endpoint.set_mode(mode)
        clock.now += 95  # the refresh fails; the held token still works: kept
        assert set(await many(oauth, 10)) == {held}
        clock.now += 10  # expired, and the endpoint still answers nonsense: no token
        assert set(await many(oauth, 10)) == {None}
        assert oauth.current() is None
        endpoint.set_mode("ok")
        clock.now += 30
        fresh = await oauth.authorization()
        assert fresh is not None and fresh != held

    asyncio.run(scenario())
    assert BROKEN_ANSWERS[mode] in caplog.text and "serving locally" in caplog.text
    assert EURO_TOKEN not in caplog.text and "Bearer" not in caplog.text and "[[[" not in caplog.text


@pytest.mark.parametrize("mode", ["nested", "euro"])
def test_the_refresher_survives_nonsense_withdraws_the_expired_header_and_recovers(
    pki: LoopbackPKI, mode: str
) -> None:
    short = TokenEndpoint(pki, **{"expires-in": 1, "delay": 0}).start()
    published: list[str | None] = []
    try:
        oauth = client(short, retry_min=0.05, retry_max=0.2)

        async def until(condition: Any) -> None:
            async with asyncio.timeout(10):
                while not condition():
                    await asyncio.sleep(0.02)

        async def scenario() -> None:
            task = asyncio.ensure_future(oauth.run_refresher(published.append))
            await until(lambda: published and published[-1] is not None)
            short.set_mode(mode)
            await until(lambda: published[-1] is None)  # the token expired: requests stay local
            assert not task.done()
            short.set_mode("ok")
            await until(lambda: published[-1] is not None)
            assert not task.done()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(scenario())
    finally:
        short.stop()
    assert published[0] is not None and published[-1] is not None and published[-1] != published[0]
    assert None in published
