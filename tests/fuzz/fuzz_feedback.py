"""Fuzz target: the feedback line as a reader's LED/buzzer board parses it (feedback.decode_line), and the agent's
encoder for whatever it decodes. `python -m tests.fuzz.fuzz_feedback [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import contextlib

from firmware_bridges import feedback
from firmware_bridges.errors import FrameError

from . import _harness


def TestOneInput(data: bytes) -> None:
    for chunk in _harness.chunks(data):
        with contextlib.suppress(FrameError):
            decoded = feedback.decode_line(chunk)
            line = feedback.encode_line(decoded)
            assert line.endswith(b"\n")
            assert line.count(b"\n") == 1
            assert len(line) <= feedback.MAX_LINE
            again = feedback.decode_line(line)
            assert (again.color, again.ack, again.granted, again.long_beep) == (
                decoded.color,
                decoded.ack,
                decoded.granted,
                decoded.long_beep,
            )


if __name__ == "__main__":
    import sys

    _harness.fuzz(TestOneInput, feedback, sys.modules[__name__])
