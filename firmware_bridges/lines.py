"""Readers that write one card id per line: the many cheap USB and serial readers (125 kHz and 13.56 MHz) that
print the id as hex or decimal digits, sometimes wrapped in a fixed prefix or suffix, ended by CR, LF or CRLF.

There is no checksum on this wire, so what protects the agent from noise is the shape of the line: only the
configured digits, between `min_digits` and `max_digits` of them, inside the configured prefix and suffix.
`LineFormat` says what that shape is; `parse_format` reads it from the `format` string of a `[[readers]]` entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .device import CardRead
from .errors import FrameError

Encoding = Literal["hex", "decimal"]
ENCODINGS: tuple[Encoding, ...] = ("hex", "decimal")

DEFAULT_DECIMAL_WIDTH = 4  # 10-digit decimal readers print the 32-bit number of EM4100 and Wiegand-34 cards
MAX_WIDTH = 32  # bytes
MAX_DIGITS = 64
MAX_AFFIX = 32  # characters of prefix or suffix
# Spaces and tabs around the id and its affixes are tolerated (some readers pad their output); this is how many
# of them a line may hold on top of the id before it is refused as overlong.
WHITESPACE_SLACK = 16

_HEX = frozenset("0123456789ABCDEFabcdef")
_DECIMAL = frozenset("0123456789")
_BLANKS = " \t"
_EOL = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class LineFormat:
    """How a reader writes a card id.

    `encoding` "hex" takes hex digits in either case; "decimal" takes a decimal number. `width` is the card id's
    size in bytes: the number is written as exactly `2 * width` upper-case hex digits (leading zeros added, a
    number too large refused), so readers that drop or add leading zeros still give the agent one id per card.
    Without a width, hex is kept as written (a leading zero added to an odd count, two digits per byte as in
    the MQTT contract) and decimal is taken as `DEFAULT_DECIMAL_WIDTH` bytes. `min_digits` and `max_digits` bound
    the digits as written; `prefix` and `suffix` are required around them when set."""

    encoding: Encoding = "hex"
    width: int | None = None
    prefix: str = ""
    suffix: str = ""
    min_digits: int = 4
    max_digits: int = 32

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r} (expected 'hex' or 'decimal')")
        if self.width is not None and not 1 <= self.width <= MAX_WIDTH:
            raise ValueError(f"width must be 1 to {MAX_WIDTH} bytes, not {self.width}")
        if not 1 <= self.min_digits <= self.max_digits <= MAX_DIGITS:
            raise ValueError(
                f"digits must satisfy 1 <= min ({self.min_digits}) <= max ({self.max_digits}) <= {MAX_DIGITS}"
            )
        for name, affix in (("prefix", self.prefix), ("suffix", self.suffix)):
            if len(affix) > MAX_AFFIX:
                raise ValueError(f"{name} is longer than {MAX_AFFIX} characters")
            if not all(" " <= c <= "~" for c in affix):
                raise ValueError(f"{name} {affix!r} must be printable ASCII")
            if affix != affix.strip(_BLANKS):
                # lines are trimmed before the affixes are matched, so such an affix could never match
                raise ValueError(f"{name} {affix!r} must not begin or end with a space")

    @property
    def byte_width(self) -> int | None:
        if self.width is None and self.encoding == "decimal":
            return DEFAULT_DECIMAL_WIDTH
        return self.width

    @property
    def max_line(self) -> int:
        """The longest line (ending excluded) this format can accept: the cap on what a stream buffers."""
        return len(self.prefix) + len(self.suffix) + self.max_digits + WHITESPACE_SLACK


def parse_format(spec: str) -> LineFormat:
    """Read a `format` setting: `ENCODING[:OPTION[,OPTION...]]`, where an option is a width in bytes or one of
    `width=N`, `prefix=TEXT`, `suffix=TEXT`, `min=N`, `max=N`. Values run to the next comma, so a prefix may hold
    ':' and '=' (`hex:prefix=ID:`) but not ','. Examples: `hex`, `decimal:4`, `hex:5,prefix=ID:,min=10,max=10`."""
    text = spec.strip()
    encoding, colon, rest = text.partition(":")
    encoding = encoding.strip().lower()
    if encoding not in ENCODINGS:
        raise ValueError(f"line format {spec!r}: unknown encoding {encoding!r} (expected 'hex' or 'decimal')")
    values: dict[str, str] = {}
    if colon:
        for option in rest.split(","):
            key, equals, value = option.partition("=")
            key = key.strip().lower()
            if not equals:  # a bare option is the width: "decimal:4"
                if key and not key.isdigit():
                    raise ValueError(f"line format {spec!r}: option {option!r} is neither a width nor key=value")
                key, value = "width", key
            if not value.strip():
                raise ValueError(f"line format {spec!r}: empty option {option!r}")
            if key not in ("width", "prefix", "suffix", "min", "max"):
                raise ValueError(
                    f"line format {spec!r}: unknown option {key!r} (expected width, prefix, suffix, min or max)"
                )
            if key in values:
                raise ValueError(f"line format {spec!r}: {key} is given twice")
            values[key] = value.strip()
    numbers: dict[str, int] = {}
    for key in ("width", "min", "max"):
        if key in values:
            if not values[key].isascii() or not values[key].isdigit():
                raise ValueError(f"line format {spec!r}: {key} must be a whole number, not {values[key]!r}")
            # every bound is far below a million; int() of thousands of digits would refuse with its own message
            numbers[key] = min(int(values[key][:7]), 10**6)
    defaults = LineFormat()
    try:
        return LineFormat(
            encoding=encoding,
            width=numbers.get("width"),
            prefix=values.get("prefix", ""),
            suffix=values.get("suffix", ""),
            min_digits=numbers.get("min", defaults.min_digits),
            max_digits=numbers.get("max", defaults.max_digits),
        )
    except ValueError as exc:
        raise ValueError(f"line format {spec!r}: {exc}") from None


def parse_id(text: str, fmt: LineFormat) -> str:
    """The agent's card id for what a reader wrote (line ending removed): the affixes stripped, the digits checked
    and normalised. Shared with the keyboard readers, which type the same text."""
    text = text.strip(_BLANKS)
    raw = text.encode("ascii", "replace")
    if fmt.prefix:
        if not text.startswith(fmt.prefix):
            raise FrameError(f"line does not start with {fmt.prefix!r}", raw)
        text = text[len(fmt.prefix) :]
    if fmt.suffix:
        if not text.endswith(fmt.suffix):
            raise FrameError(f"line does not end with {fmt.suffix!r}", raw)
        text = text[: -len(fmt.suffix)]
    digits = text.strip(_BLANKS)
    if not fmt.min_digits <= len(digits) <= fmt.max_digits:
        raise FrameError(f"{len(digits)} digits, expected {fmt.min_digits} to {fmt.max_digits}", raw)
    allowed = _HEX if fmt.encoding == "hex" else _DECIMAL
    if not set(digits) <= allowed:
        raise FrameError(f"the id holds characters that are not {fmt.encoding} digits", raw)
    width = fmt.byte_width
    if width is None:
        return digits.upper().zfill(len(digits) + len(digits) % 2)
    value = int(digits, 16 if fmt.encoding == "hex" else 10)
    if value >= 1 << (8 * width):
        raise FrameError(f"the id does not fit in {width} bytes", raw)
    return f"{value:0{2 * width}X}"


def decode(line: bytes, fmt: LineFormat) -> CardRead:
    """One line, its ending removed."""
    if len(line) > fmt.max_line:
        raise FrameError(f"line is {len(line)} bytes, at most {fmt.max_line} expected", line)
    if not all(0x20 <= byte <= 0x7E or byte == 0x09 for byte in line):
        raise FrameError("line holds bytes that are not printable ASCII", line)
    return CardRead(parse_id(line.decode("ascii"), fmt), "line")


def format_id(card_id: str, fmt: LineFormat) -> str:
    """What a reader using `fmt` writes for `card_id` (as `parse_id` returns it), without the line ending: the
    inverse of `parse_id`, for tests, fuzzing and reader simulators."""
    if not card_id or not set(card_id) <= _HEX:
        raise ValueError(f"{card_id!r} is not a hex card id")
    if fmt.encoding == "decimal":
        digits = str(int(card_id, 16))
    elif fmt.width is not None:
        digits = f"{int(card_id, 16):X}"
    else:  # as written, leading zeros and all; `parse_id` may have added one to make the count even
        digits = card_id.upper()
        if len(digits) > fmt.max_digits and digits[0] == "0":
            digits = digits[1:]
    digits = digits.zfill(fmt.min_digits)
    if len(digits) > fmt.max_digits:
        raise ValueError(f"{card_id} needs {len(digits)} digits; the format allows {fmt.max_digits}")
    return f"{fmt.prefix}{digits}{fmt.suffix}"


def encode(card_id: str, fmt: LineFormat) -> bytes:
    return format_id(card_id, fmt).encode("ascii") + b"\r\n"


class LineStream:
    """Splits bytes as they arrive (any chunking) into lines and returns what each call completed: card reads and
    errors. CR, LF and CRLF all end a line (CRLF is a line and an empty one, and empty lines are ignored).

    A line longer than the format allows is reported once and skipped up to the next line ending: the buffer
    never holds more than `format.max_line` bytes, whatever arrives."""

    def __init__(self, fmt: LineFormat | None = None) -> None:
        self.format = fmt or LineFormat()
        self._buf = bytearray()
        self._overlong = False

    def feed(self, chunk: bytes) -> list[CardRead | FrameError]:
        out: list[CardRead | FrameError] = []
        cap = self.format.max_line
        pos = 0
        while pos < len(chunk):
            match = _EOL.search(chunk, pos)
            end = match.start() if match else len(chunk)
            piece = chunk[pos:end]
            if not self._overlong:
                if len(self._buf) + len(piece) > cap:
                    seen = bytes(self._buf) + piece[:32]
                    out.append(FrameError(f"line longer than {cap} bytes skipped", seen))
                    self._buf.clear()
                    self._overlong = True
                else:
                    self._buf += piece
            if match is None:
                break
            if not self._overlong and self._buf.strip(b" \t"):
                try:
                    out.append(decode(bytes(self._buf), self.format))
                except FrameError as exc:
                    out.append(exc)
            self._buf.clear()
            self._overlong = False
            pos = end + 1
        return out
