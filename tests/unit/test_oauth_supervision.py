"""A token refresher that dies is noticed: the sidecar withdraws its Authorization header
(requests stay local) and restarts it with backoff (sidecar/supervise.py ``supervised``).

Time is driven by the test: the restarts wait on a FAKE ``sleep`` that records the delay
and only yields to the loop."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.app import Sidecar, SidecarSettings
from sidecar.control.interfaces import PassThroughSource
from sidecar.standalone.config import parse_document
from sidecar.supervise import supervised
from tests.modeldeployments import as_yaml, oauth_remote, standalone

TOKEN_IN_MESSAGE = "tok-9f8e7d"  # what an exception's message might quote; never logged

MODEL = as_yaml(standalone(9, remote=oauth_remote("offloader", "https://127.0.0.1:9/token", "s3cret")))


class NoMetrics:
    """A FAKE metric source: the model configures no metrics."""

    async def observe(self, config):
        return []


class RecordedSleep:
    """A FAKE sleep: records each delay asked for and returns at once (after one yield)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def test_a_run_that_fails_is_restarted_with_backoff_and_its_output_withdrawn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    runs = 0
    sleep = RecordedSleep()

    async def scenario() -> None:
        healthy = asyncio.Event()

        async def run() -> None:
            nonlocal runs
            runs += 1
            events.append(f"run {runs}")
            if runs <= 3:
                raise RuntimeError(f"body was {TOKEN_IN_MESSAGE}")
            healthy.set()
            await asyncio.Event().wait()  # healthy from the fourth run on

        task = asyncio.create_task(
            supervised("the refresher", run, lambda: events.append("withdrawn"), retry_min=1, sleep=sleep)
        )
        async with asyncio.timeout(10):
            await healthy.wait()
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert events == ["run 1", "withdrawn", "run 2", "withdrawn", "run 3", "withdrawn", "run 4"]
    assert sleep.delays == [1, 2, 4]
    stops = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert len(stops) == 3
    assert "the refresher stopped (RuntimeError at test_oauth_supervision.py:" in stops[0]
    assert "in run)" in stops[0]
    assert TOKEN_IN_MESSAGE not in caplog.text


def test_backoff_doubles_up_to_the_maximum_and_a_long_healthy_run_resets_it() -> None:
    clock = [0.0]
    delays: list[float] = []
    run_lengths = iter([0, 0, 0, 0, 0, 50, 0])  # seconds each run lasts before it ends

    async def run() -> None:
        try:
            clock[0] += next(run_lengths)
        except StopIteration:
            raise asyncio.CancelledError from None  # ends the test

    async def sleep(delay: float) -> None:
        delays.append(delay)

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await supervised(
                "x", run, lambda: None, retry_min=1, retry_max=8, clock=lambda: clock[0], sleep=sleep
            )

    asyncio.run(scenario())
    assert delays == [1, 2, 4, 8, 8, 1, 2]


class CrashingRefresher:
    """A FAKE OAuth client from the sidecar's ``oauth_factory``: each run of its refresher
    publishes ``Bearer t<run>``; the first then dies of a bug whose message quotes a token.
    It notes what the sidecar had published when each run started."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.calls = 0
        self.found_at_start: list[tuple[str | None, bool]] = []  # (header, remote routable)
        self.healthy = asyncio.Event()

    async def run_refresher(self, on_change) -> None:
        self.calls += 1
        state = self.sidecar.offloading
        self.found_at_start.append((state.authorization, self.sidecar.routing.plan.remote is not None))
        on_change(f"Bearer t{self.calls}")
        if self.calls == 1:
            raise RecursionError(f"while decoding {TOKEN_IN_MESSAGE}")
        self.healthy.set()
        await asyncio.Event().wait()


def test_a_crashed_token_refresher_unpublishes_the_header_and_is_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded = parse_document(MODEL)
    assert loaded.model is not None, loaded.errors
    sleep = RecordedSleep()

    async def scenario() -> CrashingRefresher:
        refresher: CrashingRefresher | None = None

        def oauth_factory(model, client, ssl_context):
            return refresher, None

        sidecar = Sidecar(
            SidecarSettings(upstream=("127.0.0.1", 9)),
            PassThroughSource(),
            NoMetrics(),
            sleep=sleep,
            oauth_factory=oauth_factory,
            auth_retry_min=0.5,
        )
        refresher = CrashingRefresher(sidecar)
        sidecar.offloading.apply_config(loaded.model)
        await sidecar.offloading.evaluate()  # the static split: offloading on
        sidecar.configure_auth(loaded.model)
        async with asyncio.timeout(10):
            await refresher.healthy.wait()
        remote = sidecar.routing.plan.remote
        assert sidecar.offloading.authorization == "Bearer t2"
        assert remote is not None and ("Authorization", "Bearer t2") in remote.headers
        assert sidecar._auth_task is not None and not sidecar._auth_task.done()
        sidecar._auth_task.cancel()
        await asyncio.gather(sidecar._auth_task, return_exceptions=True)
        return refresher

    refresher = asyncio.run(scenario())
    # The first run found nothing published; the second found the crashed run's header
    # withdrawn and the remote out of the plan (requests stay local meanwhile).
    assert refresher.found_at_start == [(None, False), (None, False)]
    assert sleep.delays == [0.5]
    assert "the OAuth token refresher (requests stay local meanwhile) stopped (RecursionError" in caplog.text
    assert TOKEN_IN_MESSAGE not in caplog.text
