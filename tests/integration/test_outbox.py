"""The outbox against the sandbox cloud (Ziggy + club cloud in-process on loopback), whose received log is the
oracle: every event arrives exactly once, a session's events in order, Ziggy's own session id on the checkout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PremisesFactory
from tests.sandboxes import check_in_and_out, delivered, exactly_once_in_order, sandbox_overrides

pytestmark = pytest.mark.embedded_only  # the outbox does not depend on the broker; run it once


async def test_a_session_reaches_ziggy_and_the_cloud_once_with_ziggys_session_id(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory()
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    await check_in_and_out(premises)
    await delivered(premises)
    events = await premises.rows("SELECT event_id, type FROM events ORDER BY seq")
    assert [t for _, t in events] == ["access.decided", "session.started", "access.decided", "session.ended"]
    exactly_once_in_order(server, events)
    calls = [e for e in server.sandbox.log if e["kind"] == "call" and e["route"].startswith("ziggy.")]
    assert [(c["route"], c["acted"]) for c in calls] == [("ziggy.checkin", True), ("ziggy.checkout", True)]
    [(ours, theirs)] = await premises.rows("SELECT session_id, ziggy_session_id FROM ziggy_sessions")
    assert theirs != ours
    assert theirs in repr(calls[1]["effect"])  # the checkout named Ziggy's session, not ours


async def test_faults_delay_but_never_lose_or_double_an_event(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory(
        {"endpoint": "cloud.events", "kind": "503", "count": 2},
        {"endpoint": "ziggy.checkin", "kind": "garbage", "count": 1},  # acts, then answers nonsense
        {"endpoint": "ziggy.checkout", "kind": "429", "count": 1, "retry_after_s": 0.5},
    )
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    await check_in_and_out(premises)
    await delivered(premises, within=30)
    events = await premises.rows("SELECT event_id, type FROM events ORDER BY seq")
    exactly_once_in_order(server, events)
    checkins = [e for e in server.sandbox.log if e["kind"] == "call" and e["route"] == "ziggy.checkin"]
    assert sum(1 for c in checkins if c["acted"]) == 1  # the retry after the garbage answer was replayed
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'") == [(0,)]
    retried = await premises.rows("SELECT destination, MAX(attempts) FROM deliveries GROUP BY destination ORDER BY 1")
    assert retried[0][1] >= 3  # cloud: two 503s, then accepted
    assert retried[1][1] >= 2  # ziggy: the garbage answer, then a replay (and the checkout's 429)
