"""Button box frames: known frames, whole and one byte at a time, hostile input, every single-bit error, copies
after a glitch, feedback frames, round trips."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridges import buttonbox
from firmware_bridges.buttonbox import ButtonBoxStream, HeartbeatFrame, PressFrame, SequenceFilter
from firmware_bridges.device import ButtonPress, Color, Feedback, Heartbeat
from firmware_bridges.errors import FrameError

PRESS_3 = b"$P,05,3*59\r\n"  # the specification's examples
LONG_2 = b"$L,07,2*FD\r\n"
HEARTBEAT = b"$H,2A,1.2.0,3600*12\r\n"
HEARTBEAT_EVENT = Heartbeat("buttonbox firmware 1.2.0, up 3600 s")

Item = ButtonPress | Heartbeat | FrameError


def events(results: list[Item]) -> list[ButtonPress | Heartbeat]:
    return [r for r in results if not isinstance(r, FrameError)]


def errors(results: list[Item]) -> list[FrameError]:
    return [r for r in results if isinstance(r, FrameError)]


def crc8_bitwise(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def test_crc8_is_the_catalogue_crc8() -> None:
    assert buttonbox.crc8(b"123456789") == 0xF4  # CRC-8/SMBUS check value
    for data in (b"", b"P,05,3", bytes(range(256))):
        assert buttonbox.crc8(data) == crc8_bitwise(data)
    # why not NMEA's XOR: these two differ in the same bit of two characters
    assert buttonbox.crc8(b"P,05,3") != buttonbox.crc8(b"P,04,2")


def test_known_frames() -> None:
    assert buttonbox.decode(PRESS_3) == PressFrame(5, 3)
    assert buttonbox.decode(LONG_2) == PressFrame(7, 2, long=True)
    assert buttonbox.decode(HEARTBEAT) == HeartbeatFrame(0x2A, "1.2.0", 3600)
    assert buttonbox.decode(PRESS_3.rstrip()) == PressFrame(5, 3)
    for frame in (PRESS_3, LONG_2, HEARTBEAT):
        assert buttonbox.encode(buttonbox.decode(frame)) == frame
    assert PressFrame(5, 3).event == ButtonPress(3)
    assert PressFrame(7, 2, long=True).event == ButtonPress(2, long=True)
    assert HeartbeatFrame(0x2A, "1.2.0", 3600).event == HEARTBEAT_EVENT


def body(text: str) -> bytes:
    """A frame with a correct checksum around whatever `text` is, to reach the checks after the checksum."""
    return buttonbox.frame(text)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "does not start with '\\$'"),
        (b"P,05,3*59\r\n", "does not start with '\\$'"),
        (b"$P,05,3\r\n", "does not start with '\\$' and end with '\\*'"),
        (b"$P,05,3*5\r\n", "and two hex digits"),
        (b"$P,05,3*58\r\n", "checksum 58 does not match the frame \\(59\\)"),
        (b"$P,05,3*5G\r\n", "not two upper-case hex digits"),
        (b"$P,05,3*e4\r\n", "not two upper-case hex digits"),
        (b"$P,05,\x833*59\r\n", "not printable ASCII"),
        (b"$P,0$,3*59\r\n", "reserved"),
        (b"$H,00," + b"9" * 60 + b"*00", "at most 48"),
        (body("X,05,3"), "unknown frame type 'X'"),
        (body(""), "unknown frame type ''"),
        (body("P,05"), "a P frame has 2 fields after its type, not 1"),
        (body("P,05,3,4"), "not 3"),
        (body("H,05,1.0"), "a H frame has 3 fields"),
        (body("P,5,3"), "sequence number '5'"),
        (body("P,0a,3"), "sequence number '0a'"),
        (body("P,105,3"), "sequence number '105'"),
        (body("P,05,0"), "numbered from 1"),
        (body("P,05,03"), "button '03' is not a number"),
        (body("P,05,100"), "button '100'"),
        (body("P,05,-1"), "button '-1'"),
        (body("P,05,"), "button ''"),
        (body("L,05,x"), "button 'x'"),
        (body("H,05,,12"), "firmware version ''"),
        (body("H,05,1 2,12"), "firmware version '1 2'"),
        (body("H,05," + "1" * 17 + ",12"), "firmware version"),
        (body("H,05,1.0,012"), "uptime '012'"),
        (body("H,05,1.0,12345678901"), "uptime"),
    ],
)
def test_bad_frames_are_refused(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        buttonbox.decode(frame)


@pytest.mark.parametrize("frame", [PRESS_3, LONG_2, HEARTBEAT])
def test_every_single_bit_error_is_caught(frame: bytes) -> None:
    line = frame.rstrip(b"\r\n")
    for at, bit in itertools.product(range(len(line)), range(8)):
        corrupt = bytearray(line)
        corrupt[at] ^= 1 << bit
        with pytest.raises(FrameError):
            buttonbox.decode(bytes(corrupt))


def test_every_error_of_up_to_three_bits_in_a_press_body_is_caught() -> None:
    # CRC-8 0x07 has Hamming distance 4 up to 119 data bits, and a press body is at most 56
    line = buttonbox.encode(PressFrame(0xFF, 99, long=True)).rstrip(b"\r\n")
    bits = [(at, bit) for at in range(1, len(line) - 3) for bit in range(8)]
    for flips in itertools.chain(itertools.combinations(bits, 2), itertools.combinations(bits, 3)):
        corrupt = bytearray(line)
        for at, bit in flips:
            corrupt[at] ^= 1 << bit
        with pytest.raises(FrameError):
            buttonbox.decode(bytes(corrupt))


def test_a_stream_whole_and_one_byte_at_a_time() -> None:
    wire = PRESS_3 + LONG_2 + HEARTBEAT + b"$P,06,3*E4\n"
    expected: list[Item] = [ButtonPress(3), ButtonPress(2, long=True), HEARTBEAT_EVENT, ButtonPress(3)]
    assert ButtonBoxStream().feed(wire) == expected
    stream = ButtonBoxStream()
    out: list[Item] = []
    for byte in wire:
        out += stream.feed(bytes([byte]))
    assert out == expected


def test_garbage_and_cut_frames_cost_only_themselves() -> None:
    stream = ButtonBoxStream()
    out = stream.feed(b"\xff\x00boot\r\n" + PRESS_3[:5] + PRESS_3 + b"$P,05,3*58\r\n" + b"\r\n\r\n" + LONG_2)
    assert events(out) == [ButtonPress(3), ButtonPress(2, long=True)]
    assert [e.reason for e in errors(out)] == [
        "6 byte(s) outside a frame skipped",
        "frame cut short by a new '$'",
        "checksum 58 does not match the frame (59)",
    ]


def test_an_overlong_frame_is_reported_once_and_never_buffered() -> None:
    stream = ButtonBoxStream()
    out = stream.feed(b"$H,00," + b"9" * 10_000)
    assert [e.reason for e in errors(out)] == [f"frame longer than {buttonbox.MAX_FRAME} bytes skipped"]
    assert len(stream._buf) == 0
    assert stream.feed(b"9" * 1000 + b"\r\n" + PRESS_3) == [ButtonPress(3)]
    # a '$' also ends the skipped stretch
    out = stream.feed(b"$" + b"x" * 100 + PRESS_3)
    assert events(out) == [ButtonPress(3)]
    assert len(errors(out)) == 1


def test_copies_are_dropped_with_a_filter_and_a_time() -> None:
    stream = ButtonBoxStream(SequenceFilter(window_s=1.0))
    assert stream.feed(PRESS_3, now=10.0) == [ButtonPress(3)]
    assert stream.feed(PRESS_3, now=10.1) == []  # the copy
    assert stream.feed(b"$P,06,3*E4\r\n", now=10.6) == [ButtonPress(3)]  # the next press of the same button
    assert stream.feed(b"$P,06,3*E4\r\n", now=10.7) == []
    assert stream.copies == 2
    assert stream.feed(PRESS_3, now=20.0) == [ButtonPress(3)]  # the counter came round again
    # without a time nothing is dropped
    assert stream.feed(PRESS_3 + PRESS_3) == [ButtonPress(3), ButtonPress(3)]


def test_a_restarted_box_counts_from_zero_again() -> None:
    stream = ButtonBoxStream(SequenceFilter(window_s=1.0))
    first = buttonbox.encode(HeartbeatFrame(0, "1.2.0", 0))
    press = buttonbox.encode(PressFrame(1, 4))
    assert events(stream.feed(first + press, now=0.0)) == [
        Heartbeat("buttonbox firmware 1.2.0, up 0 s"),
        ButtonPress(4),
    ]
    assert events(stream.feed(buttonbox.encode(HeartbeatFrame(2, "1.2.0", 5)), now=0.2))
    # a reset 0.3 s later: the same numbers again, but the uptime says it is a new run
    assert len(events(stream.feed(first + press, now=0.5))) == 2


def test_sequence_filter() -> None:
    seen = SequenceFilter(window_s=1.0)
    assert seen.accept(1, 0.0) is True
    assert seen.accept(1, 0.5) is False
    assert seen.accept(1, 0.99) is False  # copies do not extend the window
    assert seen.accept(1, 1.0) is True
    assert seen.accept(2, 1.0) is True
    seen.clear()
    assert seen.accept(2, 1.1) is True
    for seq in range(256):
        seen.accept(seq, 100.0 + seq)
    assert len(seen._seen) <= 2  # old numbers are forgotten
    with pytest.raises(ValueError, match="positive"):
        SequenceFilter(window_s=0)


@pytest.mark.parametrize(
    ("feedback", "frame"),
    [
        (Feedback.acknowledge(), b"$F,B,S,2,1,0*D4\r\n"),
        (Feedback.decision(True), b"$F,G,S,30,2,0*4C\r\n"),
        (Feedback.decision(False, "expired"), b"$F,R,B,30,0,1*E4\r\n"),
        (Feedback(Color.OFF, beeps=3), b"$F,O,S,0,3,0*9D\r\n"),
        (Feedback(Color.AMBER, beeps=40), b"$F,A,S,30,9,0*"),
        (Feedback(Color.AMBER, beeps=-2), b"$F,A,S,30,0,0*"),
    ],
)
def test_feedback_frames(feedback: Feedback, frame: bytes) -> None:
    wire = buttonbox.encode_feedback(feedback)
    assert wire.startswith(frame)
    assert wire.endswith(b"\r\n")
    assert len(buttonbox.fields(wire)) == 6


@given(
    st.sampled_from(list(Color)),
    st.integers(-5, 50),
    st.booleans(),
    st.text(max_size=40),
    st.booleans(),
    st.none() | st.booleans(),
)
def test_every_feedback_is_a_valid_frame(
    color: Color, beeps: int, long_beep: bool, text: str, ack: bool, granted: bool | None
) -> None:
    wire = buttonbox.encode_feedback(Feedback(color, beeps, long_beep, text, ack, granted))
    kind, colour, pattern, tenths, count, long = buttonbox.fields(wire)
    assert kind == "F"
    assert colour == buttonbox.COLOUR_LETTERS[color]
    assert pattern in ("S", "B")
    assert 0 <= int(tenths) <= 255
    assert 0 <= int(count) <= buttonbox.MAX_BEEPS
    assert long == str(int(long_beep))


FRAMES = st.one_of(
    st.builds(PressFrame, st.integers(0, 255), st.integers(1, 99), st.booleans()),
    st.builds(
        HeartbeatFrame,
        st.integers(0, 255),
        st.text(alphabet=sorted(buttonbox._FIRMWARE_CHARS), min_size=1, max_size=16),
        st.integers(0, 10**10 - 1),
    ),
)


@given(FRAMES)
def test_round_trip(frame: PressFrame | HeartbeatFrame) -> None:
    wire = buttonbox.encode(frame)
    assert len(wire) - 2 <= buttonbox.MAX_FRAME
    assert buttonbox.decode(wire) == frame
    assert ButtonBoxStream().feed(wire) == [frame.event]


def test_encode_refuses_what_cannot_be_sent() -> None:
    refused: list[tuple[PressFrame | HeartbeatFrame, str]] = [
        (PressFrame(256, 1), "sequence number"),
        (PressFrame(0, 0), "numbered 1 to 99"),
        (PressFrame(0, 100), "numbered 1 to 99"),
        (HeartbeatFrame(0, "1,2", 0), "firmware version"),
    ]
    for frame, reason in refused:
        with pytest.raises(ValueError, match=reason):
            buttonbox.encode(frame)
    with pytest.raises(ValueError, match="uptime"):
        buttonbox.encode(HeartbeatFrame(0, "1", 10**10))


@given(st.binary(max_size=60))
def test_whatever_decodes_is_spelt_one_way(line: bytes) -> None:
    try:
        frame = buttonbox.decode(line)
    except FrameError:
        return
    assert buttonbox.encode(frame) == line.rstrip(b"\r\n") + b"\r\n"


@given(st.lists(st.binary(max_size=40) | st.sampled_from([PRESS_3, LONG_2, HEARTBEAT]), max_size=30))
def test_hostile_streams_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    stream = ButtonBoxStream(SequenceFilter())
    for at, chunk in enumerate(chunks):
        for result in stream.feed(chunk, now=at * 0.3):
            assert isinstance(result, ButtonPress | Heartbeat | FrameError)
        assert len(stream._buf) <= buttonbox.MAX_FRAME
