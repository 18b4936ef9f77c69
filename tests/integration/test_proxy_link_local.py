"""A remote whose name resolves to a link-local or cloud metadata address is never
connected to (crds.addresses): the request falls back to the local model (502 without
one), the reason is logged and counted, and the allowed addresses of a name are still
used. Real sockets on 127.0.0.1; the resolver is a stand-in (169.254.x cannot be bound)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl

import httpx
import pytest

from certs.issue import issue_ca, issue_serving_cert
from crds.addresses import ForbiddenAddressError
from sidecar.proxy.flow import CoarseClock
from sidecar.proxy.routing import RemoteTarget, RoutePlan, RoutingTable
from sidecar.proxy.server import ProxyServer, ProxySettings
from sidecar.proxy.upstream import UpstreamPool
from tests.integration.servers import LoopThread, Upstream

NAME = "model.remote.test"  # resolved by the stand-in resolver only


@pytest.fixture(scope="module")
def lt():
    with LoopThread() as loop_thread:
        yield loop_thread


def resolver(*addresses: str):
    """A stand-in for loop.getaddrinfo: ``NAME`` resolves to ``addresses``, in order."""
    asked: list[str] = []

    async def resolve(host: str, port: int, **_: object) -> list[tuple]:
        asked.append(host)
        if host != NAME:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


class Setup:
    """A local and a remote Upstream on 127.0.0.1, and a proxy sending every request to
    the remote ``host`` (on the remote Upstream's port)."""

    def __init__(self, lt, host: str, settings: ProxySettings, *, scheme="http", remote_ssl=None):
        self.lt = lt
        self.local = lt.run(Upstream.started("local"))
        self.remote = Upstream("remote")
        lt.run(self.remote.start(0, remote_ssl))
        self.authority = f"{host}:{self.remote.port}"
        target = RemoteTarget(scheme, host, self.remote.port, self.authority)
        routing = RoutingTable(RoutePlan(remote=target, percentage=100, offloading=True))
        self.proxy = ProxyServer(routing, self.local.address, settings)
        self.url = f"http://127.0.0.1:{lt.run(self.proxy.start('127.0.0.1', 0))}"

    def get(self) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            return c.get("/echo")

    def close(self) -> None:
        self.lt.run(self.proxy.shutdown(0.2))
        self.lt.run(self.local.kill())
        self.lt.run(self.remote.kill())


@pytest.fixture
def setups(lt):
    made: list[Setup] = []

    def make(*args, **kw) -> Setup:
        made.append(Setup(lt, *args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_name_resolving_only_to_the_metadata_address_falls_back_to_local(setups, caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.proxy")
    resolve = resolver("169.254.169.254")
    s = setups(NAME, ProxySettings(remote_resolver=resolve))
    for _ in range(3):
        r = s.get()
        assert r.status_code == 200 and r.headers["x-upstream"] == "local"
    assert resolve.asked == [NAME] * 3
    stats = s.proxy.stats
    assert stats.upstream_failures_total[("remote", "connect")] == 3
    assert stats.fallbacks_total[("remote", "local", "connect")] == 3
    assert s.remote.connections_accepted == 0
    reason = (
        f"remote {NAME} resolves only to link-local/cloud metadata addresses: 169.254.169.254 is a"
        " link-local address (169.254.0.0/16), where cloud metadata services listen"
    )
    assert warnings(caplog).count(reason) == 1  # once, not once per request


def test_without_a_local_model_the_client_gets_502(setups):
    s = setups(NAME, ProxySettings(remote_resolver=resolver("fd00:ec2::254", "fe80::1")))
    s.lt.run(s.local.kill())  # nothing listens on the local port any more
    r = s.get()
    assert r.status_code == 502
    stats = s.proxy.stats
    assert stats.upstream_failures_total[("remote", "connect")] == 1
    assert stats.upstream_failures_total[("local", "connect")] == 1


def test_the_allowed_addresses_of_a_name_are_used_in_order(setups, caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.proxy")
    s = setups(NAME, ProxySettings(remote_resolver=resolver("169.254.169.254", "127.0.0.1")))
    r = s.get()
    assert r.status_code == 200 and r.headers["x-upstream"] == "remote"
    assert ["Host", s.authority] in r.json()["headers"]  # the name, not the address reached
    assert s.remote.connections_accepted == 1
    assert any("169.254.169.254); connecting only to the others" in m for m in warnings(caplog))


def test_tls_to_an_allowed_address_verifies_the_name(setups, tmp_path):
    now = dt.datetime.now(dt.UTC)
    ca = issue_ca("test remote CA", now=now, days=1)
    pair = issue_serving_cert(ca, dns_names=[NAME], ip_addresses=[], now=now, days=1)
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    settings = ProxySettings(
        remote_resolver=resolver("fe80::1", "127.0.0.1"),
        remote_ssl_context=ssl.create_default_context(cadata=ca.cert_pem.decode()),
    )
    s = setups(NAME, settings, scheme="https", remote_ssl=server)
    r = s.get()
    assert r.status_code == 200 and r.headers["x-upstream"] == "remote"


def test_a_metadata_ip_literal_is_refused_without_connecting(setups, caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.proxy")
    resolve = resolver()
    s = setups("169.254.169.254", ProxySettings(remote_resolver=resolve, connect_timeout=30))
    r = s.get()  # at once: no connect attempt that would wait for the timeout
    assert r.status_code == 200 and r.headers["x-upstream"] == "local"
    assert resolve.asked == []
    assert s.proxy.stats.upstream_failures_total[("remote", "connect")] == 1
    assert any(m.startswith("remote 169.254.169.254 is refused: ") for m in warnings(caplog))


def test_with_the_flag_off_names_are_not_screened(setups):
    resolve = resolver("169.254.169.254")
    s = setups("127.0.0.1", ProxySettings(remote_resolver=resolve, refuse_link_local_remotes=False))
    assert s.get().headers["x-upstream"] == "remote"
    assert resolve.asked == []


# --- the pool's connect, directly -------------------------------------------------------


def pool(resolve) -> UpstreamPool:
    return UpstreamPool(NAME, 9, clock=CoarseClock(), label="remote", refuse_link_local=True, resolve=resolve)


def test_the_connect_timeout_covers_resolution(lt):
    async def hangs(host, port, **_):
        await asyncio.Event().wait()

    async def attempt():
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await pool(hangs).connect(0.2)
        return loop.time() - start

    assert lt.run(attempt()) < 5


def test_a_refused_connect_is_an_oserror_saying_why(lt):
    with pytest.raises(ForbiddenAddressError) as caught:
        lt.run(pool(resolver("::ffff:169.254.169.254")).connect(5))
    assert isinstance(caught.value, OSError)
    assert str(caught.value).startswith(f"remote {NAME} resolves only to link-local/cloud metadata addresses")
