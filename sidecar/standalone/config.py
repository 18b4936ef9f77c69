"""Standalone mode's ConfigSource: a ModelDeployment in a YAML file, reloaded on change.

The file is the same YAML one would ``kubectl apply`` (it may hold other
documents too, such as the Deployment and Service of the tutorial: the one of
kind ModelDeployment is used). It is validated with the webhook's own rules;
an invalid one counts as absent (pass-through to the local model) and its
errors are logged once, each with its field path.

Changes are found by polling the file's (inode, size, mtime) every
``poll_interval`` seconds: that catches in-place writes and the atomic
rename-over that editors and ``kubectl``-style tools do, on any filesystem,
with no inotify dependency. A configuration in force is dropped only when the
file stays missing or invalid for two polls in a row, so an editor's save in
progress (delete then write, or a half-written file) is not taken for a
deletion.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from crds.model import KIND, ModelDeployment
from crds.validation import ValidationSettings, validate_object

log = logging.getLogger("sidecar.standalone.config")

MAX_FILE_BYTES = 1024 * 1024
DEFAULT_VALIDATION = ValidationSettings()


@dataclass(frozen=True)
class Loaded:
    """The outcome of reading the file once."""

    model: ModelDeployment | None
    errors: tuple[str, ...] = ()  # why there is no model (each names its field or line)
    warnings: tuple[str, ...] = ()


def parse_document(text: str, settings: ValidationSettings = DEFAULT_VALIDATION) -> Loaded:
    """The validated ModelDeployment of a YAML text; pure."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return Loaded(None, (f"not valid YAML: {where}{problem}",))
    candidates = [d for d in documents if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if not candidates:
        return Loaded(None, (f"no document of kind {KIND} in the file",))
    if len(candidates) > 1:
        return Loaded(None, (f"{len(candidates)} documents of kind {KIND}; the sidecar serves exactly one",))
    result = validate_object(candidates[0], settings)
    if not result.ok:
        return Loaded(None, tuple(str(e) for e in result.errors), result.warnings)
    return Loaded(result.model, (), result.warnings)


Fingerprint = tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns); None: missing


def fingerprint(path: Path) -> Fingerprint:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_file(path: Path, settings: ValidationSettings = DEFAULT_VALIDATION) -> Loaded:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return Loaded(None, (f"{path} does not exist",))
    except OSError as exc:
        return Loaded(None, (f"{path} cannot be read: {exc.strerror or exc}",))
    if len(data) > MAX_FILE_BYTES:
        return Loaded(None, (f"{path} is larger than {MAX_FILE_BYTES} bytes",))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Loaded(None, (f"{path} is not UTF-8 (byte {exc.start})",))
    return parse_document(text, settings)


class FileConfigSource:
    """Yields the file's ModelDeployment (or None) at start and on every change.

    Looks at the file every ``poll_interval`` seconds, waiting with ``sleep``.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        poll_interval: float = 1.0,
        validation: ValidationSettings | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.sleep = sleep
        self.validation = validation or ValidationSettings()
        self.current: ModelDeployment | None = None  # the last configuration yielded
        self.last: Loaded | None = None  # the last load, with its errors, for /status

    def _load(self) -> Loaded:
        loaded = load_file(self.path, self.validation)
        self.last = loaded
        return loaded

    def _report(self, loaded: Loaded) -> None:
        for warning in loaded.warnings:
            log.warning("%s: %s", self.path, warning)
        if loaded.model is None:
            log.error(
                "%s: no usable ModelDeployment, passing every request to the local model: %s",
                self.path,
                "; ".join(loaded.errors),
            )
        else:
            spec = loaded.model.spec
            log.info(
                "%s: ModelDeployment %s/%s loaded (enabled: %s)",
                self.path,
                loaded.model.namespace,
                loaded.model.name,
                spec.enabled,
            )

    async def updates(self) -> AsyncIterator[ModelDeployment | None]:
        seen = fingerprint(self.path)
        loaded = self._load()
        self._report(loaded)
        self.current = loaded.model
        yield loaded.model
        pending_drop = False  # a missing/invalid file seen once, while a configuration is in force
        while True:
            await self.sleep(self.poll_interval)
            now = fingerprint(self.path)
            if now != seen:
                seen = now
                loaded = self._load()
                pending_drop = False
            elif not pending_drop:
                continue
            if loaded.model is None and self.current is not None and not pending_drop:
                pending_drop = True  # confirm at the next poll (an editor's save in progress?)
                continue
            pending_drop = False
            self._report(loaded)
            if loaded.model != self.current:
                self.current = loaded.model
                yield loaded.model
