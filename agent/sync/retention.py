"""Retention: the event log is pruned once nothing needs an event any more (DESIGN 3: one storage budget,
unsynced sessions and consumption never evicted).

An event is pruned when all of these hold:
- every enabled destination's worker has queued it (its cursor is past it), and no delivery row of it is
  pending (each destination has it delivered, dead-lettered, or purged by a person);
- the pull feed acknowledged it (seq <= the cloud's ack), when the feed is configured;
- its session, if any, is closed;
- it is older than `sync.retention_days` (by its `occurred_at`, on the agent's clock).

Candidates are found on the read connection; each batch is then re-checked and deleted (delivery rows first,
for their foreign key) in one short write transaction of at most `sync.prune_batch` events, so a card tap waits
for one batch at most, and a dead letter requeued meanwhile by `club-agent outbox requeue` is never deleted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from ..errors import StoreError
from ..logs import OnceLogger, get_logger
from ..store.db import Database
from . import feed
from .status import known_destinations

log = get_logger("agent.sync.retention")

PAUSE_S = 0.005  # between batches: writers queued behind the prune go first
SCAN_WINDOW = 5000  # seqs examined per candidate read
PRUNED_TOTAL_KEY = "retention.pruned_total"
PRUNED_AT_KEY = "retention.last_pruned_at"

_PRUNABLE = """
SELECT e.seq FROM events e
WHERE {seqs} AND e.seq <= ? AND e.occurred_at < ?
  AND NOT EXISTS (SELECT 1 FROM deliveries d
                  WHERE d.destination IN (SELECT value FROM json_each(?)) AND d.seq = e.seq AND d.state = 'pending')
  AND (e.session_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = e.session_id AND s.ended_at IS NULL))
ORDER BY e.seq LIMIT ?
"""
_CANDIDATES = _PRUNABLE.format(seqs="e.seq > ?")
_RECHECK = _PRUNABLE.format(seqs="e.seq IN (SELECT value FROM json_each(?))")


class Retention:
    def __init__(
        self,
        db: Database,
        *,
        retention_s: float,
        require_ack: bool,
        batch: int,
        interval_s: float,
        now_ms: Callable[[], int],
        on_pruned: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._db = db
        self._retention_ms = int(retention_s * 1000)
        self._require_ack = require_ack
        self._batch = batch
        self._interval_s = interval_s
        self._now_ms = now_ms
        self._on_pruned = on_pruned
        self._once = OnceLogger(log)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.prune()
            except StoreError as exc:  # a full or busy disk: try again next round, say so once
                self._once.warning("prune_failed", str(exc)[:60], error=str(exc))
            except Exception:  # housekeeping: a bug here must never stop the door (cancellation still ends it)
                log.exception("prune_crashed")

    async def prune(self) -> int:
        """One round: prune everything prunable now, batch by batch. Returns how many events went."""
        now = self._now_ms()
        cutoff = now - self._retention_ms
        if self._require_ack:
            upto = (await feed.state(self._db)).acked_upto
        else:
            upto = await feed.newest_seq(self._db)
        # Events past a destination's cursor may still gain its delivery row: never pruned (the lowest cursor
        # bounds the round). Below it the destinations read now cover every row a batch could have; were one
        # missed, the events' foreign key would refuse the delete.
        lowest = await self._db.fetchone("SELECT MIN(upto) FROM delivery_cursors")
        if lowest is not None and lowest[0] is not None:
            upto = min(upto, int(lowest[0]))
        names = await known_destinations(self._db)
        destinations = json.dumps(names)
        first = await self._db.fetchone("SELECT MIN(seq) FROM events")
        after = int(first[0]) - 1 if first is not None and first[0] is not None else upto
        total = 0
        while after < upto:
            # One window of seqs per read: a long run of events that must stay (a backlog during an outage)
            # costs many short reads, never one long one that the agent's other reads would queue behind.
            window = min(upto, after + SCAN_WINDOW)
            rows = await self._db.fetchall(_CANDIDATES, (after, window, cutoff, destinations, self._batch))
            candidates = [int(r[0]) for r in rows]
            after = candidates[-1] if len(candidates) == self._batch else window
            if candidates:
                total += await self._delete(candidates, names, upto, cutoff, now)
            await asyncio.sleep(PAUSE_S)
        if total:
            self._on_pruned(total)
            log.info("events_pruned", events=total, upto=upto, older_than_ms=cutoff)
        return total

    async def _delete(self, candidates: list[int], names: list[str], upto: int, cutoff: int, now: int) -> int:
        async with self._db.transaction("pruning the event log", notify=False) as conn:
            # Checked again under the write lock: a dead letter requeued since the read is pending again.
            rows = await conn.execute_fetchall(
                _RECHECK, (json.dumps(candidates), upto, cutoff, json.dumps(names), len(candidates))
            )
            seqs = json.dumps([int(r[0]) for r in rows])
            for name in names:
                await conn.execute(
                    "DELETE FROM deliveries WHERE destination = ? AND seq IN (SELECT value FROM json_each(?))",
                    (name, seqs),
                )
            cursor = await conn.execute("DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))", (seqs,))
            deleted = cursor.rowcount
            await cursor.close()
            await conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                " SET value = CAST(value AS INTEGER) + excluded.value",
                (PRUNED_TOTAL_KEY, str(deleted)),
            )
            await conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (PRUNED_AT_KEY, str(now)))
        return deleted
