"""Millisecond ticks with MicroPython's wrap-around arithmetic.

On the device these are the built-ins of `time`. Elsewhere (tests and tools on a host) the same arithmetic runs
over time.monotonic with the ESP32's period of 2**30 ms (about 12.4 days), so a comparison written without
ticks_diff fails on the host too instead of only after twelve days in a club.

Every module that compares times takes them as arguments and compares them with `ticks_diff`; only the
application loop reads the clock, through an object with this module's four functions (this module itself on
the device, a stand-in in the tests).
"""

try:
    from time import sleep_ms, ticks_add, ticks_diff, ticks_ms
except ImportError:
    import time as _time

    PERIOD = 1 << 30
    _HALF = PERIOD >> 1
    _MASK = PERIOD - 1

    def ticks_ms():
        return int(_time.monotonic() * 1000) & _MASK

    def ticks_add(ticks, delta):
        return (ticks + delta) & _MASK

    def ticks_diff(a, b):
        """a - b, signed, correct while the two are less than half a period apart."""
        return ((a - b + _HALF) & _MASK) - _HALF

    def sleep_ms(ms):
        if ms > 0:
            _time.sleep(ms / 1000)
