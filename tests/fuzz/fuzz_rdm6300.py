"""Fuzz target: the RDM6300 stream. `python -m tests.fuzz.fuzz_rdm6300 [libFuzzer flags]` from the repository root
fuzzes it under atheris; tests/fuzz/test_fuzz_short.py runs it briefly in the suite."""

from __future__ import annotations

import sys

from firmware_bridges import rdm6300
from firmware_bridges.errors import FrameError
from firmware_bridges.rdm6300 import Em4100Tag, Rdm6300Stream

from . import _harness


def TestOneInput(data: bytes) -> None:
    stream = Rdm6300Stream()
    results: list[Em4100Tag | FrameError] = []
    for chunk in _harness.chunks(data):
        for item in stream.feed(chunk):
            if isinstance(item, Em4100Tag):
                assert rdm6300.decode(rdm6300.encode(item.data)) == item
                assert len(item.card_id) == 10
            else:
                assert isinstance(item, FrameError), item
            results.append(item)
        assert len(stream._buf) < rdm6300.FRAME_LEN
    # how the bytes were cut changes nothing
    whole = Rdm6300Stream().feed(b"".join(_harness.chunks(data)))
    assert [_harness.same(r) for r in whole] == [_harness.same(r) for r in results]


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, rdm6300, sys.modules[__name__])
