"""NFC readers (firmware_bridges/nfc.py) without hardware: nfcpy's udp driver puts a reader and an emulated card in
one process, the card listening on its own UDP port in a thread, so the adapter polls real nfcpy code end to end.

The udp driver waits up to 1 s for each target's answer, so one poll round without a card takes about 3 s with the
default targets (106A, 106B, 212F). The tests therefore wait on the polls themselves (a wrapper records each
`sense` result) rather than on the clock, and only the pure helpers run without any IO at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nfc  # type: ignore[import-untyped]
import pytest
from nfc.clf import LocalTarget, RemoteTarget  # type: ignore[import-untyped]

from firmware_bridges.device import CardRead, Color, DeviceEvent, Fault, Feedback, Heartbeat
from firmware_bridges.nfc import (
    ACR122_IDLE,
    FeedbackKind,
    Frontend,
    NfcReader,
    PresenceTracker,
    acr122_command,
    card_from_target,
    check_path,
    feedback_kind,
    lost_reason,
    open_failure_reason,
    open_frontend,
)

UID_4 = "5A3C9E21"  # a single-size UID that is neither NXP's (04...) nor random (08...)
UID_7 = "05A1B2C3D4E5F6"  # double size, Infineon's manufacturer byte
IDM = "012E4CD1A2B3C4D5"  # FeliCa IDm; 01FE... would be an NFC-DEP device, skipped by design
PMM = "0120220427674EFF"
UDP_ROUND_S = 3.0  # one udp poll round with no card: three targets, 1 s each


# --- pure helpers -----------------------------------------------------------------------------------------------


def test_card_ids_of_each_technology() -> None:
    type_a = RemoteTarget("106A", sens_res=b"\x44\x00", sel_res=b"\x00", sdd_res=bytes.fromhex(UID_7))
    assert card_from_target(type_a) == CardRead(UID_7, "iso14443a")
    topaz = RemoteTarget("106A", sens_res=b"\x00\x0c", rid_res=bytes.fromhex("1148DEADBEEF"))
    assert card_from_target(topaz) == CardRead("DEADBEEF", "iso14443a")
    type_b = RemoteTarget("106B", sensb_res=bytes.fromhex("50E5DD3DC900000011008185"))
    assert card_from_target(type_b) == CardRead("E5DD3DC9", "iso14443b")
    felica = RemoteTarget("212F", sensf_res=bytes.fromhex("01" + IDM + PMM + "0003"))
    assert card_from_target(felica) == CardRead(IDM, "felica")


def test_peer_to_peer_devices_are_not_cards() -> None:
    phone_a = RemoteTarget("106A", sens_res=b"\x04\x00", sel_res=b"\x60", sdd_res=bytes.fromhex("08796BEB"))
    phone_f = RemoteTarget("212F", sensf_res=bytes.fromhex("0101FE1444EFB88FD50000000000000000"))
    assert card_from_target(phone_a) is None
    assert card_from_target(phone_f) is None
    assert card_from_target(RemoteTarget("212F", sensf_res=b"\x01\x02")) is None  # truncated: nothing to trust


def test_presence_one_read_per_presentation() -> None:
    seen = PresenceTracker(release_after=2)
    polls = [UID_4, UID_4, None, UID_4, None, None, UID_4, IDM, UID_4, None, None, None]
    assert [seen.observe(p) for p in polls] == [
        True,  # the tap
        False,  # still there
        False,  # one empty poll: a glitch at the edge of the field, not a removal
        False,
        False,
        False,  # gone after two empty polls...
        True,  # ...so this is a new tap
        True,  # a different card is new at once
        False,  # two cards the anticollision picks in turn: still one read each
        False,
        False,
        False,
    ]
    assert seen.present == frozenset()
    with pytest.raises(ValueError, match="at least 1"):
        PresenceTracker(0)


def test_open_failure_reasons_say_what_to_do() -> None:
    busy = open_failure_reason("usb:054c:06c1", OSError(errno.EBUSY, "Device or resource busy"))
    assert "port100" in busy
    assert "pn533_usb" in busy
    assert "blacklist" in busy
    hidden = open_failure_reason("usb", OSError(errno.ENODEV, "No such device"), {"port100"})
    assert "port100 loaded" in hidden
    assert "blacklist" in hidden
    assert "blacklist" not in open_failure_reason("usb", OSError(errno.ENODEV, "No such device"))
    no_libusb = FileNotFoundError(errno.ENOENT, "cannot find a suitable libusb-1.0: [...]")
    assert "apt install libusb-1.0-0" in open_failure_reason("usb", no_libusb)
    assert "udev" in open_failure_reason("usb:072f:2200", PermissionError(errno.EACCES, "Permission denied"))
    uart = open_failure_reason("tty:AMA0:pn532", OSError(errno.ENODEV, "No such device"))
    assert "/dev/ttyAMA0" in uart
    assert "enable_uart=1" in uart
    assert "dialout" in open_failure_reason("tty:AMA0:pn532", PermissionError(errno.EACCES, "Permission denied"))
    dns = open_failure_reason("udp:nowhere.invalid:5", socket.gaierror(-2, "Name or service not known"))
    assert dns == "cannot open udp:nowhere.invalid:5: [Errno -2] Name or service not known"
    # the registry shows a reader offline on these prefixes (firmware_bridges/bridge.py)
    assert all(r.startswith("cannot open") for r in (busy, hidden, uart, dns))
    assert lost_reason("usb", OSError(errno.ENODEV, "No such device")).startswith("offline: usb stopped answering")
    assert "remove that target" in lost_reason("usb", ValueError("unsupported bitrate 106B"))
    assert lost_reason("usb", TimeoutError()) == "offline: usb stopped answering (TimeoutError); reopening"


def test_acr122u_commands() -> None:
    assert feedback_kind("nfc.clf.acr122") is FeedbackKind.ACR122U
    assert feedback_kind("nfc.clf.rcs380") is FeedbackKind.NONE
    assert feedback_kind("nfc.clf.pn532") is FeedbackKind.NONE
    # the ack: no blue LED, so the LEDs stay as they are and the buzzer chirps once
    assert acr122_command(Feedback.acknowledge()) == (bytes.fromhex("FF00400004 01010101"), 0.2)
    assert acr122_command(Feedback.decision(True)) == (bytes.fromhex("FF00400E04 01010201"), 0.4)
    assert acr122_command(Feedback.decision(False)) == (bytes.fromhex("FF00400D04 05010101"), 0.6)
    assert acr122_command(Feedback(Color.AMBER)) == (bytes.fromhex("FF00400F04 00000000"), 0.0)
    assert acr122_command(Feedback(Color.OFF, beeps=40))[0][-2] == 9  # capped
    assert bytes.fromhex("FF00400E0400000000") == ACR122_IDLE


def test_paths_and_targets_are_checked_up_front() -> None:
    assert check_path("tty:AMA0:pn532") == "tty:AMA0:pn532"
    for bad in ("", "AMA0", "/dev/ttyAMA0", "serial:AMA0"):
        with pytest.raises(ValueError, match="must start with"):
            NfcReader("r1", bad)
    with pytest.raises(ValueError, match="unknown NFC target"):
        NfcReader("r1", "usb", targets=("106X",))
    with pytest.raises(ValueError, match="at least one target"):
        NfcReader("r1", "usb", targets=())


# --- the udp rig ------------------------------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))  # where the udp driver's listening side binds
        port: int = probe.getsockname()[1]
        return port


def type_a(uid: str) -> Callable[[], Any]:
    sens_res = "4400" if len(uid) == 14 else "0400"  # UID size bits: double or single
    return lambda: LocalTarget(
        "106A", sens_res=bytes.fromhex(sens_res), sdd_res=bytes.fromhex(uid), sel_res=bytes.fromhex("00")
    )


def felica(idm: str) -> Callable[[], Any]:
    return lambda: LocalTarget("212F", sensf_res=bytearray.fromhex("01" + idm + PMM + "0003"))


class EmulatedCard:
    """A card in the field of the udp reader on `port`. While presented, a thread listens as the card again and
    again, so it answers every poll; removing it closes its socket, and polls go unanswered as for a card taken
    away. One card at a time per port: the listening side binds it."""

    LISTEN_S = 0.5

    def __init__(self, port: int, target: Callable[[], Any]) -> None:
        self._path = f"udp:127.0.0.1:{port}"
        self._target = target
        self._in_field = threading.Event()
        self._thread: threading.Thread | None = None

    def present(self) -> float:
        """Put the card in the field; returns when (monotonic)."""
        assert self._thread is None, "already presented"
        self._in_field.set()
        self._thread = threading.Thread(target=self._listen, name="emulated-card", daemon=True)
        self._thread.start()
        return time.monotonic()

    def remove(self) -> None:
        assert self._thread is not None, "not presented"
        self._in_field.clear()
        self._thread.join(2 * self.LISTEN_S + 1)
        assert not self._thread.is_alive()
        self._thread = None

    def _listen(self) -> None:
        clf = nfc.ContactlessFrontend(self._path)
        try:
            while self._in_field.is_set():
                clf.listen(self._target(), self.LISTEN_S)
        finally:
            clf.close()


class Observed:
    """A frontend whose every poll is recorded (when it returned, and what it saw), and which can be unplugged:
    then it raises what nfcpy raises for a USB reader that went away."""

    def __init__(self, inner: Frontend, rig: Rig) -> None:
        self._inner = inner
        self._rig = rig
        self.device = inner.device

    def sense(self, *targets: Any, **options: Any) -> Any:
        if not self._rig.plugged.is_set():
            raise OSError(errno.ENODEV, "No such device")
        found = self._inner.sense(*targets, **options)
        self._rig.polls.append((time.monotonic(), card_from_target(found) if found is not None else None))
        return found

    def close(self) -> None:
        self._inner.close()


class Rig:
    """Opens the real udp frontend through `Observed`, counting attempts; opening fails while unplugged."""

    def __init__(self, plugged: bool = True) -> None:
        self.port = free_udp_port()
        self.path = f"udp:127.0.0.1:{self.port}"
        self.plugged = threading.Event()
        if plugged:
            self.plugged.set()
        self.attempts = 0
        self.polls: list[tuple[float, CardRead | None]] = []

    def open(self, path: str) -> Frontend:
        self.attempts += 1
        if not self.plugged.is_set():
            raise OSError(errno.ENODEV, "No such device")
        return Observed(open_frontend(path), self)

    def reader(self, **options: Any) -> NfcReader:
        return NfcReader("r1", self.path, open_frontend=self.open, **options)

    def card(self, target: Callable[[], Any]) -> EmulatedCard:
        return EmulatedCard(self.port, target)

    async def polls_after(self, since: float, n: int, card: str | None, within: float = 20.0) -> None:
        """Until `n` polls that returned after `since` in a row saw `card` (None: no card)."""

        def done() -> bool:
            tail = [read for at, read in self.polls if at > since][-n:]
            return len(tail) == n and all((r.card_id if r else None) == card for r in tail)

        await until(done, within)


Stamped = list[tuple[float, DeviceEvent]]


@contextlib.asynccontextmanager
async def running(reader: NfcReader) -> AsyncIterator[Stamped]:
    """The reader's `run` as a task; yields its events, each with when it reached the sink."""
    events: Stamped = []
    task = asyncio.create_task(reader.run(lambda event: events.append((time.monotonic(), event))))
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], within: float) -> None:
    """Polls `condition` (state other threads change) until it holds; fails the test after `within` seconds."""
    for _ in range(int(within / 0.02) + 1):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within} s")


def reads(events: Stamped) -> list[CardRead]:
    return [e for _, e in events if isinstance(e, CardRead)]


def read_count_is(events: Stamped, n: int) -> bool:
    return len(reads(events)) == n


def of(kind: type[DeviceEvent], events: Stamped) -> list[Any]:
    return [e for _, e in events if isinstance(e, kind)]


def nfc_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nfc-")]


# --- the adapter over udp ---------------------------------------------------------------------------------------


@pytest.mark.deadline(60)
async def test_one_read_while_in_the_field_and_another_after_removal() -> None:
    rig = Rig()
    card = rig.card(type_a(UID_4))
    async with running(rig.reader()) as events:
        await until(lambda: bool(of(Heartbeat, events)), 5)
        assert "feedback: none" in of(Heartbeat, events)[0].detail
        card.present()
        await until(lambda: bool(reads(events)), UDP_ROUND_S + 2)
        first = time.monotonic()
        await rig.polls_after(first, 8, UID_4)  # kept in the field: many polls see it, one read
        assert reads(events) == [CardRead(UID_4, "iso14443a")]

        card.remove()
        await rig.polls_after(time.monotonic(), 2, None, within=2 * UDP_ROUND_S + 5)  # gone for the reader
        card.present()
        await until(lambda: len(reads(events)) == 2, UDP_ROUND_S + 2)
        await rig.polls_after(time.monotonic(), 3, UID_4)
        assert reads(events) == [CardRead(UID_4, "iso14443a")] * 2
        card.remove()
    assert not of(Fault, events)


@pytest.mark.deadline(60)
async def test_two_different_cards_are_two_reads() -> None:
    rig = Rig()
    async with running(rig.reader()) as events:
        first = rig.card(type_a(UID_7))
        first.present()
        await until(lambda: bool(reads(events)), UDP_ROUND_S + 2)
        first.remove()
        second = rig.card(felica(IDM))  # at once: a different card needs no removal in between
        second.present()
        await until(lambda: len(reads(events)) == 2, 2 * UDP_ROUND_S + 2)
        await rig.polls_after(time.monotonic(), 2, IDM)
        second.remove()
    assert reads(events) == [CardRead(UID_7, "iso14443a"), CardRead(IDM, "felica")]


@pytest.mark.deadline(60)
async def test_stopping_ends_the_thread_in_bounded_time() -> None:
    rig = Rig()
    reader = rig.reader()
    async with running(reader) as events:
        await until(lambda: bool(rig.polls), UDP_ROUND_S + 2)  # mid-way through an empty round now
        assert len(nfc_threads()) == 1
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    assert not nfc_threads()
    assert took < UDP_ROUND_S + 1  # at most the round under way, well within stop_wait_s
    assert of(Heartbeat, events)
    assert not reader.connected

    # stopping while it waits to reopen an absent reader is immediate
    away = NfcReader("r2", "tty:AMA99:pn532", reopen_min_s=30)
    async with running(away) as events:
        await until(lambda: bool(of(Fault, events)), 5)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1
    assert not nfc_threads()


@pytest.mark.deadline(30)
async def test_an_absent_reader_faults_once_and_keeps_retrying_with_backoff() -> None:
    attempts = 0

    def counting(path: str) -> Frontend:
        nonlocal attempts
        attempts += 1
        return open_frontend(path)  # nfcpy itself, on a serial port that does not exist

    reader = NfcReader("r1", "tty:AMA99:pn532", open_frontend=counting, reopen_min_s=0.05, reopen_max_s=0.2)
    async with running(reader) as events:
        started = time.monotonic()
        await until(lambda: attempts >= 5, 5)
        await reader.send(Feedback.acknowledge())
        elapsed = time.monotonic() - started
    faults = of(Fault, events)
    assert faults[0].reason.startswith("cannot open tty:AMA99:pn532: no reader answered on /dev/ttyAMA99")
    assert [f.reason for f in faults[1:]] == ["feedback dropped: tty:AMA99:pn532 is not connected"]  # one per outage
    assert not of(Heartbeat, events)
    assert attempts <= 2 + elapsed / 0.2 + 1  # the backoff bounds the retries


@pytest.mark.deadline(90)
async def test_an_unplugged_reader_comes_back_and_a_card_left_in_the_field_is_not_read_twice() -> None:
    rig = Rig(plugged=False)
    card = rig.card(type_a(UID_4))
    card.present()
    async with running(rig.reader(reopen_min_s=0.05, reopen_max_s=0.2)) as events:
        await until(lambda: rig.attempts >= 3, 5)
        assert [e for _, e in events] == [Fault(f"cannot open {rig.path}: [Errno 19] No such device")]

        rig.plugged.set()  # plugged in: it opens and reads the card already there
        await until(lambda: bool(reads(events)), UDP_ROUND_S + 2)
        assert len(of(Heartbeat, events)) == 1

        rig.plugged.clear()  # unplugged mid-poll
        await until(lambda: len(of(Fault, events)) >= 3, 5)
        lost, absent = (f.reason for f in of(Fault, events)[1:3])
        assert lost == f"offline: {rig.path} stopped answering ([Errno 19] No such device); reopening"
        assert absent.startswith(f"cannot open {rig.path}")

        rig.plugged.set()
        await until(lambda: len(of(Heartbeat, events)) == 2, 5)
        await rig.polls_after(time.monotonic(), 3, UID_4)
        assert reads(events) == [CardRead(UID_4, "iso14443a")]  # the same tap: a USB glitch is no new read
        card.remove()


@pytest.mark.deadline(90)
async def test_tap_to_read_latency(record_property: Callable[[str, object], None]) -> None:
    """Card presented -> CardRead at the sink, with the default targets, the card presented at spread-out points of
    the reader's poll round (a round starts just after the empty poll that saw the last card go). Over udp the
    driver's 1 s wait per target dominates: a poll sent before the card listened is lost, and the card is found at
    the next round. The adapter's own share is from the poll that found the card to the sink."""
    rig = Rig()
    card = rig.card(type_a(UID_4))
    tap_to_read: list[float] = []
    poll_to_sink: list[float] = []
    async with running(rig.reader(release_after=1)) as events:
        await until(lambda: bool(rig.polls), UDP_ROUND_S + 2)  # a first empty round is over
        for n, phase in enumerate((0.4, 1.2, 2.0, 2.8), start=1):
            await asyncio.sleep(phase)
            presented = card.present()
            await until(functools.partial(read_count_is, events, n), UDP_ROUND_S + 2)
            arrived = [at for at, e in events if isinstance(e, CardRead)][-1]
            found = next(at for at, read in rig.polls if at > presented and read is not None)
            tap_to_read.append(arrived - presented)
            poll_to_sink.append(arrived - found)
            card.remove()
            await rig.polls_after(time.monotonic(), 1, None, within=UDP_ROUND_S + 5)
    median, adapter = statistics.median(tap_to_read), statistics.median(poll_to_sink)
    record_property("tap_to_read_median_s", round(median, 3))
    record_property("poll_to_sink_median_ms", round(adapter * 1000, 3))
    print(f"\ntap -> CardRead over udp: median {median:.3f} s of {[round(x, 3) for x in tap_to_read]}")
    print(f"poll found the card -> CardRead at the sink: median {adapter * 1000:.3f} ms")
    assert max(tap_to_read) < UDP_ROUND_S + 1  # never more than one round (plus the poll interval) late
    assert adapter < 0.1


# --- feedback ---------------------------------------------------------------------------------------------------


class FakeAcr122Chipset:
    def __init__(self) -> None:
        self.sent: list[tuple[float, bytes]] = []

    def ccid_xfr_block(self, data: bytearray, timeout: float = 0.1) -> bytearray:
        self.sent.append((time.monotonic(), bytes(data)))
        return bytearray(b"\x90\x00")


class FakeAcr122:
    """Stands in for nfcpy's ACR122U driver object (the adapter knows it by its module)."""

    __module__ = "nfc.clf.acr122"

    def __init__(self) -> None:
        self.chipset = FakeAcr122Chipset()

    def __str__(self) -> str:
        return "ACS ACR122U PN532v1.6 at usb:001:004"


class NoCardFrontend:
    def __init__(self, device: Any) -> None:
        self.device = device

    def sense(self, *targets: Any, **options: Any) -> Any:
        time.sleep(0.02)
        return None

    def close(self) -> None:
        pass


@pytest.mark.deadline(30)
async def test_acr122u_feedback_is_played_between_polls_then_back_to_idle() -> None:
    device = FakeAcr122()
    reader = NfcReader("r1", "usb:072f:2200", open_frontend=lambda path: NoCardFrontend(device), feedback_hold_s=0.3)
    sent = device.chipset.sent
    async with running(reader) as events:
        await until(lambda: reader.connected, 5)
        assert of(Heartbeat, events) == [
            Heartbeat("ACS ACR122U PN532v1.6 at usb:001:004; feedback: red/green LEDs and buzzer")
        ]
        await reader.send(Feedback.acknowledge())
        await until(lambda: len(sent) == 1, 2)
        await reader.send(Feedback.decision(False))
        await until(lambda: len(sent) == 3, 3)
    assert [data for _, data in sent] == [
        bytes.fromhex("FF0040000401010101"),  # ack: chirp, LEDs unchanged
        bytes.fromhex("FF00400D0405010101"),  # refused: red, long beep
        ACR122_IDLE,  # and back to idle green once shown long enough
    ]
    assert sent[2][0] - sent[1][0] >= 0.3
    assert not of(Fault, events)


@pytest.mark.deadline(30)
async def test_feedback_on_a_reader_without_leds_is_a_no_op() -> None:
    rig = Rig()
    reader = rig.reader(targets=("106A",))  # a 1 s round over udp: a quicker stop
    async with running(reader) as events:
        await until(lambda: reader.connected, 5)
        await reader.send(Feedback.decision(True))
        await asyncio.sleep(0.1)
    assert reader.feedback is FeedbackKind.NONE
    assert [type(e) for _, e in events] == [Heartbeat]
