"""A background task that must not stay dead: run it again after it ends, backing off.

Used for the sidecar's sources and credential refreshers, and the gateway's watch. A task
that dies (a bug, an unexpected error) first withdraws what it published, so that nothing
stale stays in force while it is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from crds.backoff import Backoff

log = logging.getLogger("sidecar.supervise")


async def supervised(
    what: str,
    run: Callable[[], Awaitable[None]],
    on_failure: Callable[[], None],
    *,
    retry_min: float = 1.0,
    retry_max: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Runs ``run()`` for ever: whenever it ends (a bug, an unexpected error), logs it,
    calls ``on_failure`` (which withdraws what it published) and starts it again after
    ``retry_min`` seconds, doubling up to ``retry_max`` (no jitter: one process's own
    task); a run that lasted longer than ``retry_max`` starts the backoff afresh.
    Cancelling stops it.

    Only the exception's type and where it was raised are logged: its message may
    quote what a remote sent, a token for instance.
    """
    backoff = Backoff(retry_min, retry_max, jitter=False)
    failures = 0
    while True:
        started = clock()
        try:
            await run()
            why = "it ended"
        except Exception as exc:  # noqa: BLE001 - a dead task must not leave its last output published
            why = where_raised(exc)
        if clock() - started > retry_max:
            failures = 0
        delay = backoff.delay(failures)
        failures += 1
        log.error("%s stopped (%s): restarting in %.1f s", what, why, delay)
        on_failure()
        await sleep(delay)


def where_raised(exc: BaseException) -> str:
    """``Type at file:line in function`` of the innermost cause, without the message."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    return (
        f"{type(exc).__name__} at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"
    )
