"""USB readers that present themselves as a keyboard ("keyboard wedge") and type each card id followed by Enter.

The decoder works on Linux input key events as evdev delivers them (key code, value 1 down / 0 up / 2 repeat)
and stays free of the `evdev` package, which is optional (no aarch64 wheel). It takes what a reader types,
digits and A-F, and nothing a person is likely to type: keys must follow each other within `max_gap_s` (a reader
types a whole id in a few tens of milliseconds; a person needs 100 ms or more per key), so a half-typed id is
dropped at the first pause, and any other key drops it too. The typed text is read with a `LineFormat`, as a line
reader's would be; readers use the US layout's key codes (their factory default), so shift with a digit is a
symbol, not a digit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import NamedTuple

from .device import CardRead, DeviceCommand, EventSink, Fault, Heartbeat
from .errors import FrameError
from .lines import LineFormat, parse_id

# linux/input-event-codes.h
KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9, KEY_0 = range(2, 12)
KEY_E = 18
KEY_ENTER = 28
KEY_A = 30
KEY_D = 32
KEY_F = 33
KEY_LEFTSHIFT = 42
KEY_C = 46
KEY_B = 48
KEY_RIGHTSHIFT = 54
KEY_CAPSLOCK = 58
KEY_NUMLOCK = 69
KEY_SCROLLLOCK = 70
KEY_KP7, KEY_KP8, KEY_KP9 = 71, 72, 73
KEY_KP4, KEY_KP5, KEY_KP6 = 75, 76, 77
KEY_KP1, KEY_KP2, KEY_KP3, KEY_KP0 = 79, 80, 81, 82
KEY_KPENTER = 96

UP, DOWN, REPEAT = 0, 1, 2

DEFAULT_MAX_GAP_S = 0.05

_ROW_DIGITS = {KEY_1 + i: str((i + 1) % 10) for i in range(10)}
_KEYPAD_DIGITS = {
    KEY_KP0: "0",
    KEY_KP1: "1",
    KEY_KP2: "2",
    KEY_KP3: "3",
    KEY_KP4: "4",
    KEY_KP5: "5",
    KEY_KP6: "6",
    KEY_KP7: "7",
    KEY_KP8: "8",
    KEY_KP9: "9",
}
_LETTERS = {KEY_A: "A", KEY_B: "B", KEY_C: "C", KEY_D: "D", KEY_E: "E", KEY_F: "F"}
_ENTER = frozenset({KEY_ENTER, KEY_KPENTER})
_SHIFT = frozenset({KEY_LEFTSHIFT, KEY_RIGHTSHIFT})
# Some readers toggle Num Lock before typing on the keypad; lock keys change nothing in the codes that follow.
_LOCKS = frozenset({KEY_CAPSLOCK, KEY_NUMLOCK, KEY_SCROLLLOCK})
_CODE_OF = {**{c: k for k, c in _ROW_DIGITS.items()}, **{c: k for k, c in _LETTERS.items()}}


class KeyEvent(NamedTuple):
    """One EV_KEY event: `time` in seconds on a clock that does not jump (evdev's event timestamp, or monotonic)."""

    code: int
    value: int
    time: float


class KeyWedgeStream:
    """Turns key events (any batching) into card reads and errors.

    An id is at most `max_keys` keys (the format's digits and affixes): a longer run is reported once and skipped
    up to its Enter or the next pause, so memory stays bounded however long a script types."""

    def __init__(self, fmt: LineFormat | None = None, max_gap_s: float = DEFAULT_MAX_GAP_S) -> None:
        if not max_gap_s > 0:
            raise ValueError("max_gap_s must be positive")
        self.format = fmt or LineFormat()
        self.max_keys = len(self.format.prefix) + len(self.format.suffix) + self.format.max_digits
        self._gap = max_gap_s
        self._text: list[str] = []
        self._last = 0.0  # when the last id key went down
        self._overlong = False
        self._shift: set[int] = set()

    def feed(self, events: Iterable[tuple[int, int, float]]) -> list[CardRead | FrameError]:
        out: list[CardRead | FrameError] = []
        for code, value, now in events:
            result = self._key(code, value, now)
            if result is not None:
                out.append(result)
        return out

    def _drop(self) -> None:
        self._text.clear()
        self._overlong = False

    def _key(self, code: int, value: int, now: float) -> CardRead | FrameError | None:
        if value not in (UP, DOWN, REPEAT):
            return FrameError(f"key event value {value} is not 0, 1 or 2")
        if code in _SHIFT:
            if value == UP:
                self._shift.discard(code)
            else:
                self._shift.add(code)
            return None
        if value != DOWN or code in _LOCKS:
            return None
        char = _LETTERS.get(code) or _KEYPAD_DIGITS.get(code)
        if char is None and not self._shift:
            char = _ROW_DIGITS.get(code)
        if char is None and code not in _ENTER:
            typed = self._typed()
            self._drop()
            shifted = "shift+" if self._shift else ""
            return FrameError(f"key {shifted}{code} is not part of a card id", typed)
        result: FrameError | None = None
        pending = self._text or self._overlong
        # a negative gap means the clock was reset: nothing typed before it belongs with what follows
        if pending and not 0 <= now - self._last <= self._gap:
            if self._text:
                result = FrameError(f"half-typed id dropped after a pause of {now - self._last:.3f} s", self._typed())
            self._drop()
        self._last = now
        if char is None:  # Enter
            if self._overlong:
                self._drop()
                return result
            if not self._text:
                return result
            text = "".join(self._text)
            self._drop()
            try:
                return CardRead(parse_id(text, self.format), "keyboard")
            except FrameError as exc:
                return exc
        if self._overlong:
            return result
        if len(self._text) >= self.max_keys:
            error = FrameError(f"more than {self.max_keys} keys without Enter", self._typed())
            self._text.clear()
            self._overlong = True
            return error
        self._text.append(char)
        return result

    def _typed(self) -> bytes:
        return "".join(self._text).encode("ascii")


def keystrokes(text: str, start: float = 0.0, interval: float = 0.005) -> list[KeyEvent]:
    """The events a reader produces typing `text` and Enter, one event every `interval` seconds: upper-case
    letters with shift held, as readers do. For tests and reader simulators."""
    events: list[KeyEvent] = []

    def press(code: int) -> None:
        events.append(KeyEvent(code, DOWN, start + len(events) * interval))
        events.append(KeyEvent(code, UP, start + len(events) * interval))

    for char in text:
        code = _CODE_OF.get(char.upper())
        if code is None:
            raise ValueError(f"{char!r} cannot be typed as part of a card id")
        if char.isupper():
            events.append(KeyEvent(KEY_LEFTSHIFT, DOWN, start + len(events) * interval))
            press(code)
            events.append(KeyEvent(KEY_LEFTSHIFT, UP, start + len(events) * interval))
        else:
            press(code)
    press(KEY_ENTER)
    return events


# -- the transport -----------------------------------------------------------------------------------------------

EV_KEY = 1
REOPEN_MIN_S, REOPEN_MAX_S = 0.5, 10.0


class KeyWedgeReader:
    """A keyboard-wedge reader through evdev (`/dev/input/by-id/...-event-kbd`), grabbed exclusively so that its
    keystrokes reach nobody else (a console, a kiosk browser). Reopened with backoff when it is unplugged.
    Keyboard readers have no LED or buzzer the host can drive: `send` does nothing."""

    def __init__(self, name: str, path: str, fmt: LineFormat | None = None) -> None:
        self.name, self.path = name, path
        self._stream = KeyWedgeStream(fmt)
        self.connected = False

    async def run(self, sink: EventSink) -> None:
        import asyncio

        try:
            import evdev
        except ImportError:
            sink(Fault("cannot open: the evdev package is missing (pip install 'club-agent[wedge]')"))
            return
        wait, told = REOPEN_MIN_S, False
        while True:
            try:
                device = evdev.InputDevice(self.path)
                device.grab()
            except OSError as exc:
                if not told:
                    sink(Fault(f"cannot open {self.path}: {exc} (is the service user in the 'input' group?)"))
                    told = True
                await asyncio.sleep(wait)
                wait = min(REOPEN_MAX_S, wait * 2)
                continue
            wait, told, self.connected = REOPEN_MIN_S, False, True
            sink(Heartbeat(f"grabbed {device.name} at {self.path}"))
            try:
                async for event in device.async_read_loop():
                    if event.type == EV_KEY:
                        for item in self._stream.feed([(event.code, event.value, event.timestamp())]):
                            sink(Fault(f"bad frame: {item}") if isinstance(item, FrameError) else item)
            except OSError as exc:  # unplugged: ENODEV
                sink(Fault(f"serial link lost: {self.path}: {exc}"))
            finally:
                self.connected = False
                with contextlib.suppress(OSError):
                    device.close()

    async def send(self, command: DeviceCommand) -> None:
        return None
