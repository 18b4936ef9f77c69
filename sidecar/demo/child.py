"""The demos' child processes (model servers, the sidecar), shared by both scenarios."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path


class Child:
    """A child process that prints ``listening on host:port`` when it is ready."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name = name
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.port = 0
        self.admin_port = 0

    async def ready(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        ports = [int(p) for p in re.findall(r"listening on [^:\s]+:(\d+)", line)]
        if not ports:
            raise RuntimeError(f"{self.name} did not start: {line!r}\n{self.log_path.read_text()[-2000:]}")
        self.port = ports[0]
        self.admin_port = ports[1] if len(ports) > 1 else 0

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode
