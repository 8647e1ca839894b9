"""`firmware_bridges.osdp` against real libosdp readers: each reader is a libosdp PeripheralDevice with its own
refresh thread, on the far end of a pty the bus opens as its serial port.

The pty stands in for the RS-485 pair and a USB dongle: the bus opens it by a stable name (a symlink, as udev's
/dev/serial/by-id names are), and unplugging closes the pty, which pyserial sees exactly as a vanished USB
device (reads fail with "device reports readiness to read but returned no data"). Every reader hears every byte
the bus sends, as on a multi-drop pair; only the addressed reader answers.

The pure helpers (key parsing, feedback mapping, card ids) are tested here too, without IO.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import statistics
import threading
import time
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from osdp import (  # type: ignore[import-untyped]
    Capability,
    CardFormat,
    Channel,
    Command,
    CommandLEDColor,
    Event,
    LogLevel,
    PDCapabilities,
    PDInfo,
    PeripheralDevice,
)

from firmware_bridges.device import CardRead, Color, DeviceEvent, Fault, Feedback, Heartbeat
from firmware_bridges.osdp import (
    SCBK_DEFAULT,
    OsdpBus,
    OsdpReaderSpec,
    buzzer_command,
    card_id,
    card_read,
    display_text,
    feedback_commands,
    led_command,
    parse_key,
    text_command,
)

E = TypeVar("E", bound=DeviceEvent)

KEY_1 = bytes.fromhex("8f3a61d2c45b07e9a1f0362bd84c5e17")
KEY_2 = bytes.fromhex("2c9be0714fa35d86e1b7c0392a6f4d58")
FULL = [(Capability.LEDControl, 1, 1), (Capability.AudibleControl, 1, 1), (Capability.CardDataFormat, 1, 1)]
LED_ONLY = [(Capability.LEDControl, 1, 1), (Capability.CardDataFormat, 1, 1)]

ONLINE_S = 6.0  # secure channel set-up takes ~0.2 s; a retried reader comes back within the retry backoff
CARD_S = 2.0
OFFLINE_S = 12.0  # libosdp declares a silent reader offline after ~8 s of probing


# -- the wire and the readers -------------------------------------------------------------------------------------


class Wire:
    """A pty whose slave end the bus opens as `link`; a pump thread hands every byte the bus writes to each
    attached reader."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        link.symlink_to(os.ttyname(self.slave))
        self._lock = threading.Lock()
        self._inboxes: list[bytearray] = []
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._run, name="osdp-test-wire", daemon=True)
        self._pump.start()
        self.plugged = True

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.01)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except (BlockingIOError, OSError):  # EIO while nobody has the slave end open
                time.sleep(0.01)
                continue
            with self._lock:
                for inbox in self._inboxes:
                    inbox += data

    def attach(self) -> bytearray:
        inbox = bytearray()
        with self._lock:
            self._inboxes.append(inbox)
        return inbox

    def detach(self, inbox: bytearray) -> None:
        with self._lock:
            self._inboxes = [other for other in self._inboxes if other is not inbox]

    def take(self, inbox: bytearray, max_bytes: int) -> bytes:
        with self._lock:
            data = bytes(inbox[:max_bytes])
            del inbox[:max_bytes]
        return data

    def put(self, data: bytes) -> int:
        try:
            return os.write(self.master, data)
        except OSError:
            return 0

    def unplug(self) -> None:
        """The dongle goes: both ends close and its device name disappears."""
        if not self.plugged:
            return
        self.plugged = False
        self._stop.set()
        self._pump.join(2)
        os.close(self.master)
        os.close(self.slave)
        self.link.unlink(missing_ok=True)


class ReaderEnd(Channel):  # type: ignore[misc]
    def __init__(self, wire: Wire) -> None:
        super().__init__()
        self.wire = wire
        self.inbox = wire.attach()

    def read(self, max_bytes: int) -> bytes:
        return self.wire.take(self.inbox, max_bytes)

    def write(self, buf: bytes) -> int:
        return self.wire.put(buf)

    def flush(self) -> None:
        self.wire.take(self.inbox, len(self.inbox))


class FakeReader:
    """An OSDP reader: libosdp's PD with its own refresh thread; `commands` is what the bus asked of it."""

    def __init__(self, wire: Wire, address: int, key: bytes | None, capabilities: list[tuple[int, int, int]]):
        self.commands: list[dict[str, Any]] = []
        self._end = ReaderEnd(wire)
        info = PDInfo(address, self._end, scbk=key)
        self._pd = PeripheralDevice(
            info, PDCapabilities(capabilities), log_level=LogLevel.Error, command_handler=self._command
        )
        self._pd.start()
        self.running = True

    def _command(self, command: dict[str, Any]) -> tuple[int, None]:
        self.commands.append(command)
        return 0, None

    def present(self, data: bytes) -> float:
        """A card in the field; returns when (monotonic) the reader queued the read."""
        at = time.monotonic()
        event = {"event": Event.CardRead, "reader_no": 0, "format": CardFormat.Unspecified, "direction": 0}
        assert self._pd.submit_event({**event, "length": len(data) * 8, "data": data}) is not False
        return at

    async def stop(self) -> None:
        """Power off: its refresh thread stops (joined off the loop, which runs the bus)."""
        if self.running:
            self.running = False
            await asyncio.to_thread(self._pd.stop)
            self._end.wire.detach(self._end.inbox)

    def holds(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.commands) >= count

    def received(self, kind: int, since: int = 0) -> list[dict[str, Any]]:
        return [c for c in self.commands[since:] if c.get("command") == kind]


class Recorder:
    """A sink that keeps what it is given, with when it got it."""

    def __init__(self) -> None:
        self.events: list[tuple[float, DeviceEvent]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: DeviceEvent) -> None:
        self.events.append((time.monotonic(), event))
        self._changed.set()

    def of(self, kind: type[E], since: int = 0) -> list[E]:
        return [event for _, event in self.events[since:] if isinstance(event, kind)]

    async def wait_for(
        self, match: Callable[[DeviceEvent], bool], within: float, since: int = 0
    ) -> tuple[float, DeviceEvent]:
        async with asyncio.timeout(within):
            while True:
                for at, event in self.events[since:]:
                    if match(event):
                        return at, event
                self._changed.clear()
                await self._changed.wait()

    async def online(self, reader: str, since: int = 0, within: float = ONLINE_S) -> Heartbeat:
        _, event = await self.wait_for(lambda e: isinstance(e, Heartbeat) and f"{reader} " in e.detail, within, since)
        assert isinstance(event, Heartbeat)
        return event

    async def fault(self, prefix: str, within: float, since: int = 0) -> Fault:
        _, event = await self.wait_for(lambda e: isinstance(e, Fault) and e.reason.startswith(prefix), within, since)
        assert isinstance(event, Fault)
        return event


async def wait_until(check: Callable[[], bool], within: float, step: float = 0.01) -> None:
    """For what a reader's own thread records (`FakeReader.commands`): looked at every `step`, a bounded number
    of times."""
    for _ in range(int(within / step) + 1):
        if check():
            return
        await asyncio.sleep(step)
    raise TimeoutError(f"not within {within} s")


@contextlib.asynccontextmanager
async def running(*runs: Any) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run adapters (`(adapter, sink)` pairs) for the duration of the block; they must still be running at its
    end (nothing in `run` may raise for the link's sake)."""
    tasks = [asyncio.create_task(adapter.run(sink)) for adapter, sink in runs]
    try:
        yield tasks
        await asyncio.sleep(0)
        for task in tasks:
            assert not task.done(), task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "ttyOSDP"


@pytest.fixture
def wires() -> Iterator[list[Wire]]:
    made: list[Wire] = []
    yield made
    for wire in made:
        wire.unplug()


@pytest.fixture
async def readers() -> AsyncIterator[list[FakeReader]]:
    made: list[FakeReader] = []
    yield made
    for reader in made:
        await reader.stop()


def spec(name: str, address: int, key: bytes, **kwargs: Any) -> OsdpReaderSpec:
    return OsdpReaderSpec(name, address, key.hex(), **kwargs)


# -- against libosdp readers --------------------------------------------------------------------------------------


async def test_card_reads_arrive_over_the_secure_channel(
    link: Path, wires: list[Wire], readers: list[FakeReader], capsys: pytest.CaptureFixture[str]
) -> None:
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, KEY_1, FULL))
    bus = OsdpBus(str(link), [spec("r1", 1, KEY_1)])
    sink = Recorder()
    async with running((bus, sink)):
        online = await sink.online("r1")
        assert "secure channel" in online.detail
        assert sink.of(Heartbeat)[0] == Heartbeat(f"{link} open at 9600 baud")
        latencies = []
        for n in range(7):
            data = bytes([0x04, 0x5A, 0xC3, n, 0x7F, 0x80, 0x01])
            since = len(sink.events)
            presented = reader.present(data)
            arrived, read = await sink.wait_for(lambda e: isinstance(e, CardRead), CARD_S, since)
            assert read == CardRead(data.hex().upper(), "osdp")
            latencies.append(arrived - presented)
            await asyncio.sleep(0.05)
        assert sink.of(Fault) == []
    median_ms = statistics.median(latencies) * 1000
    with capsys.disabled():
        print(
            f"\nOSDP card read latency, reader event to CardRead at the sink: median {median_ms:.0f} ms, "
            f"min {min(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms over {len(latencies)} reads"
        )
    assert median_ms < 500


async def test_feedback_reaches_the_reader_as_led_and_buzzer(
    link: Path, wires: list[Wire], readers: list[FakeReader]
) -> None:
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, KEY_1, FULL))
    bus = OsdpBus(str(link), [spec("r1", 1, KEY_1)])
    adapter = bus.reader("r1")
    sink = Recorder()
    async with running((adapter, sink)):
        await sink.online("r1")
        expected = [
            (Feedback.acknowledge(), CommandLEDColor.Blue, {"on_count": 1, "off_count": 1, "rep_count": 1}),
            (Feedback.decision(True, "Bem-vinda, Ana"), CommandLEDColor.Green, {"on_count": 1, "rep_count": 2}),
            (Feedback.decision(False), CommandLEDColor.Red, {"on_count": 10, "rep_count": 1}),
        ]
        for feedback, colour, beeps in expected:
            since = len(reader.commands)
            await adapter.send(feedback)
            await wait_until(reader.holds(since + 2), CARD_S)
            (led,) = reader.received(Command.LED, since)
            (buzzer,) = reader.received(Command.Buzzer, since)
            assert led == led_command(feedback)
            assert led["on_color"] == colour
            assert led["temporary"]
            assert led["timer_count"] > 0
            assert buzzer == buzzer_command(feedback)
            assert beeps.items() <= buzzer.items()
            assert reader.received(Command.Text, since) == []  # no display on this reader
        await asyncio.sleep(0.3)
        assert sink.of(Fault) == []


async def test_two_readers_share_the_bus(link: Path, wires: list[Wire], readers: list[FakeReader]) -> None:
    """Multi-drop: each reader's reads reach its own sink; feedback goes to one reader only, and only as far as
    it can take it (a buzzer command to a reader without a buzzer would be NAKed, taking it offline)."""
    wires.append(wire := Wire(link))
    readers.append(front := FakeReader(wire, 1, KEY_1, FULL))
    readers.append(back := FakeReader(wire, 2, KEY_2, LED_ONLY))
    bus = OsdpBus(str(link), [spec("front", 1, KEY_1), spec("back", 2, KEY_2)])
    front_sink, back_sink = Recorder(), Recorder()
    async with running((bus.reader("front"), front_sink), (bus.reader("back"), back_sink)):
        await front_sink.online("front")
        await back_sink.online("back")
        back.present(b"\xbb\x02")
        front.present(b"\xaa\x01")
        await front_sink.wait_for(lambda e: e == CardRead("AA01", "osdp"), CARD_S)
        await back_sink.wait_for(lambda e: e == CardRead("BB02", "osdp"), CARD_S)
        assert front_sink.of(CardRead) == [CardRead("AA01", "osdp")]
        assert back_sink.of(CardRead) == [CardRead("BB02", "osdp")]

        await bus.send_to("back", Feedback.decision(False))
        await wait_until(lambda: bool(back.received(Command.LED)), CARD_S)
        await asyncio.sleep(1.0)  # time for a NAK to take it offline, if a buzzer command had gone out
        assert back.received(Command.LED)[0]["on_color"] == CommandLEDColor.Red
        assert back.received(Command.Buzzer) == []
        assert front.commands == []
        assert back_sink.of(Fault) == []
        assert front_sink.of(Fault) == []
        back.present(b"\xbb\x03")
        await back_sink.wait_for(lambda e: e == CardRead("BB03", "osdp"), CARD_S)


async def test_wrong_key_never_reads_and_says_why(link: Path, wires: list[Wire], readers: list[FakeReader]) -> None:
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, KEY_2, FULL))
    bus = OsdpBus(str(link), [spec("r1", 1, KEY_1)])
    sink = Recorder()
    async with running((bus, sink)):
        fault = await sink.fault("offline: r1 (address 1)", ONLINE_S)
        assert "refused the secure channel" in fault.reason
        assert KEY_1.hex() not in fault.reason.lower()
        assert KEY_2.hex() not in fault.reason.lower()
        for n in range(3):
            reader.present(bytes([0xDE, 0xAD, n]))
        await asyncio.sleep(3.5)  # the bus asks again after 1 s and 2 s: each attempt fails the same way
        assert sink.of(CardRead) == []
        assert [e for e in sink.of(Heartbeat) if "r1 " in e.detail] == []
        assert len([e for e in sink.of(Fault) if e.reason.startswith("offline")]) == 1


async def test_reader_offline_then_back(link: Path, wires: list[Wire], readers: list[FakeReader]) -> None:
    """Power off: offline after libosdp's probing; power on: online again well before libosdp's own 300 s."""
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, KEY_1, FULL))
    bus = OsdpBus(str(link), [spec("r1", 1, KEY_1)])
    sink = Recorder()
    async with running((bus.reader("r1"), sink)):
        await sink.online("r1")
        await reader.stop()
        since = len(sink.events)
        fault = await sink.fault("offline:", OFFLINE_S, since)
        assert fault == Fault("offline: r1 (address 1) stopped answering")
        await bus.send_to("r1", Feedback.acknowledge())
        await sink.fault("feedback dropped: r1 (address 1) is offline", 1.0, since)

        since = len(sink.events)
        readers.append(reader := FakeReader(wire, 1, KEY_1, FULL))  # powered on again: a fresh reader
        await sink.online("r1", since)
        reader.present(b"\x01\x02\x03\x04")
        await sink.wait_for(lambda e: e == CardRead("01020304", "osdp"), CARD_S, since)


async def test_port_missing_unplugged_and_back(link: Path, wires: list[Wire], readers: list[FakeReader]) -> None:
    """No dongle at start, then plugged, unplugged and plugged again: `run` rides through all of it."""
    bus = OsdpBus(str(link), [spec("r1", 1, KEY_1)], baud=115200)
    bus_sink, sink = Recorder(), Recorder()
    async with running((bus, bus_sink), (bus.reader("r1"), sink)):
        await sink.fault(f"cannot open {link}", 2.0)
        await bus_sink.fault(f"cannot open {link}", 2.0)

        wires.append(wire := Wire(link))
        readers.append(FakeReader(wire, 1, KEY_1, FULL))
        await sink.online("r1", within=10.0)
        await bus_sink.wait_for(lambda e: e == Heartbeat(f"{link} open at 115200 baud"), 1.0)

        since = len(sink.events)
        wire.unplug()
        fault = await sink.fault("serial link lost", 2.0, since)
        assert "[Errno" in fault.reason or "device" in fault.reason
        await asyncio.sleep(1.0)
        assert len(sink.of(Fault, since)) == 1  # one fault per outage, not one per reopen attempt

        since = len(sink.events)
        wires.append(wire := Wire(link))
        readers.append(reader := FakeReader(wire, 1, KEY_1, FULL))
        await sink.online("r1", since, within=10.0)
        reader.present(b"\x0a\x0b\x0c")
        await sink.wait_for(lambda e: e == CardRead("0A0B0C", "osdp"), CARD_S, since)


async def test_install_mode_sends_the_reader_its_key(link: Path, wires: list[Wire], readers: list[FakeReader]) -> None:
    """A factory-fresh reader (no key of its own: SCBK-D) gets its key in install mode, and then works with
    install mode off, as after commissioning."""
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, None, FULL))
    installing = OsdpBus(str(link), [spec("r1", 1, KEY_1, install_mode=True)])
    sink = Recorder()
    async with running((installing, sink)):
        await sink.wait_for(lambda e: isinstance(e, Heartbeat) and "key is installed" in e.detail, ONLINE_S)
        await sink.online("r1")
    (keyset,) = reader.received(Command.Keyset)
    assert keyset["data"] == KEY_1

    sink = Recorder()
    async with running((OsdpBus(str(link), [spec("r1", 1, KEY_1)]), sink)):
        await sink.online("r1")
        reader.present(b"\x42\x42")
        await sink.wait_for(lambda e: e == CardRead("4242", "osdp"), CARD_S)


async def test_reader_without_the_key_stays_out_when_not_installing(
    link: Path, wires: list[Wire], readers: list[FakeReader]
) -> None:
    """Outside install mode a factory-fresh reader is refused: the public key is never accepted."""
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, None, FULL))
    sink = Recorder()
    async with running((OsdpBus(str(link), [spec("r1", 1, KEY_1)]), sink)):
        await sink.fault("offline: r1", ONLINE_S)
        reader.present(b"\x99")
        await asyncio.sleep(1.5)
        assert sink.of(CardRead) == []
        assert reader.received(Command.Keyset) == []


async def test_install_mode_never_reads_in_plain_text(link: Path, wires: list[Wire], readers: list[FakeReader]) -> None:
    """Install mode lets libosdp try the public key and then plain text (a reader keyed by someone else): the
    reader is reported offline and its reads are refused."""
    wires.append(wire := Wire(link))
    readers.append(reader := FakeReader(wire, 1, KEY_2, FULL))
    sink = Recorder()
    async with running((OsdpBus(str(link), [spec("r1", 1, KEY_1, install_mode=True)]), sink)):
        await sink.fault("offline: r1 (address 1) answers without a secure channel", ONLINE_S)
        reader.present(b"\x66\x66")
        await sink.fault("card read refused: r1 (address 1) has no secure channel", CARD_S)
        assert sink.of(CardRead) == []
        assert [e for e in sink.of(Heartbeat) if "r1 " in e.detail] == []


# -- pure helpers -------------------------------------------------------------------------------------------------


def test_parse_key_accepts_hex_in_any_case_with_spaces() -> None:
    assert parse_key(KEY_1.hex()) == KEY_1
    assert parse_key(f"  {KEY_1.hex().upper()}\n") == KEY_1
    assert parse_key(f"0x{KEY_1.hex()}") == KEY_1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8f3a61d2c45b07e9a1f0362bd84c5e", "32 hex digits (16 bytes); this one has 30 characters"),
        ("8f3a61d2c45b07e9a1f0362bd84c5e1799", "this one has 34 characters"),
        ("8f3a61d2c45b07e9a1f0362bd84c5eZZ", "only the hex digits"),
        ("8f3a61d2-45b07e9a1f0362bd84c5e17", "only the hex digits"),
        ("", "this one has 0 characters"),
        (SCBK_DEFAULT.hex(), "SCBK-D, the published install key"),
        ("00" * 16, "one byte repeated"),
        ("ff" * 16, "one byte repeated"),
    ],
)
def test_parse_key_says_what_is_wrong_without_repeating_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        parse_key(text)
    if len(text) > 4:
        assert text not in str(caught.value)


def test_parse_key_refuses_what_is_not_text() -> None:
    with pytest.raises(ValueError, match="not bytes"):
        parse_key(KEY_1)  # type: ignore[arg-type]


def test_reader_spec_validates_and_hides_its_key() -> None:
    good = spec("r1", 1, KEY_1)
    assert good.scbk == KEY_1
    assert KEY_1.hex() not in repr(good)
    with pytest.raises(ValueError, match="OSDP reader r1: address 127 is not in 0-126"):
        spec("r1", 127, KEY_1)
    with pytest.raises(ValueError, match="OSDP reader r2: an OSDP key is 32 hex digits"):
        OsdpReaderSpec("r2", 2, "abc")
    with pytest.raises(ValueError, match="needs a name"):
        spec("", 1, KEY_1)


def test_bus_refuses_a_bad_configuration() -> None:
    with pytest.raises(ValueError, match="same address: 1"):
        OsdpBus("/dev/null", [spec("a", 1, KEY_1), spec("b", 1, KEY_2)])
    with pytest.raises(ValueError, match="same name: a"):
        OsdpBus("/dev/null", [spec("a", 1, KEY_1), spec("a", 2, KEY_2)])
    with pytest.raises(ValueError, match="4800 baud is not an OSDP rate"):
        OsdpBus("/dev/null", [spec("a", 1, KEY_1)], baud=4800)
    with pytest.raises(ValueError, match="no readers"):
        OsdpBus("/dev/null", [])
    with pytest.raises(ValueError, match="has no reader 'z'"):
        OsdpBus("/dev/null", [spec("a", 1, KEY_1)]).reader("z")


def test_feedback_maps_to_temporary_led_and_buzzer() -> None:
    ack, granted, denied = Feedback.acknowledge(), Feedback.decision(True), Feedback.decision(False)
    assert feedback_commands(ack) == [
        {
            "command": Command.LED,
            "reader": 0,
            "led_number": 0,
            "temporary": True,
            "control_code": 2,
            "on_color": CommandLEDColor.Blue,
            "off_color": CommandLEDColor.Black,
            "on_count": 3,
            "off_count": 0,
            "timer_count": 3,
        },
        {"command": Command.Buzzer, "reader": 0, "control_code": 2, "on_count": 1, "off_count": 1, "rep_count": 1},
    ]
    led, buzzer = feedback_commands(granted)
    assert (led["on_color"], led["timer_count"], buzzer["rep_count"]) == (CommandLEDColor.Green, 20, 2)
    led, buzzer = feedback_commands(denied)
    assert (led["on_color"], led["timer_count"]) == (CommandLEDColor.Red, 20)
    assert (buzzer["on_count"], buzzer["rep_count"]) == (10, 1)


def test_feedback_edge_cases() -> None:
    off = led_command(Feedback(Color.OFF))
    assert (off["control_code"], off["on_color"]) == (1, CommandLEDColor.Black)  # cancel the temporary colour
    assert buzzer_command(Feedback(Color.GREEN)) is None  # silence is no command (rep_count 0 means for ever)
    many = buzzer_command(Feedback(Color.GREEN, beeps=40))
    assert many is not None
    assert many["rep_count"] == 9
    both = buzzer_command(Feedback(Color.RED, beeps=2, long_beep=True))
    assert both is not None
    assert (both["on_count"], both["rep_count"]) == (10, 1)
    amber = led_command(Feedback(Color.AMBER, beeps=1))
    assert (amber["on_color"], amber["timer_count"]) == (CommandLEDColor.Amber, 10)
    text = text_command(Feedback.decision(True, "Olá, João!\tBem-vindo à quadra 3 do clube"))
    assert text is not None
    assert text["data"] == "Ola, Joao! Bem-vindo a quadra 3"
    assert [c["command"] for c in feedback_commands(Feedback.decision(True, "Oi"))] == [
        Command.LED,
        Command.Buzzer,
        Command.Text,
    ]
    assert text_command(Feedback.decision(True, "  \n")) is None


def test_display_text_is_ascii_and_capped() -> None:
    assert display_text("Ñandú Ângela Gonçalves") == "Nandu Angela Goncalves"
    assert len(display_text("x" * 100)) == 32
    assert display_text("日本") == ""


def test_card_ids() -> None:
    assert card_id(b"\x04\xa1\xb2\xc3") == "04A1B2C3"
    assert card_read({"event": Event.CardRead, "data": b"\x00\x7f"}) == CardRead("007F", "osdp")
    with pytest.raises(ValueError, match="without data"):
        card_id(b"")
    with pytest.raises(ValueError, match="not bytes"):
        card_read({"event": Event.CardRead, "data": "04A1"})
