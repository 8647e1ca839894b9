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
