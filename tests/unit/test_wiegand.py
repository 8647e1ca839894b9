"""Wiegand 26 and 34 frames: known frames, every single-bit error, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridges import wiegand
from firmware_bridges.errors import FrameError
from firmware_bridges.wiegand import WiegandCard


def test_known_frames() -> None:
    # all data bits 0: even parity 0, odd parity 1
    assert wiegand.encode(WiegandCard(26, 0, 0)) == 0b1
    # all data bits 1: twelve ones in each half, so even parity 0 and odd parity 1
    assert wiegand.encode(WiegandCard(26, 255, 65535)) == 0x1FFFFFF
    # facility 18, card 46: the first 12 data bits hold 2 ones (even parity 0), the last 12 hold 4 (odd parity 1)
    frame = int("0" + "00010010" + "0000000000101110" + "1", 2)
    assert wiegand.decode(frame, 26) == WiegandCard(26, 18, 46)
    assert WiegandCard(26, 18, 46).card_id == "12002E"
    assert WiegandCard(34, 0x1234, 0xABCD).card_id == "1234ABCD"


@pytest.mark.parametrize("bits", [26, 34])
def test_every_single_bit_error_is_caught(bits: int) -> None:
    frame = wiegand.encode(WiegandCard(bits, 0x5A, 0xC3A5))
    assert wiegand.decode(frame, bits) == WiegandCard(bits, 0x5A, 0xC3A5)
    for bit in range(bits):
        with pytest.raises(FrameError, match="parity"):
            wiegand.decode(frame ^ (1 << bit), bits)


def test_unsupported_and_out_of_range() -> None:
    with pytest.raises(FrameError, match="Wiegand 37 is not supported"):
        wiegand.decode(0, 37)
    with pytest.raises(FrameError, match="does not fit"):
        wiegand.decode(1 << 26, 26)
    with pytest.raises(FrameError, match="does not fit"):
        wiegand.decode(-1, 26)
    with pytest.raises(ValueError, match="out of range"):
        wiegand.encode(WiegandCard(26, 256, 1))
    with pytest.raises(ValueError, match="not supported"):
        wiegand.encode(WiegandCard(35, 1, 1))


@given(st.integers(0, 255), st.integers(0, 65535))
def test_round_trip_26(facility: int, number: int) -> None:
    card = WiegandCard(26, facility, number)
    assert wiegand.decode(wiegand.encode(card), 26) == card


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_round_trip_34(facility: int, number: int) -> None:
    card = WiegandCard(34, facility, number)
    assert wiegand.decode(wiegand.encode(card), 34) == card


@given(st.integers(0, (1 << 34) - 1))
def test_any_34_bit_value_decodes_or_is_refused(frame: int) -> None:
    try:
        card = wiegand.decode(frame, 34)
    except FrameError:
        return
    assert wiegand.encode(card) == frame


# -- a converter's lines ----------------------------------------------------------------------------------------

W26 = WiegandCard(26, 18, 46)


def test_converter_lines_in_each_spelling() -> None:
    line = wiegand.encode_line(W26)
    assert line == b"W26:" + f"{wiegand.encode(W26):07X}".encode() + b"\r\n"
    hex_frame = line[4:-2]
    for spelling in (line, b"26:" + hex_frame, b"26," + hex_frame, b" w26 : " + hex_frame.lower() + b"\n"):
        assert wiegand.decode_line(spelling) == W26
    assert wiegand.decode_line(wiegand.encode_line(WiegandCard(34, 0xBEEF, 0x1234))).card_id == "BEEF1234"


@pytest.mark.parametrize(
    "line", [b"", b"W26", b"W26:", b"WXX:1234567", b"W26:12G4567", b"W99:1234567", b"W26:FFFFFFFF", b"\xff\xfe"]
)
def test_bad_converter_lines_are_refused(line: bytes) -> None:
    with pytest.raises(FrameError):
        wiegand.decode_line(line)


def test_stream_whole_byte_by_byte_and_hostile() -> None:
    good = wiegand.encode_line(W26)
    bad = bytearray(good)
    bad[6] ^= 0x01  # one hex digit changed: a parity fails (or the digit is no longer hex)
    data = good + b"garbage line\r\n" + bytes(bad) + b"X" * 200 + b"\n" + good
    whole = wiegand.WiegandLineStream().feed(data)
    stream = wiegand.WiegandLineStream()
    one_by_one = [item for byte in data for item in stream.feed(bytes([byte]))]
    assert [type(i).__name__ for i in whole] == [type(i).__name__ for i in one_by_one]
    cards = [i for i in whole if isinstance(i, WiegandCard)]
    errors = [i for i in whole if isinstance(i, FrameError)]
    assert cards == [W26, W26]
    assert len(errors) == 3  # the garbage, the corrupt frame, the overlong line (reported once)


@given(st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_stream_round_trip_with_noise_before(facility: int, number: int, noise: bytes) -> None:
    card = WiegandCard(26, facility, number)
    items = wiegand.WiegandLineStream().feed(
        noise.replace(b"\r", b"").replace(b"\n", b"") + b"\n" + wiegand.encode_line(card)
    )
    assert items[-1] == card
    assert all(isinstance(i, FrameError) for i in items[:-1])
