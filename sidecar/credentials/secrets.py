"""Reading one key of a Secret, and following it: the values the remote's credentials need.

Two readers, one per mode, behind :class:`KeyReader`:

- cluster mode: :class:`SecretKeyReader`, a GET on the Secret by name through the
  sidecar's Kubernetes client (the per-ModelDeployment Role grants ``get`` only);
- standalone mode: :class:`SecretFileReader`, ``DIR/<secret name>/<key>`` as a Secret
  mounted as a volume lays it out (``--secrets-dir DIR``).

:func:`follow_key` reads one of them for ever: every ``period`` seconds while it reads
fine, sooner while it fails. Values are never logged nor shown in a repr: problems name
the Secret and the key only, and each new problem is logged once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from crds.backoff import Backoff

log = logging.getLogger("sidecar.credentials.secrets")

MAX_VALUE_BYTES = 16 * 1024  # a header value; a mounted file larger than this is not one


class KeyReader(Protocol):
    """One Secret key: ``read`` gives its value or None, and then ``problem`` says why."""

    problem: str | None

    async def read(self) -> str | None: ...


async def follow_key(
    reader: KeyReader,
    on_read: Callable[[str | None], None],
    *,
    period: float,
    retry: float = 1.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Reads ``reader`` for ever and hands every result to ``on_read`` (None: unreadable,
    ``reader.problem`` says why). Reads every ``period`` seconds; after a failed read,
    sooner: ``retry`` seconds, doubling up to ``period`` (no jitter: a secret that appears
    is picked up on a schedule one can state)."""
    backoff = Backoff(min(retry, period), period, jitter=False)
    failures = 0
    while True:
        value = await reader.read()
        on_read(value)
        if value is None:
            delay = backoff.delay(failures)
            failures += 1
        else:
            delay, failures = period, 0
        await sleep(delay)


class _Problems:
    """The last problem of a reader, logged once each time it changes."""

    problem: str | None = None

    def _fail(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("%s", problem)
        self.problem = problem


class SecretKeyReader(_Problems):
    """One key of one Secret in the sidecar's namespace, read with GET (the Role grants get only).

    ``client`` is the sidecar's Kubernetes client (``await client.get(path)`` gives the
    object as a dict). ``problem`` says why the last read gave no value (naming the Secret
    and the key, never a value).
    """

    def __init__(self, client: Any, namespace: str, name: str, key: str):
        self.client = client
        self.namespace = namespace
        self.name = name
        self.key = key
        self.version = ""
        self.problem = None

    def __repr__(self) -> str:
        return f"SecretKeyReader({self.namespace}/{self.name}[{self.key}])"

    async def read(self) -> str | None:
        """The key's value (decoded), or None when the Secret or key is missing or unreadable."""
        # Only cluster mode reads Secrets through the API: standalone never loads the client.
        from sidecar.cluster.client import KubeError

        where = f"Secret {self.namespace}/{self.name}"
        path = f"/api/v1/namespaces/{self.namespace}/secrets/{self.name}"
        try:
            secret = await self.client.get(path)
        except (KubeError, OSError, TimeoutError, ssl.SSLError) as exc:
            self._fail(f"cannot read {where}: {type(exc).__name__} {exc}")
            return None
        self.version = str((secret.get("metadata") or {}).get("resourceVersion") or "")
        data = secret.get("data") or {}
        if self.key not in data:
            self._fail(f"{where} has no key {self.key!r}")
            return None
        try:
            value = base64.b64decode(data[self.key], validate=True).decode("utf-8").strip()
        except ValueError:
            self._fail(f"{where} key {self.key!r} is not base64 UTF-8 text")
            return None
        if self.problem is not None:
            log.info("%s key %r readable again", where, self.key)
        self.problem = None
        return value


class SecretFileReader(_Problems):
    """``root/<name>/<key>``, as a Secret volume mounts it (values stripped of surrounding whitespace)."""

    def __init__(self, root: Path, name: str, key: str):
        self.root = root
        self.name = name
        self.key = key
        self.problem = None

    def __repr__(self) -> str:
        return f"SecretFileReader({self.root}/{self.name}/{self.key})"

    async def read(self) -> str | None:
        where = f"Secret {self.name} key {self.key!r} ({self.root}/{self.name}/{self.key})"
        # A name or key that is a path of its own would read outside the Secret's folder.
        if any(part in ("", ".", "..") or "/" in part for part in (self.name, self.key)):
            self._fail(f"{where}: not a Secret name and key")
            return None
        path = self.root / self.name / self.key
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_VALUE_BYTES + 1)
        except FileNotFoundError:
            self._fail(f"{where}: no such file")
            return None
        except OSError as exc:
            self._fail(f"{where}: cannot read ({exc.strerror or type(exc).__name__})")
            return None
        if len(raw) > MAX_VALUE_BYTES:
            self._fail(f"{where}: larger than {MAX_VALUE_BYTES} bytes")
            return None
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._fail(f"{where}: not UTF-8 text")
            return None
        if self.problem is not None:
            log.info("%s readable again", where)
        self.problem = None
        return value
