"""Readers attached to the box: a real RDM6300 frame written to a pty -> the agent decides on the same path as an
MQTT reader -> the session exists -> the reader's feedback lines come back on the pty."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.store.members import MemberRecord
from firmware_bridges import buttonbox, rdm6300, wiegand
from firmware_bridges.device import Color, Feedback
from firmware_bridges.feedback import decode_line
from tests.conftest import ANA, BRUNO, PASSWORDS, Premises, PremisesFactory, make_config, members

UNKNOWN = "0A0F0F0F0F"


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[int, str]]:
    """(the device side's fd, the port path the agent opens), raw like a real serial line."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Device:
    """The reader's side of the wire: writes frames, reads the feedback lines the agent sends back."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    async def line(self, within: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while b"\n" not in self._buf:
            if loop.time() > deadline:
                raise TimeoutError(f"no feedback line within {within} s (have {self._buf!r})")
            with contextlib.suppress(BlockingIOError):
                self._buf += os.read(self.fd, 256)
            await asyncio.sleep(0.002)
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"


def reader(port: str, **kw: Any) -> dict[str, Any]:
    return {"id": "door-1", "kind": "rdm6300", "port": port, "court": "c1", "feedback": "line", **kw}


async def connected(premises: Premises) -> None:
    assert premises.agent.readers is not None
    for _ in range(200):
        adapter = premises.agent.readers.bridges.get("door-1")
        if adapter is not None and getattr(adapter.adapter, "connected", False):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the attached reader never opened its port")


async def test_a_card_on_an_attached_rdm6300_checks_in_and_the_reader_hears_the_answer(
    premises_factory: PremisesFactory,
) -> None:
    with pty_pair() as (fd, port):
        premises = await premises_factory(readers=[reader(port)])
        await connected(premises)
        device = Device(fd)
        frame = rdm6300.encode(bytes.fromhex(BRUNO))
        device.write(frame * 3)  # the reader repeats while the card stays: one read
        ack = decode_line(await device.line())
        assert ack.ack
        assert ack.color is Color.BLUE
        answer = decode_line(await device.line())
        assert answer.granted is True
        assert answer.color is Color.GREEN
        assert answer.text.startswith("Bem-vindo, Bruno")
        sessions = await premises.rows("SELECT member_id, court_id, opened_by FROM sessions WHERE ended_at IS NULL")
        assert sessions == [("m-bruno", "c1", "door-1")]
        assert premises.metric("scans_total", reader="door-1", result="granted", reason="ok") == 1
        with pytest.raises(TimeoutError):
            await device.line(within=0.3)  # the repeats were one presentation: no second decision


async def test_an_unknown_card_and_a_corrupt_frame_on_the_wire(premises_factory: PremisesFactory) -> None:
    with pty_pair() as (fd, port):
        premises = await premises_factory(readers=[reader(port)])
        await connected(premises)
        device = Device(fd)
        bad = bytearray(rdm6300.encode(bytes.fromhex(ANA)))
        bad[5] ^= 0x01  # a flipped bit: the checksum refuses it, nothing is decided
        device.write(bytes(bad) + b"\x00garbage\xff" + rdm6300.encode(bytes.fromhex(UNKNOWN)))
        assert decode_line(await device.line()).ack
        answer = decode_line(await device.line())
        assert (answer.granted, answer.color, answer.long_beep) == (False, Color.RED, True)
        assert premises.metric("scans_total", reader="door-1", result="denied", reason="unknown_card") == 1
        assert await premises.rows("SELECT COUNT(*) FROM sessions") == [(0,)]


async def test_the_reader_unplugged_is_offline_and_comes_back(premises_factory: PremisesFactory) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    port = os.ttyname(slave)
    os.close(slave)  # the agent holds its own descriptor of the line
    premises = await premises_factory(readers=[reader(port)])
    await connected(premises)
    bridges = premises.agent.readers.bridges  # type: ignore[union-attr]
    os.close(master)  # unplugged: the line is gone
    for _ in range(200):
        if not getattr(bridges["door-1"].adapter, "connected", True):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the reader did not notice it was unplugged")
    for _ in range(200):
        state = await premises.rows("SELECT 1")  # keep the loop busy with the store, as the agent is
        states = {s.device_id: s for s in premises.agent.presence.snapshot()}
        if states["door-1"].online is False:
            break
        await asyncio.sleep(0.02)
    assert state == [(1,)]
    assert states["door-1"].online is False


def test_reader_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs 'port'"):
        make_config(tmp_path, readers=[{"id": "r9", "kind": "rdm6300", "court": "c1"}])
    with pytest.raises(ConfigError, match="not a configured court"):
        make_config(tmp_path, readers=[reader("/dev/ttyUSB0", court="c9")])
    with pytest.raises(ConfigError, match="must be unique"):
        make_config(tmp_path, readers=[reader("/dev/ttyUSB0", id="r1")])  # r1 is a LAN reader already
    with pytest.raises(ConfigError, match="already used"):
        make_config(tmp_path, readers=[reader("/dev/ttyUSB0"), reader("/dev/ttyUSB0", id="door-2")])
    config = make_config(tmp_path, readers=[reader("/dev/ttyUSB0")])
    assert [d.id for d in config.all_devices if d.kind == "reader"][-1] == "door-1"


async def test_the_standalone_bridge_speaks_the_mqtt_contract(premises: Premises, tmp_path: Path) -> None:
    """`python -m firmware_bridges run` on "another host": the reader r1 of the LAN config, over the broker."""
    secret = tmp_path / "r1.password"
    secret.write_text(PASSWORDS["r1"])
    with pty_pair() as (fd, port):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "firmware_bridges",
            "run",
            "--kind=rdm6300",
            f"--port={port}",
            "--id=r1",
            "--court=c1",
            f"--broker={premises.host}:{premises.port}",
            f"--password-file={secret}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            line = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert line.strip() == b"broker: connected", line
            device = Device(fd)
            device.write(rdm6300.encode(bytes.fromhex(ANA)))
            assert decode_line(await device.line()).ack
            answer = decode_line(await device.line())
            assert (answer.granted, answer.text) == (True, "Bem-vindo, Ana! Créditos: 1")
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
    sessions = await premises.rows("SELECT member_id, opened_by FROM sessions WHERE ended_at IS NULL")
    assert sessions == [("m-ana", "r1")]


async def test_a_card_on_an_attached_nfc_reader_checks_in(premises_factory: PremisesFactory) -> None:
    """nfcpy's udp driver as the NFC field: a FeliCa card presented to the agent's own reader opens a session."""
    from tests.integration.test_nfc import IDM, EmulatedCard, felica, free_udp_port

    port = free_udp_port()
    records = [*members(), MemberRecord(member_id="m-gil", first_name="Gil", cards=[IDM], groups=["padel"])]
    reader = {"id": "nfc-1", "kind": "nfc", "path": f"udp:127.0.0.1:{port}", "court": "c1"}
    premises = await premises_factory(records=records, readers=[reader])
    card = EmulatedCard(port, felica(IDM))
    card.present()
    try:
        for _ in range(300):  # the udp driver waits 1 s per target and round: a read takes up to ~3 s
            sessions = await premises.rows("SELECT member_id, opened_by FROM sessions WHERE ended_at IS NULL")
            if sessions:
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(card.remove)
    assert sessions == [("m-gil", "nfc-1")]
    assert premises.metric("scans_total", reader="nfc-1", result="granted", reason="ok") == 1


async def test_a_press_on_an_attached_button_box_marks_a_highlight(premises_factory: PremisesFactory) -> None:
    with pty_pair() as (fd, port):
        box = {"id": "box-1", "kind": "buttonbox", "port": port, "court": "c1"}
        premises = await premises_factory(readers=[box])
        for _ in range(200):
            if premises.agent.readers and getattr(premises.agent.readers.bridges["box-1"].adapter, "connected", 0):
                break
            await asyncio.sleep(0.02)
        device = Device(fd)
        device.write(buttonbox.encode(buttonbox.HeartbeatFrame(0, "1.2.0", 5)))
        press = buttonbox.encode(buttonbox.PressFrame(1, 1))
        device.write(press + press)  # the box sends each frame twice: one press
        assert await device.line() == buttonbox.encode_feedback(Feedback.acknowledge()).rstrip(b"\r\n") + b"\r\n"
        marked = await device.line()  # no session on c1 yet: the moment is marked all the same, amber
        assert marked.startswith(b"$F,A,")
        with pytest.raises(TimeoutError):
            await device.line(within=0.3)
        async with premises.reader("r1") as r1:
            assert (await r1.tap(BRUNO)).payload["status"] == "granted"
        device.write(buttonbox.encode(buttonbox.PressFrame(2, 1)))
        await device.line()
        assert (await device.line()).startswith(b"$F,G,")
        rows = await premises.rows("SELECT court_id, button_id, session_id IS NOT NULL FROM highlights ORDER BY 3")
        assert rows == [("c1", "box-1", 0), ("c1", "box-1", 1)]
        states = {s.device_id: s for s in premises.agent.presence.snapshot()}
        assert states["box-1"].online


async def test_a_card_on_an_attached_osdp_reader_checks_in_and_lights_it_green(
    premises_factory: PremisesFactory, tmp_path: Path
) -> None:
    """A libosdp reader (the PD) on a pty: secure channel with the reader's key from the secrets, the card read
    decided by the agent, the session opened, the granted LED and buzzer commands back at the reader."""
    from osdp import Command, CommandLEDColor  # type: ignore[import-untyped]

    from tests.integration.test_osdp import FULL, KEY_1, FakeReader, Wire, wait_until

    wire = Wire(tmp_path / "ttyOSDP")
    pd = FakeReader(wire, 1, KEY_1, FULL)
    try:
        entry = {"id": "osdp-1", "kind": "osdp", "port": str(wire.link), "address": 1, "court": "c1"}
        secrets = tmp_path / "secrets.toml"
        secrets.write_text(f'osdp_keys = {{ osdp-1 = "{KEY_1.hex()}" }}\n')  # inline: more keys may follow
        secrets.chmod(0o600)
        premises = await premises_factory(readers=[entry], agent={"secrets_file": str(secrets)})
        await wait_until(lambda: premises.agent.presence.snapshot() and _online(premises, "osdp-1"), 10.0)
        pd.present(bytes.fromhex(BRUNO))
        # the ack's blue and chirp, then the answer's green and two beeps
        await wait_until(lambda: len(pd.received(Command.LED)) >= 2 and len(pd.received(Command.Buzzer)) >= 2, 10.0)
        colours = [c["on_color"] for c in pd.received(Command.LED)]
        assert colours[:2] == [CommandLEDColor.Blue, CommandLEDColor.Green]
        assert len(pd.received(Command.Buzzer)) == 2
        sessions = await premises.rows("SELECT member_id, opened_by FROM sessions WHERE ended_at IS NULL")
        assert sessions == [("m-bruno", "osdp-1")]
    finally:
        await pd.stop()
        wire.unplug()


def _online(premises: Premises, device_id: str) -> bool:
    return any(s.device_id == device_id and s.online for s in premises.agent.presence.snapshot())


@pytest.mark.parametrize(
    ("kind", "wire", "extra"),
    [
        ("wiegand", wiegand.encode_line(wiegand.WiegandCard(34, 0xB0B0, 0xC0C0)), {}),
        ("lines", b"ID: 04b0b0b0b0\r\n", {"format": "hex:prefix=ID:"}),
    ],
)
async def test_other_serial_readers_decide_the_same_way(
    premises_factory: PremisesFactory, kind: str, wire: bytes, extra: dict[str, Any]
) -> None:
    records = [*members(), MemberRecord(member_id="m-hana", first_name="Hana", cards=["B0B0C0C0"], groups=["padel"])]
    with pty_pair() as (fd, port):
        premises = await premises_factory(records=records, readers=[reader(port, kind=kind, **extra)])
        await connected(premises)
        device = Device(fd)
        device.write(b"noise\r\n" + wire)
        assert decode_line(await device.line()).ack
        assert decode_line(await device.line()).granted is True
    sessions = await premises.rows("SELECT member_id FROM sessions WHERE ended_at IS NULL")
    assert sessions == [("m-hana",)] if kind == "wiegand" else [("m-bruno",)]
