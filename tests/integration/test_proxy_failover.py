"""Routing shares and failure behaviour, with real servers cut and restored."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time

import httpx
import pytest

from certs.issue import issue_ca, issue_serving_cert
from sidecar.proxy.breaker import BreakerSettings
from sidecar.proxy.server import ProxySettings
from tests.integration.servers import LoopThread, ProxyHarness, Upstream, wait_until


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture
def harnesses(lt):
    made = []

    def make(**kw):
        h = ProxyHarness(lt, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def load(url: str, *, threads: int, per_thread: int, during=None, after: int = 0, path: str = "/echo"):
    """Requests from several keep-alive clients at once; ``during`` runs once ``after`` are done."""
    statuses: list[int] = []
    servers: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()
    lock = threading.Lock()

    def worker():
        with httpx.Client(base_url=url, timeout=10) as c:
            for _ in range(per_thread):
                try:
                    r = c.get(path)
                except httpx.HTTPError as exc:
                    errors.append(exc)
                    continue
                with lock:
                    statuses.append(r.status_code)
                    servers.append(r.headers.get("x-upstream", "?"))
                    if len(statuses) == after:
                        done.set()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    if during is not None:
        done.wait(30)
        during()
    for t in pool:
        t.join(60)
    return statuses, servers, errors


def test_exactly_half_of_every_hundred_requests_go_remote_at_50_percent(harnesses):
    h = harnesses(percentage=50)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        served = [c.get(f"/echo?n={i}").headers["x-upstream"] for i in range(300)]
    for start in range(201):
        assert served[start : start + 100].count("remote") == 50
    assert h.remote.count() == 150 and h.local.count() == 150


@pytest.mark.parametrize("percentage", [0, 1, 25, 100])
def test_the_share_follows_the_percentage(harnesses, percentage):
    h = harnesses(percentage=percentage)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        for _ in range(100):
            assert c.get("/echo").status_code == 200
    assert h.remote.count() == percentage


def test_with_the_remote_killed_mid_load_every_request_still_succeeds(harnesses, lt):
    h = harnesses(percentage=50)
    statuses, servers, errors = load(
        h.url, threads=8, per_thread=60, after=120, during=lambda: lt.run(h.remote.kill())
    )
    assert errors == [] and len(statuses) == 480
    assert set(statuses) == {200}
    remote_before_kill = h.remote.count()
    assert 0 < remote_before_kill < 240  # it served its share until it died
    assert servers.count("local") == 480 - remote_before_kill
    assert h.proxy.stats.breaker_state == "open"


def test_a_remote_that_refuses_connections_is_skipped_by_the_breaker(harnesses, lt):
    settings = ProxySettings(
        breaker=BreakerSettings(failure_threshold=3, backoff_seconds=60, max_backoff_seconds=60)
    )
    h = harnesses(percentage=50, settings=settings)
    lt.run(h.remote.kill())
    with httpx.Client(base_url=h.url, timeout=10) as c:
        answers = [c.get("/echo") for _ in range(40)]
    assert {r.status_code for r in answers} == {200}
    assert {r.headers["x-upstream"] for r in answers} == {"local"}
    stats = h.proxy.stats
    assert stats.upstream_failures_total[("remote", "connect")] == 3  # then the breaker held
    assert stats.fallbacks_total[("remote", "local", "connect")] == 3
    assert stats.fallbacks_total[("remote", "local", "breaker_open")] == 17
    assert stats.breaker_state == "open"


def test_the_breaker_probes_again_and_closes_when_the_remote_is_back(harnesses, lt):
    settings = ProxySettings(
        breaker=BreakerSettings(failure_threshold=2, backoff_seconds=0.2, max_backoff_seconds=0.2)
    )
    h = harnesses(percentage=100, settings=settings)
    port = h.remote.port
    lt.run(h.remote.kill())
    with httpx.Client(base_url=h.url, timeout=10) as c:
        assert {c.get("/echo").headers["x-upstream"] for _ in range(5)} == {"local"}
        assert h.proxy.stats.breaker_state == "open"
        revived = Upstream("remote")
        lt.run(revived.start(port))
        h.remote = revived
        # The next request probes once the breaker's backoff is over, on the proxy's clock.
        breaker = remote_breaker(h)
        wait_until("the breaker's backoff is over", lambda: lt.call(h.proxy.loop.time) >= breaker.retry_at)
        assert [c.get("/echo").headers["x-upstream"] for _ in range(5)] == ["remote"] * 5
    assert h.proxy.stats.breaker_state == "closed"


def test_a_remote_that_drops_requests_unanswered_is_replaced_by_the_local_model(harnesses, lt):
    h = harnesses(percentage=100)

    async def drop_everything(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    import asyncio

    server = lt.run(asyncio.start_server(drop_everything, "127.0.0.1", 0))
    from sidecar.proxy.routing import RemoteTarget

    port = server.sockets[0].getsockname()[1]
    h.target = RemoteTarget(scheme="http", host="127.0.0.1", port=port, authority=f"127.0.0.1:{port}")
    h.set_percentage(100)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.post("/echo", content=b"x" * 5000)
    assert r.status_code == 200 and r.headers["x-upstream"] == "local" and r.json()["body_size"] == 5000
    lt.call(server.close)


def test_a_slow_remote_past_the_read_timeout_is_replaced_by_the_local_model(harnesses):
    h = harnesses(percentage=100, settings=ProxySettings(read_timeout=0.3, tick=0.05))
    h.remote.delay_s = 2.0
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert r.status_code == 200 and r.headers["x-upstream"] == "local"
    assert h.proxy.stats.fallbacks_total[("remote", "local", "timeout")] == 1


def test_with_the_local_model_down_requests_go_to_the_remote(harnesses, lt):
    h = harnesses(percentage=0)
    lt.run(h.local.kill())
    with httpx.Client(base_url=h.url, timeout=10) as c:
        answers = [c.post("/echo", content=b"abc") for _ in range(10)]
    assert [(r.status_code, r.headers["x-upstream"], r.json()["body_size"]) for r in answers] == [
        (200, "remote", 3)
    ] * 10


def test_with_the_local_model_killed_mid_load_every_request_still_succeeds(harnesses, lt):
    h = harnesses(percentage=50)
    statuses, servers, errors = load(
        h.url, threads=8, per_thread=40, after=80, during=lambda: lt.run(h.local.kill())
    )
    assert errors == [] and set(statuses) == {200} and len(statuses) == 320
    assert servers.count("remote") > 160


def test_with_no_remote_a_dead_local_model_is_a_clear_502(harnesses, lt):
    h = harnesses(with_remote=False)
    lt.run(h.local.kill())
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert r.status_code == 502 and r.text == "local model unavailable (connect)\n"


def test_while_shutting_down_a_dead_local_model_is_a_503_with_retry_after(harnesses, lt):
    h = harnesses(with_remote=False, settings=ProxySettings(shutdown_grace=1.0))
    lt.run(h.local.kill())
    import asyncio

    future = asyncio.run_coroutine_threadsafe(h.proxy.shutdown(3.0), lt.loop)
    wait_until("the shutdown began", lambda: h.proxy.draining)  # within the grace: still accepting
    assert not h.proxy.ready
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    future.result(10)


# --- TLS to the remote ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls():
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("test remote CA", now=now, days=1)
    pair = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
    return ca, pair


def server_context(pair, tmp_path):
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    return context


def test_an_https_remote_is_verified_and_used(harnesses, tls, tmp_path):
    ca, pair = tls
    client_context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    h = harnesses(
        percentage=100,
        remote_scheme="https",
        remote_ssl=server_context(pair, tmp_path),
        settings=ProxySettings(remote_ssl_context=client_context),
    )
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert r.status_code == 200 and r.headers["x-upstream"] == "remote"
    assert ["Host", f"127.0.0.1:{h.remote.port}"] in r.json()["headers"]


def test_an_https_remote_with_an_untrusted_certificate_is_not_used(harnesses, tls, tmp_path):
    ca, pair = tls
    h = harnesses(
        percentage=100, remote_scheme="https", remote_ssl=server_context(pair, tmp_path)
    )  # system CAs
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert r.status_code == 200 and r.headers["x-upstream"] == "local"
    assert h.proxy.stats.upstream_failures_total[("remote", "tls")] == 1
    assert h.remote.count() == 0


# --- remote targets changing over time ---------------------------------------------


def test_old_remote_targets_are_forgotten_and_requests_follow_the_newest(harnesses, lt):
    """A token refresh or caBundle change makes a new RemoteTarget: old ones (and
    their tokens, pools, breakers) are dropped beyond a few, the newest serves."""
    from sidecar.proxy.remote import MAX_KEPT_ROUTES
    from sidecar.proxy.routing import RemoteTarget, RoutePlan

    h = harnesses(percentage=100)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        for i in range(100):
            # Every tenth target a new TLS context (a caBundle change): a new pool key.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if i % 10 == 0 else None
            target = RemoteTarget(
                scheme="http",
                host="127.0.0.1",
                port=h.remote.port,
                authority=f"127.0.0.1:{h.remote.port}",
                headers=(("Authorization", f"Bearer token-{i}"),),
                ssl_context=context,
            )
            lt.call(lambda t=target: h.routing.update(RoutePlan(remote=t, percentage=100, offloading=True)))
            r = c.get("/echo")
            assert r.status_code == 200 and r.json()["server"] == "remote"
            assert {n.lower(): v for n, v in r.json()["headers"]}["authorization"] == f"Bearer token-{i}"
            pools = lt.call(lambda: list(h.proxy.remotes.pools.values()))
            assert len(h.proxy.remotes.routes) <= MAX_KEPT_ROUTES + 1
            assert len(pools) <= MAX_KEPT_ROUTES + 1 and len(h.proxy.remotes.breakers) <= MAX_KEPT_ROUTES + 1
            if i == 0:
                first_pool = pools[0]
    kept_tokens = {dict(t.headers)["Authorization"] for t in h.proxy.remotes.routes}
    assert "Bearer token-99" in kept_tokens and "Bearer token-0" not in kept_tokens
    assert first_pool.closed and not first_pool.idle  # its connections were closed with it
    assert h.remote.count() == 100 and h.local.count() == 0


@pytest.mark.parametrize(
    "bad",
    [{"headers": (("X-Api-Key", "key-\u20ac"),)}, {"path_prefix": "/v1-\u20ac"}],
    ids=["header value not latin-1", "path prefix not latin-1"],
)
def test_a_remote_that_cannot_be_encoded_is_never_a_500_but_served_locally(harnesses, bad, caplog):
    h = harnesses(percentage=100, **bad)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        for _ in range(3):
            r = c.get("/echo")
            assert r.status_code == 200 and r.json()["server"] == "local"
    assert h.proxy.stats.fallbacks_total[("remote", "local", "bad-remote-config")] == 3
    assert h.remote.count() == 0
    said = [rec for rec in caplog.records if "cannot be used" in rec.getMessage()]
    assert len(said) == 1 and "\u20ac" not in said[0].getMessage() and "key-" not in said[0].getMessage()


# --- the last resort and busy backends ---------------------------------------------------


def remote_breaker(h):
    (breaker,) = h.proxy.remotes.breakers.values()
    return breaker


def trip_the_breaker(h, lt, client: httpx.Client, requests: int = 4) -> None:
    """The remote goes down and the breaker opens: every request is served locally."""
    lt.run(h.remote.kill())
    assert {client.get("/echo").headers["x-upstream"] for _ in range(requests)} == {"local"}
    assert h.proxy.stats.breaker_state == "open"


def revive_remote(h, lt) -> None:
    revived = Upstream("remote")
    lt.run(revived.start(h.remote.port))
    h.remote = revived


def test_an_open_breaker_never_vetoes_the_remote_when_the_local_model_fails(harnesses, lt):
    """The issue's case: the remote is back, its breaker still open for 60 s; the
    local model fails. The remote answers, and that answer closes the breaker."""
    settings = ProxySettings(
        breaker=BreakerSettings(failure_threshold=2, backoff_seconds=60, max_backoff_seconds=60)
    )
    h = harnesses(percentage=50, settings=settings)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        trip_the_breaker(h, lt, c)
        revive_remote(h, lt)
        lt.run(h.local.kill())
        answers = [c.post("/echo", content=b"abc") for _ in range(6)]
    assert [(r.status_code, r.headers["x-upstream"], r.json()["body_size"]) for r in answers] == [
        (200, "remote", 3)
    ] * 6
    assert h.proxy.stats.breaker_state == "closed"
    assert h.proxy.stats.fallbacks_total[("local", "remote", "connect")] >= 1


def test_a_failed_last_resort_counts_as_a_failed_probe(harnesses, lt):
    settings = ProxySettings(
        breaker=BreakerSettings(failure_threshold=2, backoff_seconds=60, max_backoff_seconds=600)
    )
    h = harnesses(percentage=100, settings=settings)
    with httpx.Client(base_url=h.url, timeout=10) as c:
        trip_the_breaker(h, lt, c)
        lt.run(h.local.kill())
        r = c.get("/echo")
    assert r.status_code == 502 and r.text == "remote model unavailable (connect)\n"
    breaker = remote_breaker(h)
    assert breaker.state == "open" and breaker.backoff == 120  # doubled, as after any failed probe


@pytest.mark.parametrize("status", [503, 429])
def test_a_busy_remote_is_replaced_by_the_local_model_and_its_retry_after_holds_it_off(harnesses, status):
    h = harnesses(percentage=100)
    h.remote.answer = (status, [("Retry-After", "1")])
    with httpx.Client(base_url=h.url, timeout=10) as c:
        started = time.monotonic()
        r = c.post("/echo", content=b"x" * 5000)
        assert (r.status_code, r.headers["x-upstream"], r.json()["body_size"]) == (200, "local", 5000)
        assert h.remote.count() == 1 and remote_breaker(h).state == "open"
        h.remote.answer = None
        # While the Retry-After runs the remote gets nothing; then it serves again.
        while (r := c.get("/echo")).headers["x-upstream"] == "local":
            assert time.monotonic() - started < 5, "the remote was never tried again"
            time.sleep(0.05)
        assert time.monotonic() - started >= 1.0
    assert h.remote.count() == 2 and h.proxy.stats.breaker_state == "closed"
    stats = h.proxy.stats
    assert stats.fallbacks_total[("remote", "local", f"http_{status}")] == 1
    assert stats.upstream_failures_total[("remote", f"http_{status}")] == 1


def test_a_busy_remote_without_retry_after_is_one_failure_towards_the_threshold(harnesses):
    h = harnesses(percentage=100, settings=ProxySettings(breaker=BreakerSettings(failure_threshold=3)))
    h.remote.answer = (429, [])
    with httpx.Client(base_url=h.url, timeout=10) as c:
        served = [c.get("/echo").headers["x-upstream"] for _ in range(5)]
    assert served == ["local"] * 5
    assert h.remote.count() == 3  # then the breaker held it off
    assert h.proxy.stats.breaker_state == "open"


def test_a_busy_answer_to_a_request_that_cannot_be_replayed_is_relayed_as_it_is(harnesses):
    h = harnesses(percentage=100)  # replay_buffer_bytes: 64 KiB
    h.remote.answer = (503, [("Retry-After", "7")])
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.post("/echo", content=b"x" * (256 * 1024))
    assert (r.status_code, r.headers["x-upstream"], r.headers["retry-after"]) == (503, "remote", "7")
    assert r.text == "remote busy\n"
    assert h.local.count() == 0 and remote_breaker(h).state == "open"  # its Retry-After still counts


def test_a_busy_local_model_sends_the_request_to_the_remote_even_past_an_open_breaker(harnesses, lt):
    settings = ProxySettings(
        breaker=BreakerSettings(failure_threshold=2, backoff_seconds=60, max_backoff_seconds=60)
    )
    h = harnesses(percentage=0, settings=settings)
    h.local.answer = (503, [("Retry-After", "30")])
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.post("/echo", content=b"hello")
        assert (r.status_code, r.headers["x-upstream"], r.json()["body"]) == (200, "remote", "hello")
        h.local.answer = None
        h.set_percentage(100)
        trip_the_breaker(h, lt, c)
        revive_remote(h, lt)
        h.local.answer = (503, [])
        r = c.get("/echo")
    assert (r.status_code, r.headers["x-upstream"]) == (200, "remote")
    assert h.proxy.stats.breaker_state == "closed"
    assert h.proxy.stats.fallbacks_total[("local", "remote", "http_503")] == 2


def test_a_local_429_concerns_the_client_and_is_relayed(harnesses):
    h = harnesses(percentage=0)
    h.local.answer = (429, [("Retry-After", "3")])
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert (r.status_code, r.headers["x-upstream"], r.headers["retry-after"]) == (429, "local", "3")
    assert h.remote.count() == 0


def test_when_both_backends_are_busy_the_client_gets_the_second_answer(harnesses):
    h = harnesses(percentage=0)
    h.local.answer = (503, [("Retry-After", "30")])
    h.remote.answer = (503, [("Retry-After", "5")])
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert (r.status_code, r.headers["x-upstream"], r.headers["retry-after"]) == (503, "remote", "5")
    assert h.local.count() == 1 and h.remote.count() == 1


def test_a_busy_remote_then_a_dead_local_model_gives_the_busy_status_and_its_retry_after(harnesses, lt):
    h = harnesses(percentage=100)
    h.remote.answer = (503, [("Retry-After", "4")])
    lt.run(h.local.kill())
    with httpx.Client(base_url=h.url, timeout=10) as c:
        r = c.get("/echo")
    assert (r.status_code, r.headers["retry-after"]) == (503, "4")
    assert r.text == "remote model busy (503), local model unavailable (connect)\n"
