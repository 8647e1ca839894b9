"""Contact debounce and short/long press detection, over (level, time) samples.

Samples are (level, time) pairs, from polling the pin once a loop. Levels are logical: 1 pressed, 0 released
(the wiring's polarity is the hardware layer's business). Times are ticks, compared with ticks_diff only.
"""

from ticks import ticks_diff

SHORT = "short"
LONG = "long"


class Debouncer:
    """A level counts once it has held for `debounce_ms`; shorter excursions (bounces, glitches) are ignored.

    `feed` returns the accepted changes as (level, since) pairs, `since` being the time of the edge that
    started the accepted level.
    """

    def __init__(self, debounce_ms, level=0):
        self.debounce_ms = debounce_ms
        self.stable = level
        self._candidate = level
        self._since = None

    def feed(self, level, now):
        changes = self.settle(now)
        if level != self._candidate:
            self._candidate = level
            self._since = now
        return changes

    def settle(self, now):
        """Accept the pending level if it has held long enough by `now`."""
        if self._candidate != self.stable and ticks_diff(now, self._since) >= self.debounce_ms:
            self.stable = self._candidate
            return [(self.stable, self._since)]
        return []


class PressDetector:
    """Debounced presses, classified: a long press is reported as soon as it has been held `long_ms` (so the
    player gets feedback without letting go), a short one when it is released before that."""

    def __init__(self, debounce_ms, long_ms):
        self.long_ms = long_ms
        self._debouncer = Debouncer(debounce_ms)
        self._down_at = None
        self._long_sent = False

    def feed(self, level, now):
        """Returns the presses (kind, pressed_at) completed up to this sample."""
        presses = []
        for state, since in self._debouncer.feed(level, now):
            presses += self._change(state, since)
        return presses + self._held(now)

    def poll(self, now):
        """Call on every loop: completes a long press, and a change whose level has now held long enough."""
        presses = []
        for state, since in self._debouncer.settle(now):
            presses += self._change(state, since)
        return presses + self._held(now)

    def _change(self, state, since):
        if state:
            self._down_at = since
            self._long_sent = False
            return []
        down_at, self._down_at = self._down_at, None
        if down_at is None or self._long_sent:
            return []
        if ticks_diff(since, down_at) >= self.long_ms:
            return [(LONG, down_at)]  # held past long_ms between two samples (the loop was busy meanwhile)
        return [(SHORT, down_at)]

    def _held(self, now):
        if self._down_at is not None and not self._long_sent and ticks_diff(now, self._down_at) >= self.long_ms:
            self._long_sent = True
            return [(LONG, self._down_at)]
        return []
