"""Wiegand 26 and 34 frames as Wiegand-to-serial converters deliver them: the raw bits, parity included.

Wiegand 26: an even-parity bit over the first 12 data bits, 8 bits of facility code, 16 of card number, an
odd-parity bit over the last 12. Wiegand 34: the same with 16 bits of facility and 16 of number, parities over
16 data bits each. Raw pulses are too short for GPIO polling from Python: converters are supported, not
bit-banging.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FrameError

# bits -> facility code width
FORMATS = {26: 8, 34: 16}


@dataclass(frozen=True, slots=True)
class WiegandCard:
    bits: int  # frame length: 26 or 34
    facility: int
    number: int

    @property
    def card_id(self) -> str:
        """The agent's card id: the data bits (facility and number) as hex, two digits per byte."""
        data_bits = self.bits - 2
        value = (self.facility << 16) | self.number
        return f"{value:0{(data_bits + 7) // 8 * 2}X}"


def _ones(value: int) -> int:
    return bin(value).count("1")


def encode(card: WiegandCard) -> int:
    """The frame's bits as an integer, first bit transmitted as the most significant."""
    width = FORMATS.get(card.bits)
    if width is None:
        raise ValueError(f"Wiegand {card.bits} is not supported; use one of {sorted(FORMATS)}")
    if not 0 <= card.facility < 1 << width or not 0 <= card.number < 1 << 16:
        raise ValueError("facility or number out of range for the format")
    data = (card.facility << 16) | card.number
    half = (card.bits - 2) // 2
    first, last = data >> half, data & ((1 << half) - 1)
    even = _ones(first) & 1  # makes the first half plus parity even
    odd = 1 - (_ones(last) & 1)  # makes the last half plus parity odd
    return (even << (card.bits - 1)) | (data << 1) | odd


def decode(frame: int, bits: int) -> WiegandCard:
    """Check both parities of a `bits`-long frame and split it."""
    width = FORMATS.get(bits)
    if width is None:
        raise FrameError(f"Wiegand {bits} is not supported; use one of {sorted(FORMATS)}")
    if not 0 <= frame < 1 << bits:
        raise FrameError(f"frame does not fit in {bits} bits")
    half = (bits - 2) // 2
    data = (frame >> 1) & ((1 << (bits - 2)) - 1)
    even, odd = frame >> (bits - 1), frame & 1
    if (_ones(data >> half) + even) & 1:
        raise FrameError(f"Wiegand {bits}: even parity over the first {half} bits fails")
    if not (_ones(data & ((1 << half) - 1)) + odd) & 1:
        raise FrameError(f"Wiegand {bits}: odd parity over the last {half} bits fails")
    return WiegandCard(bits, data >> 16, data & 0xFFFF)


# -- the converters' serial output ------------------------------------------------------------------------------

MAX_LINE = 24  # "W34:" and 9 hex digits, with room for spaces and CRLF


def encode_line(card: WiegandCard) -> bytes:
    """The line a converter prints for `card`: `W<bits>:<the raw frame, parity bits included, in hex>`."""
    return f"W{card.bits}:{encode(card):0{(card.bits + 3) // 4}X}\r\n".encode()


def decode_line(line: bytes) -> WiegandCard:
    """`W26:2468ACE`, `26:2468ACE` or `26,2468ACE` (case and spaces free), CR/LF stripped."""
    text = line.strip().upper()
    if text.startswith(b"W"):
        text = text[1:]
    for sep in (b":", b",", b" "):
        bits, found, value = text.partition(sep)
        if found:
            break
    else:
        raise FrameError("a Wiegand line is BITS:HEX, for example W26:2468ACE", line)
    bits, value = bits.strip(), value.strip()
    if not bits.isdigit() or not value or not all(c in b"0123456789ABCDEF" for c in value):
        raise FrameError("a Wiegand line is BITS:HEX, for example W26:2468ACE", line)
    return decode(int(value, 16), int(bits))


class WiegandLineStream:
    """A converter's lines in any chunking: cards and errors; an overlong line is reported once and skipped up
    to its end, never buffered whole."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overlong = False

    def feed(self, chunk: bytes) -> list[WiegandCard | FrameError]:
        out: list[WiegandCard | FrameError] = []
        for byte in chunk:
            if byte in b"\r\n":
                if self._buf and not self._overlong:
                    try:
                        out.append(decode_line(bytes(self._buf)))
                    except FrameError as exc:
                        out.append(exc)
                self._buf.clear()
                self._overlong = False
            elif self._overlong:
                continue
            elif len(self._buf) >= MAX_LINE:
                out.append(FrameError(f"line longer than {MAX_LINE} bytes skipped", bytes(self._buf)))
                self._buf.clear()
                self._overlong = True
            else:
                self._buf.append(byte)
        return out
