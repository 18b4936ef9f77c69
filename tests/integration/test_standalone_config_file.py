"""Standalone mode's ModelDeployment file: parsing, validation and reload on real files."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Self

import pytest

from sidecar.standalone.config import FileConfigSource, load_file, parse_document

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
TUTORIAL = (TESTDATA / "modeldeployments" / "tutorial.yaml").read_text()
POLL = 0.02


def with_percentage(percentage: int) -> str:
    return TUTORIAL.replace("percentage: 50", f"percentage: {percentage}")


# --- parsing ------------------------------------------------------------------------------


def test_the_tutorial_modeldeployment_parses_with_its_values():
    loaded = parse_document(TUTORIAL)
    assert loaded.errors == ()
    config = loaded.model.spec.offloading_config
    assert loaded.model.name == "my-model"
    assert config.remote_backend.host == "my-model-on-another-cluster:80"
    assert config.behavior.percentage == 50
    assert config.metrics[0].resource.target.average_utilization == 50


def test_the_modeldeployment_is_picked_out_of_a_file_with_other_documents():
    text = (TESTDATA / "tutorial-cluster-a.yaml").read_text() + "\n---\n" + TUTORIAL
    loaded = parse_document(text)
    assert loaded.model is not None and loaded.model.name == "my-model"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (with_percentage(150), "spec.offloadingConfig.behavior.percentage: must be between 0 and 100"),
        (TUTORIAL.replace("scheme: http", "scheme: gopher"), "spec.offloadingConfig.remoteBackend.scheme"),
        (TUTORIAL.replace("  model: my-model\n", ""), "spec.model"),
        ("kind: ModelDeployment\nmetadata: {name: x}\nspec: [1, 2\n", "not valid YAML: line 4"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n", "no document of kind ModelDeployment"),
        (TUTORIAL + "\n---\n" + TUTORIAL, "2 documents of kind ModelDeployment"),
    ],
)
def test_an_unusable_file_gives_no_model_and_errors_naming_the_field_or_line(text, fragment):
    loaded = parse_document(text)
    assert loaded.model is None
    assert any(fragment in e for e in loaded.errors), loaded.errors


def test_warnings_come_with_a_valid_model():
    loaded = parse_document(with_percentage(0))
    assert loaded.model is not None
    assert any("percentage is 0" in w for w in loaded.warnings)


def test_missing_binary_and_oversized_files_are_errors_not_crashes(tmp_path):
    assert "does not exist" in load_file(tmp_path / "nope.yaml").errors[0]
    (tmp_path / "bin.yaml").write_bytes(b"kind: \xff\xfe\n")
    assert "not UTF-8" in load_file(tmp_path / "bin.yaml").errors[0]
    (tmp_path / "big.yaml").write_bytes(b"#" * (2 * 1024 * 1024))
    assert "larger than" in load_file(tmp_path / "big.yaml").errors[0]


# --- reload on change ----------------------------------------------------------------------


class Watch:
    """Runs a FileConfigSource's updates() into a queue for the length of a test, on a
    FAKE sleep that lets the source look at the file only when the test says so
    (:meth:`polls`): which poll saw which state of the file is the test's to decide."""

    def __init__(self, path: Path):
        self.source = FileConfigSource(path, poll_interval=POLL, sleep=self._sleep)
        self.queue: asyncio.Queue = asyncio.Queue()
        self._asleep = asyncio.Event()  # the source waits for its next poll
        self._wake = asyncio.Event()

    async def _sleep(self, delay: float) -> None:
        assert delay == POLL
        self._wake.clear()
        self._asleep.set()
        await self._wake.wait()

    async def __aenter__(self) -> Self:
        async def pump() -> None:
            async for model in self.source.updates():
                await self.queue.put(model)

        self.task = asyncio.create_task(pump())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def settled(self) -> None:
        """Returns when the source waits for its next poll (the first load is done)."""
        async with asyncio.timeout(5):
            await self._asleep.wait()

    async def polls(self, n: int = 1) -> None:
        """Lets the source look at the file ``n`` times; returns when it waits again,
        what it yielded meanwhile queued."""
        for _ in range(n):
            await self.settled()
            self._asleep.clear()
            self._wake.set()
            await self.settled()

    async def next(self, max_polls: int = 3):
        """The next configuration yielded, letting the source poll for it at most ``max_polls`` times."""
        await self.settled()
        for _ in range(max_polls):
            if not self.queue.empty():
                break
            await self.polls()
        assert not self.queue.empty(), f"nothing yielded in {max_polls} polls"
        return self.queue.get_nowait()

    async def nothing_for(self, polls: int) -> bool:
        await self.polls(polls)
        return self.queue.empty()


def percentage_of(model) -> int:
    return model.spec.offloading_config.behavior.percentage


def run(coro):
    return asyncio.run(coro)


def test_the_first_update_is_the_file_as_it_is(tmp_path):
    path = tmp_path / "md.yaml"
    path.write_text(TUTORIAL)

    async def main():
        async with Watch(path) as watch:
            assert percentage_of(await watch.next()) == 50

    run(main())


def test_an_edit_in_place_and_an_atomic_replace_are_both_picked_up(tmp_path):
    path = tmp_path / "md.yaml"
    path.write_text(TUTORIAL)

    async def main():
        async with Watch(path) as watch:
            await watch.next()
            path.write_text(with_percentage(20))  # same inode, new content
            assert percentage_of(await watch.next()) == 20
            tmp = tmp_path / ".md.yaml.swp"
            tmp.write_text(with_percentage(30))
            os.replace(tmp, path)  # how editors and config management save
            assert percentage_of(await watch.next()) == 30

    run(main())


def test_rewriting_the_same_configuration_yields_nothing(tmp_path):
    path = tmp_path / "md.yaml"
    path.write_text(TUTORIAL)

    async def main():
        async with Watch(path) as watch:
            await watch.next()
            path.write_text(TUTORIAL + "\n# a comment\n")
            assert await watch.nothing_for(10)

    run(main())


def test_a_deleted_file_means_pass_through_but_a_save_in_progress_does_not(tmp_path):
    path = tmp_path / "md.yaml"
    path.write_text(TUTORIAL)

    async def main():
        async with Watch(path) as watch:
            await watch.next()
            # Delete-then-write across one poll: seen missing once, then back: nothing changes.
            path.unlink()
            assert await watch.nothing_for(1)
            path.write_text(TUTORIAL)
            assert await watch.nothing_for(3)
            # Missing at two polls in a row: dropped (pass-through) at the second.
            path.unlink()
            assert await watch.nothing_for(1)
            await watch.polls(1)
            assert watch.queue.get_nowait() is None
            path.write_text(with_percentage(10))
            assert percentage_of(await watch.next(max_polls=1)) == 10

    run(main())


def test_an_invalid_edit_drops_the_configuration_and_logs_the_field(tmp_path, caplog):
    path = tmp_path / "md.yaml"
    path.write_text(TUTORIAL)
    watch = Watch(path)

    async def main():
        async with watch:
            await watch.next()
            path.write_text(with_percentage(101))
            assert await watch.next() is None
            assert await watch.nothing_for(10)

    with caplog.at_level(logging.ERROR, logger="sidecar.standalone.config"):
        run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 101" in errors[0]
    assert "passing every request to the local model" in errors[0]
    assert watch.source.last is not None and watch.source.last.errors


def test_a_file_missing_at_start_yields_none_then_the_model_once_written(tmp_path):
    path = tmp_path / "md.yaml"

    async def main():
        async with Watch(path) as watch:
            assert await watch.next() is None
            path.write_text(TUTORIAL)
            assert percentage_of(await watch.next()) == 50

    run(main())
