"""Crash test (issue 5): the agent, a subprocess under steady taps and bar orders, is SIGKILLed at random moments
and restarted, sixteen times; the sandbox cloud, in its own subprocess, outlives every kill. Nothing a device was
told about is lost, nothing is delivered twice, and each session's events reach the cloud and Ziggy in order.

The rig and its oracle are in tests/e2e/crash_rig.py; benchmarks/crash.py runs the same rig for 100 cycles.

The rig's players come back for more sessions within seconds. That found a delivery-order bug that needs no
kill at all (a member's next check-in reaching Ziggy before their last check-out); its deterministic
reproduction is the second test here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BRUNO, PremisesFactory
from tests.e2e.crash_rig import CrashOptions, run_crash
from tests.sandboxes import delivered, sandbox_overrides
from tests.sandboxes import sandbox_factory as sandbox_factory  # the fixture, for this module

pytestmark = [pytest.mark.slow, pytest.mark.embedded_only]

CYCLES = 16
SEED = 5


@pytest.mark.deadline(150)
async def test_random_sigkills_lose_nothing_double_nothing_reorder_nothing(tmp_path: Path) -> None:
    report = await run_crash(CrashOptions(root=tmp_path / "crash", cycles=CYCLES, seed=SEED), say=print)
    summary = report.summary()
    print(summary)

    assert report.failures == 0, summary
    assert report.final_exit == 0, summary  # the last run stops cleanly on SIGTERM
    verdict, told = report.verdict, report.told
    assert len(report.cycles) == CYCLES
    assert verdict.cloud_events == verdict.events, summary
    # The rig did real work: sessions opened and closed, orders recorded, answers cut off by kills and repeated.
    assert len(told.checkins) >= CYCLES, summary
    assert len(told.checkouts) >= CYCLES, summary
    assert len(told.orders) >= CYCLES, summary
    assert told.repeated, summary


async def test_a_members_next_session_reaches_ziggy_after_the_last_one(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Found by the crash rig; no kill needed. A member plays session A and starts session B on the same court
    while Ziggy answers 503 (Retry-After 5 s); then Ziggy is back and every Ziggy row is due at once. The outbox
    keeps order per session only, and its Ziggy worker (one event per call, oldest and freshest eligible in
    turn) used to send B's check-in before A's check-out whichever turn it was on: B's check-in first (Ziggy
    takes it as zg-1, A's then gets 409 and adopts zg-1, INSERT OR REPLACE dropping B's mapping), or A's
    check-in and then B's (409, B adopts A's zg-1). Either way A's check-out closed the Ziggy session B was
    playing in, and B's later lines and check-out were dead-lettered ("no Ziggy session"). Ziggy must hear a
    member's sessions in order: check-in A, check-out A, check-in B."""
    server = await sandbox_factory({"endpoint": "ziggy.*", "kind": "503", "rate": 1.0, "retry_after_s": 5})
    premises = await premises_factory(
        **sandbox_overrides(server, tmp_path / "secrets"),
        sync={"backoff_base_s": 0.05, "backoff_cap_s": 0.2},
        policy={"second_tap_grace_s": 0, "debounce_s": 0},
    )
    async with premises.reader("r1") as reader:
        for action in ("checkin", "checkout", "checkin"):
            assert (await reader.tap(BRUNO)).payload["action"] == action
            premises.clock.advance(seconds=60)
    tried = "SELECT COUNT(*) FROM deliveries JOIN events USING (seq) WHERE destination = 'ziggy' AND attempts > 0"
    for _ in range(100):  # both check-ins tried once (refused, or held back behind session A)
        if await premises.rows(tried + " AND type = 'session.started'") == [(2,)]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the check-ins were never tried")
    server.sandbox.faults.replace([])  # Ziggy is back ...
    assert premises.agent.db is not None
    async with premises.agent.db.transaction("making every Ziggy row due") as conn:  # ... and nothing waits
        await conn.execute("UPDATE deliveries SET next_attempt_at = 0 WHERE destination = 'ziggy'")
    await delivered(premises, within=15)

    rows = await premises.rows("SELECT event_id, type FROM events WHERE type LIKE 'session.%' ORDER BY seq")
    acted = [
        (c["route"], c["idempotency_key"])
        for c in server.sandbox.log
        if c["kind"] == "call" and c["route"].startswith("ziggy.") and c["acted"]
    ]
    assert acted == [
        ("ziggy.checkin", rows[0][0]),
        ("ziggy.checkout", rows[1][0]),
        ("ziggy.checkin", rows[2][0]),
    ]
