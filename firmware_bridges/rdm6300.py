"""RDM6300 / EM4100 125 kHz serial readers (9600 8N1).

A frame is 14 bytes: STX (0x02), 10 ASCII hex digits (a version/customer byte and the 32-bit card number),
2 ASCII hex digits of checksum (the XOR of the five data bytes), ETX (0x03). The reader repeats the frame for as
long as the card stays in the field, so a stream also needs `RepeatFilter`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FrameError

STX = 0x02
ETX = 0x03
FRAME_LEN = 14
_HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")


@dataclass(frozen=True, slots=True)
class Em4100Tag:
    """A card read: `card_id` is the agent's card id (10 upper-case hex digits); `number` the 32-bit number that
    is usually printed on the card."""

    data: bytes  # the five data bytes

    @property
    def card_id(self) -> str:
        return self.data.hex().upper()

    @property
    def number(self) -> int:
        return int.from_bytes(self.data[1:], "big")


def checksum(data: bytes) -> int:
    out = 0
    for byte in data:
        out ^= byte
    return out


def encode(data: bytes) -> bytes:
    """The frame a reader sends for five data bytes."""
    if len(data) != 5:
        raise ValueError("an EM4100 id is 5 bytes")
    return bytes([STX]) + data.hex().upper().encode() + f"{checksum(data):02X}".encode() + bytes([ETX])


def decode(frame: bytes) -> Em4100Tag:
    """One whole frame, STX to ETX."""
    if len(frame) != FRAME_LEN:
        raise FrameError(f"frame is {len(frame)} bytes, expected {FRAME_LEN}", frame)
    if frame[0] != STX or frame[-1] != ETX:
        raise FrameError("frame does not start with STX and end with ETX", frame)
    digits = frame[1:13]
    if not set(digits) <= _HEX_DIGITS:
        raise FrameError("frame holds characters that are not hex digits", frame)
    raw = bytes.fromhex(digits.decode("ascii"))
    data, check = raw[:5], raw[5]
    if checksum(data) != check:
        raise FrameError(f"checksum {check:02X} does not match the data ({checksum(data):02X})", frame)
    return Em4100Tag(data)


class Rdm6300Stream:
    """Buffers bytes as they arrive (any chunking) and returns what each call completed: tags and errors.

    Garbage between frames is skipped up to the next STX and reported once per stretch; the buffer never holds
    more than one frame's worth."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipped = 0

    def feed(self, chunk: bytes) -> list[Em4100Tag | FrameError]:
        out: list[Em4100Tag | FrameError] = []
        for byte in chunk:
            if not self._buf:
                if byte != STX:
                    self._skipped += 1
                    continue
                if self._skipped:
                    out.append(FrameError(f"{self._skipped} byte(s) outside a frame skipped"))
                    self._skipped = 0
                self._buf.append(byte)
                continue
            if byte == STX:  # a frame cut short: start again at this STX
                out.append(FrameError("frame cut short by a new STX", bytes(self._buf)))
                self._buf = bytearray([STX])
                continue
            self._buf.append(byte)
            if byte == ETX or len(self._buf) == FRAME_LEN:
                frame = bytes(self._buf)
                self._buf.clear()
                try:
                    out.append(decode(frame))
                except FrameError as exc:
                    out.append(exc)
        return out


class RepeatFilter:
    """One read per presentation: the same card seen again within `hold_s` of its last sighting is the same
    presentation (the reader repeats while the card stays in the field); a gap of `hold_s` ends it. Time is
    passed in (monotonic seconds), so the filter is pure."""

    def __init__(self, hold_s: float = 0.5) -> None:
        if hold_s <= 0:
            raise ValueError("hold_s must be positive")
        self._hold = hold_s
        self._card: str | None = None
        self._last = 0.0

    def accept(self, card_id: str, now: float) -> bool:
        same = card_id == self._card and now - self._last < self._hold
        self._card, self._last = card_id, now
        return not same
