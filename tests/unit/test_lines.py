"""Line readers: formats and their config strings, whole lines, one byte at a time, hostile input, round trips."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_bridges import lines
from firmware_bridges.device import CardRead
from firmware_bridges.errors import FrameError
from firmware_bridges.lines import LineFormat, LineStream, parse_format

HEX = LineFormat()
DECIMAL = parse_format("decimal:4")


def cards(results: list[CardRead | FrameError]) -> list[str]:
    return [r.card_id for r in results if isinstance(r, CardRead)]


def errors(results: list[CardRead | FrameError]) -> list[FrameError]:
    return [r for r in results if isinstance(r, FrameError)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hex", LineFormat()),
        (" HEX ", LineFormat()),
        ("decimal", LineFormat("decimal")),
        ("decimal:4", LineFormat("decimal", width=4)),
        ("hex:prefix=ID:", LineFormat(prefix="ID:")),
        ("hex:prefix=UID=,suffix=;", LineFormat(prefix="UID=", suffix=";")),
        ("hex:5,min=10,max=10", LineFormat(width=5, min_digits=10, max_digits=10)),
        ("decimal:width=7, min=8, max=17", LineFormat("decimal", width=7, min_digits=8, max_digits=17)),
    ],
)
def test_format_specs(spec: str, expected: LineFormat) -> None:
    assert parse_format(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown encoding ''"),
        ("base64", "unknown encoding 'base64'"),
        ("hex:", "empty option ''"),
        ("hex:4,,min=2", "empty option ''"),
        ("hex:prefix=", "empty option 'prefix='"),
        ("hex:foo", "option 'foo' is neither a width nor key=value"),
        ("hex:colour=red", "unknown option 'colour'"),
        ("hex:4,width=5", "width is given twice"),
        ("hex:min=four", "min must be a whole number, not 'four'"),
        ("hex:max=-3", "max must be a whole number"),
        ("decimal:0", "width must be 1 to 32 bytes, not 0"),
        ("decimal:33", "width must be 1 to 32 bytes"),
        ("hex:min=10,max=8", r"1 <= min \(10\) <= max \(8\) <= 64"),
        ("hex:max=65", "<= 64"),
        ("hex:max=" + "9" * 5000, "<= 64"),
        ("hex:prefix=é", "must be printable ASCII"),
        ("hex:suffix=" + "x" * 33, "longer than 32"),
    ],
)
def test_bad_format_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_format(spec)
    assert str(caught.value).startswith(f"line format {spec!r}: ")


@given(st.text(max_size=60) | st.text(alphabet="hexdcimal:,=0123456789prefixsuffixwidthmnax", max_size=60))
def test_any_format_string_parses_or_says_what_is_wrong(spec: str) -> None:
    try:
        fmt = parse_format(spec)
    except ValueError as exc:
        message = str(exc)
    else:  # what parses is a format that passes its own checks
        assert LineFormat(fmt.encoding, fmt.width, fmt.prefix, fmt.suffix, fmt.min_digits, fmt.max_digits) == fmt
        return
    assert message.startswith(f"line format {spec!r}: ")


def test_formats_check_themselves() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        LineFormat("base64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not begin or end with a space"):
        LineFormat(prefix="ID ")


@pytest.mark.parametrize(
    ("fmt", "line", "card_id"),
    [
        (HEX, b"0a0012d687", "0A0012D687"),
        (HEX, b"\t04A224B1C35E80 ", "04A224B1C35E80"),
        (HEX, b"ABCDE", "0ABCDE"),  # two digits per byte, as the MQTT contract's ids are
        (parse_format("hex:4"), b"12D687", "0012D687"),
        (parse_format("hex:4"), b"000012D687", "0012D687"),
        (DECIMAL, b"0001234567", "0012D687"),  # the number printed on EM4100 cards
        (DECIMAL, b"1234567", "0012D687"),
        (DECIMAL, b"4294967295", "FFFFFFFF"),
        (parse_format("decimal"), b"4294967295", "FFFFFFFF"),
        (parse_format("decimal:7"), b"1234567890123456", "0462D53C8ABAC0"),
        (parse_format("hex:prefix=ID:"), b"ID:04A224B1", "04A224B1"),
        (parse_format("hex:prefix=ID:"), b" ID: 04A224B1 ", "04A224B1"),
        (parse_format("hex:prefix=[,suffix=]"), b"[04A224B1]", "04A224B1"),
    ],
)
def test_lines(fmt: LineFormat, line: bytes, card_id: str) -> None:
    assert lines.decode(line, fmt) == CardRead(card_id, "line")


@pytest.mark.parametrize(
    ("fmt", "line", "reason"),
    [
        (HEX, b"", "0 digits, expected 4 to 32"),
        (HEX, b"123", "3 digits"),
        (HEX, b"1" * 33, "33 digits"),
        (HEX, b"04A224G1", "not hex digits"),
        (HEX, b"04A2 24B1", "not hex digits"),  # the digits of an id are contiguous
        (HEX, b"04A2\x0024B1", "not printable ASCII"),
        (HEX, b"04A2\xc3\xa924B1", "not printable ASCII"),
        (HEX, b"1" * 100, "100 bytes, at most 48"),
        (DECIMAL, b"0A0012D687", "not decimal digits"),
        (DECIMAL, b"4294967296", "does not fit in 4 bytes"),
        (parse_format("hex:4"), b"0100000000", "does not fit in 4 bytes"),
        (parse_format("hex:prefix=ID:"), b"04A224B1", "does not start with 'ID:'"),
        (parse_format("hex:prefix=ID:"), b"id:04A224B1", "does not start with 'ID:'"),
        (parse_format("hex:suffix=;"), b"04A224B1", "does not end with ';'"),
        (parse_format("hex:min=8,max=8"), b"04A224B1C3", "10 digits, expected 8 to 8"),
    ],
)
def test_bad_lines_are_refused(fmt: LineFormat, line: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        lines.decode(line, fmt)


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_a_stream_whole_and_one_byte_at_a_time(ending: bytes) -> None:
    text = b"0A0012D687" + ending + b"04a224b1c35e80" + ending + ending + b"   " + ending
    expected = ["0A0012D687", "04A224B1C35E80"]
    assert LineStream().feed(text) == [CardRead(c, "line") for c in expected]
    stream = LineStream()
    out: list[CardRead | FrameError] = []
    for byte in text:
        out += stream.feed(bytes([byte]))
    assert cards(out) == expected
    assert errors(out) == []


def test_a_line_waits_for_its_ending() -> None:
    stream = LineStream(DECIMAL)
    assert stream.feed(b"00012") == []
    assert stream.feed(b"34567") == []
    assert cards(stream.feed(b"\r\n")) == ["0012D687"]


def test_an_overlong_line_is_reported_once_and_never_buffered_whole() -> None:
    stream = LineStream()
    cap = stream.format.max_line
    out = stream.feed(b"0A0012D687\n" + b"1" * (cap + 1))
    assert cards(out) == ["0A0012D687"]
    assert [e.reason for e in errors(out)] == [f"line longer than {cap} bytes skipped"]
    for _ in range(100):
        assert stream.feed(b"2" * 1000) == []
        assert len(stream._buf) <= cap
    assert cards(stream.feed(b"3\n0A0012D687\n")) == ["0A0012D687"]


def test_a_line_of_exactly_the_cap_is_still_read() -> None:
    stream = LineStream(parse_format("hex:max=64"))
    line = b" " * 8 + b"A" * 64 + b" " * 8
    assert len(line) == stream.format.max_line
    assert cards(stream.feed(line + b"\r\n")) == ["A" * 64]


def test_each_bad_line_is_one_error() -> None:
    stream = LineStream(parse_format("hex:prefix=ID:,min=8"))
    out = stream.feed(b"\x00\xffnoise\r\nID:04A224B1\r\nID:04A2\r\nxx\nID:04A224B2\r\n")
    assert cards(out) == ["04A224B1", "04A224B2"]
    assert [e.reason for e in errors(out)] == [
        "line holds bytes that are not printable ASCII",
        "4 digits, expected 8 to 32",
        "line does not start with 'ID:'",
    ]


FORMATS = st.builds(
    LineFormat,
    encoding=st.sampled_from(lines.ENCODINGS),
    width=st.none() | st.integers(1, 8),
    prefix=st.sampled_from(["", "ID:", "UID=", "["]),
    suffix=st.sampled_from(["", ";", "]"]),
    min_digits=st.integers(1, 10),
    max_digits=st.integers(10, 40),
)


@given(FORMATS, st.binary(min_size=1, max_size=8), st.sampled_from([b"\r", b"\n", b"\r\n"]))
def test_round_trip(fmt: LineFormat, data: bytes, ending: bytes) -> None:
    # the format fitted to the id: its width for numbers, few enough digits required for hex as written
    if fmt.encoding == "decimal" or fmt.width is not None:
        fmt = replace(fmt, width=len(data), max_digits=max(fmt.max_digits, 20))
    else:
        fmt = replace(fmt, min_digits=min(fmt.min_digits, 2 * len(data)), max_digits=max(fmt.max_digits, 16))
    card_id = data.hex().upper()
    line = lines.encode(card_id, fmt)
    assert lines.decode(line[:-2], fmt) == CardRead(card_id, "line")
    assert LineStream(fmt).feed(line[:-2] + ending) == [CardRead(card_id, "line")]


@given(FORMATS, st.text(alphabet="0123456789abcdefABCDEF :ID=[];", max_size=45))
def test_whatever_decodes_encodes_back_to_the_same_id(fmt: LineFormat, text: str) -> None:
    try:
        read = lines.decode(text.encode(), fmt)
    except FrameError:
        return
    assert read.card_id == read.card_id.upper()
    assert len(read.card_id) % 2 == 0
    assert lines.decode(lines.encode(read.card_id, fmt).rstrip(b"\r\n"), fmt) == read


@given(st.lists(st.binary(max_size=80), max_size=20), FORMATS)
def test_hostile_streams_never_raise_and_stay_bounded(chunks: list[bytes], fmt: LineFormat) -> None:
    stream = LineStream(fmt)
    for chunk in chunks:
        for result in stream.feed(chunk):
            assert isinstance(result, CardRead | FrameError)
        assert len(stream._buf) <= fmt.max_line


@given(st.binary(max_size=200), st.integers(1, 16))
def test_chunking_does_not_change_the_result(data: bytes, size: int) -> None:
    whole = LineStream().feed(data)
    stream = LineStream()
    pieces: list[CardRead | FrameError] = []
    for at in range(0, len(data), size):
        pieces += stream.feed(data[at : at + size])
    assert cards(pieces) == cards(whole)
    assert [e.reason for e in errors(pieces)] == [e.reason for e in errors(whole)]
