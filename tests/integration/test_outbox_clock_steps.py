"""The outbox's retry delays are elapsed time, whatever NTP does to the wall clock of a Pi without an RTC.

The real `Outbox` on a real SQLite database, with in-process destinations that refuse what they are told to
refuse. Its wall and monotonic clocks follow real elapsed time (the workers sleep for real, for under a second
here) and the test steps the wall clock by hours without touching the system's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from agent.config import ZiggySection
from agent.metrics import Metrics
from agent.store.db import Database
from agent.store.repo import NewEvent, Stamp, append_events, enable_destinations
from agent.sync import outbox as outbox_module
from agent.sync.delivery import OutboxEvent, Result, Transient, Verdict
from agent.sync.outbox import CLOCK_REFERENCE_KEY, Outbox
from agent.sync.ziggy import KEY_MEMORY_MS, ZiggyDestination

HOUR_MS = 3600 * 1000
# A retry waits 0.5 to 1 s (jitter), however often it was tried; the breaker never opens.
QUICK = {"backoff_base_s": 1.0, "backoff_cap_s": 1.0, "breaker_failures": 1000}


class Clocks:
    """Wall and monotonic ms of one boot, both following real elapsed time; `step` sets the wall clock as NTP does."""

    def __init__(self) -> None:
        self._started = time.monotonic_ns() // 1_000_000
        self._wall_at_start = 1_772_463_600_000  # 2026-03-02 15:00 UTC
        self.steps_ms = 0

    def mono_ms(self) -> int:
        return 7_000_000 + time.monotonic_ns() // 1_000_000 - self._started  # not the system's own value

    def wall_ms(self) -> int:
        return self._wall_at_start + time.monotonic_ns() // 1_000_000 - self._started + self.steps_ms

    def step(self, seconds: float) -> None:
        self.steps_ms += int(seconds * 1000)

    def offset_ms(self) -> int:
        """Wall minus monotonic ms, exactly (two reads may fall in different milliseconds)."""
        return self._wall_at_start - 7_000_000 + self.steps_ms


class Fake:
    """A destination in process: delivers every event but those in `refuse` and the later events of their
    sessions in the same call (answered RETRY, one by one), and fails whole calls while `down`. Keeps what it
    received and when each seq was tried (monotonic ms)."""

    def __init__(self, name: str, clocks: Clocks, batch_size: int = 50) -> None:
        self.name, self.batch_size = name, batch_size
        self._clocks = clocks
        self.refuse: set[int] = set()
        self.down = False
        self.received: list[OutboxEvent] = []
        self.tried: dict[int, list[int]] = {}

    async def send(self, events: list[OutboxEvent]) -> list[Result]:
        for e in events:
            self.tried.setdefault(e.seq, []).append(self._clocks.mono_ms())
        if self.down:
            raise Transient("the club's internet is down")
        out = []
        held: set[str | None] = set()  # sessions with an event refused in this call: the rest of it waits too
        for e in events:
            if e.seq in self.refuse or (e.session_id is not None and e.session_id in held):
                held.add(e.session_id)
                out.append(Result(e.seq, Verdict.RETRY, "not yet"))
            else:
                self.received.append(e)
                out.append(Result(e.seq, Verdict.DELIVERED))
        return out

    async def aclose(self) -> None:
        pass


@dataclass
class Sessions:
    """Per session, the seqs of its events in order; `firsts` are each session's first event."""

    seqs: dict[str, list[int]]

    @property
    def firsts(self) -> set[int]:
        return {seqs[0] for seqs in self.seqs.values()}

    @property
    def all(self) -> set[int]:
        return {s for seqs in self.seqs.values() for s in seqs}


async def open_db(path: Path, destinations: Iterable[str]) -> Database:
    db = Database(path)
    await db.__aenter__()
    await db.write("test: enabling destinations", enable_destinations, list(destinations))
    return db


async def add_sessions(db: Database, clocks: Clocks, n: int = 4, per_session: int = 3, first: int = 0) -> Sessions:
    """`n` sessions (numbered from `first`), their events interleaved in the log (as on a busy evening)."""
    stamp = Stamp(datetime.fromtimestamp(clocks.wall_ms() / 1000, UTC), clocks.mono_ms() * 10**6, "boot-a", True)
    kinds = ["session.started", *(["consumption.recorded"] * (per_session - 2)), "session.ended"]
    events = [
        NewEvent(kind, {"i": i}, session_id=f"s{s}") for i, kind in enumerate(kinds) for s in range(first, first + n)
    ]
    written = await db.write("test: events", append_events, stamp, events)
    seqs: dict[str, list[int]] = {}
    for (seq, _), event in zip(written, events, strict=True):
        assert event.session_id is not None
        seqs.setdefault(event.session_id, []).append(seq)
    return Sessions(seqs)


@contextlib.asynccontextmanager
async def running(box: Outbox) -> AsyncIterator[Outbox]:
    task = asyncio.create_task(box.run())
    try:
        yield box
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], Any], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within} s: {what}")


async def waiting(db: Database, clocks: Clocks, seqs: set[int]) -> bool:
    """Every one of `seqs` was tried and waits for its retry, due in the future."""
    rows = await db.fetchall("SELECT seq, attempts, next_attempt_at FROM deliveries WHERE state = 'pending'")
    now = clocks.wall_ms()
    ready = {r[0] for r in rows if r[1] >= 1 and r[2] > now}
    return seqs <= ready


def got(fake: Fake, sessions: Sessions) -> Callable[[], Any]:
    """A check for `until`: `fake` received every event of `sessions`."""

    async def check() -> bool:
        return sessions.all <= {e.seq for e in fake.received}

    return check


async def pending(db: Database) -> int:
    row = await db.fetchone("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
    assert row is not None
    return int(row[0])


def in_session_order(fake: Fake, sessions: Sessions) -> None:
    """Every event exactly once, each session's in the order of the log."""
    got = [e.seq for e in fake.received]
    assert sorted(got) == sorted(sessions.all)
    for seqs in sessions.seqs.values():
        assert [s for s in got if s in seqs] == seqs


def steps_logged(logs: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(e["destination"], e["delta_s"]) for e in logs if e["event"] == "outbox_clock_step"]


async def test_a_backward_step_of_two_hours_delays_retries_by_their_backoff_not_by_the_step(tmp_path: Path) -> None:
    clocks = Clocks()
    db = await open_db(tmp_path / "agent.db", ["cloud"])
    try:
        sessions = await add_sessions(db, clocks)
        cloud = Fake("cloud", clocks)
        cloud.refuse = set(sessions.firsts)  # each session's first event waits: the rest of it is held back
        metrics = Metrics()
        box = Outbox(
            db,
            [cloud],
            wall_ms=clocks.wall_ms,
            mono_ms=clocks.mono_ms,
            boot_id="boot-a",
            on_clock_step=metrics.outbox_clock_steps.inc,
            **QUICK,
        )
        with capture_logs() as logs:
            async with running(box):
                await until(lambda: waiting(db, clocks, sessions.firsts), what="the first events wait for a retry")
                assert cloud.received == []  # the later events of each session are held back behind the first
                assert metrics.value("outbox_clock_steps_total") == 0
                clocks.step(-2 * 3600)  # NTP: the clock was two hours fast
                cloud.refuse.clear()
                stepped = time.monotonic()
                await until(lambda: pending_is(db, 0), within=5.0, what="everything delivered after the step")
                assert time.monotonic() - stepped < 3.0  # one backoff (at most 1 s) and a round, not two hours
        in_session_order(cloud, sessions)
        assert steps_logged(logs) == [("cloud", pytest.approx(-7200, abs=0.1))]
        assert box.clock_steps == 1
        assert metrics.value("outbox_clock_steps_total") == 1  # what /metrics shows
    finally:
        await db.__aexit__(None, None, None)


async def pending_is(db: Database, n: int) -> bool:
    return await pending(db) == n


async def test_a_forward_step_loses_nothing_keeps_session_order_and_does_not_retry_early(tmp_path: Path) -> None:
    clocks = Clocks()
    db = await open_db(tmp_path / "agent.db", ["cloud", "ziggy"])
    try:
        sessions = await add_sessions(db, clocks)
        cloud, ziggy = Fake("cloud", clocks), Fake("ziggy", clocks, batch_size=1)
        for fake in (cloud, ziggy):
            fake.refuse = set(sessions.firsts)
        box = Outbox(db, [cloud, ziggy], wall_ms=clocks.wall_ms, mono_ms=clocks.mono_ms, boot_id="boot-a", **QUICK)
        with capture_logs() as logs:
            async with running(box):
                await until(lambda: waiting(db, clocks, sessions.firsts), what="the first events wait for a retry")
                clocks.step(2 * 3600)  # NTP: the clock was two hours slow (the usual first sync of a Pi)
                for fake in (cloud, ziggy):
                    fake.refuse.clear()
                # taps go on: the commit wakes the workers, which must not take the waiting rows as due yet
                later = await add_sessions(db, clocks, n=2, first=10)
                box.notify()
                everything = Sessions({**sessions.seqs, **later.seqs})
                for fake in (cloud, ziggy):
                    await until(got(fake, everything), within=5.0, what="everything delivered after the step")
        for fake in (cloud, ziggy):
            in_session_order(fake, everything)
            for seq in sessions.firsts:
                # the retry after the step came when its backoff (at least 0.5 s) was up, not at once
                last_refused, retried = fake.tried[seq][-2], fake.tried[seq][-1]
                assert retried - last_refused >= 450, (fake.name, seq, fake.tried[seq])
        # one step seen once, for every destination, though two workers share the clocks
        assert sorted(steps_logged(logs)) == [
            ("cloud", pytest.approx(7200, abs=0.1)),
            ("ziggy", pytest.approx(7200, abs=0.1)),
        ]
        assert box.clock_steps == 1
    finally:
        await db.__aexit__(None, None, None)


async def test_an_agent_restarted_in_the_same_boot_after_a_step_rebases_what_the_last_one_scheduled(
    tmp_path: Path,
) -> None:
    clocks = Clocks()
    db = await open_db(tmp_path / "agent.db", ["cloud"])
    try:
        sessions = await add_sessions(db, clocks)
        cloud = Fake("cloud", clocks)
        cloud.refuse = set(sessions.firsts)
        first = Outbox(db, [cloud], wall_ms=clocks.wall_ms, mono_ms=clocks.mono_ms, boot_id="boot-a", **QUICK)
        async with running(first):
            await until(lambda: waiting(db, clocks, sessions.firsts), what="the first events wait for a retry")
        assert await pending(db) == len(sessions.all)
        clocks.step(-2 * 3600)  # while the agent is stopped
        cloud.refuse.clear()
        second = Outbox(db, [cloud], wall_ms=clocks.wall_ms, mono_ms=clocks.mono_ms, boot_id="boot-a", **QUICK)
        with capture_logs() as logs:
            async with running(second):
                await until(lambda: pending_is(db, 0), within=5.0, what="everything delivered by the restarted agent")
        in_session_order(cloud, sessions)
        assert steps_logged(logs) == [("cloud", pytest.approx(-7200, abs=0.1))]

        # a third start in the same boot, no step since: nothing is moved again
        assert await reference_is(db, clocks)
        with capture_logs() as logs:
            third = Outbox(db, [cloud], wall_ms=clocks.wall_ms, mono_ms=clocks.mono_ms, boot_id="boot-a", **QUICK)
            async with running(third):
                more = await add_sessions(db, clocks, n=1, first=10)
                await until(got(cloud, more), what="delivered by the third start")
        in_session_order(cloud, Sessions({**sessions.seqs, **more.seqs}))
        assert steps_logged(logs) == []
        assert third.clock_steps == 0
    finally:
        await db.__aexit__(None, None, None)


async def reference_is(db: Database, clocks: Clocks) -> bool:
    row = await db.fetchone("SELECT value FROM kv WHERE key = ?", (CLOCK_REFERENCE_KEY,))
    return row is not None and f'"offset_ms": {clocks.offset_ms()}' in row[0]


async def test_after_a_reboot_what_waited_is_due_at_once_and_a_later_step_does_not_move_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new boot: the monotonic clock restarts and the wall clock is whatever fake-hwclock saved (an hour
    behind here) until NTP steps it. The rows the last boot scheduled cannot be placed on this boot's timeline:
    they are due at once, not moved by the step (which would hold them back by an hour more)."""
    monkeypatch.setattr(outbox_module, "IDLE_MAX_S", 0.2)
    clocks = Clocks()
    db = await open_db(tmp_path / "agent.db", ["cloud"])
    try:
        sessions = await add_sessions(db, clocks, n=2)
        cloud = Fake("cloud", clocks)
        cloud.down = True
        slow = {**QUICK, "backoff_base_s": 600.0, "backoff_cap_s": 600.0}  # retried in five to ten minutes
        first = Outbox(db, [cloud], wall_ms=clocks.wall_ms, mono_ms=clocks.mono_ms, boot_id="boot-a", **slow)
        async with running(first):
            await until(lambda: waiting(db, clocks, sessions.firsts), what="the first events wait for a retry")

        rebooted = Clocks()
        rebooted.step(-3600)
        cloud.down = False
        second = Outbox(db, [cloud], wall_ms=rebooted.wall_ms, mono_ms=rebooted.mono_ms, boot_id="boot-b", **slow)
        with capture_logs() as logs:
            async with running(second):
                await until(lambda: pending_is(db, 0), within=5.0, what="delivered after the reboot")
                rebooted.step(3600)  # NTP syncs: nothing is left to move
                await until(lambda: reference_is(db, rebooted), what="the step seen")
        in_session_order(cloud, sessions)
        assert [e["destination"] for e in logs if e["event"] == "outbox_schedule_restarted"] == ["cloud"]
        assert steps_logged(logs) == [("cloud", pytest.approx(3600, abs=0.1))]
    finally:
        await db.__aexit__(None, None, None)


async def test_a_step_smaller_than_the_tolerance_moves_nothing(tmp_path: Path) -> None:
    clocks = Clocks()
    db = await open_db(tmp_path / "agent.db", ["cloud"])
    try:
        sessions = await add_sessions(db, clocks, n=1)
        cloud = Fake("cloud", clocks)
        box = Outbox(db, [cloud], wall_ms=clocks.wall_ms, mono_ms=clocks.mono_ms, boot_id="boot-a", **QUICK)
        with capture_logs() as logs:
            async with running(box):
                await until(got(cloud, sessions), what="delivered")
                clocks.step(1.5)  # a leap second, or two clocks read a little apart
                more = await add_sessions(db, clocks, n=1, first=10)
                box.notify()
                await until(got(cloud, more), what="delivered")
        in_session_order(cloud, Sessions({**sessions.seqs, **more.seqs}))
        assert steps_logged(logs) == []
        assert box.clock_steps == 0
    finally:
        await db.__aexit__(None, None, None)


async def test_ziggy_asks_first_when_the_first_attempt_is_stamped_after_now(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The clock went back past the first attempt of a check-in: how long ago it was is unknown, so Ziggy may
    have forgotten the key; the agent asks for the member's active session (and adopts it) before creating one.
    Ziggy already has each member checked in (an earlier attempt acted, its answer lost)."""
    server = await sandbox_factory()
    s = server.settings
    clocks = Clocks()
    headers = {"Authorization": f"Bearer {s.ziggy_api_key}", "X-Client-Id": s.ziggy_client_id}
    async with httpx.AsyncClient(base_url=s.ziggy_base_url, headers=headers) as http:
        for member in ("m1", "m2", "m3"):
            body = {"user_id": member, "court_id": "c1", "timestamp": "2026-03-02T15:00:00+00:00"}
            assert (await http.post("/access/checkin", json=body)).status_code == 200
    now = clocks.wall_ms()
    firsts = {"m1": now - 60_000, "m2": now + HOUR_MS, "m3": now - 2 * KEY_MEMORY_MS}
    checkins = [
        OutboxEvent(
            seq=seq,
            event_id=f"0190aaaa-0000-7000-8000-00000000000{seq}",
            type="session.started",
            occurred_at=now,
            mono_ns=0,
            boot_id="boot-a",
            clock_synced=True,
            session_id=f"s{seq}",
            device_id=None,
            data={"member_id": member, "court_id": "c1", "started_at": "2026-03-02T15:00:00+00:00"},
            attempts=1,
            first_attempt_at=first,
        )
        for seq, (member, first) in enumerate(firsts.items(), start=1)
    ]
    async with Database(tmp_path / "agent.db") as db:
        zone = ZiggySection(base_url=s.ziggy_base_url, client_id=s.ziggy_client_id)
        ziggy = ZiggyDestination(zone, s.ziggy_api_key, db, wall_ms=clocks.wall_ms)
        try:
            results = await ziggy.send(checkins)
        finally:
            await ziggy.aclose()
        adopted = await db.fetchall("SELECT session_id FROM ziggy_sessions ORDER BY session_id")
    assert [r.verdict for r in results] == [Verdict.DELIVERED] * 3
    assert [r[0] for r in adopted] == ["s1", "s2", "s3"]
    posted = [c["idempotency_key"] for c in server.sandbox.log if c["kind"] == "call" and c["route"] == "ziggy.checkin"]
    # m1's attempt is a minute old: created again (Ziggy says 409, then it is adopted). m2's is stamped after
    # now, m3's two days ago: asked first, adopted, nothing posted.
    assert posted.count(checkins[0].event_id) == 1
    assert checkins[1].event_id not in posted
    assert checkins[2].event_id not in posted
