"""The one error a decoder raises for a frame it cannot accept."""

from __future__ import annotations


class FrameError(ValueError):
    """A frame that is truncated, corrupt or not of this protocol; `frame` holds the bytes (capped) that were seen."""

    def __init__(self, reason: str, frame: bytes = b"") -> None:
        super().__init__(f"{reason}: {frame[:32]!r}" if frame else reason)
        self.reason = reason
        self.frame = frame[:32]
