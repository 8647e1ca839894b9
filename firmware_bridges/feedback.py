"""The feedback line: how the agent drives the LED, buzzer and display of a serial reader that has them.

Cheap 125 kHz and line readers only talk; their feedback comes from a small board (any microcontroller with an
RGB LED and a buzzer) on the TX line of the same USB-serial adapter. One ASCII line per command, UTF-8 text:

    FB <what> <colour> <beeps> <long> <text>\\n

- `what`: ACK (the read was heard: flash and chirp at once, before any decision), GRANTED, DENIED or SHOW;
- `colour`: OFF GREEN RED AMBER BLUE;
- `beeps`: short beeps, 0-9; `long`: 1 for one long beep (a refusal), else 0;
- `text`: the rest of the line, at most 64 characters, for a display (may be empty).

Example: `FB GRANTED GREEN 2 0 Bem-vindo, Ana!\\n`. A board that has no display ignores the text.
"""

from __future__ import annotations

from .device import Color, Feedback
from .errors import FrameError

MAX_TEXT = 64
_WHAT = ("ACK", "GRANTED", "DENIED", "SHOW")
_DIGITS = tuple("0123456789")  # one ASCII digit: not "", not "12", not another script's digit
MAX_LINE = 4 + 8 + 6 + 2 + 2 + MAX_TEXT * 4 + 1  # UTF-8: at most 4 bytes a character


def _what(feedback: Feedback) -> str:
    if feedback.ack:
        return "ACK"
    if feedback.granted is None:
        return "SHOW"
    return "GRANTED" if feedback.granted else "DENIED"


def _clean(text: str) -> str:
    """Printable, one line, capped: a name from the member list must not break the frame."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()[:MAX_TEXT].rstrip()


def encode_line(feedback: Feedback) -> bytes:
    beeps = max(0, min(9, feedback.beeps))
    fields = ["FB", _what(feedback), feedback.color.value.upper(), str(beeps), "1" if feedback.long_beep else "0"]
    text = _clean(feedback.text)
    return (" ".join(fields) + (f" {text}" if text else "") + "\n").encode()


def decode_line(line: bytes) -> Feedback:
    """One line as a board would read it (the tests' side of the wire, and a check on `encode_line`)."""
    if len(line) > MAX_LINE:
        raise FrameError(f"feedback line is {len(line)} bytes, at most {MAX_LINE}", line)
    try:
        text = line.decode().rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise FrameError("feedback line is not UTF-8", line) from exc
    parts = text.split(" ", 5)
    if len(parts) < 5 or parts[0] != "FB":
        raise FrameError("not a feedback line", line)
    _, what, colour, beeps, long_beep = parts[:5]
    try:
        color = Color(colour.lower())
    except ValueError as exc:
        raise FrameError(f"unknown colour {colour!r}", line) from exc
    if (
        what not in ("ACK", "GRANTED", "DENIED", "SHOW")
        or beeps not in tuple("0123456789")
        or long_beep not in ("0", "1")
    ):
        raise FrameError("malformed feedback fields", line)
    if len(parts) > 5 and not parts[5].isprintable():
        raise FrameError("feedback text holds control characters", line)
    granted = {"GRANTED": True, "DENIED": False}.get(what)
    return Feedback(
        color,
        beeps=int(beeps),
        long_beep=long_beep == "1",
        text=parts[5] if len(parts) > 5 else "",
        ack=what == "ACK",
        granted=granted,
    )
