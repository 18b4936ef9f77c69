"""A token refresher that dies is noticed: the sidecar withdraws its Authorization header
(requests stay local) and restarts it with backoff (sidecar/app.py ``supervised``)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.app import Sidecar, SidecarSettings, supervised
from sidecar.standalone.config import parse_document
from sidecar.credentials.oauth import OAuthClient
from tests.modeldeployments import as_yaml, oauth_remote, standalone

TOKEN_IN_MESSAGE = "tok-9f8e7d"  # what an exception's message might quote; never logged

MODEL = as_yaml(standalone(9, remote=oauth_remote("offloader", "https://127.0.0.1:9/token", "s3cret")))


class NoMetrics:
    """A FAKE metric source: the model configures no metrics."""

    async def observe(self, metrics):
        return []


def test_a_run_that_fails_is_restarted_with_backoff_and_its_output_withdrawn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        events.append(f"run {runs}")
        if runs <= 3:
            raise RuntimeError(f"body was {TOKEN_IN_MESSAGE}")
        await asyncio.Event().wait()  # healthy from the fourth run on

    async def scenario() -> None:
        task = asyncio.create_task(
            supervised("the refresher", run, lambda: events.append("withdrawn"), retry_min=0.01)
        )
        async with asyncio.timeout(10):
            while runs < 4:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert events == ["run 1", "withdrawn", "run 2", "withdrawn", "run 3", "withdrawn", "run 4"]
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


def test_a_crashed_token_refresher_unpublishes_the_header_and_is_restarted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the refresher (stood in for by a patched run_refresher that publishes a
    header, then raises) must not leave that header published."""
    calls = 0

    async def refresher(self: OAuthClient, on_change) -> None:
        nonlocal calls
        calls += 1
        on_change(f"Bearer t{calls}")
        if calls == 1:
            await asyncio.sleep(0.05)
            raise RecursionError(f"while decoding {TOKEN_IN_MESSAGE}")
        await asyncio.Event().wait()

    monkeypatch.setattr(OAuthClient, "run_refresher", refresher)
    loaded = parse_document(MODEL)
    assert loaded.model is not None, loaded.errors
    seen: list[str | None] = []

    async def scenario() -> None:
        sidecar = Sidecar(SidecarSettings(upstream=("127.0.0.1", 9)), None, NoMetrics())  # type: ignore[arg-type]
        sidecar.auth_retry_min = 0.05
        sidecar.controller.apply_config(loaded.model)
        set_authorization = sidecar.controller.set_authorization

        def record(header: str | None) -> None:
            seen.append(header)
            set_authorization(header)

        sidecar.controller.set_authorization = record  # type: ignore[method-assign]
        sidecar._configure_auth(loaded.model)
        async with asyncio.timeout(10):
            while calls < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert sidecar.controller.authorization == "Bearer t2"
        assert sidecar._auth_task is not None and not sidecar._auth_task.done()
        sidecar._auth_task.cancel()
        await asyncio.gather(sidecar._auth_task, return_exceptions=True)

    asyncio.run(scenario())
    assert seen == ["Bearer t1", None, "Bearer t2"]
    assert "the OAuth token refresher (requests stay local meanwhile) stopped (RecursionError" in caplog.text
    assert TOKEN_IN_MESSAGE not in caplog.text
