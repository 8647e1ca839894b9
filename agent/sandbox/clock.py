"""Sandbox time: the wall clock plus an offset that only moves forward, so tests can compress days into seconds.

Everything in the sandbox that expires (tokens, idempotency keys) or checks freshness (signed timestamps) reads
this clock, never `time.time()` directly; `POST /_sandbox/clock` advances it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime


class SandboxClock:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._offset = 0.0

    @property
    def offset_s(self) -> float:
        return self._offset

    def now(self) -> float:
        """Unix seconds of sandbox time."""
        return self._wall() + self._offset

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("sandbox time only moves forward")
        self._offset += seconds
        return self.now()

    def reset(self) -> None:
        self._offset = 0.0

    def iso(self, at: float | None = None) -> str:
        return iso(self.now() if at is None else at)


def iso(unix_s: float) -> str:
    """UTC ISO 8601 with milliseconds and 'Z', the form the reference's clients send (`toISOString()`)."""
    stamp = datetime.fromtimestamp(unix_s, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
