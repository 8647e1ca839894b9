"""The outbox against every way the sandbox can fail, a restart while offline and a full disk. The sandbox's
received log is the oracle: every event exactly once, a session's events in order, nothing dead-lettered that
only needed a retry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.server import SandboxServer
from tests.conftest import ANA, BRUNO, PremisesFactory
from tests.sandboxes import check_in_and_out, delivered, exactly_once_in_order, sandbox_overrides

pytestmark = pytest.mark.embedded_only  # the outbox does not depend on the broker; run it once

FAST_RETRIES = {"backoff_base_s": 0.05, "backoff_cap_s": 0.5, "breaker_open_s": 1.0}


def ziggy_calls(server: SandboxServer, route: str) -> list[dict[str, Any]]:
    return [e for e in server.sandbox.log if e["kind"] == "call" and e["route"] == route]


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("500", {}),
        ("503", {"retry_after_s": 0.2}),
        ("429", {"retry_after_s": 0.2}),
        ("401", {}),
        ("reset", {}),
        ("slow", {"delay_s": 0.5}),
        ("garbage", {}),
    ],
)
async def test_every_fault_kind_delays_but_never_loses_or_doubles(
    premises_factory: PremisesFactory,
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    kind: str,
    extra: dict[str, Any],
) -> None:
    server = await sandbox_factory(
        {"endpoint": "ziggy.*", "kind": kind, "count": 2, **extra},
        {"endpoint": "cloud.events", "kind": kind, "count": 2, **extra},
    )
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"), sync=FAST_RETRIES)
    await check_in_and_out(premises)
    await delivered(premises, within=30)
    exactly_once_in_order(server, await premises.rows("SELECT event_id, type FROM events ORDER BY seq"))
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'") == [(0,)]
    # Ziggy acted once per call, whatever the faults made the agent repeat
    for route in ("ziggy.checkin", "ziggy.checkout"):
        assert sum(1 for c in ziggy_calls(server, route) if c["acted"]) == 1, route
    faulted = [e for e in server.sandbox.log if e.get("fault")]
    assert len(faulted) >= 3  # the plan really fired (two on each destination's first calls)


async def test_a_restart_while_offline_keeps_every_event_and_delivers_it_after(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory(
        {"endpoint": "*", "kind": "reset", "rate": 1.0},  # the club's internet is down
    )
    first = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"), sync=FAST_RETRIES)
    async with first.reader("r1") as reader:
        for card in (ANA, BRUNO):
            assert (await reader.tap(card)).payload["action"] == "checkin"
    first.clock.advance(seconds=600)
    for _ in range(40):  # let every row fail a few times (once queued), so the restart happens mid-backoff
        [(rows, least)] = await first.rows("SELECT COUNT(*), COALESCE(MIN(attempts), 0) FROM deliveries")
        if rows == 6 and least >= 2:
            break
        await asyncio.sleep(0.05)
    assert await first.pending() == 6  # 2 x (access.decided, session.started) to the cloud + 2 session.started to Ziggy
    assert [e for e in server.sandbox.log if e["kind"] == "event"] == []

    second = await premises_factory(restart=first)  # the box reboots, still offline
    async with second.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["action"] == "checkout"
    server.sandbox.faults.replace([])  # the internet comes back
    await delivered(second, within=30)
    events = await second.rows("SELECT event_id, type FROM events ORDER BY seq")
    assert len(events) == 6
    exactly_once_in_order(server, events)
    acted = sorted(c["route"] for c in server.sandbox.log if c["kind"] == "call" and c.get("acted"))
    assert acted == ["ziggy.checkin", "ziggy.checkin", "ziggy.checkout"]  # order is kept per session only


async def test_a_72_hour_outage_delivers_everything_once_and_asks_ziggy_before_creating_again(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Three days without internet, compressed: the club's clock (and so every event) spans 72 hours, the
    outbox's own record of when it first tried is moved back 72 hours, and Ziggy forgets idempotency keys after
    a second instead of a day. Ziggy took the first check-in but its answer was lost (garbage)."""
    server = await sandbox_factory(
        {"endpoint": "ziggy.checkin", "kind": "garbage", "count": 1},  # acted; the agent cannot know
        {"endpoint": "*", "kind": "reset", "rate": 1.0},  # then nothing gets through
        idempotency_ttl_s=1.0,
    )
    premises = await premises_factory(
        **sandbox_overrides(server, tmp_path / "secrets"),
        sync=FAST_RETRIES,
        policy={"scan_rate_per_s": 100},  # three days of taps in seconds
    )
    told: list[dict[str, Any]] = []
    async with premises.reader("r2") as reader, premises.tablet("desk") as bar:  # court 2 is open day and night
        told.append((await reader.tap(ANA)).payload)  # stays on court across the outage
        for _ in range(12):  # every six hours, a game with a drink
            premises.clock.advance(seconds=6 * 3600)
            told.append((await reader.tap(BRUNO)).payload)
            order = {"item_id": "agua", "name": "Água", "quantity": 1, "unit_price": 4.5}
            told.append((await bar.order([order], card_id=BRUNO)).payload)
            premises.clock.advance(seconds=3600)
            told.append((await reader.tap(BRUNO)).payload)
            await asyncio.sleep(0.05)
    assert all(t["status"] in ("granted", "ok") for t in told)
    assert [e for e in server.sandbox.log if e["kind"] == "event"] == []  # the outage was total
    expected = 12 * 8 + 3  # a game: 2 decisions to the cloud; start, order, end to both. Ana: 3 rows
    for _ in range(100):  # the last decisions' rows are queued by the workers' next round
        [(pending, tries)] = await premises.rows(
            "SELECT COUNT(*), MAX(attempts) FROM deliveries WHERE state = 'pending'"
        )
        if pending == expected:
            break
        await asyncio.sleep(0.02)
    assert pending == expected
    assert await premises.pending() == expected
    assert tries >= 2
    async with premises.agent.db.transaction("test: the outbox has been trying for 72 hours") as conn:  # type: ignore[union-attr]
        await conn.execute("UPDATE deliveries SET first_attempt_at = first_attempt_at - ?", (72 * 3600 * 1000,))
    await asyncio.sleep(1.1)  # Ziggy has forgotten the keys
    server.sandbox.faults.replace([])
    await delivered(premises, within=60)

    events = await premises.rows("SELECT event_id, type FROM events ORDER BY seq")
    exactly_once_in_order(server, events)
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'") == [(0,)]
    acted = [c["route"] for c in server.sandbox.log if c["kind"] == "call" and c.get("acted")]
    assert acted.count("ziggy.checkin") == 13  # Ana's once, though her first answer was lost and the key forgotten
    assert acted.count("ziggy.consumption.record") == 12
    ended = await premises.rows("SELECT COUNT(*) FROM sessions WHERE ended_at IS NOT NULL")
    assert acted.count("ziggy.checkout") == ended[0][0]  # Bruno's twelve, and Ana's if the sweeper timed it out
    asked = [c for c in server.sandbox.log if c["kind"] == "call" and c["route"] == "ziggy.sessions.active"]
    assert asked  # the stale retry asked before creating
    assert len(server.sandbox.ziggy.sessions) == 13


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs where the first agent of the test keeps its data (premises_factory's agent0)."""
    mountpoint = tmp_path / "agent0"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill_up(directory: Path) -> Path:
    """Fill the file system under `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            chunk = b"\0" * size
            with contextlib.suppress(OSError):
                for _ in range(100_000):
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_refuses_new_decisions_and_loses_nothing_promised(
    small_disk: Path, premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory({"endpoint": "*", "kind": "503", "rate": 1.0})
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"), sync=FAST_RETRIES)
    assert premises.config.agent.data_dir == small_disk
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["status"] == "granted"
        filler = fill_up(small_disk)
        assert shutil.disk_usage(small_disk).free == 0
        refused = (await reader.tap(BRUNO)).payload
        assert refused["status"] == "denied"
        assert refused["reason"] == "unavailable"  # never granted unrecorded
        assert premises.metric("store_errors_total", doing="decision") >= 1
        server.sandbox.faults.replace([])  # the cloud is back while the disk is still full
        await asyncio.sleep(0.5)  # the outbox may fail to record what it sent: it must not stop or lose rows
        filler.unlink()  # the installer frees space
        assert (await reader.tap(BRUNO)).payload["status"] == "granted"  # the door works again
    await delivered(premises, within=30)
    events = await premises.rows("SELECT event_id, type FROM events ORDER BY seq")
    assert [t for _, t in events] == ["access.decided", "session.started", "access.decided", "session.started"]
    exactly_once_in_order(server, events)
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'") == [(0,)]
