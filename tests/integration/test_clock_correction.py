"""A box without RTC boots with a wrong wall clock. What it stamps before NTP syncs is corrected from monotonic
time once the clock syncs (DESIGN 3): the events, the session and highlight rows, and a clock.corrected event
tells receivers that already took the first stamps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from agent.access import AccessService
from agent.clock import ManualClock, boot_id
from agent.store.repo import to_ms
from tests.conftest import ANA, BRUNO, T0, PremisesFactory

pytestmark = pytest.mark.embedded_only  # store and service behaviour: one broker is enough

BOOTED_AS = datetime(2025, 1, 1, 0, 0, tzinfo=UTC)  # what a Pi without RTC believes before NTP
ERROR = T0 - BOOTED_AS  # how far off it is


async def test_stamps_made_before_sync_are_corrected_at_the_first_decision_after(
    premises_factory: PremisesFactory,
) -> None:
    clock = ManualClock(BOOTED_AS, synced=False)
    premises = await premises_factory(clock=clock, policy={"untrusted_clock": "allow"})
    async with premises.reader("r1") as reader, premises.button("b1") as button:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"
        clock.advance(seconds=90)
        assert (await button.press()).payload["status"] == "ok"
        clock.advance(seconds=30)
        clock.jump_wall(ERROR.total_seconds())  # NTP steps the clock
        clock.is_synced = True
        assert (await reader.tap(BRUNO)).payload["action"] == "checkin"

    rows = await premises.rows(
        "SELECT type, occurred_at, occurred_at_unsynced, clock_synced FROM events WHERE type != 'clock.corrected'"
        " ORDER BY seq"
    )
    first_stamp = to_ms(BOOTED_AS)
    truth = to_ms(T0)
    assert rows[:3] == [
        ("access.decided", truth, first_stamp, 1),
        ("session.started", truth, first_stamp, 1),
        ("highlight.created", truth + 90_000, first_stamp + 90_000, 1),
    ]
    assert all(synced == 1 for *_, synced in rows)
    assert [r[2] for r in rows[3:]] == [None, None]  # Bruno's tap was stamped synced: nothing to correct

    [(started_at,)] = await premises.rows("SELECT started_at FROM sessions WHERE card_id = ?", ANA)
    assert started_at == truth
    [(pressed_at, start_at)] = await premises.rows("SELECT pressed_at, start_at FROM highlights")
    assert (pressed_at, start_at) == (truth + 90_000, truth + 80_000)
    started = await premises.rows("SELECT data FROM events WHERE type = 'session.started' ORDER BY seq LIMIT 1")
    assert json.loads(started[0][0])["started_at"] == "2026-03-02T15:00:00.000Z"  # what Ziggy will be sent

    [(data, synced)] = await premises.rows("SELECT data, clock_synced FROM events WHERE type = 'clock.corrected'")
    corrected = json.loads(data)
    assert synced == 1
    assert corrected["boot_id"] == boot_id()
    assert [c["stamped_at"] for c in corrected["corrections"]] == [
        "2025-01-01T00:00:00.000Z",
        "2025-01-01T00:00:00.000Z",
        "2025-01-01T00:01:30.000Z",
    ]
    assert premises.metric("clock_corrections_total") == 3


async def test_a_session_opened_before_sync_is_not_timed_out_by_the_clock_step(
    premises_factory: PremisesFactory,
) -> None:
    clock = ManualClock(BOOTED_AS, synced=False)
    premises = await premises_factory(clock=clock, policy={"untrusted_clock": "allow"})
    async with premises.reader("r1") as reader:
        await reader.tap(ANA)
    clock.advance(seconds=600)
    clock.jump_wall(ERROR.total_seconds())
    clock.is_synced = True
    service = premises.agent.service
    assert service is not None
    # Uncorrected, the session would look 14 months old and be closed as auto_timeout.
    assert await service.sweep() == frozenset()
    [(ended_at, started_at)] = await premises.rows("SELECT ended_at, started_at FROM sessions")
    assert ended_at is None
    assert started_at == to_ms(T0)
    clock.advance(seconds=timedelta(minutes=120).total_seconds())  # the test config's session_max_minutes
    assert await service.sweep() == frozenset({"c1"})
    [(reason,)] = await premises.rows("SELECT end_reason FROM sessions")
    assert reason == "auto_timeout"


async def test_an_agent_restarted_in_the_same_boot_corrects_at_start(premises_factory: PremisesFactory) -> None:
    clock = ManualClock(BOOTED_AS, synced=False)
    premises = await premises_factory(clock=clock, policy={"untrusted_clock": "allow"})
    async with premises.reader("r1") as reader:
        await reader.tap(ANA)
    clock.advance(seconds=5)
    clock.jump_wall(ERROR.total_seconds())
    clock.is_synced = True
    agent = premises.agent
    assert agent.db is not None
    # a second service on the same store and boot, as after `systemctl restart club-agent`
    restarted = AccessService(agent.db, premises.config, clock, boot_id(), agent.metrics)
    await restarted.start()
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE clock_synced = 0") == [(0,)]
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'clock.corrected'") == [(1,)]


async def test_stamps_of_an_earlier_boot_stay_marked_unsynced(premises_factory: PremisesFactory) -> None:
    clock = ManualClock(BOOTED_AS, synced=False)
    premises = await premises_factory(clock=clock, policy={"untrusted_clock": "allow"})
    async with premises.reader("r1") as reader:
        await reader.tap(ANA)
    agent = premises.agent
    assert agent.db is not None
    async with agent.db.transaction("test: pretend the events came from another boot") as conn:
        await conn.execute("UPDATE events SET boot_id = 'an-earlier-boot'")
    clock.jump_wall(ERROR.total_seconds())
    clock.is_synced = True
    restarted = AccessService(agent.db, premises.config, clock, boot_id(), agent.metrics)
    await restarted.start()
    # its monotonic clock is gone: nothing can be computed, so nothing is invented
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE clock_synced = 0") == [(2,)]
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'clock.corrected'") == [(0,)]


async def test_a_synced_clock_stepped_back_does_not_refuse_the_checkout(premises_factory: PremisesFactory) -> None:
    """NTP steps a synced clock too (a bad server, a leap of the upstream). Two minutes on court are two minutes
    whatever the wall clock says: the second tap checks out rather than being taken for a nervous double tap."""
    clock = ManualClock(T0)
    premises = await premises_factory(clock=clock)
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"
        clock.advance(seconds=120)
        clock.jump_wall(-600)
        assert (await reader.tap(ANA)).payload["action"] == "checkout"
        clock.advance(seconds=5)
        clock.jump_wall(3600)  # forward: a tap 5 s after check-in is still a double tap
        assert (await reader.tap(BRUNO)).payload["action"] == "checkin"
        clock.advance(seconds=5)
        assert (await reader.tap(BRUNO)).payload["reason"] == "already_in_session"


async def test_a_clock_step_neither_times_out_a_session_early_nor_late(premises_factory: PremisesFactory) -> None:
    clock = ManualClock(T0)
    premises = await premises_factory(clock=clock)
    async with premises.reader("r1") as reader:
        await reader.tap(ANA)
    service = premises.agent.service
    assert service is not None
    clock.advance(seconds=60)
    clock.jump_wall(timedelta(hours=5).total_seconds())
    assert await service.sweep() == frozenset()  # one minute on court, whatever the wall clock says
    clock.jump_wall(-timedelta(hours=8).total_seconds())
    clock.advance(seconds=timedelta(minutes=120).total_seconds())  # the test config's session_max_minutes
    assert await service.sweep() == frozenset({"c1"})
