"""The court button box: a microcontroller with a few buttons, an RGB LED and a buzzer on a USB-serial link.

The protocol is ours, at 9600 or 115200 baud 8N1: NMEA-like ASCII lines, `$BODY*CC` and CRLF, where BODY is
comma-separated fields and CC the CRC-8 of BODY as two upper-case hex digits. CRC-8 rather than NMEA's XOR,
which misses two flips of the same bit in different characters: `P,05,3` (button 3) and `P,04,2` (button 2) have
the same XOR.

Box to agent: `P,SS,N` a press of button N, `L,SS,N` a long press, `H,SS,VERSION,UPTIME` a heartbeat. SS is a
sequence number (two hex digits, one counter for all frames, wrapping at 256); the box sends every frame twice,
100 ms apart, so one frame lost to a glitch on the link costs nothing, and the copy is recognised by its SS
(`SequenceFilter`). Agent to box: `F,COLOUR,PATTERN,TENTHS,BEEPS,LONG` (`encode_feedback`).

Parsing is strict and every valid frame has exactly one spelling, so `encode(decode(frame))` gives the frame back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .device import ButtonPress, Color, Feedback, Heartbeat
from .errors import FrameError

START = ord("$")
CHECK = ord("*")
MAX_FRAME = 48  # bytes from '$' to the last checksum digit; the longest heartbeat is 36
MAX_BUTTON = 99
MAX_FIRMWARE = 16
MAX_UPTIME_DIGITS = 10
MAX_BEEPS = 9
ACK_TENTHS = 2  # the acknowledgement of a read is a flash, not a state
SHOW_TENTHS = 30  # how long a decision stays on the LED

COLOUR_LETTERS = {Color.OFF: "O", Color.GREEN: "G", Color.RED: "R", Color.AMBER: "A", Color.BLUE: "B"}
STEADY, BLINK = "S", "B"

_UPPER_HEX = frozenset("0123456789ABCDEF")
_DECIMAL = frozenset("0123456789")
_FIRMWARE_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.+-_")


def _crc8_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8 = _crc8_table()


def crc8(data: bytes) -> int:
    """CRC-8 with polynomial 0x07, initial value 0, no reflection, no final XOR (CRC-8/SMBUS; check value 0xF4)."""
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


@dataclass(frozen=True, slots=True)
class PressFrame:
    seq: int
    button: int
    long: bool = False

    @property
    def event(self) -> ButtonPress:
        return ButtonPress(self.button, self.long)


@dataclass(frozen=True, slots=True)
class HeartbeatFrame:
    seq: int
    firmware: str
    uptime_s: int

    @property
    def event(self) -> Heartbeat:
        return Heartbeat(f"buttonbox firmware {self.firmware}, up {self.uptime_s} s")


BoxFrame = PressFrame | HeartbeatFrame


def frame(body: str) -> bytes:
    """`body` framed for the wire: '$', the body, '*', its CRC-8, CRLF."""
    raw = body.encode("ascii")
    return b"$" + raw + f"*{crc8(raw):02X}\r\n".encode()


def fields(line: bytes) -> list[str]:
    """The fields of one frame, '$' to checksum (a trailing line ending is allowed), once framing and checksum
    hold. Either direction: tests and box simulators read the agent's commands with it."""
    line = line.rstrip(b"\r\n")
    if len(line) > MAX_FRAME:
        raise FrameError(f"frame is {len(line)} bytes, at most {MAX_FRAME} expected", line)
    if len(line) < 4 or line[0] != START or line[-3] != CHECK:
        raise FrameError("frame does not start with '$' and end with '*' and two hex digits", line)
    body, check = line[1:-3], line[-2:].decode("latin-1")
    if not all(0x20 <= byte <= 0x7E and byte not in (START, CHECK) for byte in body):
        raise FrameError("frame body holds bytes that are not printable ASCII or are reserved", line)
    if not set(check) <= _UPPER_HEX:
        raise FrameError("checksum is not two upper-case hex digits", line)
    if int(check, 16) != crc8(body):
        raise FrameError(f"checksum {check} does not match the frame ({crc8(body):02X})", line)
    return body.decode("ascii").split(",")


def _number(text: str, name: str, digits: int, line: bytes) -> int:
    """A decimal number with one spelling: no sign, no leading zero."""
    if not 1 <= len(text) <= digits or not set(text) <= _DECIMAL or (len(text) > 1 and text[0] == "0"):
        raise FrameError(f"{name} {text!r} is not a number of at most {digits} digits without leading zeros", line)
    return int(text)


def decode(line: bytes) -> BoxFrame:
    """One frame from the box, '$' to checksum (a trailing line ending is allowed)."""
    parts = fields(line)
    kind, args = parts[0], parts[1:]
    expected = {"P": 2, "L": 2, "H": 3}.get(kind)
    if expected is None:
        raise FrameError(f"unknown frame type {kind!r}", line)
    if len(args) != expected:
        raise FrameError(f"a {kind} frame has {expected} fields after its type, not {len(args)}", line)
    if len(args[0]) != 2 or not set(args[0]) <= _UPPER_HEX:
        raise FrameError(f"sequence number {args[0]!r} is not two upper-case hex digits", line)
    seq = int(args[0], 16)
    if kind == "H":
        firmware = args[1]
        if not 1 <= len(firmware) <= MAX_FIRMWARE or not set(firmware) <= _FIRMWARE_CHARS:
            raise FrameError(f"firmware version {firmware!r} is not 1 to {MAX_FIRMWARE} of [0-9A-Za-z.+-_]", line)
        return HeartbeatFrame(seq, firmware, _number(args[2], "uptime", MAX_UPTIME_DIGITS, line))
    button = _number(args[1], "button", 2, line)
    if button == 0:
        raise FrameError("buttons are numbered from 1", line)
    return PressFrame(seq, button, long=kind == "L")


def encode(box_frame: BoxFrame) -> bytes:
    """What a box sends for `box_frame`: for tests and box simulators."""
    if not 0 <= box_frame.seq <= 0xFF:
        raise ValueError("the sequence number is 0 to 255")
    if isinstance(box_frame, HeartbeatFrame):
        if not 1 <= len(box_frame.firmware) <= MAX_FIRMWARE or not set(box_frame.firmware) <= _FIRMWARE_CHARS:
            raise ValueError(f"firmware version {box_frame.firmware!r} cannot be sent")
        if not 0 <= box_frame.uptime_s < 10**MAX_UPTIME_DIGITS:
            raise ValueError("uptime out of range")
        return frame(f"H,{box_frame.seq:02X},{box_frame.firmware},{box_frame.uptime_s}")
    if not 1 <= box_frame.button <= MAX_BUTTON:
        raise ValueError(f"buttons are numbered 1 to {MAX_BUTTON}")
    return frame(f"{'L' if box_frame.long else 'P'},{box_frame.seq:02X},{box_frame.button}")


def encode_feedback(feedback: Feedback) -> bytes:
    """The box's LED and buzzer for `feedback`: a read's acknowledgement is a short flash; a refusal blinks;
    anything else shows steadily for `SHOW_TENTHS`. The box has no display, so `text` is not sent."""
    if feedback.color is Color.OFF:
        pattern, tenths = STEADY, 0
    elif feedback.ack:
        pattern, tenths = STEADY, ACK_TENTHS
    else:
        pattern, tenths = (BLINK if feedback.granted is False else STEADY), SHOW_TENTHS
    beeps = min(max(feedback.beeps, 0), MAX_BEEPS)
    colour = COLOUR_LETTERS[feedback.color]
    return frame(f"F,{colour},{pattern},{tenths},{beeps},{int(feedback.long_beep)}")


class SequenceFilter:
    """Drops the copies: a sequence number seen within `window_s` of its first sighting is a copy of that frame.
    The box sends each frame twice 100 ms apart and cannot wrap its 256 numbers in a second, so one second
    separates copies from new frames with room to spare. Time is passed in (monotonic seconds)."""

    def __init__(self, window_s: float = 1.0) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self._window = window_s
        self._seen: dict[int, float] = {}

    def accept(self, seq: int, now: float) -> bool:
        first = self._seen.get(seq)
        if first is not None and 0 <= now - first < self._window:
            return False
        self._seen = {s: t for s, t in self._seen.items() if 0 <= now - t < self._window}
        self._seen[seq] = now
        return True

    def clear(self) -> None:
        """Forget every number: the box restarted and counts from 00 again."""
        self._seen.clear()


class ButtonBoxStream:
    """Buffers bytes as they arrive (any chunking) and returns what each call completed: presses, heartbeats and
    errors. With a `SequenceFilter` and the arrival time, copies are dropped (and counted in `copies`); without a
    time nothing is dropped, since a doubled press is better than a lost one.

    Bytes outside a frame are skipped up to the next '$' and reported once per stretch (line endings between
    frames are not counted); a frame longer than `MAX_FRAME` is reported once and skipped, so the buffer never
    holds more than one frame."""

    def __init__(self, repeats: SequenceFilter | None = None) -> None:
        self._repeats = repeats
        self._buf = bytearray()
        self._skipped = 0
        self._overlong = False
        self._uptime = -1
        self.copies = 0

    def feed(self, chunk: bytes, now: float | None = None) -> list[ButtonPress | Heartbeat | FrameError]:
        out: list[ButtonPress | Heartbeat | FrameError] = []
        for byte in chunk:
            if byte == START:
                if self._buf:
                    out.append(FrameError("frame cut short by a new '$'", bytes(self._buf)))
                if self._skipped:
                    out.append(FrameError(f"{self._skipped} byte(s) outside a frame skipped"))
                    self._skipped = 0
                self._buf = bytearray([START])
                self._overlong = False
            elif byte in b"\r\n":
                if self._buf:
                    self._complete(bytes(self._buf), now, out)
                    self._buf.clear()
                self._overlong = False
            elif self._overlong:
                continue
            elif not self._buf:
                self._skipped += 1
            elif len(self._buf) >= MAX_FRAME:
                out.append(FrameError(f"frame longer than {MAX_FRAME} bytes skipped", bytes(self._buf)))
                self._buf.clear()
                self._overlong = True
            else:
                self._buf.append(byte)
        return out

    def _complete(self, line: bytes, now: float | None, out: list[ButtonPress | Heartbeat | FrameError]) -> None:
        try:
            box_frame = decode(line)
        except FrameError as exc:
            out.append(exc)
            return
        if self._repeats is not None and now is not None:
            if isinstance(box_frame, HeartbeatFrame):
                if box_frame.uptime_s < self._uptime:  # restarted: its numbers start again at 00
                    self._repeats.clear()
                self._uptime = box_frame.uptime_s
            if not self._repeats.accept(box_frame.seq, now):
                self.copies += 1
                return
        out.append(box_frame.event)
