"""A stand-in Kubernetes API server on loopback, for the client's failure paths.

FAKE: it serves only what sidecar/cluster/client.py asks of one resource collection (GET
of a list, watch with resourceVersion, bookmarks, 410 Gone once history is
compacted, bearer-token checks) over real TLS, with knobs to expire watches,
drop connections and stop answering. The e2e tier runs the same client against
the real kube-apiserver; this one exists because the real one cannot be made
to misbehave on cue.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from certs.issue import KeyPair, issue_ca, issue_serving_cert


@dataclass
class LoopbackPKI:
    ca: KeyPair
    serving: KeyPair
    dir: Path

    @classmethod
    def create(cls, directory: Path) -> LoopbackPKI:
        now = dt.datetime.now(dt.UTC)
        ca = issue_ca("fake-apiserver-ca", now=now, days=1)
        serving = issue_serving_cert(ca, dns_names=["localhost"], ip_addresses=["127.0.0.1"], now=now, days=1)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.crt").write_bytes(ca.cert_pem)
        (directory / "tls.crt").write_bytes(serving.cert_pem)
        (directory / "tls.key").write_bytes(serving.key_pem)
        return cls(ca, serving, directory)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.cert_pem.decode())

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.dir / "tls.crt"), str(self.dir / "tls.key"))
        return ctx


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    authorization: str | None


@dataclass
class FakeApiServer:
    """One collection (``collection`` path) of objects keyed by name."""

    pki: LoopbackPKI
    collection: str
    token: str = "token-1"
    kind: str = "ModelDeploymentList"
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    version: int = 100
    compacted: int = 0  # watches from below this resourceVersion get 410 Gone
    forbidden: bool = False  # authorized requests get 403, as RBAC refuses a token without a role
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Condition | None = None
    _watch_writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, port: int = 0) -> int:
        self._changed = asyncio.Condition()
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", port, ssl=self.pki.server_context(), reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stops listening and cuts every connection (the API server is gone)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            await asyncio.sleep(0)
            self._server = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path, token: str | None = None, token_file: Path | None = None) -> Path:
        import base64

        import yaml

        user: dict[str, Any] = (
            {"token": token or self.token} if token_file is None else {"tokenFile": str(token_file)}
        )
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.pki.ca.cert_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "sidecar", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "sidecar"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- changing the state -------------------------------------------------------------------

    async def put(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        kind = "MODIFIED" if name in self.objects else "ADDED"
        await self._record(kind, obj)

    async def delete(self, name: str) -> None:
        obj = self.objects[name]
        await self._record("DELETED", obj)

    async def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self.history.append((self.version, kind, obj))
        await self._notify()

    async def bookmark(self) -> None:
        """Advances the resourceVersion without a change and sends a BOOKMARK."""
        self.version += 1
        self.history.append((self.version, "BOOKMARK", {"metadata": {"resourceVersion": str(self.version)}}))
        await self._notify()

    async def compact(self) -> None:
        """Forget history: watches from any older resourceVersion now get 410 Gone."""
        self.compacted = self.version
        self.history.clear()
        await self._notify()

    def drop_watches(self) -> None:
        for writer in list(self._watch_writers):
            writer.transport.abort()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def watches_seen(self) -> list[Seen]:
        return [s for s in self.seen if s.query.get("watch") == "true"]

    def lists_seen(self) -> list[Seen]:
        return [s for s in self.seen if s.query.get("watch") != "true"]

    # -- serving ----------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                url = urlsplit(target)
                seen = Seen(url.path, dict(parse_qsl(url.query)), headers.get("authorization"))
                self.seen.append(seen)
                if seen.authorization != f"Bearer {self.token}":
                    await self._status(writer, 401, "Unauthorized", "Unauthorized")
                elif self.forbidden:
                    message = (
                        f'{url.path} is forbidden: User "system:serviceaccount:models:default" cannot list'
                    )
                    await self._status(writer, 403, "Forbidden", message)
                elif method != "GET" or url.path != self.collection:
                    await self._status(writer, 404, "NotFound", f"{url.path} not found")
                elif seen.query.get("watch") == "true":
                    await self._watch(writer, seen.query)
                    return
                else:
                    await self._list(writer, seen.query)
                if headers.get("connection") == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _matches(self, obj: dict[str, Any], query: dict[str, str]) -> bool:
        selector = query.get("fieldSelector", "")
        if selector.startswith("metadata.name="):
            return obj.get("metadata", {}).get("name") == selector.split("=", 1)[1]
        return True

    async def _list(self, writer: asyncio.StreamWriter, query: dict[str, str]) -> None:
        items = [o for o in self.objects.values() if self._matches(o, query)]
        body = {
            "kind": self.kind,
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self.version)},
            "items": items,
        }
        await self._respond(writer, 200, json.dumps(body).encode())

    async def _status(self, writer: asyncio.StreamWriter, code: int, reason: str, message: str) -> None:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        await self._respond(writer, code, json.dumps(body).encode())

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def _watch(self, writer: asyncio.StreamWriter, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        timeout = float(query.get("timeoutSeconds") or 300)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self._watch_writers.add(writer)

        async def send(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        assert self._changed is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if since < self.compacted:
                        gone = {
                            "kind": "Status",
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": f"too old resource version: {since} ({self.compacted})",
                        }
                        await send({"type": "ERROR", "object": gone})
                        break
                    for version, kind, obj in list(self.history):
                        if version <= since:
                            continue
                        since = version
                        if kind == "BOOKMARK" and not bookmarks:
                            continue
                        if kind != "BOOKMARK" and not self._matches(obj, query):
                            continue
                        await send({"type": kind, "object": obj})
                    seen_up_to = since
                    async with self._changed:
                        await self._changed.wait_for(
                            lambda v=seen_up_to: self.version > v or v < self.compacted
                        )
        except TimeoutError:
            pass
        finally:
            self._watch_writers.discard(writer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
