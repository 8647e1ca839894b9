"""OSDP readers on an RS-485 bus: the agent is the Control Panel (CP), each reader a Peripheral Device (PD).

OSDP is a polled, half-duplex protocol: the CP asks each address in turn and a reader answers only when asked,
so several readers share one pair of wires (multi-drop) and one serial port. libosdp (the `osdp` package) runs
the protocol: polling, the secure channel (AES-128, a 16-byte key per reader), retries. This module gives it a
serial port, drives it from the event loop and turns what it reports into `DeviceEvent`s.

Lessons from libosdp 3.2.9 that shape the code below:

- Once a PD is offline, libosdp waits 300 s before it tries again; a reader that is power-cycled would stay dark
  for five minutes. The bus retries sooner itself (disable, then enable the PD) with a backoff of 1 s to 30 s.
- A PD that NAKs a command (an LED command to a reader without LEDs, a buzzer command to one without a buzzer) is
  taken offline. So feedback is sent only as far as the reader's reported capabilities go.
- A Python exception raised inside a channel callback is left pending in the C code. The channel therefore never
  raises: a failing port is recorded and the session ends after the refresh that saw it.
- `Channel.flush` must not block (pyserial's `flush()` waits for the output to drain); it discards input.
- Online/offline and secure-channel changes arrive as notification events (`LibFlag.EnableNotification`), exact
  transitions from libosdp's state machine. A PD that stops answering is declared offline after about 8 s of
  probing, as the OSDP specification asks.
- Without `EnforceSecure`, libosdp falls back to the published install key (SCBK-D) and, failing that, to plain
  text. Readers run with `EnforceSecure` unless they are being commissioned (`install_mode`), and a card read is
  accepted only over a secure channel keyed with the reader's own key.
- The `osdp.ControlPanel` wrapper is built around a refresh thread of its own (its methods take a lock that only
  its `start()` creates) and puts every event in an unbounded queue for `get_event()`, which a callback user
  never drains. The bus uses `osdp_sys.ControlPanel`, the binding the wrapper wraps, with the package's
  `PDInfo` and constants.

Which reader an event comes from travels by which sink receives it: `OsdpBus.reader(name)` is an `Adapter` for
one reader of the bus, and its sink gets that reader's events only. The bus itself is an `Adapter` too; its sink
gets the port's events (opened, lost, cannot be opened) and the events of any reader without a sink of its own,
which is all a bus with one reader (the usual wiring: one reader per USB dongle) needs. `device.EventSink` takes
a `DeviceEvent`, so a tagged event type would not fit through it; a sink per reader keeps `sink(event)` as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import osdp_sys  # type: ignore[import-not-found]
import serial
from osdp import (  # type: ignore[import-untyped]
    Capability,
    Channel,
    Command,
    CommandLEDColor,
    Event,
    EventNotification,
    LibFlag,
    LogLevel,
    PDInfo,
)

from .device import CardRead, Color, DeviceCommand, DeviceEvent, EventSink, Fault, Feedback, Heartbeat

OSDP_BAUDS: Final = (9600, 19200, 38400, 57600, 115200, 230400)  # the rates the OSDP specification allows
MAX_ADDRESS: Final = 126  # 127 (0x7F) is the broadcast address
KEY_BYTES: Final = 16
# SCBK-D, the install key every OSDP reader knows: public, so it secures nothing.
SCBK_DEFAULT: Final = bytes(range(0x30, 0x40))

# libosdp's refresh must run at least every 50 ms; at 20 ms (its own thread's pace) a card read reaches the sink
# within about one poll cycle, and the loop wakes 50 times a second for a few tens of microseconds each.
REFRESH_S: Final = 0.02
REOPEN_MIN_S, REOPEN_MAX_S = 0.5, 10.0  # reopening a port that went away
STABLE_S: Final = 10.0  # a session this long resets the reopen backoff (a flapping dongle backs off)
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # asking an offline reader again (libosdp alone would wait 300 s)

# Feedback timings, in the 100 ms units of the OSDP LED and buzzer commands.
ACK_LED_TICKS: Final = 3  # a short flash: the read was heard
DECISION_LED_TICKS: Final = 20  # the answer stays up long enough to be seen
OTHER_LED_TICKS: Final = 10
SHORT_BEEP_TICKS: Final = 1
LONG_BEEP_TICKS: Final = 10
MAX_BEEPS: Final = 9
TEXT_MAX: Final = 32  # libosdp's limit for one text command
TEXT_SHOW_S: Final = 5

# OSDP control codes (OSDP 2.2, osdp_LED, osdp_BUZ and osdp_TEXT)
LED_TEMP_CANCEL, LED_TEMP_SET = 1, 2
BUZZER_OFF, BUZZER_DEFAULT_TONE = 1, 2
TEXT_TEMPORARY_NO_WRAP = 3

OsdpCommand = dict[str, int | bool | str]

_COLOURS: Final[Mapping[Color, int]] = {
    Color.GREEN: CommandLEDColor.Green,
    Color.RED: CommandLEDColor.Red,
    Color.AMBER: CommandLEDColor.Amber,
    Color.BLUE: CommandLEDColor.Blue,
}
# What a reader must report before a command of that kind is sent to it (a NAK would take it offline).
_NEEDS: Final[Mapping[int, int]] = {
    Command.LED: Capability.LEDControl,
    Command.Buzzer: Capability.AudibleControl,
    Command.Text: Capability.TextOutput,
}
_COMMAND_NAMES: Final[Mapping[int, str]] = {
    Command.LED: "LED",
    Command.Buzzer: "buzzer",
    Command.Text: "text",
    Command.Keyset: "key set",
}
_HEX: Final = frozenset(string.hexdigits)


# -- pure helpers ---------------------------------------------------------------------------------------------


def parse_key(text: str) -> bytes:
    """A reader's secure channel key from its hex form in the secrets file: 32 hex digits, surrounding spaces
    allowed. The messages never repeat the key: they end up in logs."""
    if not isinstance(text, str):
        raise ValueError(f"an OSDP key is a string of {KEY_BYTES * 2} hex digits, not {type(text).__name__}")
    digits = text.strip()
    if digits[:2].lower() == "0x":
        digits = digits[2:]
    if len(digits) != KEY_BYTES * 2:
        raise ValueError(
            f"an OSDP key is {KEY_BYTES * 2} hex digits ({KEY_BYTES} bytes); this one has {len(digits)} characters"
        )
    if not set(digits) <= _HEX:
        raise ValueError("an OSDP key holds only the hex digits 0-9 and a-f; this one has other characters")
    key = bytes.fromhex(digits)
    if key == SCBK_DEFAULT:
        raise ValueError("this OSDP key is SCBK-D, the published install key: give each reader a random key")
    if len(set(key)) == 1:
        raise ValueError("this OSDP key is one byte repeated: give each reader a random key")
    return key


def card_id(data: bytes) -> str:
    """The agent's card id for the bytes a reader sent: upper-case hex, as the reader sent them (a raw Wiegand
    read that is not a whole number of bytes is padded by the reader on the right)."""
    if not data:
        raise ValueError("a card read without data")
    return data.hex().upper()


def card_read(event: Mapping[str, object]) -> CardRead:
    """libosdp's card read event (a dict) -> `CardRead`."""
    data = event.get("data")
    if not isinstance(data, bytes):
        raise ValueError(f"a card read whose data is {type(data).__name__}, not bytes")
    return CardRead(card_id(data), "osdp")


def display_text(text: str) -> str:
    """What a reader's display can show of `text`: OSDP text is ASCII, at most `TEXT_MAX` characters; accents
    are dropped rather than the letters ("Olá, João" -> "Ola, Joao")."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch if ch.isprintable() else " " for ch in plain)[:TEXT_MAX].strip()


def led_command(feedback: Feedback, reader_no: int = 0) -> OsdpCommand:
    """The LED part of `feedback`: a temporary colour for a while, after which the reader returns to its own
    (permanent) state; `Color.OFF` cancels a temporary colour at once."""
    command: OsdpCommand = {
        "command": Command.LED,
        "reader": reader_no,
        "led_number": 0,
        "temporary": True,
        "control_code": LED_TEMP_CANCEL,
        "on_color": CommandLEDColor.Black,
        "off_color": CommandLEDColor.Black,
        "on_count": 0,
        "off_count": 0,
        "timer_count": 0,
    }
    colour = _COLOURS.get(feedback.color)
    if colour is None:
        return command
    if feedback.ack:
        ticks = ACK_LED_TICKS
    elif feedback.granted is not None:
        ticks = DECISION_LED_TICKS
    else:
        ticks = OTHER_LED_TICKS
    # on_count > 0 with off_count 0 is a steady colour for the whole timer
    command.update(control_code=LED_TEMP_SET, on_color=colour, on_count=ticks, timer_count=ticks)
    return command


def buzzer_command(feedback: Feedback, reader_no: int = 0) -> OsdpCommand | None:
    """The buzzer part of `feedback`, or None when it makes no sound. A long beep (a refusal) wins over short
    ones: the reader plays one buzzer pattern at a time. rep_count is never 0, which means "for ever"."""
    if feedback.long_beep:
        on, off, repeat = LONG_BEEP_TICKS, SHORT_BEEP_TICKS, 1
    elif feedback.beeps > 0:
        on, off, repeat = SHORT_BEEP_TICKS, SHORT_BEEP_TICKS, min(feedback.beeps, MAX_BEEPS)
    else:
        return None
    return {
        "command": Command.Buzzer,
        "reader": reader_no,
        "control_code": BUZZER_DEFAULT_TONE,
        "on_count": on,
        "off_count": off,
        "rep_count": repeat,
    }


def text_command(feedback: Feedback, reader_no: int = 0) -> OsdpCommand | None:
    text = display_text(feedback.text)
    if not text:
        return None
    return {
        "command": Command.Text,
        "reader": reader_no,
        "control_code": TEXT_TEMPORARY_NO_WRAP,
        "temp_time": TEXT_SHOW_S,
        "offset_row": 1,
        "offset_col": 1,
        "data": text,
    }


def feedback_commands(feedback: Feedback, reader_no: int = 0) -> list[OsdpCommand]:
    """Everything `feedback` asks of a reader, as libosdp command dicts: LED, then buzzer, then text. The caller
    keeps the ones the reader can do (`OsdpBus` checks the reader's capabilities)."""
    optional = (buzzer_command(feedback, reader_no), text_command(feedback, reader_no))
    return [led_command(feedback, reader_no), *(command for command in optional if command is not None)]


# -- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OsdpReaderSpec:
    """One reader on a bus: `name` is its device id on the contract, `address` its OSDP address (set on the
    reader, 0-126, unique on the bus), `key` its secure channel key as 32 hex digits (from the secrets file).

    `install_mode` is for commissioning a reader that still has its factory key: the bus then accepts SCBK-D,
    the public install key, once, to send the reader its own key. Turn it off as soon as the reader is online:
    while it is on, a reader swapped for a factory-fresh one is keyed without anybody noticing."""

    name: str
    address: int
    key: str = field(repr=False)
    install_mode: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an OSDP reader needs a name")
        if not 0 <= self.address <= MAX_ADDRESS:
            raise ValueError(f"OSDP reader {self.name}: address {self.address} is not in 0-{MAX_ADDRESS}")
        try:
            parse_key(self.key)
        except ValueError as exc:
            raise ValueError(f"OSDP reader {self.name}: {exc}") from None

    @property
    def scbk(self) -> bytes:
        return parse_key(self.key)


# -- the serial port as libosdp sees it -----------------------------------------------------------------------


class SerialChannel(Channel):  # type: ignore[misc]
    """A non-blocking pyserial port as libosdp's channel. It never raises into libosdp: the first failure is
    kept in `error`, every later call is a no-op, and the bus ends the session after the refresh."""

    def __init__(self, port: serial.Serial) -> None:
        super().__init__()
        self._port = port
        self.error: str | None = None

    def _failed(self, exc: Exception) -> None:
        if self.error is None:
            self.error = _describe(exc)

    def read(self, max_bytes: int) -> bytes:
        if self.error is not None:
            return b""
        try:
            return bytes(self._port.read(max_bytes))
        except Exception as exc:  # anything escaping here stays pending inside libosdp's C code
            self._failed(exc)
            return b""

    def write(self, buf: bytes) -> int:
        if self.error is not None:
            return 0
        try:
            return int(self._port.write(buf) or 0)
        except Exception as exc:
            self._failed(exc)
            return 0

    def flush(self) -> None:
        """libosdp flushes after a broken exchange: the half-received reply is garbage. Output is left alone: a
        frame already handed to the driver is cut short by nothing but a broken frame on the shared wire."""
        if self.error is not None:
            return
        try:
            self._port.reset_input_buffer()
        except Exception as exc:
            self._failed(exc)


def _describe(exc: BaseException) -> str:
    """An error as one line; termios errors (`reset_input_buffer` on a vanished device) are bare tuples."""
    if len(exc.args) == 2 and isinstance(exc.args[0], int) and isinstance(exc.args[1], str):
        return f"[Errno {exc.args[0]}] {exc.args[1]}"
    return str(exc) or type(exc).__name__


def open_port(url: str, baud: int) -> serial.Serial:
    """`url` is a device path (`/dev/ttyUSB0`, better its stable `/dev/serial/by-id/...` name) or a pyserial URL
    (`socket://host:port` for an RS-485-to-Ethernet converter). Exclusive: two processes polling one bus would
    garble each other's frames."""
    return serial.serial_for_url(url, baudrate=baud, timeout=0, write_timeout=0, exclusive=True)


# -- the bus --------------------------------------------------------------------------------------------------


class ControlPanel(Protocol):
    """The part of libosdp's `osdp_sys.ControlPanel` the bus uses (the package has no type information). PDs are
    named by their offset in the list the panel was made with."""

    def refresh(self) -> None: ...

    def set_event_callback(self, callback: Callable[[int, dict[str, object]], int]) -> None: ...

    def submit_command(self, pd: int, command: OsdpCommand) -> bool: ...

    def check_capability(self, pd: int, capability: int) -> tuple[int, int]: ...

    def get_pd_id(self, pd: int) -> dict[str, int] | None: ...

    def disable_pd(self, pd: int) -> bool: ...

    def enable_pd(self, pd: int) -> bool: ...

    def is_pd_enabled(self, pd: int) -> bool: ...


def _discard(event: DeviceEvent) -> None:
    """The bus's own sink when only its readers are hosted: they get the port's faults themselves."""


@dataclass(slots=True)
class _Reader:
    spec: OsdpReaderSpec
    index: int  # the PD's offset in libosdp's list
    sink: EventSink | None = None
    online: bool | None = None  # None: not known yet in this session
    sc_active: bool = False
    sc_default_key: bool = False
    can: frozenset[int] = frozenset()  # the commands the reader reported it can do (`_NEEDS`)
    retry_at: float = 0.0
    retry_wait: float = RETRY_MIN_S
    kicking: bool = False  # disabled by the bus, to be enabled again: a retry
    insecure: bool = False  # online for libosdp, but not over a secure channel with its own key: offline for us

    def reset(self) -> None:
        self.online, self.sc_active, self.sc_default_key, self.kicking, self.insecure = None, False, False, False, False
        self.can, self.retry_wait = frozenset(), RETRY_MIN_S

    @property
    def secure(self) -> bool:
        return self.sc_active and not self.sc_default_key

    @property
    def where(self) -> str:
        return f"{self.spec.name} (address {self.spec.address})"


class OsdpBus:
    """One RS-485 bus with its readers (an `Adapter`).

    libosdp's refresh is driven from the event loop at `refresh_s`, not from a thread: the refresh is a few tens of
    microseconds of C on a non-blocking port, so the loop is never held up, and everything libosdp touches (its
    context, its callbacks, the sinks) stays on one thread with no lock and no hand-over. A thread would buy no
    parallelism (the channel callbacks are Python and need the GIL) and would need a lock around every libosdp
    call and a join on the way out. The cost is the loop's wake-ups; a loop stalled for longer than libosdp's
    200 ms reply timeout makes it retry, and it declares a reader offline only after 8 s of silence.
    """

    def __init__(
        self,
        port: str,
        readers: Sequence[OsdpReaderSpec],
        *,
        baud: int = 9600,
        name: str | None = None,
        refresh_s: float = REFRESH_S,
        log_level: int = LogLevel.Error,
    ) -> None:
        if not readers:
            raise ValueError(f"OSDP bus {port}: no readers")
        if baud not in OSDP_BAUDS:
            raise ValueError(f"OSDP bus {port}: {baud} baud is not an OSDP rate ({', '.join(map(str, OSDP_BAUDS))})")
        if not 0 < refresh_s <= 0.05:
            raise ValueError("refresh_s must be in (0, 0.05]: libosdp needs a refresh at least every 50 ms")
        for what, values in (("address", [str(r.address) for r in readers]), ("name", [r.name for r in readers])):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"OSDP bus {port}: two readers with the same {what}: {', '.join(twice)}")
        self.name = name or f"osdp:{port}"
        self.port, self.baud = port, baud
        self._refresh_s = refresh_s
        self._log_level = log_level
        self._readers = {spec.name: _Reader(spec, index) for index, spec in enumerate(readers)}
        self._by_index = list(self._readers.values())
        self._sink: EventSink = _discard
        self._cp: ControlPanel | None = None  # osdp_sys.ControlPanel while the port is open
        self._inbox: list[tuple[int, dict[str, object]]] = []
        self._running = False
        self._shared: asyncio.Task[None] | None = None  # the run started for the reader adapters
        self._users = 0

    # -- Adapter ----------------------------------------------------------------------------------------------

    async def run(self, sink: EventSink) -> None:
        """Open the port, run the protocol, reopen with backoff when the port goes away; until cancelled."""
        if self._running:
            raise RuntimeError(f"{self.name} is already running")
        self._running, self._sink = True, sink
        loop = asyncio.get_running_loop()
        wait, told = REOPEN_MIN_S, False
        try:
            while True:
                try:
                    port = await asyncio.to_thread(open_port, self.port, self.baud)
                except (serial.SerialException, OSError, ValueError) as exc:
                    if not told:  # one fault per outage, not one per attempt
                        self._link_event(Fault(f"cannot open {self.port}: {exc}"))
                        told = True
                    await asyncio.sleep(wait)
                    wait = min(REOPEN_MAX_S, wait * 2)
                    continue
                opened = loop.time()
                self._sink(Heartbeat(f"{self.port} open at {self.baud} baud"))
                try:
                    reason = await self._session(SerialChannel(port))
                finally:
                    self._cp = None
                    self._inbox.clear()
                    with contextlib.suppress(Exception):
                        port.close()
                self._link_event(Fault(f"serial link lost: {reason}"))
                told = True
                if loop.time() - opened >= STABLE_S:
                    wait = REOPEN_MIN_S
                await asyncio.sleep(wait)
                wait = min(REOPEN_MAX_S, wait * 2)
        finally:
            self._running, self._sink, self._cp = False, _discard, None

    async def send(self, command: DeviceCommand) -> None:
        """`command` to every reader of the bus."""
        for reader in self._by_index:
            self._deliver(reader, command)

    async def send_to(self, reader: str, feedback: Feedback) -> None:
        """`feedback` to one reader: what it can show of it (LED, buzzer, text on a display), if it is online and
        secure; otherwise it is dropped with a `Fault` (feedback is worthless late)."""
        self._deliver(self._reader(reader), feedback)

    def reader(self, name: str) -> OsdpReader:
        """One reader of the bus as an `Adapter` of its own."""
        return OsdpReader(self, self._reader(name).spec.name)

    # -- reader adapters --------------------------------------------------------------------------------------

    def _reader(self, name: str) -> _Reader:
        try:
            return self._readers[name]
        except KeyError:
            raise ValueError(f"{self.name} has no reader {name!r}") from None

    async def _serve(self, name: str, sink: EventSink) -> None:
        """Hand `name`'s events to `sink` until cancelled. Unless the bus is run directly, the first reader
        adapter starts it and the last one to leave stops it."""
        reader = self._reader(name)
        if reader.sink is not None:
            raise RuntimeError(f"reader {name} of {self.name} is already being run")
        reader.sink = sink
        self._users += 1
        try:
            if self._shared is None and not self._running:
                self._shared = asyncio.get_running_loop().create_task(self.run(_discard), name=self.name)
            if self._shared is not None:
                await asyncio.shield(self._shared)  # ends only by an error, which every reader then sees
            else:
                await asyncio.get_running_loop().create_future()  # the bus's own runner does the work
        finally:
            reader.sink = None
            self._users -= 1
            if self._users == 0 and self._shared is not None:
                task, self._shared = self._shared, None
                task.cancel()
                await asyncio.wait([task])

    # -- one session: the port is open ------------------------------------------------------------------------

    async def _session(self, channel: SerialChannel) -> str:
        """Run libosdp on an open port until the port fails; returns why."""
        osdp_sys.set_loglevel(self._log_level)  # process-wide in libosdp
        infos = [self._pd_info(reader, channel) for reader in self._by_index]
        cp: ControlPanel = osdp_sys.ControlPanel(infos)
        cp.set_event_callback(self._on_event)
        self._cp = cp
        for reader in self._by_index:
            reader.reset()
        loop = asyncio.get_running_loop()
        while True:
            cp.refresh()
            if channel.error is not None:
                return channel.error
            self._drain(cp, loop.time())
            self._supervise(cp, loop.time())
            await asyncio.sleep(self._refresh_s)

    @staticmethod
    def _pd_info(reader: _Reader, channel: SerialChannel) -> dict[str, object]:
        flags = [LibFlag.EnableNotification]
        if reader.spec.install_mode:
            # without EnforceSecure libosdp may use SCBK-D to send the reader its key (and would accept plain
            # text: `_Reader.secure` keeps those reads out)
            flags.append(LibFlag.InstallMode)
        else:
            flags.append(LibFlag.EnforceSecure)
        info = PDInfo(reader.spec.address, channel, scbk=reader.spec.scbk, name=reader.spec.name, flags=flags)
        result: dict[str, object] = info.get()
        return result

    def _on_event(self, pd: int, event: dict[str, object]) -> int:
        """libosdp's callback, inside `refresh`: only queued, so nothing can raise into the C code and nothing
        calls back into libosdp while it is mid-refresh."""
        self._inbox.append((pd, event))
        return 0

    def _drain(self, cp: ControlPanel, now: float) -> None:
        inbox, self._inbox = self._inbox, []
        for pd, event in inbox:
            if not 0 <= pd < len(self._by_index):
                continue
            reader = self._by_index[pd]
            kind = event.get("event")
            if kind == Event.CardRead:
                self._card(reader, event)
            elif kind == Event.Notification:
                self._notification(cp, reader, event, now)
            # key presses, status reports and manufacturer replies: nothing the agent uses

    def _card(self, reader: _Reader, event: Mapping[str, object]) -> None:
        if not (reader.online and reader.secure):
            self._emit(reader, Fault(f"card read refused: {reader.where} has no secure channel"))
            return
        try:
            read = card_read(event)
        except ValueError as exc:
            self._emit(reader, Fault(f"bad card read from {reader.where}: {exc}"))
            return
        self._emit(reader, read)

    def _notification(self, cp: ControlPanel, reader: _Reader, event: Mapping[str, object], now: float) -> None:
        kind, arg0, arg1 = event.get("type"), event.get("arg0"), event.get("arg1")
        if kind == EventNotification.SecureChannelStatus:
            reader.sc_active, reader.sc_default_key = bool(arg0), bool(arg1)
        elif kind == EventNotification.PeripheralDeviceStatus:
            if arg0:
                self._online(cp, reader)
            else:
                self._offline(cp, reader, now)
        elif kind == EventNotification.Command and isinstance(arg0, int):
            what = _COMMAND_NAMES.get(arg0, f"command {arg0}")
            if arg0 == Command.Keyset and arg1:
                self._emit(reader, Heartbeat(f"{reader.where}: its own key is installed; turn install_mode off"))
            elif not arg1:
                self._emit(reader, Fault(f"{reader.where} refused the {what} command"))

    def _online(self, cp: ControlPanel, reader: _Reader) -> None:
        reader.retry_wait, reader.kicking = RETRY_MIN_S, False
        if not reader.secure:
            # Only possible in install mode: the reader came up in plain text or on the public key. libosdp keeps
            # it and retries the secure channel itself; a success reports the reader online again.
            if not reader.insecure:
                self._emit(reader, Fault(f"offline: {reader.where} answers without a secure channel (check its key)"))
            reader.online, reader.insecure = False, True
            return
        reader.online, reader.insecure = True, False
        reader.can = frozenset(
            command for command, capability in _NEEDS.items() if cp.check_capability(reader.index, capability)[0] > 0
        )
        self._emit(reader, Heartbeat(f"{reader.where}: online, secure channel; {self._identity(cp, reader)}"))

    @staticmethod
    def _identity(cp: ControlPanel, reader: _Reader) -> str:
        pd_id = cp.get_pd_id(reader.index) or {}
        firmware = pd_id.get("firmware_version", 0) & 0xFFFFFF
        return (
            f"vendor {pd_id.get('vendor_code', 0) & 0xFFFFFF:06X} model {pd_id.get('model', 0)} "
            f"serial {pd_id.get('serial_number', 0) & 0xFFFFFFFF:08X} "
            f"firmware {firmware >> 16}.{(firmware >> 8) & 0xFF}.{firmware & 0xFF}"
        )

    def _offline(self, cp: ControlPanel, reader: _Reader, now: float) -> None:
        if reader.insecure:
            reader.insecure = False  # it was offline for us already; now it is gone for libosdp too
            reader.retry_at = now + reader.retry_wait
            return
        if reader.online is False:
            return  # already said: the bus's own disable, or one of its retries failing again
        was, reader.online = reader.online, False
        reader.can = frozenset()
        reader.retry_at = now + reader.retry_wait
        if was:
            self._emit(reader, Fault(f"offline: {reader.where} stopped answering"))
        else:
            self._emit(reader, Fault(f"offline: {reader.where} {self._why_not(cp, reader)}"))

    @staticmethod
    def _why_not(cp: ControlPanel, reader: _Reader) -> str:
        """A reader that never came online: it answered libosdp's ID request (so its identity is known) and then
        failed the secure channel, or it did not answer at all."""
        pd_id = cp.get_pd_id(reader.index) or {}
        if any(pd_id.get(key) for key in ("vendor_code", "serial_number", "model")):
            return "answers but refused the secure channel (wrong key, or a factory key: see install_mode)"
        return "does not answer (wiring, address, baud rate, power?)"

    def _supervise(self, cp: ControlPanel, now: float) -> None:
        """Ask offline readers again, with backoff: disable the PD, and once libosdp has taken the disable (not
        always on the next refresh: a request waits for the exchange in progress), enable it, which starts over
        with the reader at once. Each attempt schedules the next; coming online ends them."""
        for reader in self._by_index:
            if reader.kicking:
                if not cp.is_pd_enabled(reader.index) and cp.enable_pd(reader.index):
                    reader.kicking = False
                    reader.retry_wait = min(RETRY_MAX_S, reader.retry_wait * 2)
                    reader.retry_at = now + reader.retry_wait
            elif (
                reader.online is False
                and not reader.insecure
                and now >= reader.retry_at
                and cp.disable_pd(reader.index)
            ):
                reader.kicking = True

    # -- feedback ---------------------------------------------------------------------------------------------

    def _deliver(self, reader: _Reader, feedback: Feedback) -> None:
        cp = self._cp
        if cp is None or not reader.online or not reader.secure:
            self._emit(reader, Fault(f"feedback dropped: {reader.where} is offline"))
            return
        for command in feedback_commands(feedback):
            kind = command["command"]
            if isinstance(kind, int) and kind not in reader.can:
                continue  # the reader would NAK it, and a NAK takes it offline
            if not cp.submit_command(reader.index, command):
                what = _COMMAND_NAMES.get(int(kind), str(kind))
                self._emit(reader, Fault(f"feedback dropped: libosdp refused the {what} command for {reader.where}"))

    # -- where events go --------------------------------------------------------------------------------------

    def _emit(self, reader: _Reader, event: DeviceEvent) -> None:
        (reader.sink or self._sink)(event)

    def _link_event(self, event: DeviceEvent) -> None:
        """A port event: the bus's sink and every reader's, each sink once; readers start over afterwards."""
        sinks = {id(self._sink): self._sink}
        for reader in self._by_index:
            reader.reset()
            if reader.sink is not None:
                sinks.setdefault(id(reader.sink), reader.sink)
        for sink in sinks.values():
            sink(event)


class OsdpReader:
    """One reader of an `OsdpBus` as an `Adapter`: its sink gets that reader's events, plus the port's faults;
    `send` goes to that reader alone."""

    def __init__(self, bus: OsdpBus, name: str) -> None:
        self.name = name
        self.bus = bus

    async def run(self, sink: EventSink) -> None:
        await self.bus._serve(self.name, sink)

    async def send(self, command: DeviceCommand) -> None:
        await self.bus.send_to(self.name, command)


__all__ = [
    "OSDP_BAUDS",
    "OsdpBus",
    "OsdpCommand",
    "OsdpReader",
    "OsdpReaderSpec",
    "SerialChannel",
    "buzzer_command",
    "card_id",
    "card_read",
    "display_text",
    "feedback_commands",
    "led_command",
    "open_port",
    "parse_key",
    "text_command",
]
