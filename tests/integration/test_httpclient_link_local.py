"""The control side's HTTP client with ``refuse_link_local`` (the OAuth token fetch): a
host that is, or resolves only to, a link-local or cloud metadata address is never
connected to; the allowed addresses of a name are. Real sockets on 127.0.0.1 (and real
TLS); the resolver is a stand-in, since 169.254.x cannot be bound here."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from crds.addresses import ForbiddenAddressError
from sidecar.credentials.oauth import OAuthClient
from sidecar.httpclient import fetch
from tests.integration.fake_apiserver import LoopbackPKI

STEP = 10.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def resolver(name: str, *addresses: str):
    """A stand-in for loop.getaddrinfo: ``name`` resolves to ``addresses``, in order."""

    async def resolve(host: str, port: int, **_: object) -> list[tuple]:
        if host != name:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    return resolve


async def server(ssl_context=None) -> tuple[asyncio.Server, list[bytes]]:
    """A server on 127.0.0.1 answering OK once per connection; the request heads it read."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(OK)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context), heads


def test_a_name_resolving_only_to_metadata_addresses_is_refused_before_any_connect():
    async def main() -> None:
        srv, heads = await server()
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ForbiddenAddressError) as caught:
                await fetch(
                    f"http://auth.test:{port}/token",
                    timeout=STEP,
                    max_body=100,
                    refuse_link_local="tokenUrl",
                    resolve=resolver("auth.test", "169.254.169.254", "fd00:ec2::254"),
                )
            assert str(caught.value).startswith(
                "tokenUrl host auth.test resolves only to link-local/cloud metadata addresses: "
                "169.254.169.254 is a link-local address"
            )
            assert heads == []
        finally:
            srv.close()

    asyncio.run(main())


def test_the_allowed_address_of_a_name_is_used_and_tls_verifies_the_name(tmp_path):
    pki = LoopbackPKI.create(tmp_path)  # a certificate for "localhost" and 127.0.0.1

    async def main() -> None:
        srv, heads = await server(pki.server_context())
        port = srv.sockets[0].getsockname()[1]
        try:
            response = await fetch(
                f"https://localhost:{port}/token",
                ssl_context=pki.client_context(),
                timeout=STEP,
                max_body=100,
                refuse_link_local="tokenUrl",
                resolve=resolver("localhost", "169.254.169.254", "127.0.0.1"),
            )
            assert (response.status, response.body) == (200, b"ok")
            assert f"Host: localhost:{port}".encode() in heads[0]
        finally:
            srv.close()

    asyncio.run(main())


def test_a_metadata_literal_is_refused_at_once():
    async def main() -> None:
        with pytest.raises(ForbiddenAddressError, match=r"^tokenUrl host fd00:ec2::254 is refused: .*AWS"):
            await fetch(
                "https://[fd00:ec2::254]/token", timeout=STEP, max_body=100, refuse_link_local="tokenUrl"
            )

    asyncio.run(main())


def test_the_oauth_client_gets_no_token_from_a_metadata_address_and_says_why(caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.credentials.oauth")
    oauth = OAuthClient("https://169.254.169.254/latest/api/token", "offloader", "secret", timeout=30)
    # At once: nothing is connected to (a connect would wait for the timeout here).
    assert asyncio.run(asyncio.wait_for(oauth.authorization(), STEP)) is None
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "ForbiddenAddressError (tokenUrl host 169.254.169.254 is refused: 169.254.169.254 is a link-local"
        in m
        for m in messages
    ), messages
