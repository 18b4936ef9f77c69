"""Flow control shared by both sides of the data path, and its small shared pieces.

A client connection stops reading for several reasons at once (an upstream being
connected, a pipelined request waiting, a full upstream buffer, ...); each is a
bit in :class:`ReadPauses`, and reading resumes only when none is left. This is
uvicorn's ``FlowControl`` (``protocols/http/flow_control.py``) for many reasons
instead of one. The upstream side pauses a client through the same object, so
neither side needs to know the other's class.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

# Why a client connection stops reading (a bit mask; reading resumes at zero).
PAUSE_CONNECTING = 1  # the upstream is being connected: keep the body unread
PAUSE_PIPELINE = 2  # a pipelined request waits for the one before
PAUSE_UPSTREAM_FULL = 4  # the upstream isn't taking bytes as fast as the client sends
PAUSE_UPGRADE = 8  # waiting for the upstream's answer to a WebSocket upgrade
PAUSE_REJECTED = 16  # a bad request was seen; nothing more is read


class ReadPauses:
    """The reasons a transport is not being read, as a bit mask of ``PAUSE_*``.

    The transport is paused when the first reason arrives and resumed when the
    last one goes. Once ``stop()`` is called (the connection is closing) the
    transport is no longer touched, but reasons are still counted.

    >>> class Transport:
    ...     def pause_reading(self): print("paused")
    ...     def resume_reading(self): print("resumed")
    >>> pauses = ReadPauses(Transport())
    >>> pauses.pause(PAUSE_CONNECTING)
    paused
    >>> pauses.pause(PAUSE_UPSTREAM_FULL)
    >>> pauses.unpause(PAUSE_CONNECTING)
    >>> pauses.unpause(PAUSE_UPSTREAM_FULL)
    resumed
    """

    __slots__ = ("reasons", "stopped", "transport")

    def __init__(self, transport: Any):
        self.transport = transport
        self.reasons = 0
        self.stopped = False

    def pause(self, reason: int) -> None:
        if not self.reasons and not self.stopped:
            self.transport.pause_reading()
        self.reasons |= reason

    def unpause(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.stopped:
                self.transport.resume_reading()

    def clear(self) -> None:
        """Forget every reason (the connection reads on regardless: a tunnel, a linger)."""
        self.reasons = 0

    def stop(self) -> None:
        """The connection is closing: leave its transport alone from now on."""
        self.stopped = True


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a TCP transport: each relayed piece goes out at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already closed
            pass


class CoarseClock:
    """``now`` (event-loop seconds) as of the last tick: timeouts need seconds, not
    a syscall per read. The server's timer sets ``now``; everything else reads it."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0):
        self.now = now
