"""The informer loop: a resource's full state, then every change to it, forever.

:func:`list_and_watch` lists, watches from the list's resourceVersion (bookmarks keep it
fresh), lists again when the watch has expired (410 Gone), and after an error or a lost
connection waits a delay from :class:`crds.backoff.Backoff` before trying again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crds.backoff import Backoff
from sidecar.cluster.client import ApiGone, KubeClient, KubeError, WatchEvent, describe_error

log = logging.getLogger("sidecar.cluster.informer")

RETRY = Backoff(base=0.5, cap=30.0)


@dataclass(frozen=True)
class Listed:
    """The full state after a (re)list: every item."""

    items: tuple[dict[str, Any], ...]
    resource_version: str


async def list_and_watch(
    client: KubeClient,
    path: str,
    params: Mapping[str, str] | None = None,
    *,
    backoff: Backoff = RETRY,
    watch_timeout: Callable[[], int] | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> AsyncIterator[Listed | WatchEvent]:
    """Yields a :class:`Listed` snapshot, then every change, forever.

    A watch that ends is resumed from the last resourceVersion seen; 410 Gone means relist
    (another Listed follows); an error or a lost connection waits ``backoff.delay`` (growing
    with each consecutive failure, reset by any success) and tries again.
    """
    # Like client-go: a watch lasts 5-10 minutes so that many clients' watches
    # do not all end at once.
    watch_timeout = watch_timeout or (lambda: random.randint(300, 600))
    version: str | None = None
    failures = 0
    while True:
        try:
            if version is None:
                listing = await client.get(path, params)
                version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                yield Listed(tuple(listing.get("items") or ()), version)
                failures = 0
            async for event in client.watch(
                path, params, resource_version=version, timeout_seconds=watch_timeout()
            ):
                version = event.resource_version or version
                failures = 0
                if event.type != "BOOKMARK":
                    yield event
        except ApiGone:
            log.info("watch of %s expired (410 Gone): listing again", path)
            version = None
        except (TimeoutError, OSError, ssl.SSLError, KubeError) as exc:
            delay = backoff.delay(failures, rand)
            failures += 1
            log.warning("API server %s: %s; retrying in %.1f s", path, describe_error(exc), delay)
            await sleep(delay)
