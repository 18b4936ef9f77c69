"""Headers for the remote whose values come from Secrets (``remoteBackend.headersFromSecrets``).

The pure part, :func:`resolve_secret_headers`, turns the configured headers and
what was read of each Secret key into either the headers to send or the reason
the remote cannot be used: a remote that needs an API key it does not have
would only answer 401, so while any value is missing every request stays local.

The values come from a reader per distinct Secret key:

- cluster mode: :class:`sidecar.credentials.secrets.SecretKeyReader` (GET on the Secret,
  by name, as the per-ModelDeployment Role allows), re-read every minute
  (``--secret-refresh``), sooner while it fails;
- standalone mode: :class:`sidecar.credentials.secrets.SecretFileReader` over
  ``--secrets-dir DIR``, where ``DIR/<secret name>/<key>`` holds the value (the layout
  of a Secret mounted as a volume), re-read every second.

:class:`SecretHeaderKeeper` runs the readers and reports each change. Values
are never logged nor shown in a repr or /status: problems name the Secret and
the key only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crds.model import HeaderFromSecret
from sidecar.credentials.secrets import KeyReader, SecretFileReader, SecretKeyReader, follow_key

log = logging.getLogger("sidecar.credentials.headers")

FILE_PERIOD = 1.0  # seconds between reads of a mounted Secret file
API_PERIOD = 60.0  # seconds between GETs of a Secret that reads fine

SecretKey = tuple[str, str]  # (Secret name, key)


@dataclass(frozen=True)
class SecretHeaders:
    """The headers read from Secrets, or why they cannot be had (``problem``)."""

    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None


def secret_keys(specs: Sequence[HeaderFromSecret]) -> tuple[SecretKey, ...]:
    """The distinct Secret keys the headers read, in order of first use."""
    return tuple(dict.fromkeys((h.secret_key_ref.name, h.secret_key_ref.key) for h in specs))


def header_value_problem(value: str) -> str | None:
    """Why a Secret's value cannot be sent as a header value (None: it can)."""
    if not value:
        return "is empty"
    if any(c in value for c in "\r\n\0"):
        return "holds CR, LF or NUL"
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F or ord(c) > 0xFF for c in value):
        return "holds characters not allowed in a header value"
    return None


def resolve_secret_headers(
    specs: Sequence[HeaderFromSecret],
    values: Mapping[SecretKey, str | None],
    problems: Mapping[SecretKey, str] | None = None,
) -> SecretHeaders:
    """The headers to send, or the first reason they cannot be sent; pure.

    ``values`` holds what was read of each key (None or absent: nothing yet);
    ``problems`` the readers' reasons for the keys without a value.
    """
    problems = problems or {}
    headers = []
    for spec in specs:
        key = (spec.secret_key_ref.name, spec.secret_key_ref.key)
        where = f"header {spec.name} from Secret {key[0]} key {key[1]!r}"
        value = values.get(key)
        if value is None:
            why = problems.get(key) or "not read yet"
            return SecretHeaders(problem=f"{where}: {why}")
        bad = header_value_problem(value)
        if bad is not None:
            return SecretHeaders(problem=f"{where}: the value {bad}")
        headers.append((spec.name, value))
    return SecretHeaders(headers=tuple(headers))


def with_secret_headers(
    target_headers: tuple[tuple[str, str], ...], extra: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """``target_headers`` with ``extra`` added, replacing any of the same names."""
    names = {name.lower() for name, _ in extra}
    return (*(h for h in target_headers if h[0].lower() not in names), *extra)


# --- the keeper ----------------------------------------------------------------------------------


class SecretHeaderKeeper:
    """Keeps the headersFromSecrets of one remote current; calls ``on_change`` on every change.

    ``readers`` maps each Secret key to its reader. Each is read every
    ``period`` seconds, and sooner while it fails (backing off from ``retry``;
    :func:`~sidecar.credentials.secrets.follow_key`), waiting with ``sleep``.
    """

    def __init__(
        self,
        specs: Sequence[HeaderFromSecret],
        readers: Mapping[SecretKey, KeyReader],
        on_change: Callable[[SecretHeaders], None],
        *,
        period: float,
        retry: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.specs = tuple(specs)
        self.readers = dict(readers)
        self.on_change = on_change
        self.period = period
        self.retry = retry
        self.sleep = sleep
        self.values: dict[SecretKey, str | None] = {}
        self.current = resolve_secret_headers(self.specs, {})

    def __repr__(self) -> str:
        return f"SecretHeaderKeeper({[name for name, _ in secret_keys(self.specs)]})"

    def _update(self) -> None:
        problems = {k: r.problem for k, r in self.readers.items() if r.problem is not None}
        resolved = resolve_secret_headers(self.specs, self.values, problems)
        if resolved != self.current:
            if resolved.usable:
                log.info("headers from Secrets ready: %s", ", ".join(n for n, _ in resolved.headers))
            elif self.current.usable:
                log.warning("offloaded requests stay local: %s", resolved.problem)
            self.current = resolved
            self.on_change(resolved)

    def _read(self, key: SecretKey) -> Callable[[str | None], None]:
        def record(value: str | None) -> None:
            self.values[key] = value
            self._update()

        return record

    async def run(self) -> None:
        self.on_change(self.current)
        await asyncio.gather(
            *(
                follow_key(reader, self._read(key), period=self.period, retry=self.retry, sleep=self.sleep)
                for key, reader in self.readers.items()
            )
        )


def keeper_for(
    specs: Sequence[HeaderFromSecret],
    on_change: Callable[[SecretHeaders], None],
    *,
    kube_client: Any = None,
    namespace: str | None = None,
    secrets_dir: Path | None = None,
    period: float = API_PERIOD,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> SecretHeaderKeeper | str:
    """The keeper for this mode, or why there can be none (standalone without ``--secrets-dir``).

    ``period``: seconds between GETs of each Secret in cluster mode (files are
    re-read every :data:`FILE_PERIOD`).
    """
    keys = secret_keys(specs)
    readers: dict[SecretKey, KeyReader]
    if kube_client is not None:
        assert namespace is not None
        readers = {k: SecretKeyReader(kube_client, namespace, *k) for k in keys}
        return SecretHeaderKeeper(specs, readers, on_change, period=period, sleep=sleep)
    if secrets_dir is None:
        return (
            "remoteBackend.headersFromSecrets needs the Secrets: in standalone mode give "
            "--secrets-dir DIR holding DIR/<secret name>/<key>"
        )
    readers = {k: SecretFileReader(secrets_dir, *k) for k in keys}
    return SecretHeaderKeeper(specs, readers, on_change, period=FILE_PERIOD, sleep=sleep)
