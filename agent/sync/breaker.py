"""A circuit breaker per destination, as the reference document asks: 5 failures in a row open it for 60 s,
then one probe is let through (half-open); its success closes it, its failure opens it again."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failures: int = 5, open_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open state: only the one probe)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self.open_s:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def wait_s(self) -> float:
        """How long until a call may go out (0 when it may now)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.open_s - (self._clock() - self._opened_at))

    def success(self) -> None:
        self._failures = 0
        self.state = BreakerState.CLOSED

    def failure(self) -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()
