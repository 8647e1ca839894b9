"""The feedback line: what a reader's LED/buzzer board reads, for every kind of answer, and what it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridges.device import Color, Feedback
from firmware_bridges.errors import FrameError
from firmware_bridges.feedback import MAX_LINE, MAX_TEXT, decode_line, encode_line


def test_the_three_signals_of_a_read() -> None:
    assert encode_line(Feedback.acknowledge()) == b"FB ACK BLUE 1 0\n"
    assert encode_line(Feedback.decision(True, "Bem-vindo, Ana!")) == b"FB GRANTED GREEN 2 0 Bem-vindo, Ana!\n"
    assert encode_line(Feedback.decision(False, "Cartão desconhecido")) == (
        "FB DENIED RED 0 1 Cartão desconhecido\n".encode()
    )
    assert decode_line(b"FB DENIED RED 0 1 Cart\xc3\xa3o desconhecido\r\n").text == "Cartão desconhecido"


def test_text_cannot_break_the_frame() -> None:
    line = encode_line(Feedback(Color.AMBER, beeps=42, text="Ana\nFB GRANTED GREEN 2 0 x\r" + "é" * 200))
    assert line.count(b"\n") == 1
    assert len(line) <= MAX_LINE
    back = decode_line(line)
    assert back.beeps == 9  # capped
    assert len(back.text) <= MAX_TEXT
    assert "\n" not in back.text


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"FB",
        b"XX ACK BLUE 1 0\n",
        b"FB ACK PURPLE 1 0\n",
        b"FB MAYBE BLUE 1 0\n",
        b"FB ACK BLUE x 0\n",
        b"FB ACK BLUE 1 2\n",
        b"FB ACK BLUE 1 0 \xff\xfe\n",
        b"FB ACK BLUE 1 0 " + b"a" * MAX_LINE,
        b"FB ACK BLUE  0\n",  # no beep count
        b"FB ACK BLUE 12 0\n",  # one digit only
        "FB ACK BLUE \u0663 0\n".encode(),  # an Arabic-Indic three is not an ASCII digit
        b"FB ACK BLUE 1 0 a\x00b\n",  # control characters would reach a display
    ],
)
def test_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(FrameError):
        decode_line(line)


@given(
    st.sampled_from(list(Color)),
    st.integers(0, 9),
    st.booleans(),
    st.text(alphabet=st.characters(categories=["L", "N", "P"], include_characters=" "), max_size=MAX_TEXT),
    st.sampled_from([(True, None), (False, True), (False, False), (False, None)]),
)
def test_round_trip(color: Color, beeps: int, long_beep: bool, text: str, kind: tuple[bool, bool | None]) -> None:
    ack, granted = kind
    feedback = Feedback(color, beeps=beeps, long_beep=long_beep, text=text, ack=ack, granted=None if ack else granted)
    back = decode_line(encode_line(feedback))
    assert back == Feedback(color, beeps, long_beep, text.strip(), ack, None if ack else granted)


@given(st.binary(max_size=MAX_LINE + 8))
def test_any_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        back = decode_line(data)
    except FrameError:
        return
    again = decode_line(encode_line(back))  # what a board accepts, the agent can say again
    assert (again.color, again.ack, again.granted, again.long_beep) == (
        back.color,
        back.ack,
        back.granted,
        back.long_beep,
    )
