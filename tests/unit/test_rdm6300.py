"""RDM6300 / EM4100 frames: whole, one byte at a time, hostile input, round trips, and repeat suppression."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridges import rdm6300
from firmware_bridges.errors import FrameError
from firmware_bridges.rdm6300 import Em4100Tag, Rdm6300Stream, RepeatFilter

CARD_1234567 = b"\x020A0012D68749\x03"  # the reader's datasheet example: version 0x0A, card 1234567


def tags(results: list[Em4100Tag | FrameError]) -> list[str]:
    return [r.card_id for r in results if isinstance(r, Em4100Tag)]


def errors(results: list[Em4100Tag | FrameError]) -> list[FrameError]:
    return [r for r in results if isinstance(r, FrameError)]


def test_the_datasheet_frame() -> None:
    tag = rdm6300.decode(CARD_1234567)
    assert tag.card_id == "0A0012D687"
    assert tag.number == 1234567
    assert rdm6300.encode(tag.data) == CARD_1234567


def test_lower_case_hex_is_accepted() -> None:
    assert rdm6300.decode(CARD_1234567.lower()).number == 1234567


def test_a_stream_whole_and_one_byte_at_a_time() -> None:
    two = CARD_1234567 + rdm6300.encode(bytes.fromhex("01DEADBEEF"))
    assert tags(Rdm6300Stream().feed(two)) == ["0A0012D687", "01DEADBEEF"]
    stream = Rdm6300Stream()
    out: list[Em4100Tag | FrameError] = []
    for byte in two:
        out += stream.feed(bytes([byte]))
    assert tags(out) == ["0A0012D687", "01DEADBEEF"]
    assert errors(out) == []


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (CARD_1234567[:-1] + b"\x04", "STX and end with ETX"),
        (b"\x020A0012D68748\x03", "checksum 48"),
        (b"\x020A0012D6874G\x03", "not hex digits"),
        (b"\x020A0012D687\x03", "12 bytes"),
        (CARD_1234567 + b"\x03", "15 bytes"),
        (b"", "0 bytes"),
    ],
)
def test_bad_frames_are_refused(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        rdm6300.decode(frame)


def test_garbage_and_cut_frames_cost_only_themselves() -> None:
    stream = Rdm6300Stream()
    out = stream.feed(b"noise\xff\x00" + CARD_1234567[:7] + CARD_1234567 + b"\x020A0012D68748\x03" + CARD_1234567)
    assert tags(out) == ["0A0012D687", "0A0012D687"]
    reasons = [e.reason for e in errors(out)]
    assert reasons[0] == "7 byte(s) outside a frame skipped"
    assert reasons[1] == "frame cut short by a new STX"
    assert reasons[2].startswith("checksum 48")
    assert len(reasons) == 3


def test_an_overlong_frame_is_cut_at_fourteen_bytes() -> None:
    stream = Rdm6300Stream()
    out = stream.feed(b"\x02" + b"A" * 1000)
    assert len(out) == 1
    assert isinstance(out[0], FrameError)
    assert len(stream._buf) == 0  # the buffer never grows past one frame


@given(st.binary(min_size=5, max_size=5))
def test_round_trip(data: bytes) -> None:
    frame = rdm6300.encode(data)
    assert rdm6300.decode(frame).data == data
    assert tags(Rdm6300Stream().feed(frame)) == [data.hex().upper()]


@given(st.binary(min_size=5, max_size=5), st.integers(1, 12), st.integers(0, 255))
def test_any_single_corrupted_digit_is_caught(data: bytes, at: int, replacement: int) -> None:
    frame = bytearray(rdm6300.encode(data))
    if frame[at] == replacement or chr(replacement).upper() == chr(frame[at]):
        return
    frame[at] = replacement
    with pytest.raises(FrameError):
        rdm6300.decode(bytes(frame))


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_hostile_streams_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    stream = Rdm6300Stream()
    for chunk in chunks:
        for result in stream.feed(chunk):
            assert isinstance(result, Em4100Tag | FrameError)
        assert len(stream._buf) < rdm6300.FRAME_LEN


def test_repeat_filter_reports_one_read_per_presentation() -> None:
    seen = RepeatFilter(hold_s=0.5)
    # the card sits in the field: frames every 0.1 s are one presentation
    assert [seen.accept("A", t / 10) for t in range(10)] == [True] + [False] * 9
    assert seen.accept("B", 1.0) is True  # another card
    assert seen.accept("A", 1.05) is True
    assert seen.accept("A", 1.6) is True  # taken away for 0.55 s and shown again
    with pytest.raises(ValueError, match="positive"):
        RepeatFilter(hold_s=0)
