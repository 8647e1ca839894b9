"""Fuzz target: the Wiegand 26/34 decoder, twice: each chunk of input as one frame (its first byte picks the length
in bits, the rest is the value, usually masked to that length), and the whole input, chunked, through the
converters' line stream. `python -m tests.fuzz.fuzz_wiegand [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import sys

from firmware_bridges import wiegand
from firmware_bridges.errors import FrameError

from . import _harness


def TestOneInput(data: bytes) -> None:
    stream = wiegand.WiegandLineStream()
    for chunk in _harness.chunks(data):
        for item in stream.feed(chunk):
            assert isinstance(item, wiegand.WiegandCard | FrameError)
            if isinstance(item, wiegand.WiegandCard):
                assert wiegand.decode_line(wiegand.encode_line(item)) == item
        assert len(stream._buf) <= wiegand.MAX_LINE
    for chunk in _harness.chunks(data):
        if not chunk:
            continue
        head = chunk[0]
        bits = 24 + (head & 0x0F) if head >= 0xC0 else (26, 34)[head & 1]  # now and then any length 24..39
        frame = int.from_bytes(chunk[1:], "big")
        if head & 0x02:
            frame &= (1 << bits) - 1
        if head & 0x04 == 0x04 and head & 0x08:
            frame = -frame
        try:
            card = wiegand.decode(frame, bits)
        except FrameError:
            continue
        assert wiegand.encode(card) == frame
        assert len(card.card_id) == (bits - 2 + 7) // 8 * 2
        assert int(card.card_id, 16) == (card.facility << 16) | card.number


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, wiegand, sys.modules[__name__])
