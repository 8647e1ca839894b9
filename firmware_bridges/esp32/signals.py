"""LEDs and buzzers driven without blocking: the loop calls `update(now)` and each output follows its pattern.

A pattern is a tuple of durations in ms, alternately on and off, starting with on: (60,) is one short flash,
(80, 80, 80) two. Between patterns an output shows its idle state: steady on, off, or a slow blink that tells
the people around the device that it is offline.
"""

from ticks import ticks_diff

OFF = (0, 1000)
ON = (1000, 1000)
OFFLINE_BLINK = (100, 1500)


class Blinker:
    def __init__(self, out):
        self._out = out
        self._level = None
        self._pattern = None
        self._started = 0
        self._idle = OFF
        self._anchor = 0

    def idle(self, mode, now):
        """mode: (on_ms, period_ms) of the idle blink; OFF, ON and OFFLINE_BLINK are the ones used."""
        if mode != self._idle:
            self._idle = mode
            self._anchor = now

    def play(self, pattern, now):
        self._pattern = pattern
        self._started = now
        self.update(now)

    @property
    def playing(self):
        return self._pattern is not None

    @property
    def level(self):
        return self._level

    def update(self, now):
        level = None
        if self._pattern is not None:
            t = ticks_diff(now, self._started)
            for i, duration in enumerate(self._pattern):
                if t < duration:
                    level = 1 if i % 2 == 0 else 0
                    break
                t -= duration
            else:
                self._pattern = None
        if level is None:
            on_ms, period_ms = self._idle
            since = ticks_diff(now, self._anchor)
            if since > 1000000 or since < 0:
                self._anchor = now  # keep the phase arithmetic far from the tick counter's wrap
                since = 0
            level = 1 if since % period_ms < on_ms else 0
        if level != self._level:
            self._level = level
            self._out.value(level)
