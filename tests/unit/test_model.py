"""Card ids: one canonical spelling, whatever the reader or the front desk typed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain.model import MAX_CARD_HEX, normalize_card_id


@pytest.mark.parametrize(
    "raw",
    [
        "04A22B1C",
        "04a22b1c",
        "04:a2:2b:1c",
        "04-A2-2B-1C",
        "04 a2 2b 1c",
        "04:A2-2b 1C",
        " 04a22b1c ",
        "0:4:a:2:2:b:1:c",
        "04::a2--2b  1c",
    ],
)
def test_separators_are_removed_and_case_is_upper(raw: str) -> None:
    assert normalize_card_id(raw) == "04A22B1C"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("F", "0F"),
        ("abc", "0ABC"),
        ("1:23", "0123"),
        ("4a22b1c", "04A22B1C"),
        ("0", "00"),
    ],
)
def test_odd_length_is_left_padded_with_zero(raw: str, expected: str) -> None:
    assert normalize_card_id(raw) == expected


def test_longest_card_id_is_accepted() -> None:
    uid = "0123456789ABCDEF" * 2
    assert len(uid) == MAX_CARD_HEX == 32
    assert normalize_card_id(uid.lower()) == uid
    assert normalize_card_id(":".join(uid[i : i + 2] for i in range(0, 32, 2))) == uid


def test_odd_length_just_under_the_cap_is_padded_to_the_cap() -> None:
    assert normalize_card_id("1" * 31) == "0" + "1" * 31


@pytest.mark.parametrize("raw", ["", " ", ":", "-", " : - ", "\t\n"])
def test_empty_card_id_is_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        normalize_card_id(raw)


@pytest.mark.parametrize("raw", ["1" * 33, "0" * 34, "AB" * 20, ":".join(["AB"] * 17)])
def test_overlong_card_id_is_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="longer than 32"):
        normalize_card_id(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "0G",
        "04:A2:2B:1Z",
        "12.34",
        "0x1234",
        "12_34",
        "12,34",
        "1234/",
        "é1",
        "\u0661\u0662",  # Arabic-Indic digits are digits, but not hex
        "\uff11\uff12",  # fullwidth digits
    ],
)
def test_non_hex_card_id_is_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="hexadecimal"):
        normalize_card_id(raw)


def test_non_ascii_letter_that_upper_cases_to_hex_is_rejected() -> None:
    # U+FB00 LATIN SMALL LIGATURE FF upper-cases to "FF": not hexadecimal, and must not become card FF.
    with pytest.raises(ValueError, match="hexadecimal"):
        normalize_card_id("\ufb00")


SEPARATORS = st.sampled_from([":", "-", " ", ""])


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=16), SEPARATORS, st.booleans())
def test_round_trip_from_bytes(uid: bytes, separator: str, upper: bool) -> None:
    text = separator.join(f"{byte:02x}" for byte in uid)
    if upper:
        text = text.upper()
    assert normalize_card_id(text) == uid.hex().upper()


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=16))
def test_leading_zero_dropped_by_a_reader_is_restored(uid: bytes) -> None:
    # Some readers print the UID as a number, losing a leading zero nibble.
    as_number = format(int.from_bytes(uid, "big"), "X")
    normalized = normalize_card_id(as_number)
    assert len(normalized) % 2 == 0
    assert int(normalized, 16) == int.from_bytes(uid, "big")
    assert normalized == uid.hex().upper().lstrip("0").rjust(len(normalized), "0")


@settings(max_examples=300)
@given(st.text(alphabet="0123456789abcdefABCDEF:- ", max_size=40))
def test_normalize_is_idempotent_and_canonical(raw: str) -> None:
    try:
        card = normalize_card_id(raw)
    except ValueError:
        return
    assert normalize_card_id(card) == card
    assert len(card) % 2 == 0
    assert 2 <= len(card) <= MAX_CARD_HEX
    assert set(card) <= set("0123456789ABCDEF")
