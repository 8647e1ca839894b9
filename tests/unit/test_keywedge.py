"""Keyboard-wedge readers: what readers type, what people type, hostile events, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridges import lines
from firmware_bridges.device import CardRead
from firmware_bridges.errors import FrameError
from firmware_bridges.keywedge import (
    DOWN,
    KEY_0,
    KEY_1,
    KEY_4,
    KEY_A,
    KEY_CAPSLOCK,
    KEY_ENTER,
    KEY_KP1,
    KEY_KP2,
    KEY_KP3,
    KEY_KP4,
    KEY_KPENTER,
    KEY_LEFTSHIFT,
    KEY_NUMLOCK,
    KEY_RIGHTSHIFT,
    REPEAT,
    UP,
    KeyEvent,
    KeyWedgeStream,
    keystrokes,
)
from firmware_bridges.lines import LineFormat, parse_format

KEY_Q = 16  # not part of any id
KEY_SPACE = 57


def cards(results: list[CardRead | FrameError]) -> list[str]:
    return [r.card_id for r in results if isinstance(r, CardRead)]


def errors(results: list[CardRead | FrameError]) -> list[FrameError]:
    return [r for r in results if isinstance(r, FrameError)]


def tap(code: int, at: float) -> list[KeyEvent]:
    return [KeyEvent(code, DOWN, at), KeyEvent(code, UP, at + 0.002)]


def test_a_reader_typing_decimal() -> None:
    stream = KeyWedgeStream(parse_format("decimal:4"))
    assert stream.feed(keystrokes("0001234567")) == [CardRead("0012D687", "keyboard")]


def test_a_reader_typing_hex_in_either_case() -> None:
    stream = KeyWedgeStream()
    assert cards(stream.feed(keystrokes("04A224B1", start=1.0))) == ["04A224B1"]
    assert cards(stream.feed(keystrokes("04a224b1", start=2.0))) == ["04A224B1"]
    # the right shift works as the left one does
    events = [*tap(KEY_4, 3.0), KeyEvent(KEY_RIGHTSHIFT, DOWN, 3.005), *tap(KEY_A, 3.01)]
    events += [KeyEvent(KEY_RIGHTSHIFT, UP, 3.015), *tap(KEY_1, 3.02), *tap(KEY_0, 3.025), *tap(KEY_ENTER, 3.03)]
    assert cards(stream.feed(events)) == ["4A10"]


def test_keypad_digits_and_keypad_enter() -> None:
    events = [KeyEvent(KEY_NUMLOCK, DOWN, 0.0)]
    for i, code in enumerate([KEY_KP1, KEY_KP2, KEY_KP3, KEY_KP4, KEY_KPENTER]):
        events += tap(code, 0.01 * i)
    assert KeyWedgeStream().feed(events) == [CardRead("1234", "keyboard")]


def test_one_event_at_a_time_and_repeats_ignored() -> None:
    stream = KeyWedgeStream()
    out: list[CardRead | FrameError] = []
    for event in keystrokes("0A0012D687", start=5.0):
        out += stream.feed([event])
        if event.value == DOWN:  # auto-repeat of a held key is not a new key
            out += stream.feed([KeyEvent(event.code, REPEAT, event.time)])
    assert out == [CardRead("0A0012D687", "keyboard")]


def test_a_person_typing_on_a_keyboard_gets_no_card() -> None:
    stream = KeyWedgeStream()
    events = keystrokes("04A224B1", start=0.0, interval=0.06)  # fast typing: 120 ms per key
    out = stream.feed(events)
    assert cards(out) == []
    assert all("half-typed id dropped after a pause" in e.reason for e in errors(out))


def test_a_pause_drops_the_half_typed_id_and_the_rest_stands_alone() -> None:
    stream = KeyWedgeStream()
    events = keystrokes("04A224B1", start=0.0)
    half = [e for e in events if e.code != KEY_ENTER]
    out = stream.feed(half)
    assert out == []
    out = stream.feed(keystrokes("0A0012D687", start=1.0))
    assert cards(out) == ["0A0012D687"]
    assert [e.reason for e in errors(out)] == ["half-typed id dropped after a pause of 0.910 s"]
    assert errors(out)[0].frame == b"04A224B1"


def test_enter_after_a_pause_ends_nothing() -> None:
    stream = KeyWedgeStream()
    events = [e for e in keystrokes("04A224B1") if e.code != KEY_ENTER]
    out = stream.feed([*events, *tap(KEY_ENTER, 0.5)])
    assert cards(out) == []
    assert len(errors(out)) == 1
    assert stream.feed(tap(KEY_ENTER, 0.6)) == []  # a lone Enter is an empty line


def test_time_going_backwards_breaks_an_id() -> None:
    stream = KeyWedgeStream()
    out = stream.feed([*tap(KEY_1, 10.0), *tap(KEY_1, 10.01), *keystrokes("1234", start=3.0)])
    assert cards(out) == ["1234"]
    assert len(errors(out)) == 1


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([*tap(KEY_1, 0.0), *tap(KEY_Q, 0.01)], "key 16 is not part of a card id"),
        ([*tap(KEY_1, 0.0), *tap(KEY_SPACE, 0.01)], "key 57 is not part of a card id"),
        ([KeyEvent(KEY_LEFTSHIFT, DOWN, 0.0), *tap(KEY_1, 0.01)], "key shift+2 is not part of a card id"),
        ([KeyEvent(KEY_1, 3, 0.0)], "key event value 3 is not 0, 1 or 2"),
        ([KeyEvent(-1, DOWN, 0.0)], "key -1 is not part of a card id"),
    ],
)
def test_keys_that_are_not_part_of_an_id(events: list[KeyEvent], reason: str) -> None:
    assert [e.reason for e in errors(KeyWedgeStream().feed(events))] == [reason]


def test_a_foreign_key_drops_what_was_typed() -> None:
    stream = KeyWedgeStream()
    events = [*tap(KEY_1, 0.0), *tap(KEY_Q, 0.01), *keystrokes("4321", start=0.02)]
    out = stream.feed(events)
    assert cards(out) == ["4321"]
    assert errors(out)[0].frame == b"1"


def test_shift_released_restores_digits() -> None:
    stream = KeyWedgeStream()
    events = [
        KeyEvent(KEY_LEFTSHIFT, DOWN, 0.0),
        *tap(KEY_A, 0.005),
        KeyEvent(KEY_LEFTSHIFT, UP, 0.01),
        KeyEvent(KEY_CAPSLOCK, DOWN, 0.012),  # lock keys change no code
        *tap(KEY_1, 0.015),
        *tap(KEY_0, 0.02),
        *tap(KEY_4, 0.025),
        *tap(KEY_ENTER, 0.03),
    ]
    assert stream.feed(events) == [CardRead("A104", "keyboard")]


def test_the_format_checks_the_typed_id() -> None:
    stream = KeyWedgeStream(parse_format("decimal:4"))
    out = stream.feed(keystrokes("0A0012D687") + keystrokes("4294967296", start=1.0))
    assert [e.reason for e in errors(out)] == [
        "the id holds characters that are not decimal digits",
        "the id does not fit in 4 bytes",
    ]


def test_an_overlong_id_is_reported_once_and_not_buffered() -> None:
    stream = KeyWedgeStream(parse_format("hex:max=10"))
    assert stream.max_keys == 10
    events = [e for e in keystrokes("1" * 500, interval=0.001) if e.code != KEY_ENTER]
    out = stream.feed(events)
    assert len(out) == 1
    assert [e.reason for e in errors(out)] == ["more than 10 keys without Enter"]
    assert len(stream._text) == 0
    assert stream.feed(tap(KEY_ENTER, 1.001)) == []  # ends the skipped run
    assert cards(stream.feed(keystrokes("1234", start=2.0))) == ["1234"]


def test_an_overlong_run_also_ends_at_a_pause() -> None:
    stream = KeyWedgeStream(parse_format("hex:max=4"))
    events = [e for e in keystrokes("123456", interval=0.001) if e.code != KEY_ENTER]
    assert len(stream.feed(events)) == 1
    assert cards(stream.feed(keystrokes("1234", start=1.0))) == ["1234"]


def test_bad_settings_and_untypeable_text() -> None:
    with pytest.raises(ValueError, match="positive"):
        KeyWedgeStream(max_gap_s=0)
    with pytest.raises(ValueError, match="cannot be typed"):
        keystrokes("ID:12")


FORMATS = st.builds(
    LineFormat,
    encoding=st.sampled_from(lines.ENCODINGS),
    width=st.none() | st.integers(1, 8),
    min_digits=st.integers(1, 10),
    max_digits=st.integers(20, 40),
)


@given(FORMATS, st.binary(min_size=1, max_size=8))
def test_round_trip(fmt: LineFormat, data: bytes) -> None:
    try:
        read = lines.decode(lines.format_id(data.hex(), fmt).encode(), fmt)
    except FrameError:
        return  # the data is wider than the format
    stream = KeyWedgeStream(fmt)
    assert stream.feed(keystrokes(lines.format_id(read.card_id, fmt))) == [CardRead(read.card_id, "keyboard")]


EVENTS = st.lists(
    st.tuples(
        st.sampled_from([KEY_1, KEY_0, KEY_A, KEY_ENTER, KEY_LEFTSHIFT, KEY_Q, KEY_KP1, 0, 255, -5, 10**9]),
        st.integers(-1, 3),
        st.floats(0, 1) | st.just(float("nan")),
    ),
    max_size=200,
)


@given(EVENTS, FORMATS)
def test_hostile_events_never_raise_and_stay_bounded(events: list[tuple[int, int, float]], fmt: LineFormat) -> None:
    stream = KeyWedgeStream(fmt)
    for result in stream.feed(sorted(events, key=lambda e: e[2] if e[2] == e[2] else 0.0)):
        assert isinstance(result, CardRead | FrameError)
        if isinstance(result, CardRead):
            assert lines.parse_id(lines.format_id(result.card_id, fmt), fmt) == result.card_id
    assert len(stream._text) <= stream.max_keys
