"""Every reader kind builds from its description, and a bad one is refused with a message that says what to fix."""

from __future__ import annotations

import asyncio

import pytest

from firmware_bridges.device import DeviceEvent, Fault
from firmware_bridges.keywedge import KeyWedgeReader
from firmware_bridges.registry import KINDS, ReaderSpec, build, build_all

KEY = "8f3a61d2c45b07e9a1f0362bd84c5e17"


def test_every_kind_builds() -> None:
    specs = {
        "rdm6300": ReaderSpec("a", "rdm6300", port="loop://"),
        "wiegand": ReaderSpec("b", "wiegand", port="loop://"),
        "lines": ReaderSpec("c", "lines", port="loop://", format="decimal:4"),
        "buttonbox": ReaderSpec("d", "buttonbox", port="loop://"),
        "nfc": ReaderSpec("e", "nfc", path="udp:127.0.0.1:9"),
        "osdp": ReaderSpec("f", "osdp", port="loop://", key=KEY),
        "keywedge": ReaderSpec("g", "keywedge", path="/dev/input/event99"),
    }
    assert set(specs) == set(KINDS)
    for spec in specs.values():
        assert build(spec) is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ReaderSpec("a", "rdm6300"), "needs a serial port"),
        (ReaderSpec("a", "lines", port="loop://", format="octal"), "octal"),
        (ReaderSpec("a", "nfc"), "nfcpy path"),
        (ReaderSpec("a", "keywedge"), "input device"),
        (ReaderSpec("a", "osdp", port="loop://"), "osdp_keys.a"),
        (ReaderSpec("a", "osdp", port="loop://", key="00"), "32 hex"),
        (ReaderSpec("a", "magstripe", port="loop://"), "not supported"),
    ],
)
def test_bad_descriptions_say_what_to_fix(spec: ReaderSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(spec)


def test_osdp_readers_on_one_port_share_a_bus_and_one_bad_reader_spoils_only_its_bus() -> None:
    built = build_all(
        [
            ReaderSpec("r1", "osdp", port="/dev/ttyA", address=1, key=KEY),
            ReaderSpec("r2", "osdp", port="/dev/ttyA", address=2, key=KEY),
            ReaderSpec("r3", "osdp", port="/dev/ttyB", address=1, key=KEY, baud=9600),
            ReaderSpec("r4", "osdp", port="/dev/ttyB", address=2, key=KEY, baud=115200),
            ReaderSpec("r5", "rdm6300"),
        ]
    )
    assert getattr(built["r1"], "bus", None) is getattr(built["r2"], "bus", 1)
    assert isinstance(built["r3"], ValueError)
    assert "disagree on the baud rate" in str(built["r4"])
    assert isinstance(built["r5"], ValueError)


async def test_a_keyboard_reader_that_is_not_there_says_so_once_and_keeps_trying() -> None:
    pytest.importorskip("evdev")  # the optional [wedge] extra
    events: list[DeviceEvent] = []
    reader = KeyWedgeReader("kbd", "/dev/input/by-id/no-such-reader-event-kbd")
    task = asyncio.create_task(reader.run(events.append))
    await asyncio.sleep(1.2)  # long enough for at least two attempts (0.5 s, then 1 s)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert events == [events[0]]
    assert isinstance(events[0], Fault)
    assert events[0].reason.startswith("cannot open /dev/input/by-id/no-such-reader-event-kbd")
