"""Fuzz target: the button box stream (with and without copy suppression), its frame decoder and the feedback
encoder. `python -m tests.fuzz.fuzz_buttonbox [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import re
import sys

from firmware_bridges import buttonbox
from firmware_bridges.buttonbox import ButtonBoxStream, PressFrame, SequenceFilter
from firmware_bridges.device import ButtonPress, Color, Feedback, Heartbeat
from firmware_bridges.errors import FrameError

from . import _harness

Item = ButtonPress | Heartbeat | FrameError
COLOURS = list(Color)


# '$', a body, '*' and two characters: where a checksum would be
_CHECKSUM_SLOT = re.compile(rb"\$([^$*\r\n]{0,60})\*[^\r\n$]{2}")


def _with_checksums(data: bytes) -> bytes:
    """`data` with correct checksums wherever one fits: random bytes almost never carry a valid CRC-8, and the
    field checks behind it deserve fuzzing too."""
    return _CHECKSUM_SLOT.sub(lambda m: b"$%s*%02X" % (m[1], buttonbox.crc8(m[1])), data)


def TestOneInput(data: bytes) -> None:
    if data[:1] and data[0] & 0x80:
        data = _with_checksums(data)
    plain, filtered = ButtonBoxStream(), ButtonBoxStream(SequenceFilter(window_s=0.5))
    results: list[Item] = []
    now = 0.0
    for chunk in _harness.chunks(data):
        now += len(chunk) * 0.01  # a few chunks apart is a copy, longer is a new frame
        results += _checked(plain.feed(chunk))
        _checked(filtered.feed(chunk, now))
        assert len(plain._buf) <= buttonbox.MAX_FRAME
        assert len(filtered._buf) <= buttonbox.MAX_FRAME
    whole = ButtonBoxStream().feed(b"".join(_harness.chunks(data)))
    assert [_harness.same(r) for r in whole] == [_harness.same(r) for r in results]

    # every frame that decodes has one spelling, and it is the one seen
    for line in re.split(rb"[\r\n]", data):
        try:
            frame = buttonbox.decode(line)
        except FrameError:
            continue
        assert buttonbox.encode(frame) == line + b"\r\n"

    if len(data) >= 4:
        feedback = Feedback(
            COLOURS[data[0] % len(COLOURS)], beeps=data[1] - 128, long_beep=bool(data[2] & 1), ack=bool(data[2] & 2)
        )
        wire = buttonbox.encode_feedback(feedback)
        assert len(wire) - 2 <= buttonbox.MAX_FRAME
        assert buttonbox.fields(wire)[0] == "F"


def _checked(items: list[Item]) -> list[Item]:
    for item in items:
        if isinstance(item, ButtonPress):
            frame = PressFrame(0, item.button, item.long)
            assert buttonbox.decode(buttonbox.encode(frame)).event == item
        elif isinstance(item, Heartbeat):
            assert item.detail.startswith("buttonbox firmware ")
        else:
            assert isinstance(item, FrameError), item
    return items


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, buttonbox, sys.modules[__name__])
