"""systemd's notify protocol, against a datagram socket this test owns as systemd would: READY=1 within 3 s of
start, WATCHDOG=1 every half WatchdogSec, and no ping while the decision loop is stalled (systemd would then
restart the agent), pinging again once it recovers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ANA, Premises, PremisesFactory


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, with when it came."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    async def wait_for(self, field: str, after: float, within: float) -> float:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for at, text in self.drain():
                if at >= after and field in text.split("\n"):
                    return at
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {field} within {within} s: {self.messages[-5:]}")

    def pings(self, since: float) -> int:
        return sum(1 for at, text in self.drain() if at >= since and "WATCHDOG=1" in text.split("\n"))


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2: a ping a second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    fake.sock.close()


async def test_ready_within_3_s_then_pings_that_stop_while_decisions_are_stuck(
    systemd: FakeSystemd, premises_factory: PremisesFactory
) -> None:
    started = time.monotonic()
    premises: Premises = await premises_factory()
    ready = await systemd.wait_for("READY=1", started, 3.0)
    print(f"READY=1 {ready - started:.2f} s after start")
    assert ready - started <= 3.0
    await asyncio.sleep(2.5)
    assert systemd.pings(ready) >= 2

    # A decision that never finishes (a hung call): the worker is stuck, the door would stay silent.
    service = premises.agent.service
    assert service is not None
    stuck = asyncio.Event()
    real_scan = service.scan

    async def hung(*args: Any, **kwargs: Any) -> Any:
        await stuck.wait()
        return await real_scan(*args, **kwargs)

    service.scan = hung  # type: ignore[method-assign]
    async with premises.reader("r1") as reader:
        tap = asyncio.create_task(reader.tap(ANA, reply_within=30))
        await asyncio.sleep(1.2)  # the ping already on its way may still come
        stalled_at = time.monotonic()
        await asyncio.sleep(2.5)
        assert systemd.pings(stalled_at) == 0  # systemd would restart the agent now
        assert any("STATUS=unhealthy: decision worker" in text for _, text in systemd.drain())
        stuck.set()  # it recovers: pings resume
        assert (await tap).payload["status"] == "granted"
    resumed = await systemd.wait_for("WATCHDOG=1", time.monotonic(), 3.0)
    assert resumed


async def test_a_store_that_cannot_commit_withholds_the_ping(
    systemd: FakeSystemd, premises_factory: PremisesFactory
) -> None:
    premises: Premises = await premises_factory()
    await systemd.wait_for("READY=1", 0, 3.0)
    await systemd.wait_for("WATCHDOG=1", 0, 3.0)
    with contextlib.closing(sqlite3.connect(premises.config.db_path, timeout=0)) as other:
        other.execute("BEGIN EXCLUSIVE")  # another process holds the database: nothing can commit
        await asyncio.sleep(1.2)
        held_at = time.monotonic()
        await asyncio.sleep(2.5)
        assert systemd.pings(held_at) == 0
        other.rollback()
    await systemd.wait_for("WATCHDOG=1", time.monotonic(), 15.0)


async def test_without_notify_socket_nothing_is_sent(premises: Premises) -> None:
    assert not premises.agent.notifier.enabled
    assert premises.agent.notifier.send("READY=1") is False
