"""The persistent outbox: one worker per destination, reading the event log's delivery rows (DESIGN 3).

- Durable first: the decision's transaction writes its event (store.repo.append_events); each worker then adds
  its destination's delivery rows for the events past its cursor, in bulk (store.repo.queue_deliveries), and
  only ever moves a row from pending to delivered or dead. The cursor and the rows commit together, so a crash
  or a restart while offline loses nothing, and a decision pays for one row, not one per destination.
- Order per session, never global: an event goes out only when no earlier event of its session is still pending
  and waiting for a retry; within a batch, a session's events keep their order.
- Fresh events are not starved by a backlog: half of each batch is taken from the newest eligible events (those
  with nothing of their session before them), and the replay is paced (`replay_per_s`).
- Retries: exponential backoff with jitter and a cap per row, `Retry-After` honoured, a circuit breaker per
  destination. A permanent refusal dead-letters that event with the reason; the rest goes on.
- Timers never depend on new writes arriving: an idle worker sleeps until the earliest retry is due, or until
  `notify()` says new events were committed (a notice during a round is kept for the next one); woken so, it
  lingers `LINGER_S` first, so that a busy evening's events travel in batches.
- Retry delays are elapsed time, though rows keep them as wall ms (`next_attempt_at`: the due queries stay one
  index range, and status and `repo.destination_busy` read it as wall time). A Pi has no RTC and NTP may step
  its wall clock by hours: when wall minus monotonic time moves, the rows waiting for a retry move with it
  (`_Timeline`), so a backward step does not hold them (and every later event of their sessions) back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from ..clock import boot_id as current_boot_id
from ..errors import StoreError
from ..logs import OnceLogger, get_logger
from ..loop import check_cancelled
from ..store import repo
from ..store.db import Database
from .breaker import CircuitBreaker
from .delivery import Destination, OutboxEvent, Result, Transient, Verdict
from .status import known_destinations

log = get_logger("agent.sync.outbox")

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
REPLAY_PER_S = 500.0
IDLE_MAX_S = 30.0
# An idle worker woken by a commit waits this long before it looks: on a busy evening the events of 100 ms go out
# in one round (one call to the cloud, one bookkeeping commit) instead of one round each, and every decision
# waits behind fewer commits. A backlog never waits for it (the worker is not idle then).
LINGER_S = 0.1
LATENCY_WINDOW = 20  # calls remembered per destination for the median latency
QUEUE_CHUNK = 1000  # seqs given delivery rows per write: a decision queued behind it waits for ~2 ms at most
QUEUE_CHUNKS_PER_ROUND = 50  # then a batch is sent: a long unqueued stretch never holds deliveries back
# Wall minus monotonic time moves only when the wall clock is set: NTP slews both clocks alike, and reading the
# two is not atomic (a preempted read costs milliseconds). A step smaller than this is left alone: a retry
# early or late by two seconds at most.
STEP_TOLERANCE_MS = 2000
CLOCK_REFERENCE_KEY = "outbox.clock_reference"  # in kv: the boot and wall-minus-monotonic offset rows follow

_COLUMNS = (
    "d.seq, e.event_id, e.type, e.occurred_at, e.mono_ns, e.boot_id, e.clock_synced, e.session_id, e.device_id,"
    " e.data, d.attempts, d.first_attempt_at"
)
# The session checks walk a session's own earlier events (events_by_session), then look each up by primary
# key: CROSS JOIN pins that order. Left to the planner, SQLite walked every earlier delivery of the destination
# per candidate, O(backlog) per row: 7 s per query at 100k pending, a 1M backlog drained at 3 events/s.
#
# The candidates come from deliveries_pending_seq (migration 0010): pending rows only, in seq order. Left to the
# planner, SQLite walked the primary key instead, through every delivered row kept: 1-3 ms per pick at 20,000.
#
# Due, and nothing of the same session before it that is still waiting for a retry.
_DUE_RELAXED = f"""
SELECT {_COLUMNS} FROM deliveries d INDEXED BY deliveries_pending_seq JOIN events e ON e.seq = d.seq
WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
  AND (e.session_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM events e2 CROSS JOIN deliveries d2 ON d2.seq = e2.seq AND d2.destination = ?
        WHERE e2.session_id = e.session_id AND e2.seq < e.seq AND d2.state = 'pending'
          AND d2.next_attempt_at > ?))
ORDER BY d.seq LIMIT ?
"""  # noqa: S608 - constant SQL, parameters bound
# Due, and nothing of the same session before it pending at all: safe to send ahead of the backlog.
_DUE_FRESH = f"""
SELECT {_COLUMNS} FROM deliveries d INDEXED BY deliveries_pending_seq JOIN events e ON e.seq = d.seq
WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
  AND (e.session_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM events e2 CROSS JOIN deliveries d2 ON d2.seq = e2.seq AND d2.destination = ?
        WHERE e2.session_id = e.session_id AND e2.seq < e.seq AND d2.state = 'pending'))
ORDER BY d.seq DESC LIMIT ?
"""  # noqa: S608
# When the earliest waiting row is due: the first entry of its destination's range of deliveries_pending.
_EARLIEST_RETRY = "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ? AND state = 'pending'"


@dataclass
class WorkerStatus:
    """What a worker knows of its destination, in memory: the health endpoint's live half."""

    destination: str
    breaker: str
    last_success_ms: int | None = None
    last_error: str | None = None
    last_error_ms: int | None = None
    last_call_ms: int | None = None  # wall time when the last call to the destination ended
    last_call_ok: bool | None = None  # None: no call yet
    consecutive_failures: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def called(self, ok: bool, seconds: float, now_ms: int, error: str | None = None) -> None:
        """One call to `destination.send` ended: whole-call success or failure, and how long it took."""
        self.latencies_ms.append(seconds * 1000)
        self.last_call_ms = now_ms
        self.last_call_ok = ok
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1
        if not ok:
            self.last_error, self.last_error_ms = error, now_ms

    @property
    def last_latency_ms(self) -> float | None:
        return self.latencies_ms[-1] if self.latencies_ms else None

    @property
    def median_latency_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None


class _Pace:
    """A token bucket: how fast a backlog is replayed after an outage."""

    def __init__(self, per_s: float, burst: float) -> None:
        self.per_s, self.burst = per_s, burst
        self._tokens, self._at = burst, time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.per_s)


class _Timeline:
    """The wall clock the retry schedule is written in, kept measuring elapsed time across wall clock steps.

    The schedule follows one offset, wall minus monotonic time, kept in kv with the boot it belongs to. When
    the offset moves by more than STEP_TOLERANCE_MS (the wall clock was set), every pending row scheduled past
    the present moves by as much, in the transaction that records the new offset: a crash rebases all or none,
    and once only. The workers share it, so one of them moves the rows of every destination, once a step.

    Kept in the database, not only in memory: an agent restarted within the same boot still knows the offset its
    rows were scheduled with, and rebases them for a step taken while it was stopped. A new boot has no such
    link (monotonic time restarts, and the wall clock may be anything until NTP): a row still waiting then is due
    at once, rather than left in a timeline that a later step would move the wrong way."""

    def __init__(
        self,
        db: Database,
        wall_ms: Callable[[], int],
        mono_ms: Callable[[], int],
        boot: str,
        on_step: Callable[[], None],
    ) -> None:
        self._db = db
        self._on_step = on_step
        self._wall_ms, self._mono_ms = wall_ms, mono_ms
        self._boot = boot
        self._offset: int | None = None  # wall - monotonic ms of the schedule; None until read from the store
        self._lock = asyncio.Lock()
        self.shifted_ms = 0  # the sum of the steps the rows were moved by
        self.steps = 0

    def _moved(self, wall: int, mono: int) -> bool:
        return self._offset is None or abs(wall - mono - self._offset) > STEP_TOLERANCE_MS

    async def now(self) -> int:
        """Wall ms now, once the schedule agrees with the wall clock. Yields only on first use and after a step."""
        wall = self._wall_ms()
        if not self._moved(wall, self._mono_ms()):
            return wall
        async with self._lock:
            wall, mono = self._wall_ms(), self._mono_ms()  # again: the worker we waited for may have rebased
            if self._offset is None:
                await self._resume(wall, mono)
            elif self._moved(wall, mono):
                await self._rebase(wall, wall - mono - self._offset, wall - mono)
            return wall

    async def _resume(self, wall: int, mono: int) -> None:
        row = await self._db.fetchone("SELECT value FROM kv WHERE key = ?", (CLOCK_REFERENCE_KEY,))
        ref = _reference(row[0] if row is not None else None)
        if ref is not None and ref[0] == self._boot:
            delta = wall - mono - ref[1]
            if abs(delta) > STEP_TOLERANCE_MS:  # stepped while the agent was stopped
                await self._rebase(wall, delta, wall - mono)
            else:
                self._offset = ref[1]
            return
        # Another boot, or no reference (the first start of this version, a recovered store): rows scheduled
        # in the future are in a timeline we cannot place.
        why = "no reference" if ref is None else "new boot"
        reset = await self._move_pending(
            "restarting the retry schedule", "next_attempt_at = ?", (wall,), wall, wall - mono
        )
        self._offset = wall - mono
        for name, rows in reset.items():
            if rows:
                log.info("outbox_schedule_restarted", destination=name, rows=rows, reason=why)

    async def _rebase(self, wall: int, delta: int, offset: int) -> None:
        # Rows due by either clock stay due when moved, so only those past the earlier of the two "now"s need
        # moving: after a backward step those between the new now and the old one too (due, yet in the future
        # by the new clock). One range of the deliveries_pending index per destination.
        since = min(wall, wall - delta)
        # first_attempt_at moves too: Ziggy's "tried more than a day ago" is elapsed time as well.
        moved = await self._move_pending(
            "rebasing the retry schedule",
            "next_attempt_at = next_attempt_at + ?, first_attempt_at = first_attempt_at + ?",
            (delta, delta),
            since,
            offset,
        )
        # Nothing yields between the commit and here: a worker never sees the rows moved and the offset not.
        self._offset = offset
        self.shifted_ms += delta
        self.steps += 1
        self._on_step()
        for name, rows in moved.items():
            log.info("outbox_clock_step", destination=name, delta_s=round(delta / 1000, 3), rows=rows)

    async def _move_pending(
        self, doing: str, assignments: str, values: tuple[int, ...], since: int, offset: int
    ) -> dict[str, int]:
        """`SET assignments` on every destination's pending rows due after `since`, and the new reference, in one
        transaction of its own (not a group write: `_Worker._record` must never share a commit with it); the rows
        changed by destination."""
        names = await known_destinations(self._db)
        changed: dict[str, int] = {}
        async with self._db.transaction(doing, notify=False) as conn:
            for name in names:
                cursor = await conn.execute(
                    f"UPDATE deliveries SET {assignments}"  # noqa: S608 - our own constant assignments
                    " WHERE destination = ? AND state = 'pending' AND next_attempt_at > ?",
                    (*values, name, since),
                )
                changed[name] = cursor.rowcount
                await cursor.close()
            await _save_reference(conn, self._boot, offset)
        return changed


def _reference(value: str | None) -> tuple[str, int] | None:
    """(boot id, offset ms) from its kv value; None when absent or unreadable (as after a new boot)."""
    if value is None:
        return None
    try:
        doc = json.loads(value)
        return str(doc["boot_id"]), int(doc["offset_ms"])
    except (ValueError, TypeError, KeyError):
        return None


async def _save_reference(conn: aiosqlite.Connection, boot: str, offset: int) -> None:
    await conn.execute(
        "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
        (CLOCK_REFERENCE_KEY, json.dumps({"boot_id": boot, "offset_ms": offset})),
    )


class Outbox:
    def __init__(
        self,
        db: Database,
        destinations: Sequence[Destination],
        *,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        mono_ms: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000,
        boot_id: str | None = None,
        replay_per_s: float = REPLAY_PER_S,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        breaker_failures: int = 5,
        breaker_open_s: float = 60.0,
        on_clock_step: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._wall_ms = wall_ms
        boot = current_boot_id() if boot_id is None else boot_id
        self._timeline = _Timeline(db, wall_ms, mono_ms, boot, on_clock_step)
        self.workers = [
            _Worker(
                self,
                d,
                replay_per_s=replay_per_s,
                base_s=backoff_base_s,
                cap_s=backoff_cap_s,
                breaker=CircuitBreaker(breaker_failures, breaker_open_s),
            )
            for d in destinations
        ]

    @property
    def clock_steps(self) -> int:
        """Wall clock steps the retry schedule was moved for, since this outbox started."""
        return self._timeline.steps

    def statuses(self) -> dict[str, WorkerStatus]:
        """Each worker's status by destination, its breaker as it stands now."""
        for worker in self.workers:
            worker.status.breaker = worker.breaker.state.value
        return {worker.destination.name: worker.status for worker in self.workers}

    def notify(self) -> None:
        """New events were committed."""
        for worker in self.workers:
            worker.wake.set()

    def stalled(self, slack_s: float) -> list[str]:
        """Workers that have not gone round their loop for longer than they ever sleep plus `slack_s`."""
        now = time.monotonic()
        return [w.destination.name for w in self.workers if now - w.beat > max(IDLE_MAX_S, w.breaker.open_s) + slack_s]

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for worker in self.workers:
                    tg.create_task(worker.run(), name=f"outbox-{worker.destination.name}")
        finally:
            for worker in self.workers:
                await worker.destination.aclose()


class _Worker:
    def __init__(
        self,
        outbox: Outbox,
        destination: Destination,
        *,
        replay_per_s: float,
        base_s: float,
        cap_s: float,
        breaker: CircuitBreaker,
    ):
        self.outbox = outbox
        self.destination = destination
        self.breaker = breaker
        self.wake = asyncio.Event()
        self.status = WorkerStatus(destination.name, self.breaker.state.value)
        self._pace = _Pace(replay_per_s, max(replay_per_s, destination.batch_size * 2))
        self._base_s, self._cap_s = base_s, cap_s
        self._fresh_turn = False
        self._queued_upto = -1  # every seq up to here has its delivery row (or is not routed here)
        self._once = OnceLogger(log)
        self.beat = time.monotonic()

    @property
    def _db(self) -> Database:
        return self.outbox._db

    async def run(self) -> None:
        while True:
            check_cancelled()  # _sleep's wait_for can swallow a cancel (see agent/loop.py)
            self.beat = time.monotonic()  # the watchdog's sign of life (agent/notify.py)
            try:
                await self._round()
            except StoreError as exc:  # a full or read-only disk: say so, wait, try again
                self._once.warning("outbox_store_error", self.destination.name, error=str(exc))
                await asyncio.sleep(5)

    async def _round(self) -> None:
        self.wake.clear()  # a commit from here on wakes the next sleep at once
        caught_up = await self._queue()  # also while the breaker is open: status and retention see the rows
        if not self.breaker.allow():
            await self._sleep(self.breaker.wait_s())
            return
        batch = await self._due()
        if not batch:
            if caught_up:
                await self._idle()
            return
        await self._pace.take(len(batch))
        started = time.perf_counter()
        try:
            results = await self.destination.send(batch)
        except Exception as exc:  # a bug in a destination must not stop the agent or the other destinations
            if not isinstance(exc, Transient):
                log.exception("outbox_destination_failed", destination=self.destination.name)
                exc = Transient(f"{exc.__class__.__name__}: {exc}"[:200])
            self.status.called(False, time.perf_counter() - started, self.outbox._wall_ms(), exc.reason)
            self.breaker.failure()
            self._once.warning(
                "outbox_retry",
                f"{self.destination.name}:{exc.reason[:40]}",
                destination=self.destination.name,
                error=exc.reason,
                events=len(batch),
            )
            await self._record(batch, [Result(e.seq, Verdict.RETRY, exc.reason) for e in batch], exc.retry_after_s)
            return
        self.status.called(True, time.perf_counter() - started, self.outbox._wall_ms())
        self.breaker.success()
        await self._record(batch, results, None)

    async def _queue(self) -> bool:
        """Give the events committed since the last round their delivery rows for this destination, at most
        QUEUE_CHUNKS_PER_ROUND chunks of them; False when some are left for the next round."""
        row = await self._db.fetchone("SELECT MAX(seq) FROM events")
        newest = int(row[0]) if row is not None and row[0] is not None else 0
        if newest <= self._queued_upto:
            return True
        dest = self.destination.name
        for _ in range(QUEUE_CHUNKS_PER_ROUND):
            left = await self._db.write_quietly("queuing deliveries", repo.queue_deliveries, dest, QUEUE_CHUNK)
            if left is None:  # not enabled in this database (enable_destinations was not run): nothing to queue
                self._once.warning("outbox_destination_not_enabled", dest, destination=dest)
                return True
            if left == 0:
                self._queued_upto = newest
                return True
        return False

    async def _due(self) -> list[OutboxEvent]:
        now = await self.outbox._timeline.now()
        size = self.destination.batch_size
        dest = self.destination.name
        relaxed = (dest, now, dest, now)  # the relaxed query checks `now` twice
        fresh = (dest, now, dest)
        if size == 1:
            # One event per call: alternate the oldest and the freshest eligible one.
            self._fresh_turn = not self._fresh_turn
            rows = await self._db.fetchall(_DUE_FRESH, (*fresh, 1)) if self._fresh_turn else []
            if not rows:
                rows = await self._db.fetchall(_DUE_RELAXED, (*relaxed, 1))
        else:
            oldest = await self._db.fetchall(_DUE_RELAXED, (*relaxed, size - size // 2))
            freshest = await self._db.fetchall(_DUE_FRESH, (*fresh, size // 2))
            rows = sorted({r[0]: r for r in [*oldest, *freshest]}.values(), key=lambda r: r[0])
        return [_event(r) for r in rows]

    def _backoff_ms(self, attempts: int, retry_after_s: float | None) -> int:
        if retry_after_s is not None:
            return int(retry_after_s * 1000 * random.uniform(1.0, 1.1))
        delay = min(self._cap_s, self._base_s * 2 ** min(attempts, 30))
        return int(delay * 1000 * random.uniform(0.5, 1.0))

    async def _record(self, batch: list[OutboxEvent], results: list[Result], retry_after_s: float | None) -> None:
        """The results in one write of the store's group commit (a function on the writer's thread, not a
        transaction held across awaits: decisions queued behind it would wait for every hop of it)."""
        tried = {e.seq: e.attempts for e in batch}
        timeline = self.outbox._timeline
        now = await timeline.now()
        shifted = timeline.shifted_ms
        dest = self.destination.name
        delays = {r.seq: self._backoff_ms(tried.get(r.seq, 0), retry_after_s) for r in results}
        delivered = any(r.verdict is Verdict.DELIVERED for r in results)
        failed = next((r.reason for r in results if r.verdict is not Verdict.DELIVERED), None)
        breaker = self.breaker.state.value

        def record(conn: sqlite3.Connection) -> int:
            # A rebase committed while this write waited for the writer: our `now` is on the old wall clock, and
            # the rows written below must not be; no rebase runs while a group commits (the store's lock).
            at = now + timeline.shifted_ms - shifted
            conn.executemany(
                "UPDATE deliveries SET state = 'delivered', delivered_at = ?, attempts = attempts + 1,"
                " first_attempt_at = COALESCE(first_attempt_at, ?), last_error = NULL"
                " WHERE destination = ? AND seq = ?",
                [(at, at, dest, r.seq) for r in results if r.verdict is Verdict.DELIVERED],
            )
            conn.executemany(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = ?,"
                " first_attempt_at = COALESCE(first_attempt_at, ?) WHERE destination = ? AND seq = ?",
                [(r.reason, at, dest, r.seq) for r in results if r.verdict is Verdict.DEAD],
            )
            conn.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,"
                " first_attempt_at = COALESCE(first_attempt_at, ?) WHERE destination = ? AND seq = ?",
                [
                    (r.reason, at + delays[r.seq], at, dest, r.seq)
                    for r in results
                    if r.verdict not in (Verdict.DELIVERED, Verdict.DEAD)
                ],
            )
            conn.execute(
                "INSERT INTO destination_state (destination, last_success_at, last_error, last_error_at, breaker)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (destination) DO UPDATE SET"
                " last_success_at = COALESCE(excluded.last_success_at, last_success_at),"
                " last_error = COALESCE(excluded.last_error, last_error),"
                " last_error_at = COALESCE(excluded.last_error_at, last_error_at), breaker = excluded.breaker",
                (dest, at if delivered else None, failed, at if failed else None, breaker),
            )
            return at

        now = await self._db.write_quietly("recording deliveries", record)
        self.status.breaker = self.breaker.state.value
        if delivered:
            self.status.last_success_ms = now
        if failed:
            self.status.last_error, self.status.last_error_ms = failed, now

    async def _idle(self) -> None:
        """Sleep until the earliest retry is due or new rows are committed (never only the latter)."""
        row = await self._db.fetchone(_EARLIEST_RETRY, (self.destination.name,))
        due = row[0] if row and row[0] is not None else None
        wait = IDLE_MAX_S if due is None else max(0.0, (due - await self.outbox._timeline.now()) / 1000)
        if await self._sleep(min(wait, IDLE_MAX_S)):
            await asyncio.sleep(LINGER_S)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep until woken by a commit (True) or for `seconds` (False)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), max(seconds, 0.005))
            return True
        return False


def _event(row: Any) -> OutboxEvent:
    return OutboxEvent(
        seq=row[0],
        event_id=row[1],
        type=row[2],
        occurred_at=row[3],
        mono_ns=row[4],
        boot_id=row[5],
        clock_synced=bool(row[6]),
        session_id=row[7],
        device_id=row[8],
        data=json.loads(row[9]),
        attempts=row[10],
        first_attempt_at=row[11],
    )
