"""The pull feed (DESIGN 2.4): the cloud reads the event log in `seq` order and acknowledges what it holds.

`seq` is the commit order (one writer at a time) and is never reused (AUTOINCREMENT), so `after` is a complete
cursor: a page holds every event with a greater seq that still exists, in order, and a later page never
reveals an event below a seq already served. Events at or below the acknowledged seq may since have been
pruned (`sync.retention_days`). Each event has the push wire's shape (`OutboxEvent.wire`) plus `device_id`.

Pages are serialised by SQLite itself (`json_object`, on the reader connection's thread): 5,000 events cost one
query and one join, and the stored `data` text is embedded as it is, never decoded and encoded again.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..store.db import Database

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
ACKED_KEY = "pull_feed.acked_upto"  # in kv: the highest seq the cloud acknowledged
ACKED_AT_KEY = "pull_feed.acked_at"  # in kv: when (ms), by the agent's clock

# occurred_at in the push wire's form (datetime.isoformat(timespec="milliseconds") in UTC), e.g.
# 2026-03-02T15:00:00.123+00:00; SQLite's strftime agrees with Python's for every millisecond value.
_PAGE = """
SELECT seq, json_object(
    'seq', seq, 'event_id', event_id, 'type', type,
    'occurred_at', strftime('%Y-%m-%dT%H:%M:%f+00:00', occurred_at / 1000.0, 'unixepoch'),
    'mono_ns', mono_ns, 'boot_id', boot_id,
    'clock_synced', json(CASE WHEN clock_synced THEN 'true' ELSE 'false' END),
    'session_id', session_id, 'device_id', device_id, 'data', json(data))
FROM events WHERE seq > ? ORDER BY seq LIMIT ?
"""
_NEWEST = "SELECT seq FROM sqlite_sequence WHERE name = 'events'"


@dataclass(frozen=True, slots=True)
class Page:
    events_json: bytes  # a JSON array, ready to embed in the answer
    count: int
    next_after: int  # the `after` of the next page: the last seq served, or the request's `after` when empty
    has_more: bool


@dataclass(frozen=True, slots=True)
class FeedState:
    acked_upto: int
    acked_at_ms: int | None
    newest_seq: int  # the highest seq ever assigned (0: no event yet), pruned or not

    @property
    def lag(self) -> int:
        """Events committed that the cloud has not acknowledged yet."""
        return max(0, self.newest_seq - self.acked_upto)


@dataclass(frozen=True, slots=True)
class AckOutcome:
    acked_upto: int  # the stored acknowledgement after this call
    newest_seq: int
    changed: bool
    beyond_newest: bool  # refused: the ack names a seq this log never assigned


async def page(db: Database, after: int, limit: int) -> Page:
    """Up to `limit` events with seq > `after`, in seq order."""
    rows = await db.fetchall(_PAGE, (after, limit + 1))
    has_more = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        return Page(b"[]", 0, after, False)
    body = "[" + ",".join(row[1] for row in rows) + "]"
    return Page(body.encode(), len(rows), int(rows[-1][0]), has_more)


async def newest_seq(db: Database) -> int:
    row = await db.fetchone(_NEWEST)
    return int(row[0]) if row is not None else 0


async def state(db: Database) -> FeedState:
    rows = await db.fetchall("SELECT key, value FROM kv WHERE key IN (?, ?)", (ACKED_KEY, ACKED_AT_KEY))
    values = {str(r[0]): str(r[1]) for r in rows}
    acked_at = values.get(ACKED_AT_KEY)
    return FeedState(
        acked_upto=int(values.get(ACKED_KEY, 0)),
        acked_at_ms=int(acked_at) if acked_at is not None else None,
        newest_seq=await newest_seq(db),
    )


async def ack(db: Database, upto: int, now_ms: int) -> AckOutcome:
    """Record that the cloud holds every event up to `upto`. Monotonic: a lower ack than the stored one is a
    no-op, so a late retry of an old ack never moves the mark back."""
    async with db.transaction("recording the pull feed's ack", notify=False) as conn:
        rows = list(await conn.execute_fetchall(_NEWEST))
        newest = int(rows[0][0]) if rows else 0
        rows = list(await conn.execute_fetchall("SELECT value FROM kv WHERE key = ?", (ACKED_KEY,)))
        current = int(rows[0][0]) if rows else 0
        if upto > newest:
            return AckOutcome(current, newest, changed=False, beyond_newest=True)
        if upto <= current:
            return AckOutcome(current, newest, changed=False, beyond_newest=False)
        await conn.executemany(
            "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
            [(ACKED_KEY, str(upto)), (ACKED_AT_KEY, str(now_ms))],
        )
    return AckOutcome(upto, newest, changed=True, beyond_newest=False)
