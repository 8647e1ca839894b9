"""Fuzz target: the line reader stream, under a format picked by the input's first byte.
`python -m tests.fuzz.fuzz_lines [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import sys

from firmware_bridges import lines
from firmware_bridges.device import CardRead
from firmware_bridges.errors import FrameError
from firmware_bridges.lines import LineStream, parse_format

from . import _harness

FORMATS = [
    parse_format(spec)
    for spec in (
        "hex",
        "decimal:4",
        "hex:prefix=ID:,suffix=;",
        "hex:4,min=8,max=10",
        "decimal:7,min=1",
        "hex:min=1,max=3",
    )
]


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    fmt = FORMATS[data[0] % len(FORMATS)]
    wire = data[1:]
    stream = LineStream(fmt)
    results: list[CardRead | FrameError] = []
    for chunk in _harness.chunks(wire):
        for item in stream.feed(chunk):
            if isinstance(item, CardRead):
                assert item.format == "line"
                assert item.card_id == item.card_id.upper()
                assert len(item.card_id) % 2 == 0
                assert lines.decode(lines.encode(item.card_id, fmt)[:-2], fmt) == item
            else:
                assert isinstance(item, FrameError), item
            results.append(item)
        assert len(stream._buf) <= fmt.max_line
    whole = LineStream(fmt).feed(b"".join(_harness.chunks(wire)))
    assert [_harness.same(r) for r in whole] == [_harness.same(r) for r in results]


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, lines, sys.modules[__name__])
