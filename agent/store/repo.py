"""SQL for the hot path and its neighbours: plain functions over a sqlite3 connection, run on the store's thread
by `Database.write` (inside the caller's transaction, so callers decide what commits together) or
`Database.read`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

from uuid6 import uuid7

from ..domain.model import CacheInfo, Instant, Member, MemberState, MemberStatus, OpenSession, TimeWindow

# Which destinations learn of which event type. Ziggy knows sessions and consumption; the cloud knows all.
ROUTES: dict[str, tuple[str, ...]] = {
    "access.decided": ("cloud",),
    "session.started": ("ziggy", "cloud"),
    "session.ended": ("ziggy", "cloud"),
    "consumption.recorded": ("ziggy", "cloud"),
    "consumption.voided": ("cloud",),  # Ziggy has no call to take a line back (a line voided in time is not sent)
    "highlight.created": ("cloud",),
    # a court with a camera whose clip will not come (no footage, evicted, refused): the cloud cuts its own
    "highlight.clip_unavailable": ("cloud",),
    "clock.corrected": ("cloud",),
}


def to_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    """UUIDv7: time-ordered, so ids sort roughly by birth and index well."""
    return str(uuid7())


@dataclass(frozen=True, slots=True)
class Stamp:
    """When something happened, as well as this box can tell (DESIGN section 3, Time)."""

    wall: datetime
    mono_ns: int
    boot_id: str
    clock_synced: bool


@dataclass(frozen=True, slots=True)
class NewEvent:
    type: str
    data: dict[str, Any]
    session_id: str | None = None
    device_id: str | None = None


def routed_to(destination: str) -> tuple[str, str]:
    """The SQL condition on an event's `type` (one `?`, bound to the JSON list returned) for the events that go to
    `destination`: the types ROUTES sends there, or for the cloud, which learns of every type, all types but
    those routed elsewhere only."""
    if destination == "cloud":
        others = sorted(t for t, ds in ROUTES.items() if "cloud" not in ds)
        return "type NOT IN (SELECT value FROM json_each(?))", json.dumps(others)
    mine = sorted(t for t, ds in ROUTES.items() if destination in ds)
    return "type IN (SELECT value FROM json_each(?))", json.dumps(mine)


def append_events(conn: sqlite3.Connection, stamp: Stamp, events: Sequence[NewEvent]) -> list[tuple[int, str]]:
    """Append events to the log; returns (seq, event_id) per event. Their delivery rows are added later, in bulk,
    by `queue_deliveries` (the outbox worker of each destination does it before it looks for work): a decision
    writes one row and one index entry per event, nothing else."""
    out = []
    for ev in events:
        event_id = new_id()
        cursor = conn.execute(
            "INSERT INTO events (event_id, type, occurred_at, mono_ns, boot_id, clock_synced, session_id,"
            " device_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event_id,
                ev.type,
                to_ms(stamp.wall),
                stamp.mono_ns,
                stamp.boot_id,
                int(stamp.clock_synced),
                ev.session_id,
                ev.device_id,
                json.dumps(ev.data, separators=(",", ":"), ensure_ascii=False),
            ),
        )
        seq = cursor.lastrowid
        assert seq is not None
        out.append((seq, event_id))
    return out


def destination_busy(conn: sqlite3.Connection, destination: str, now_ms: int) -> bool:
    """Whether `destination` has events to deliver now (queued and due, or not queued yet): bulk work such as
    clip uploads waits for them. Two index lookups, whatever the backlog."""
    due = conn.execute(
        "SELECT 1 FROM deliveries WHERE destination = ? AND state = 'pending' AND next_attempt_at <= ? LIMIT 1",
        (destination, now_ms),
    ).fetchone()
    if due is not None:
        return True
    behind = conn.execute(
        "SELECT upto < (SELECT COALESCE(MAX(seq), 0) FROM events) FROM delivery_cursors WHERE destination = ?",
        (destination,),
    ).fetchone()
    return bool(behind and behind[0])


def enable_destinations(conn: sqlite3.Connection, destinations: Iterable[str]) -> None:
    """The destinations the configuration enables, before the first decision: each new one learns of the events
    from now on (its cursor starts at the newest seq); one no longer enabled stops queuing (its cursor goes,
    the rows it already has stay until delivered, dead-lettered or purged)."""
    names = sorted(set(destinations))
    conn.execute(
        "DELETE FROM delivery_cursors WHERE destination NOT IN (SELECT value FROM json_each(?))", (json.dumps(names),)
    )
    conn.executemany(
        "INSERT OR IGNORE INTO delivery_cursors (destination, upto)"
        " VALUES (?, (SELECT COALESCE(MAX(seq), 0) FROM events))",
        [(name,) for name in names],
    )


def queue_deliveries(conn: sqlite3.Connection, destination: str, limit: int) -> int | None:
    """Add the delivery rows of `destination` for up to `limit` seqs past its cursor, and move the cursor: the
    events of a commit are all below the next commit's (one writer), so nothing is ever skipped. Returns how many
    seqs are still past the cursor, or None when the destination is not enabled (it has no cursor)."""
    row = conn.execute("SELECT upto FROM delivery_cursors WHERE destination = ?", (destination,)).fetchone()
    if row is None:
        return None
    upto = int(row[0])
    newest = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
    end = min(newest, upto + limit)
    if end > upto:
        where, types = routed_to(destination)
        conn.execute(
            f"INSERT OR IGNORE INTO deliveries (destination, seq) SELECT ?, seq FROM events"  # noqa: S608 - constant
            f" WHERE seq > ? AND seq <= ? AND {where}",
            (destination, upto, end, types),
        )
        conn.execute("UPDATE delivery_cursors SET upto = ? WHERE destination = ?", (end, destination))
    return newest - end


# -- members ---------------------------------------------------------------------------------------------------


def _windows(raw: str) -> tuple[TimeWindow, ...]:
    out = []
    for item in json.loads(raw):
        out.append(
            TimeWindow(
                days=frozenset(item["days"]), start=time.fromisoformat(item["from"]), end=time.fromisoformat(item["to"])
            )
        )
    return tuple(out)


def member_from_row(row: sqlite3.Row) -> Member:
    return Member(
        member_id=row["member_id"],
        first_name=row["first_name"],
        status=MemberStatus(row["status"]),
        credits=row["credits"],
        requires_credit=bool(row["requires_credit"]),
        valid_from=from_ms(row["valid_from"]) if row["valid_from"] is not None else None,
        valid_until=from_ms(row["valid_until"]) if row["valid_until"] is not None else None,
        groups=frozenset(json.loads(row["groups_json"])),
        hours=_windows(row["hours_json"]),
    )


@dataclass(frozen=True, slots=True)
class Lookup:
    """Everything a decision needs about one credential, read in one statement."""

    member: Member | None
    state: MemberState
    cache: CacheInfo


_LOOKUP_SQL = """
SELECT ml.version AS list_version, ml.synced_at AS list_synced_at, m.*,
       s.session_id AS open_session_id, s.court_id AS open_court_id, s.started_at AS open_started_at,
       (SELECT COALESCE(SUM(l.delta), 0) FROM credit_ledger l
         WHERE l.member_id = m.member_id AND l.confirmed = 0) AS pending_credits,
       {open_instant} AS open_instant,
       (SELECT MAX(x.started_at) FROM sessions x WHERE x.member_id = m.member_id) AS last_checkin_at,
       {last_instant} AS last_checkin_instant
FROM member_list ml
LEFT JOIN {source}
LEFT JOIN members m ON m.member_id = {member_ref}
LEFT JOIN sessions s ON s.member_id = m.member_id AND s.ended_at IS NULL
WHERE ml.id = 1
"""
# When a session opened on the monotonic clock: its first event's (events_by_session holds seqs in order).
_START_INSTANT = (
    "(SELECT e.mono_ns || ' ' || e.boot_id FROM events e WHERE e.session_id = {session} ORDER BY e.seq LIMIT 1)"
)
_LOOKUP_INSTANTS = {
    "open_instant": _START_INSTANT.format(session="s.session_id"),
    "last_instant": _START_INSTANT.format(
        session="(SELECT x.session_id FROM sessions x WHERE x.member_id = m.member_id ORDER BY x.started_at DESC"
        " LIMIT 1)"
    ),
}
_BY_CARD = _LOOKUP_SQL.format(source="cards c ON c.card_id = ?", member_ref="c.member_id", **_LOOKUP_INSTANTS)
_BY_CODE = _LOOKUP_SQL.format(source="members k ON k.member_code = ?", member_ref="k.member_id", **_LOOKUP_INSTANTS)
_BY_ID = _LOOKUP_SQL.format(source="members k ON k.member_id = ?", member_ref="k.member_id", **_LOOKUP_INSTANTS)


def _instant(value: str | None) -> Instant | None:
    """`mono_ns boot_id` as the start-instant subqueries give it."""
    if not value:
        return None
    mono, _, boot = value.partition(" ")
    return Instant(int(mono), boot)


def _lookup_from_row(row: sqlite3.Row) -> Lookup:
    cache = CacheInfo(
        version=row["list_version"],
        synced_at=from_ms(row["list_synced_at"]) if row["list_synced_at"] is not None else None,
    )
    if row["member_id"] is None:
        return Lookup(None, MemberState(), cache)
    member = member_from_row(row)
    open_session = None
    if row["open_session_id"] is not None:
        open_session = OpenSession(
            session_id=row["open_session_id"],
            member_id=member.member_id,
            court_id=row["open_court_id"],
            started_at=from_ms(row["open_started_at"]),
            started=_instant(row["open_instant"]),
        )
    state = MemberState(
        open_session=open_session,
        last_checkin_at=from_ms(row["last_checkin_at"]) if row["last_checkin_at"] is not None else None,
        last_checkin=_instant(row["last_checkin_instant"]),
        pending_credits=int(row["pending_credits"]),
    )
    return Lookup(member, state, cache)


def lookup(
    conn: sqlite3.Connection,
    *,
    card_id: str | None = None,
    member_code: str | None = None,
    member_id: str | None = None,
) -> Lookup:
    if card_id is not None:
        sql, key = _BY_CARD, card_id
    elif member_code is not None:
        sql, key = _BY_CODE, member_code
    elif member_id is not None:
        sql, key = _BY_ID, member_id
    else:
        raise ValueError("lookup needs a card id, member code or member id")
    return _lookup_from_row(conn.execute(sql, (key,)).fetchone())


def cards_of(conn: sqlite3.Connection, member_id: str) -> list[str]:
    rows = conn.execute("SELECT card_id FROM cards WHERE member_id = ? ORDER BY card_id", (member_id,)).fetchall()
    return [r[0] for r in rows]


# -- sessions --------------------------------------------------------------------------------------------------


def open_session(
    conn: sqlite3.Connection,
    *,
    session_id: str,
    member_id: str,
    court_id: str,
    card_id: str | None,
    opened_by: str,
    started_at: datetime,
    list_version: int,
) -> None:
    conn.execute(
        "INSERT INTO sessions (session_id, member_id, court_id, card_id, opened_by, started_at, list_version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (session_id, member_id, court_id, card_id, opened_by, to_ms(started_at), list_version),
    )


def close_session(conn: sqlite3.Connection, session_id: str, ended_at: datetime, reason: str) -> bool:
    cursor = conn.execute(
        "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE session_id = ? AND ended_at IS NULL",
        (to_ms(ended_at), reason, session_id),
    )
    return cursor.rowcount == 1


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    member_id: str
    first_name: str
    court_id: str
    started_at: datetime
    credits_left: int | None
    started: Instant | None = None  # `started_at` on the monotonic clock (None: unknown)


_OPEN_SESSIONS_SQL = f"""
SELECT s.session_id, s.member_id, s.court_id, s.started_at, m.first_name, m.credits,
       {_START_INSTANT.format(session="s.session_id")} AS started_instant,
       (SELECT COALESCE(SUM(l.delta), 0) FROM credit_ledger l
         WHERE l.member_id = s.member_id AND l.confirmed = 0) AS pending
FROM sessions s LEFT JOIN members m ON m.member_id = s.member_id
WHERE s.ended_at IS NULL {{where}}
ORDER BY s.started_at, s.session_id
"""  # noqa: S608 - constant SQL


def _session_view(row: sqlite3.Row) -> SessionView:
    credits = row["credits"]
    return SessionView(
        session_id=row["session_id"],
        member_id=row["member_id"],
        first_name=row["first_name"] or "",
        court_id=row["court_id"],
        started_at=from_ms(row["started_at"]),
        credits_left=None if credits is None else credits + int(row["pending"]),
        started=_instant(row["started_instant"]),
    )


def open_sessions(conn: sqlite3.Connection, court_id: str | None = None) -> list[SessionView]:
    if court_id is None:
        rows = conn.execute(_OPEN_SESSIONS_SQL.format(where="")).fetchall()
    else:
        rows = conn.execute(_OPEN_SESSIONS_SQL.format(where="AND s.court_id = ?"), (court_id,)).fetchall()
    return [_session_view(r) for r in rows]


def session_by_id(conn: sqlite3.Connection, session_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return row


@dataclass(frozen=True, slots=True)
class ConsumptionLine:
    line_id: str
    line_no: int
    item_id: str
    item_name: str
    quantity: int
    unit_cents: int

    @property
    def total_cents(self) -> int:
        return self.quantity * self.unit_cents


def insert_consumption(
    conn: sqlite3.Connection,
    *,
    request_id: str,
    pos_id: str,
    session: sqlite3.Row,
    lines: Sequence[ConsumptionLine],
    at: datetime,
) -> None:
    conn.executemany(
        "INSERT INTO consumption (line_id, request_id, pos_id, line_no, session_id, member_id, court_id, item_id,"
        " item_name, quantity, unit_cents, total_cents, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                line.line_id,
                request_id,
                pos_id,
                line.line_no,
                session["session_id"],
                session["member_id"],
                session["court_id"],
                line.item_id,
                line.item_name,
                line.quantity,
                line.unit_cents,
                line.total_cents,
                to_ms(at),
            )
            for line in lines
        ],
    )


def session_consumption_cents(conn: sqlite3.Connection, session_id: str) -> int:
    (total,) = conn.execute(
        "SELECT COALESCE(SUM(total_cents), 0) FROM consumption WHERE session_id = ? AND voided_at IS NULL",
        (session_id,),
    ).fetchone()
    return int(total)


def consumption_line(conn: sqlite3.Connection, line_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM consumption WHERE line_id = ?", (line_id,)).fetchone()
    return row


def void_consumption(conn: sqlite3.Connection, line_id: str, *, at: datetime, reason: str, by: str) -> None:
    conn.execute(
        "UPDATE consumption SET voided_at = ?, void_reason = ?, voided_by = ? WHERE line_id = ? AND voided_at IS NULL",
        (to_ms(at), reason, by, line_id),
    )


def highlight_count(conn: sqlite3.Connection, court_id: str, since: datetime) -> int:
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM highlights WHERE court_id = ? AND pressed_at >= ?", (court_id, to_ms(since))
    ).fetchone()
    return int(count)


# -- credits ---------------------------------------------------------------------------------------------------


def spend_credits(
    conn: sqlite3.Connection, member_id: str, amount: int, session_id: str, event_id: str, at: datetime
) -> None:
    conn.execute(
        "INSERT INTO credit_ledger (member_id, delta, session_id, event_id, created_at) VALUES (?, ?, ?, ?, ?)",
        (member_id, -amount, session_id, event_id, to_ms(at)),
    )


# -- answered requests -----------------------------------------------------------------------------------------


def answered(conn: sqlite3.Connection, device_id: str, msg_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT response FROM device_requests WHERE device_id = ? AND msg_id = ?", (device_id, msg_id)
    ).fetchone()
    return None if row is None else dict(json.loads(row[0]))


def remember_answer(
    conn: sqlite3.Connection, device_id: str, msg_id: str, response: dict[str, Any], at: datetime
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO device_requests (device_id, msg_id, response, created_at) VALUES (?, ?, ?, ?)",
        (device_id, msg_id, json.dumps(response, separators=(",", ":"), ensure_ascii=False), to_ms(at)),
    )


def forget_answers_before(conn: sqlite3.Connection, before: datetime) -> int:
    return conn.execute("DELETE FROM device_requests WHERE created_at < ?", (to_ms(before),)).rowcount


# -- highlights ------------------------------------------------------------------------------------------------


def insert_highlight(
    conn: sqlite3.Connection,
    *,
    highlight_id: str,
    court_id: str,
    session_id: str | None,
    button_id: str,
    pressed_at: datetime,
    start_at: datetime,
    duration_ms: int,
    kind: str,
    clip_state: str = "none",
) -> None:
    conn.execute(
        "INSERT INTO highlights (highlight_id, court_id, session_id, button_id, pressed_at, start_at, duration_ms,"
        " kind, clip_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            highlight_id,
            court_id,
            session_id,
            button_id,
            to_ms(pressed_at),
            to_ms(start_at),
            duration_ms,
            kind,
            clip_state,
        ),
    )


# -- small durable facts ---------------------------------------------------------------------------------------


def get_kv(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_kv(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))


# -- clock correction (DESIGN 3) ----------------------------------------------------------------------------

# The wall-time fields an event's data carries that were stamped at the event itself.
_STAMPED_FIELDS = {
    "session.started": ("started_at",),
    "session.ended": ("ended_at",),
    "highlight.created": ("pressed_at", "start_at"),
}
CORRECTIONS_PER_EVENT = 500


def _parse_iso_ms(value: str) -> int:
    return to_ms(datetime.fromisoformat(value.replace("Z", "+00:00")))


def _shift_iso(value: Any, offset_ms: int) -> Any:
    if not isinstance(value, str):
        return value
    return iso(from_ms(_parse_iso_ms(value) + offset_ms))


def correct_unsynced(conn: sqlite3.Connection, boot_id: str, wall: datetime, mono_ns: int) -> list[dict[str, Any]]:
    """Re-stamp this boot's events stamped before the clock synced, from monotonic time: the true wall time of
    an event is now - (monotonic now - its monotonic stamp). The event rows (and the times their data and the
    session, highlight and consumption rows carry) are corrected in the caller's transaction; the first stamp
    stays in occurred_at_unsynced. Returns the corrections, for a clock.corrected event (receivers that already
    took an event with its first stamp fix it from that). Stamps of earlier boots cannot be corrected: their
    monotonic clock is gone, and they stay marked clock_synced = false."""
    rows = conn.execute(
        "SELECT seq, event_id, type, occurred_at, mono_ns, session_id, data FROM events"
        " WHERE boot_id = ? AND clock_synced = 0 ORDER BY seq",
        (boot_id,),
    ).fetchall()
    now_ms = to_ms(wall)
    corrections: list[dict[str, Any]] = []
    started_offsets: dict[str, int] = {}  # session id -> offset of its start, corrected in this pass
    for row in rows:
        true_ms = now_ms - (mono_ns - row["mono_ns"]) // 1_000_000
        offset = true_ms - row["occurred_at"]
        data = json.loads(row["data"])
        for name in _STAMPED_FIELDS.get(row["type"], ()):
            if name in data:
                data[name] = _shift_iso(data[name], offset)
        session_id = row["session_id"]
        if row["type"] == "session.started" and session_id:
            started_offsets[session_id] = offset
            conn.execute("UPDATE sessions SET started_at = started_at + ? WHERE session_id = ?", (offset, session_id))
        elif row["type"] == "session.ended" and session_id:
            if session_id in started_offsets and "started_at" in data:
                data["started_at"] = _shift_iso(data["started_at"], started_offsets[session_id])
            if isinstance(data.get("started_at"), str) and isinstance(data.get("ended_at"), str):
                minutes = (_parse_iso_ms(data["ended_at"]) - _parse_iso_ms(data["started_at"])) // 60_000
                data["duration_minutes"] = max(0, minutes)
            conn.execute(
                "UPDATE sessions SET ended_at = ended_at + ? WHERE session_id = ? AND ended_at IS NOT NULL",
                (offset, session_id),
            )
        elif row["type"] == "highlight.created" and data.get("highlight_id"):
            conn.execute(
                "UPDATE highlights SET pressed_at = pressed_at + ?, start_at = start_at + ? WHERE highlight_id = ?",
                (offset, offset, data["highlight_id"]),
            )
        elif row["type"] == "consumption.recorded" and data.get("line_id"):
            conn.execute(
                "UPDATE consumption SET recorded_at = recorded_at + ? WHERE line_id = ?", (offset, data["line_id"])
            )
        conn.execute(
            "UPDATE events SET occurred_at = ?, occurred_at_unsynced = occurred_at, clock_synced = 1,"
            " data = ? WHERE seq = ?",
            (true_ms, json.dumps(data, separators=(",", ":")), row["seq"]),
        )
        corrections.append(
            {
                "event_id": row["event_id"],
                "seq": row["seq"],
                "occurred_at": iso(from_ms(true_ms)),
                "stamped_at": iso(from_ms(row["occurred_at"])),
            }
        )
    return corrections
