"""The outbox as operators and the health endpoint see it: per destination its depth, dead letters, oldest
pending event, last success and last error; and how a destination's health is judged.

Read-only queries on `Database.fetchall` (the agent's shared reader, or the CLI's own connection to the same
file: WAL lets both read while the agent writes). Every query walks an index, never the whole event log.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from ..store import repo
from ..store.db import Database

# Calls succeed, but the oldest pending event has waited this long: a backlog that is not draining fast enough.
DEGRADED_BACKLOG_S = 300.0


class Health(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class DestinationState:
    destination: str
    pending: int
    dead: int
    oldest_pending_ms: int | None  # occurred_at of the oldest pending event
    last_success_ms: int | None  # as last recorded by the agent (destination_state)
    last_error: str | None
    last_error_ms: int | None
    breaker: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    destination: str
    seq: int
    event_id: str
    type: str
    occurred_at_ms: int
    session_id: str | None
    attempts: int
    reason: str | None


async def known_destinations(db: Database) -> list[str]:
    """Every destination enabled, with a delivery row or with a recorded state; the rows' destinations found by
    walking the primary key's first column (one index seek per destination), not by scanning every row."""
    found: set[str] = set()
    row = await db.fetchone("SELECT MIN(destination) FROM deliveries")
    while row is not None and row[0] is not None:
        found.add(str(row[0]))
        row = await db.fetchone("SELECT MIN(destination) FROM deliveries WHERE destination > ?", (row[0],))
    found.update(str(r[0]) for r in await db.fetchall("SELECT destination FROM destination_state"))
    found.update(str(r[0]) for r in await db.fetchall("SELECT destination FROM delivery_cursors"))
    return sorted(found)


# Pending: the rows waiting, plus the events routed here that the worker has not given rows yet (past its cursor;
# none when the destination is not enabled). Each count walks a partial index (migration 0010): the primary key
# would walk every delivered row kept, milliseconds a poll, growing with the history.
_STATE = """
SELECT
    (SELECT COUNT(*) FROM deliveries INDEXED BY deliveries_pending_seq WHERE destination = :dest AND state = 'pending')
      + (SELECT COUNT(*) FROM events
         WHERE seq > (SELECT upto FROM delivery_cursors WHERE destination = :dest) AND {routed}),
    (SELECT COUNT(*) FROM deliveries INDEXED BY deliveries_dead WHERE destination = :dest AND state = 'dead'),
    (SELECT e.occurred_at FROM events e WHERE e.seq = COALESCE(
        (SELECT MIN(seq) FROM deliveries INDEXED BY deliveries_pending_seq
         WHERE destination = :dest AND state = 'pending'),
        (SELECT MIN(seq) FROM events
         WHERE seq > (SELECT upto FROM delivery_cursors WHERE destination = :dest) AND {routed}))),
    s.last_success_at, s.last_error, s.last_error_at, s.breaker
FROM (SELECT 1) LEFT JOIN destination_state s ON s.destination = :dest
"""


async def destination_states(db: Database, names: Iterable[str]) -> list[DestinationState]:
    out = []
    for name in names:
        routed, types = repo.routed_to(name)
        sql = _STATE.format(routed=routed.replace("?", ":types"))
        row = await db.fetchone(sql, {"dest": name, "types": types})
        assert row is not None  # the FROM (SELECT 1) always yields one row
        out.append(
            DestinationState(
                destination=name,
                pending=int(row[0]),
                dead=int(row[1]),
                oldest_pending_ms=row[2],
                last_success_ms=row[3],
                last_error=row[4],
                last_error_ms=row[5],
                breaker=row[6],
            )
        )
    return out


_DEAD = """
SELECT d.destination, d.seq, e.event_id, e.type, e.occurred_at, e.session_id, d.attempts, d.last_error
FROM deliveries d JOIN events e ON e.seq = d.seq
WHERE d.state = 'dead' {}
ORDER BY d.seq, d.destination LIMIT ?
"""
_DEAD_ALL = _DEAD.format("")
_DEAD_ONE = _DEAD.format("AND d.destination = ?")


async def dead_letters(db: Database, destination: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """Dead letters in seq order (then destination), at most `limit`."""
    if destination is None:
        rows = await db.fetchall(_DEAD_ALL, (limit,))
    else:
        rows = await db.fetchall(_DEAD_ONE, (destination, limit))
    return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]


def judge(
    *,
    running: bool,
    breaker: str | None,
    last_call_ok: bool | None,
    dead: int,
    oldest_pending_age_s: float | None,
) -> Health:
    """unhealthy: not running (enabled without its secrets), its breaker is not closed, or its last call failed;
    degraded: calls succeed but dead letters wait for an operator, or the backlog is older than
    DEGRADED_BACKLOG_S; healthy otherwise (including a destination not called yet with nothing to send)."""
    if not running or (breaker is not None and breaker != "closed") or last_call_ok is False:
        return Health.UNHEALTHY
    if dead > 0 or (oldest_pending_age_s is not None and oldest_pending_age_s > DEGRADED_BACKLOG_S):
        return Health.DEGRADED
    return Health.HEALTHY


def worst(healths: Iterable[Health]) -> Health:
    order = [Health.HEALTHY, Health.DEGRADED, Health.UNHEALTHY]
    return max(healths, key=order.index, default=Health.HEALTHY)
