"""13.56 MHz NFC readers driven by nfcpy: a PN532 on a UART, a Sony RC-S380 or an ACS ACR122U on USB, or any other
reader nfcpy drives, named by an nfcpy path ("usb", "usb:054c:06c1", "tty:AMA0:pn532", "udp:host:port").

The reader is polled by a thread of its own with `ContactlessFrontend.sense`, one round over the configured targets
(106A, 106B, 212F) every `interval_s`. Polling the anticollision answers, rather than nfcpy's `connect`, is a
deliberate choice: `connect` activates each tag (NXP probes, reads) and then decides removal with a tag-type
presence check that some cards fail at once (a MIFARE Classic answers the Type 2 READ it uses only after
authentication), which would turn one tap into a stream of reads; it also checks its `terminate` callback only
between sense cycles (seconds, by default) and swallows the IOError of an unplugged reader. A sense round needs no
activation, works for every card type alike, surfaces IOError as itself, and the stop flag is looked at after every
round.

A card id is the UID (Type A), the PUPI (Type B) or the IDm (FeliCa), upper-case hex; `PresenceTracker` turns the
polls into one read per presentation. The reader is reopened with backoff when it goes away (a `Fault` says so,
once per outage and per change of reason, a `Heartbeat` says it is back); nothing here raises for the link's sake.

Feedback: of nfcpy's drivers only the ACR122U's drives an indicator (red and green LEDs and a buzzer, through the
reader's own LED-and-buzzer command). A PN532 board has nothing beyond its power LED, and nfcpy has no LED or buzzer
control for the RC-S380 (nor for the other PN53x and Sony readers); for those `send` is a no-op, and the feedback
has to come from elsewhere (a feedback board, `firmware_bridges.feedback`). The `Heartbeat` says which applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import nfc  # type: ignore[import-untyped]
import nfc.clf  # type: ignore[import-untyped]

from .device import CardRead, Color, DeviceCommand, DeviceEvent, EventSink, Fault, Feedback, Heartbeat

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("106A", "106B", "212F")  # ISO 14443-A (MIFARE, NTAG...), ISO 14443-B, FeliCa
TARGETS = ("106A", "212A", "424A", "106B", "212B", "424B", "848B", "212F", "424F")  # what nfcpy can sense at all
POLL_INTERVAL_S = 0.1  # between sense rounds: tap-to-read latency against RF duty and CPU on a Pi
RELEASE_AFTER = 2  # empty polls before a card counts as removed (one can be a glitch at the edge of the field)
REOPEN_MIN_S, REOPEN_MAX_S = 0.5, 10.0
STOP_WAIT_S = 5.0  # a sense round plus closing the reader; udp's simulated round alone takes up to 3 s
FEEDBACK_HOLD_S = 2.0  # how long a decision's colour stays on an ACR122U before its idle green comes back

PATH_KINDS = ("usb", "tty", "com", "udp")
# Kernel NFC drivers that bind the USB readers before libusb can: port100 (RC-S380), pn533_usb and pn533 (PN533
# boards, and the ACR122U's PN532 behind its USB bridge).
KERNEL_MODULES = ("port100", "pn533_usb", "pn533")
_BLACKLIST = (
    "blacklist the kernel modules port100 and pn533_usb (provisioning/setup.sh installs"
    " /etc/modprobe.d/club-agent-nfc.conf) and reboot"
)


def check_path(path: str) -> str:
    """`path` if nfcpy could take it: an empty path would open no reader at all, and no error either."""
    kind = path.split(":", 1)[0]
    if kind not in PATH_KINDS:
        raise ValueError(f"nfcpy path {path!r} must start with one of {', '.join(PATH_KINDS)} (e.g. tty:AMA0:pn532)")
    return path


def card_from_target(target: Any) -> CardRead | None:
    """The card an nfcpy `RemoteTarget` from `sense` answered for, or None for a peer-to-peer device (a phone in
    NFC-DEP mode answers with an id drawn afresh each session, so it is no card; nfcpy's own `connect` skips these
    too). Attributes nfcpy did not set read as None."""
    brty: str = target.brty or ""
    if brty.endswith("A"):
        if target.rid_res:  # Type 1 (Topaz): RID answers HR0 HR1 UID0-3
            return CardRead(bytes(target.rid_res[2:6]).hex().upper(), "iso14443a")
        if target.sel_res and target.sel_res[0] & 0x40:  # SEL_RES: NFC-DEP supported
            return None
        if target.sdd_res:
            return CardRead(bytes(target.sdd_res).hex().upper(), "iso14443a")
    elif brty.endswith("B") and target.sensb_res and len(target.sensb_res) >= 5:
        return CardRead(bytes(target.sensb_res[1:5]).hex().upper(), "iso14443b")  # 0x50, PUPI (4 bytes), ...
    elif brty.endswith("F") and target.sensf_res and len(target.sensf_res) >= 9:
        idm = bytes(target.sensf_res[1:9])  # 0x01, IDm (8 bytes), PMm (8 bytes), system code
        if idm.startswith(b"\x01\xfe"):  # NFCID2 of an NFC-DEP target
            return None
        return CardRead(idm.hex().upper(), "felica")
    return None


class PresenceTracker:
    """One read per presentation for a reader that is polled. A card is new when it was not in the field at the
    previous polls; it leaves after `release_after` polls without it. Cards are tracked each on its own, so two
    cards in the field that the anticollision picks in turn are still one read each, and a different card is new
    at once. Pure: the caller says what each poll saw."""

    def __init__(self, release_after: int = RELEASE_AFTER) -> None:
        if release_after < 1:
            raise ValueError("release_after must be at least 1")
        self._release_after = release_after
        self._misses: dict[str, int] = {}  # card in the field -> polls since it was last seen

    @property
    def present(self) -> frozenset[str]:
        return frozenset(self._misses)

    def observe(self, card_id: str | None) -> bool:
        """Record one poll (None: it saw no card); True if `card_id` starts a new presentation."""
        for other in list(self._misses):
            if other != card_id:
                self._misses[other] += 1
                if self._misses[other] >= self._release_after:
                    del self._misses[other]
        if card_id is None:
            return False
        new = card_id not in self._misses
        self._misses[card_id] = 0
        return new


def open_failure_reason(path: str, error: BaseException, loaded_modules: Collection[str] = ()) -> str:
    """What an operator should do about a reader that would not open. nfcpy reports a USB reader it found but could
    not claim (busy or no permission) as busy only when the path names it fully (usb:VID:PID or usb:BUS:DEV); with
    a partial path ("usb") it is just missing, so a loaded kernel NFC driver is named as the likely reason."""
    kind = path.split(":", 1)[0]
    code = getattr(error, "errno", None)
    head = f"cannot open {path}"
    if kind == "usb":
        if "libusb" in str(error):
            return f"{head}: libusb-1.0 is not installed (apt install libusb-1.0-0)"
        if code == errno.EBUSY:
            return (
                f"{head}: the reader is claimed by another driver (Device or resource busy): {_BLACKLIST};"
                " for an ACR122U also stop pcscd"
            )
        if code == errno.EACCES:
            return f"{head}: no permission on the USB device: add a udev rule for the agent's user (see python -m nfc)"
        if code == errno.ENODEV:
            claimed = [m for m in KERNEL_MODULES if m in loaded_modules]
            if claimed:
                modules = ", ".join(claimed)
                return f"{head}: no usable reader; kernel module(s) {modules} loaded, likely holding it: {_BLACKLIST}"
            return f"{head}: no supported reader found (unplugged, or no permission on /dev/bus/usb: see python -m nfc)"
    if kind == "tty":
        device = _tty_device(path)
        if code == errno.EACCES:
            return f"{head}: no permission on {device}: add the agent's user to the dialout group"
        if code == errno.ENODEV:
            return (
                f"{head}: no reader answered on {device}: check that it exists (enable_uart=1, serial console off),"
                " the wiring (reader TX to Pi RX and RX to TX) and the PN532's HSU/UART mode switches"
            )
    return f"{head}: {error}"


def lost_reason(path: str, error: BaseException) -> str:
    """A reader that was open and stopped answering: unplugged, or its UART or USB link broke."""
    if isinstance(error, ValueError | nfc.clf.UnsupportedTargetError):  # a target this reader cannot sense
        return f"offline: {path} cannot poll the configured targets ({error}): remove that target"
    return f"offline: {path} stopped answering ({str(error) or type(error).__name__}); reopening"


def _tty_device(path: str) -> str:
    parts = path.split(":")
    port = parts[1] if len(parts) > 1 else ""
    return f"/dev/tty{port}" if port else "the serial port"


def _loaded_kernel_modules() -> frozenset[str]:
    return frozenset(m for m in KERNEL_MODULES if os.path.isdir(f"/sys/module/{m}"))


class FeedbackKind(enum.StrEnum):
    NONE = "none"
    ACR122U = "acr122u"

    @property
    def description(self) -> str:
        if self is FeedbackKind.ACR122U:
            return "red/green LEDs and buzzer"
        return "none, no LED or buzzer nfcpy can drive"


def feedback_kind(driver_module: str) -> FeedbackKind:
    """What the nfcpy driver (its module name, e.g. "nfc.clf.acr122") lets the agent show."""
    return FeedbackKind.ACR122U if driver_module == "nfc.clf.acr122" else FeedbackKind.NONE


# ACR122U "Bi-Color LED and Buzzer Control": FF 00 40 <LED state> 04 <T1> <T2> <repetitions> <buzzer link>.
# LED state bits: 0 red on, 1 green on, 2 update red, 3 update green (4-7 blinking, unused). T1/T2 in 100 ms;
# buzzer link 01 sounds the buzzer during T1. The reader answers after the whole sequence has played.
_ACR122_LEDS = {Color.OFF: 0x0C, Color.GREEN: 0x0E, Color.RED: 0x0D, Color.AMBER: 0x0F}  # no blue LED: unchanged
ACR122_IDLE = bytes.fromhex("FF00400E0400000000")  # nfcpy's idle state for the ACR122U: green only, silent


def acr122_command(feedback: Feedback) -> tuple[bytes, float]:
    """The ACR122U command that shows `feedback`, and how long it plays (seconds). Blue (the local ack) has no LED
    here, so the LEDs stay as they are and only the buzzer chirps; a refusal's long beep wins over short ones."""
    leds = _ACR122_LEDS.get(feedback.color, 0x00)
    if feedback.long_beep:
        t1, t2, times = 5, 1, 1
    elif feedback.beeps > 0:
        t1, t2, times = 1, 1, min(feedback.beeps, 9)
    else:
        t1 = t2 = times = 0
    buzzer = 0x01 if times else 0x00
    return bytes([0xFF, 0x00, 0x40, leds, 0x04, t1, t2, times, buzzer]), times * (t1 + t2) / 10


class Frontend(Protocol):
    """What the reader thread uses of `nfc.ContactlessFrontend`."""

    device: Any

    def sense(self, *targets: Any, **options: Any) -> Any: ...

    def close(self) -> None: ...


def open_frontend(path: str) -> Frontend:
    """nfcpy's frontend on `path`; raises OSError (ENODEV for no reader) when it cannot be opened."""
    frontend: Frontend = nfc.ContactlessFrontend(path)
    return frontend


class _LinkLost(Exception):
    """The open reader failed: carries the reason to report."""


@dataclass
class NfcReader:
    """One NFC reader. `path` is an nfcpy path; `targets` the technologies polled each round (a reader polls
    faster with fewer); `open_frontend` is how a path becomes an open reader (nfcpy's by default)."""

    name: str
    path: str
    targets: tuple[str, ...] = DEFAULT_TARGETS
    interval_s: float = POLL_INTERVAL_S
    release_after: int = RELEASE_AFTER
    reopen_min_s: float = REOPEN_MIN_S
    reopen_max_s: float = REOPEN_MAX_S
    stop_wait_s: float = STOP_WAIT_S
    feedback_hold_s: float = FEEDBACK_HOLD_S
    open_frontend: Callable[[str], Frontend] = open_frontend
    connected: bool = field(default=False, init=False)
    feedback: FeedbackKind = field(default=FeedbackKind.NONE, init=False)
    _sink: EventSink | None = field(default=None, init=False, repr=False)
    _pending: Feedback | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_path(self.path)
        if not self.targets:
            raise ValueError("an NFC reader needs at least one target to poll")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:  # now, not as a fault from the thread later
            raise ValueError(f"unknown NFC target(s) {', '.join(unknown)}: use {', '.join(TARGETS)}")
        PresenceTracker(self.release_after)

    async def run(self, sink: EventSink) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"NFC reader {self.name} is already running")
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        finished: asyncio.Future[None] = loop.create_future()

        def emit(event: DeviceEvent) -> None:
            try:
                loop.call_soon_threadsafe(sink, event)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                stop.set()

        def serve() -> None:
            try:
                self._serve(emit, stop)
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, finished)

        self._sink = sink
        self._wake.clear()
        thread = threading.Thread(target=serve, name=f"nfc-{self.name}", daemon=True)
        self._thread = thread
        thread.start()
        try:
            await asyncio.shield(finished)  # the thread ends only when told to, or when the loop goes away
        finally:
            stop.set()
            self._wake.set()
            if not finished.done():
                try:
                    await asyncio.wait_for(asyncio.shield(finished), self.stop_wait_s)
                except TimeoutError:  # a driver call that would not return: the daemon thread dies with the process
                    log.warning("NFC reader %s did not stop within %.1f s", self.name, self.stop_wait_s)
            self._sink = None

    async def send(self, command: DeviceCommand) -> None:
        """Queue the command for the reader thread, which plays it between two polls (the reader is not thread
        safe); a newer command replaces one not yet played, since late feedback is worthless. A no-op for a
        reader without LED or buzzer; dropped with a `Fault` while the reader is away."""
        if not self.connected:
            if self._sink is not None:
                self._sink(Fault(f"feedback dropped: {self.path} is not connected"))
            return
        if self.feedback is FeedbackKind.NONE:
            return
        with self._lock:
            self._pending = command
        self._wake.set()

    # The reader thread from here on: blocking calls are fine, events leave through `emit` only.

    def _serve(self, emit: Callable[[DeviceEvent], None], stop: threading.Event) -> None:
        tracker = PresenceTracker(self.release_after)  # kept across reopenings: a USB glitch is not a new tap
        delay = self.reopen_min_s
        told: str | None = None
        while not stop.is_set():
            try:
                frontend = self.open_frontend(self.path)
            except Exception as exc:  # whatever nfcpy raises, the answer is a fault and another try later
                reason = open_failure_reason(self.path, exc, _loaded_kernel_modules())
                if reason != told:  # once per outage and per new reason, not once per retry
                    emit(Fault(reason))
                    told = reason
                stop.wait(delay)
                delay = min(self.reopen_max_s, delay * 2)
                continue
            try:
                self.feedback = feedback_kind(type(frontend.device).__module__)
                self.connected = True
                emit(Heartbeat(f"{frontend.device}; feedback: {self.feedback.description}"))
                told, delay = None, self.reopen_min_s
                self._poll(frontend, tracker, emit, stop)
            except Exception as exc:  # _LinkLost from the poll; anything else from a driver is the same to us
                told = str(exc) if isinstance(exc, _LinkLost) else lost_reason(self.path, exc)
                emit(Fault(told))
                stop.wait(delay)
            finally:
                self.connected = False
                with self._lock:
                    self._pending = None
                with contextlib.suppress(Exception):
                    frontend.close()

    def _poll(
        self, frontend: Frontend, tracker: PresenceTracker, emit: Callable[[DeviceEvent], None], stop: threading.Event
    ) -> None:
        reset_at: float | None = None
        while not stop.is_set():
            try:
                reset_at = self._play_feedback(frontend, reset_at)
                found = frontend.sense(*[nfc.clf.RemoteTarget(t) for t in self.targets], iterations=1, interval=0)
            except Exception as exc:
                raise _LinkLost(lost_reason(self.path, exc)) from exc
            read = card_from_target(found) if found is not None else None
            if tracker.observe(read.card_id if read else None) and read is not None:
                emit(read)
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _play_feedback(self, frontend: Frontend, reset_at: float | None) -> float | None:
        """Play the pending command, or put the LEDs back to idle once a decision has been shown long enough;
        returns when that is due."""
        with self._lock:
            command, self._pending = self._pending, None
        if self.feedback is not FeedbackKind.ACR122U:
            return None
        chipset = frontend.device.chipset
        if command is not None:
            data, plays_s = acr122_command(command)
            chipset.ccid_xfr_block(bytearray(data), timeout=plays_s + 0.2)
            if command.color is not Color.BLUE:
                return time.monotonic() + max(plays_s, self.feedback_hold_s)
            return reset_at
        if reset_at is not None and time.monotonic() >= reset_at:
            chipset.ccid_xfr_block(bytearray(ACR122_IDLE))
            return None
        return reset_at


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
