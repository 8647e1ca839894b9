"""Stand-in for MicroPython's millisecond ticks (time.ticks_ms and friends), for the firmware under test.

Real time by default, so timeouts against the real broker behave as on the device; it starts 0.4 s
before the ESP32's 2**30 ms wrap, so every test crosses it; and a test can freeze it and move it by hand to
lay out a bouncing contact edge by edge.
"""

from __future__ import annotations

import time

PERIOD = 1 << 30
MASK = PERIOD - 1


class HostClock:
    def __init__(self, start: int = PERIOD - 400):
        self._base = start
        self._since = time.monotonic()
        self._frozen = False

    def _raw(self) -> int:
        if self._frozen:
            return self._base
        return self._base + int((time.monotonic() - self._since) * 1000)

    def ticks_ms(self) -> int:
        return self._raw() & MASK

    @staticmethod
    def ticks_add(ticks: int, delta: int) -> int:
        return (ticks + delta) & MASK

    @staticmethod
    def ticks_diff(a: int, b: int) -> int:
        return ((a - b + PERIOD // 2) & MASK) - PERIOD // 2

    def sleep_ms(self, ms: int) -> None:
        if self._frozen:
            self._base += ms
        elif ms > 0:
            time.sleep(ms / 1000)

    def freeze(self) -> None:
        self._base = self._raw()
        self._frozen = True

    def advance(self, ms: int) -> None:
        assert self._frozen, "advance a frozen clock only: real time would be counted twice"
        self._base += ms

    def thaw(self) -> None:
        self._since = time.monotonic()
        self._frozen = False
