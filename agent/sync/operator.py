"""What an operator does to dead letters, each action kept in `outbox_audit` with who did it.

- requeue: dead -> pending, attempts reset, due at once. A running agent's idle worker looks for due rows at
  least every `outbox.IDLE_MAX_S`, so it picks them up without a restart. `first_attempt_at` is kept: Ziggy's
  rule for retries older than a day (ask before creating again) must still apply to them.
- purge: the dead delivery row is deleted; the event itself stays in the log (the pull feed still serves it)
  until retention prunes it. It means "this destination will never get this event", decided by a person.

The agent may be running: every write transaction touches at most CHUNK rows, and the action's audit row is
written in the first of them and brought up to date in each, so a crash half-way leaves an audit row that says
exactly what was done.
"""

from __future__ import annotations

import getpass
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiosqlite

from ..errors import AgentError
from ..store.db import Database
from .status import known_destinations

CHUNK = 500
REASONS_KEPT = 20

Action = Literal["requeue", "purge"]

_APPLY = {
    "requeue": "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = 0"
    " WHERE destination = ? AND state = 'dead' AND seq IN (SELECT value FROM json_each(?)) RETURNING seq, last_error",
    "purge": "DELETE FROM deliveries"
    " WHERE destination = ? AND state = 'dead' AND seq IN (SELECT value FROM json_each(?)) RETURNING seq, last_error",
}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at_ms: int
    actor: str
    action: str
    destination: str | None
    detail: str


def actor() -> str:
    """Who is at the keyboard: the person behind sudo, else the login user."""
    if os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return getpass.getuser()  # $LOGNAME, $USER, ... then the password database
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


def seq_ranges(seqs: Iterable[int]) -> str:
    """1,2,3,7,9,10 -> '1-3,7,9-10': a complete record of thousands of seqs in a few bytes."""
    out: list[str] = []
    ordered = sorted(set(seqs))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


async def check_destination(db: Database, destination: str | None, configured: Iterable[str]) -> list[str]:
    """The destinations an action covers; an unknown name is refused, naming the known ones."""
    known = sorted(set(configured) | set(await known_destinations(db)))
    if destination is None:
        return known
    if destination not in known:
        raise AgentError(f"unknown destination '{destination}' (known: {', '.join(known) or 'none'})")
    return [destination]


async def apply(
    db: Database,
    action: Action,
    destinations: Sequence[str],
    seqs: Sequence[int] | None,
    *,
    who: str,
    now_ms: int,
) -> dict[str, int]:
    """Requeue or purge dead letters: `seqs` on each of `destinations` (every one must be dead on at least one
    of them, or nothing is done), or every dead letter when `seqs` is None. Returns rows changed per destination."""
    if seqs is not None:
        await _check_seqs(db, destinations, seqs)
    done: dict[str, int] = {}
    for destination in destinations:
        changed = await _apply_one(db, action, destination, seqs, who, now_ms)
        if changed:
            done[destination] = changed
    return done


async def _check_seqs(db: Database, destinations: Sequence[str], seqs: Sequence[int]) -> None:
    rows = await db.fetchall(
        "SELECT DISTINCT seq FROM deliveries WHERE state = 'dead' AND destination IN (SELECT value FROM json_each(?))"
        " AND seq IN (SELECT value FROM json_each(?))",
        (json.dumps(list(destinations)), json.dumps(sorted(set(seqs)))),
    )
    missing = sorted(set(seqs) - {int(r[0]) for r in rows})
    if missing:
        where = destinations[0] if len(destinations) == 1 else "any destination"
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise AgentError(f"no dead letter on {where} for seq {shown} (see 'club-agent outbox dead'); nothing changed")


async def _apply_one(
    db: Database, action: Action, destination: str, seqs: Sequence[int] | None, who: str, now_ms: int
) -> int:
    changed: list[int] = []
    reasons: Counter[str] = Counter()
    audit_id: int | None = None
    todo = sorted(set(seqs)) if seqs is not None else None
    after = 0
    while True:
        async with db.transaction(f"{action} of dead letters", notify=action == "requeue") as conn:
            if todo is not None:
                chunk, todo = todo[:CHUNK], todo[CHUNK:]
            else:
                chunk = await _next_dead(conn, destination, after)
            if not chunk:
                break
            after = chunk[-1]
            cursor = await conn.execute(_APPLY[action], (destination, json.dumps(chunk)))
            rows = list(await cursor.fetchall())
            await cursor.close()
            if not rows:
                continue
            changed.extend(int(r[0]) for r in rows)
            reasons.update((r[1] or "")[:120] for r in rows)
            detail = json.dumps(
                {
                    "count": len(changed),
                    "seqs": seq_ranges(changed),
                    "selected": "all" if seqs is None else "seqs",
                    "reasons": dict(reasons.most_common(REASONS_KEPT)),
                },
                ensure_ascii=False,
            )
            if audit_id is None:
                cursor = await conn.execute(
                    "INSERT INTO outbox_audit (at, actor, action, destination, detail) VALUES (?, ?, ?, ?, ?)",
                    (now_ms, who, action, destination, detail),
                )
                audit_id = cursor.lastrowid
                await cursor.close()
            else:
                await conn.execute("UPDATE outbox_audit SET detail = ? WHERE id = ?", (detail, audit_id))
        if todo is not None and not todo:
            break
    return len(changed)


async def _next_dead(conn: aiosqlite.Connection, destination: str, after: int) -> list[int]:
    rows = await conn.execute_fetchall(
        "SELECT seq FROM deliveries WHERE destination = ? AND state = 'dead' AND seq > ? ORDER BY seq LIMIT ?",
        (destination, after, CHUNK),
    )
    return [int(r[0]) for r in rows]


async def audit_log(db: Database, limit: int = 50) -> list[AuditEntry]:
    """The newest `limit` operator actions, oldest first."""
    rows = await db.fetchall(
        "SELECT id, at, actor, action, destination, detail FROM outbox_audit ORDER BY id DESC LIMIT ?", (limit,)
    )
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5]) for r in reversed(rows)]
