"""Serial readers and button boxes: a pyserial port read by a thread of its own, decoded on the event loop.

At 9600 baud a frame takes 15 ms on the wire, so a blocking `read` in a thread that hands each chunk to the loop
(`call_soon_threadsafe`) costs nothing measurable and keeps pyserial's plain, well-trodden API; decoding stays on
the loop, so decoders stay pure and single-threaded. The port is reopened with backoff when the USB adapter goes
away (a `Fault` says so, a `Heartbeat` that it is back); nothing here raises for the link's sake.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import serial

from . import buttonbox, lines, rdm6300, wiegand
from .device import CardRead, DeviceCommand, DeviceEvent, EventSink, Fault, Heartbeat
from .errors import FrameError
from .feedback import encode_line

READ_TIMEOUT_S = 0.05  # how often the reader thread looks at its stop flag
REOPEN_MIN_S, REOPEN_MAX_S = 0.2, 5.0
STOP_WAIT_S = 2.0


class Decoder(Protocol):
    """Bytes in any chunking -> device events; `now` is monotonic seconds (repeat suppression, timeouts)."""

    def feed(self, chunk: bytes, now: float) -> list[DeviceEvent]: ...


def _fault(error: FrameError) -> Fault:
    return Fault(f"bad frame: {error}")


class _CardStream(Protocol):
    def feed(self, chunk: bytes) -> Sequence[object]: ...


class PresentedCards:
    """A card stream that cannot tell a card held to the reader from a new tap (RDM6300 repeats its frame, line
    readers their line): one read per presentation, a new one after `hold_s` without the card."""

    def __init__(self, stream: _CardStream, to_read: Callable[[object], CardRead], hold_s: float = 0.5) -> None:
        self._stream, self._to_read = stream, to_read
        self._repeats = rdm6300.RepeatFilter(hold_s)

    def feed(self, chunk: bytes, now: float) -> list[DeviceEvent]:
        out: list[DeviceEvent] = []
        for item in self._stream.feed(chunk):
            if isinstance(item, FrameError):
                out.append(_fault(item))
                continue
            read = self._to_read(item)
            if self._repeats.accept(read.card_id, now):
                out.append(read)
        return out


def rdm6300_decoder() -> PresentedCards:
    def to_read(tag: object) -> CardRead:
        assert isinstance(tag, rdm6300.Em4100Tag)
        return CardRead(tag.card_id, "em4100")

    return PresentedCards(rdm6300.Rdm6300Stream(), to_read)


def wiegand_decoder() -> PresentedCards:
    def to_read(card: object) -> CardRead:
        assert isinstance(card, wiegand.WiegandCard)
        return CardRead(card.card_id, f"wiegand{card.bits}")

    return PresentedCards(wiegand.WiegandLineStream(), to_read)


def lines_decoder(fmt: lines.LineFormat) -> PresentedCards:
    def to_read(read: object) -> CardRead:
        assert isinstance(read, CardRead)
        return read

    return PresentedCards(lines.LineStream(fmt), to_read)


class ButtonBoxDecoder:
    """The button box's line protocol (buttonbox.py); its sequence numbers drop the copies it sends."""

    def __init__(self) -> None:
        self._stream = buttonbox.ButtonBoxStream(buttonbox.SequenceFilter())

    def feed(self, chunk: bytes, now: float) -> list[DeviceEvent]:
        return [_fault(item) if isinstance(item, FrameError) else item for item in self._stream.feed(chunk, now)]


Encoder = Callable[[DeviceCommand], bytes]


@dataclass
class SerialAdapter:
    """One serial device. `url` is a device path or any pyserial URL (`loop://`, `socket://`...)."""

    name: str
    url: str
    decoder: Decoder
    baud: int = 9600
    encoder: Encoder | None = encode_line  # None: the device has no feedback channel
    _port: serial.Serial | None = field(default=None, init=False, repr=False)
    _write_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    connected: bool = field(default=False, init=False)

    async def run(self, sink: EventSink) -> None:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        lost = asyncio.Event()

        def deliver(chunk: bytes) -> None:
            for event in self.decoder.feed(chunk, time.monotonic()):
                sink(event)

        def reader(port: serial.Serial) -> None:
            try:
                while not stop.is_set():
                    data = port.read(1)  # returns after READ_TIMEOUT_S with nothing
                    if data:
                        waiting = port.in_waiting
                        if waiting:
                            data += port.read(waiting)
                        loop.call_soon_threadsafe(deliver, data)
            except (serial.SerialException, OSError) as exc:
                if not stop.is_set():
                    loop.call_soon_threadsafe(sink, Fault(f"serial link lost: {exc}"))
            finally:
                if not stop.is_set():
                    loop.call_soon_threadsafe(lost.set)

        wait = REOPEN_MIN_S
        told_down = False
        try:
            while True:
                try:
                    port = await asyncio.to_thread(self._open)
                except (serial.SerialException, OSError, ValueError) as exc:
                    if not told_down:  # one fault per outage, not one per retry
                        sink(Fault(f"cannot open {self.url}: {exc}"))
                        told_down = True
                    await asyncio.sleep(wait)
                    wait = min(REOPEN_MAX_S, wait * 2)
                    continue
                wait, told_down = REOPEN_MIN_S, False
                self._port, self.connected = port, True
                sink(Heartbeat(f"connected to {self.url}"))
                lost.clear()
                thread = threading.Thread(target=reader, args=(port,), name=f"serial-{self.name}", daemon=True)
                thread.start()
                try:
                    await lost.wait()
                finally:
                    stop.set()
                    self._port, self.connected = None, False
                    await asyncio.to_thread(thread.join, STOP_WAIT_S)
                    with contextlib.suppress(serial.SerialException, OSError):
                        port.close()
                    stop.clear()
                told_down = True
                await asyncio.sleep(wait)
        finally:
            stop.set()

    def _open(self) -> serial.Serial:
        return serial.serial_for_url(self.url, baudrate=self.baud, timeout=READ_TIMEOUT_S, write_timeout=0.5)

    async def send(self, command: DeviceCommand) -> None:
        """Write the command's bytes if the port is open; feedback that cannot go now is dropped (late is
        worthless), and a failed write shows up as the reader thread's fault."""
        port, encoder = self._port, self.encoder
        if port is None or encoder is None:
            return
        data = encoder(command)
        await asyncio.to_thread(self._write, port, data)

    def _write(self, port: serial.Serial, data: bytes) -> None:
        with self._write_lock, contextlib.suppress(serial.SerialException, OSError):
            port.write(data)
