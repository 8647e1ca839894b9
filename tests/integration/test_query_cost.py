"""The queries a busy evening runs over and over cost the same after 500 sessions as after 10,000.

Each query runs against two stores that differ only in how much history they keep (ended sessions, their
events, delivered rows for both destinations), and SQLite's virtual machine instructions are counted (a progress
handler called every instruction): an index seek is one instruction whatever the table's size, so a query
that walks history shows up as a count that grows with it. Counted, not timed: the machine's load cannot make
this test pass or fail.

Found this way: Ziggy's "is this member's previous session still pending" check walked every Ziggy delivery
row ever made up to the event, once per check-in (tap p50 4 -> 13 ms over a 30-minute soak).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.store import repo
from agent.store.db import Database
from agent.sync import feed, outbox, status, ziggy

SMALL, LARGE = 500, 10_000
T0_MS = 1_780_000_000_000
NOW_MS = T0_MS + 10 * 86_400_000
BOOT = "b" * 32
CARD = "CAFE01"
MEMBER = "m-now"


def _event(seq: int, kind: str, session: str | None, member: str, at: int) -> tuple[Any, ...]:
    data = {"member_id": member, "court_id": "c1", "started_at": "2026-06-01T10:00:00+00:00"}
    return (seq, f"e{seq:08d}", kind, at, seq * 1_000_000, BOOT, 1, session, "r1", json.dumps(data))


def fill(path: Path, history: int, analyze: bool) -> None:
    """`history` ended sessions of other members (two events each, delivered to both destinations), then the
    present: MEMBER with two ended sessions and one open one whose check-in is still pending, and a few events
    committed that no worker has queued yet. Set-up straight into the schema, not through the agent."""
    conn = sqlite3.connect(path)
    with conn:
        member = (MEMBER, "Ana", "active", None, T0_MS)
        others = [(f"m{i:06d}", "Rui", "active", None, T0_MS) for i in range(history)]
        conn.executemany(
            "INSERT INTO members (member_id, first_name, status, credits, updated_at) VALUES (?, ?, ?, ?, ?)",
            [member, *others],
        )
        conn.execute("INSERT INTO cards (card_id, member_id) VALUES (?, ?)", (CARD, MEMBER))
        conn.execute("UPDATE member_list SET version = 1, members = ?, synced_at = ? WHERE id = 1", (history, T0_MS))
        sessions: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        seq = 0
        past = [(f"s{i:06d}", f"m{i:06d}") for i in range(history)] + [("s-prev1", MEMBER), ("s-prev2", MEMBER)]
        for n, (session, who) in enumerate(past):
            at = T0_MS + n * 1000
            sessions.append((session, who, "c1", "r1", at, at + 500, "tap", 1))
            events.append(_event(seq + 1, "session.started", session, who, at))
            events.append(_event(seq + 2, "session.ended", session, who, at))
            seq += 2
        delivered = seq
        sessions.append(("s-now", MEMBER, "c1", "r1", NOW_MS - 1000, None, None, 1))
        events.append(_event(seq + 1, "session.started", "s-now", MEMBER, NOW_MS - 1000))
        queued = seq + 1
        events += [_event(seq + 2 + i, "access.decided", None, MEMBER, NOW_MS) for i in range(3)]
        conn.executemany(
            "INSERT INTO sessions (session_id, member_id, court_id, opened_by, started_at, ended_at, end_reason,"
            " list_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            sessions,
        )
        conn.executemany(
            "INSERT INTO events (seq, event_id, type, occurred_at, mono_ns, boot_id, clock_synced, session_id,"
            " device_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            events,
        )
        for dest in ("ziggy", "cloud"):
            conn.executemany(
                "INSERT INTO deliveries (destination, seq, state, attempts, delivered_at)"
                " VALUES (?, ?, 'delivered', 1, ?)",
                [(dest, s, T0_MS) for s in range(1, delivered + 1)],
            )
            conn.execute("INSERT INTO deliveries (destination, seq) VALUES (?, ?)", (dest, queued))
            conn.execute("INSERT OR REPLACE INTO delivery_cursors (destination, upto) VALUES (?, ?)", (dest, queued))
        conn.execute("INSERT INTO ziggy_sessions (session_id, ziggy_session_id) VALUES ('s-prev2', 'z-prev2')")
    if analyze:  # the agent runs no ANALYZE; were it to, the planner's statistics must not change the plans
        conn.execute("ANALYZE")
    conn.close()


def _state_sql(dest: str) -> tuple[str, dict[str, str]]:
    routed, types = repo.routed_to(dest)
    return status._STATE.format(routed=routed.replace("?", ":types")), {"dest": dest, "types": types}


def _queue(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")
    try:
        repo.queue_deliveries(conn, "cloud", outbox.QUEUE_CHUNK)
    finally:
        conn.execute("ROLLBACK")


def _newest(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT MAX(seq) FROM events").fetchone()[0])


def _sql(sql: str, params: Any) -> Callable[[sqlite3.Connection], Any]:
    return lambda conn: conn.execute(sql, params).fetchall()


# What runs per tap, per outbox round, per poll of health, status and /metrics, per pull of the feed.
HOT: dict[str, Callable[[sqlite3.Connection], Any]] = {
    "tap: member lookup by card": lambda conn: repo.lookup(conn, card_id=CARD),
    "tap: open sessions on the court": lambda conn: repo.open_sessions(conn, "c1"),
    "tap: answered already?": lambda conn: repo.answered(conn, "r1", "msg-1"),
    "court: consumption of a session": lambda conn: repo.session_consumption_cents(conn, "s-now"),
    "court: highlights today": lambda conn: repo.highlight_count(conn, "c1", repo.from_ms(NOW_MS - 3_600_000)),
    "outbox: due, oldest first": _sql(outbox._DUE_RELAXED, ("ziggy", NOW_MS, "ziggy", NOW_MS, 10)),
    "outbox: due, freshest first": _sql(outbox._DUE_FRESH, ("cloud", NOW_MS, "cloud", 10)),
    "outbox: earliest retry": _sql(outbox._EARLIEST_RETRY, ("cloud",)),
    "outbox: newest event": _sql("SELECT MAX(seq) FROM events", ()),
    "outbox: queue new events": _queue,
    "outbox: destination busy": lambda conn: repo.destination_busy(conn, "cloud", NOW_MS),
    "ziggy: member's previous session pending": _sql(ziggy._EARLIER_PENDING, (MEMBER, "s-now", 10**9)),
    "ziggy: session id of a session": _sql(
        "SELECT ziggy_session_id FROM ziggy_sessions WHERE session_id = ?", ("s-prev2",)
    ),
    "status: cloud": _sql(*_state_sql("cloud")),
    "status: ziggy": _sql(*_state_sql("ziggy")),
    "feed: the last few events": lambda conn: conn.execute(feed._PAGE, (_newest(conn) - 5, 100)).fetchall(),
}


def instructions(path: Path, queries: dict[str, Callable[[sqlite3.Connection], Any]] = HOT) -> dict[str, int]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row  # as the store's connections
    counted = 0

    def count() -> int:
        nonlocal counted
        counted += 1
        return 0

    out = {}
    try:
        for name, run in queries.items():
            counted = 0
            conn.set_progress_handler(count, 1)
            run(conn)
            conn.set_progress_handler(None, 1)
            out[name] = counted
    finally:
        conn.close()
    return out


async def _store(path: Path, history: int, analyze: bool = False) -> Path:
    async with Database(path):
        pass  # migrated
    fill(path, history, analyze)
    return path


@pytest.mark.parametrize("analyze", [False, True], ids=["as-run", "analyzed"])
async def test_hot_queries_do_not_walk_history(tmp_path: Path, analyze: bool) -> None:
    small = instructions(await _store(tmp_path / "small.db", SMALL, analyze))
    large = instructions(await _store(tmp_path / "large.db", LARGE, analyze))
    grown = {
        name: (small[name], large[name]) for name in HOT if large[name] > 1.5 * small[name] + 50
    }  # a seek deeper in a taller B-tree is still one instruction; a walk is thousands
    table = "\n".join(f"  {name}: {small[name]} -> {large[name]}" for name in HOT)
    assert not grown, f"queries whose cost grows with history ({SMALL} -> {LARGE} sessions):\n{table}"


async def test_the_walk_is_caught(tmp_path: Path) -> None:
    """The counting sees a walk: the Ziggy check as it was written before grows with history."""
    before = (
        "SELECT e.seq FROM sessions s JOIN events e ON e.session_id = s.session_id"
        " JOIN deliveries d ON d.seq = e.seq AND d.destination = 'ziggy'"
        " WHERE s.member_id = ? AND s.session_id != ? AND e.seq < ? AND d.state = 'pending' LIMIT 1"
    )
    walk = {"before": _sql(before, (MEMBER, "s-now", 10**9))}
    small = instructions(await _store(tmp_path / "small.db", SMALL), walk)["before"]
    large = instructions(await _store(tmp_path / "large.db", LARGE), walk)["before"]
    assert large > 10 * small, (small, large)
