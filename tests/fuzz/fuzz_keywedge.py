"""Fuzz target: the keyboard-wedge decoder. Every three input bytes are one key event: a key code (half of them
drawn from the keys an id is typed with), a value (mostly down, now and then one evdev never sends) and the time
since the previous event (0-254 ms, or a step back). `python -m tests.fuzz.fuzz_keywedge [libFuzzer flags]` fuzzes
it under atheris."""

from __future__ import annotations

import sys

from firmware_bridges import keywedge, lines
from firmware_bridges.device import CardRead
from firmware_bridges.errors import FrameError
from firmware_bridges.keywedge import KeyEvent, KeyWedgeStream
from firmware_bridges.lines import parse_format

from . import _harness

# keyboard readers type no punctuation, so prefixes and suffixes are made of id characters too
FORMATS = [parse_format(spec) for spec in ("hex", "decimal:4", "hex:prefix=FF,suffix=0,min=2,max=8", "hex:4,min=1")]
ID_KEYS = [
    keywedge.KEY_0,
    keywedge.KEY_1,
    keywedge.KEY_9,
    keywedge.KEY_A,
    keywedge.KEY_F,
    keywedge.KEY_KP5,
    keywedge.KEY_ENTER,
    keywedge.KEY_KPENTER,
    keywedge.KEY_LEFTSHIFT,
    keywedge.KEY_RIGHTSHIFT,
    keywedge.KEY_NUMLOCK,
]


def events(chunk: bytes, start: float) -> list[KeyEvent]:
    out: list[KeyEvent] = []
    now = start
    for at in range(0, len(chunk) - 2, 3):
        key, value, step = chunk[at : at + 3]
        code = key if key < 128 else ID_KEYS[key % len(ID_KEYS)]
        now = now - 1.0 if step == 0xFF else now + step / 1000
        out.append(KeyEvent(code, 7 if value == 0xFF else (0, 1, 2, 1)[value & 3], now))
    return out


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    fmt = FORMATS[data[0] % len(FORMATS)]
    stream, batch = KeyWedgeStream(fmt), []
    results: list[CardRead | FrameError] = []
    now = 0.0
    for chunk in _harness.chunks(data[1:]):
        keys = events(chunk, now)
        now = keys[-1].time if keys else now
        batch += keys
        for item in stream.feed(keys):
            if isinstance(item, CardRead):
                assert item.format == "keyboard"
                typed = keywedge.keystrokes(lines.format_id(item.card_id, fmt))
                assert KeyWedgeStream(fmt).feed(typed) == [item]
            else:
                assert isinstance(item, FrameError), item
            results.append(item)
        assert len(stream._text) <= stream.max_keys
        assert len(stream._shift) <= 2
    whole = KeyWedgeStream(fmt).feed(batch)
    assert [_harness.same(r) for r in whole] == [_harness.same(r) for r in results]


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, keywedge, lines, sys.modules[__name__])
