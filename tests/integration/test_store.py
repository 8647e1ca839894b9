"""The SQLite store against real files in tmp_path: migrations, transactions, corruption and recovery,
member import files, applying member lists, lookups, the one-open-session rule and the event log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

import agent.store
from agent.domain.model import MemberState, MemberStatus, TimeWindow
from agent.errors import ImportFileError, MigrationError, StoreCorrupt, StoreError
from agent.store import repo
from agent.store.db import SALVAGE_TABLES, SLOW_S, Database, migrations, recover
from agent.store.members import MemberRecord, apply_members, read_member_file
from agent.sync import status
from agent.sync.retention import Retention

SP = ZoneInfo("America/Sao_Paulo")
MIGRATION_FILES = sorted((Path(agent.store.__file__).parent / "migrations").glob("*.sql"))
T0 = datetime(2026, 3, 2, 14, 30, 0, 123000, tzinfo=UTC)  # millisecond precision: the store keeps ms
STAMP = repo.Stamp(wall=T0, mono_ns=123_456_789, boot_id="boot-1", clock_synced=True)


def member(member_id: str, first_name: str = "Ana", **fields: Any) -> MemberRecord:
    return MemberRecord.model_validate({"member_id": member_id, "first_name": first_name, **fields})


async def apply(db: Database, records: list[MemberRecord], **kwargs: Any) -> Any:
    return await apply_members(db, records, tz=SP, source="test", **kwargs)


async def by_card(db: Database, card: str) -> repo.Lookup:
    return await db.read(repo.lookup, card_id=card)


async def scalar(db: Database, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = await db.fetchone(sql, params)
    assert row is not None
    return row[0]


async def table_rows(db: Database, table: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await db.fetchall(f"SELECT * FROM {table} ORDER BY 1, 2")]  # noqa: S608


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "agent.db"


@pytest.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    async with Database(db_path) as database:
        yield database


# -- opening and migrations ------------------------------------------------------------------------------------


async def test_new_database_is_migrated_in_wal_with_synchronous_full(db_path: Path) -> None:
    assert MIGRATION_FILES, "no migration files found"
    async with Database(db_path) as db:
        assert await scalar(db, "PRAGMA user_version") == len(MIGRATION_FILES) == len(migrations())
        rows = await db.conn.execute_fetchall("PRAGMA journal_mode")
        assert next(iter(rows))[0] == "wal"
        rows = await db.conn.execute_fetchall("PRAGMA synchronous")
        assert next(iter(rows))[0] == 2
        rows = await db.conn.execute_fetchall("PRAGMA foreign_keys")
        assert next(iter(rows))[0] == 1
        assert [tuple(r) for r in await db.fetchall("SELECT id, version, members FROM member_list")] == [(1, 0, 0)]
    assert contents(db_path)


async def test_checkpoints_run_off_the_commit_path_and_keep_the_wal_bounded(db_path: Path) -> None:
    """The writer never checkpoints (its commits would wait for a 4 MB copy and an fsync); a connection of the
    store's own does, once the WAL passes its threshold, and the WAL then starts over instead of growing."""
    wal = db_path.with_name(db_path.name + "-wal")
    async with Database(db_path) as db:
        rows = await db.conn.execute_fetchall("PRAGMA wal_autocheckpoint")
        assert next(iter(rows))[0] == 0  # the writer's
        blob = random.randbytes(32 * 1024)  # 64 KiB as hex
        for round_ in range(3):
            for i in range(80):  # 5.2 MB a round, past the 4 MB threshold
                await db.write(
                    "test: filling the WAL",
                    lambda conn, k=f"fill-{round_}-{i}": conn.execute(
                        "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (k, blob.hex())
                    ),
                )
            for _ in range(100):  # the checkpointer looks once a second: 10 s at most
                if db.checkpoints > round_:
                    break
                await asyncio.sleep(0.1)
            assert db.checkpoints > round_, f"no checkpoint in round {round_}; WAL {wal.stat().st_size} bytes"
        # The WAL restarted from its beginning after each checkpoint: about one round long, not three.
        assert wal.stat().st_size < 2 * 80 * 64 * 1024
        assert await scalar(db, "SELECT COUNT(*) FROM kv WHERE key LIKE 'fill-%'") == 240
    assert not wal.exists() or wal.stat().st_size == 0  # closing checkpointed the rest


async def test_a_slow_commit_is_logged_with_what_it_carried(db_path: Path) -> None:
    """Taps wait behind a commit the disk holds up: the operator sees it in the log, with what was written."""
    async with Database(db_path) as db:

        def slow(conn: sqlite3.Connection) -> None:
            time.sleep(SLOW_S + 0.05)  # what a stalled fsync looks like from here
            conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES ('slow', '1')")

        with capture_logs() as logs:
            await db.write("test: fast", lambda conn: None)
            await db.write("test: a slow disk", slow)
    slow_ones = [e for e in logs if e["event"] == "store_slow_commit"]
    assert len(slow_ones) == 1, logs
    assert slow_ones[0]["doing"] == ["test: a slow disk"]
    assert slow_ones[0]["writes"] == 1
    assert slow_ones[0]["ms"] >= SLOW_S * 1000
    assert slow_ones[0]["log_level"] == "warning"


async def test_reopening_is_idempotent_and_keeps_data(db_path: Path) -> None:
    async with Database(db_path) as db:
        await apply(db, [member("m1")])
    async with Database(db_path) as db:
        assert await scalar(db, "PRAGMA user_version") == len(MIGRATION_FILES)
        assert await scalar(db, "SELECT COUNT(*) FROM member_list") == 1
        assert await scalar(db, "SELECT version FROM member_list") == 1
        assert await scalar(db, "SELECT first_name FROM members WHERE member_id = 'm1'") == "Ana"


async def test_schema_newer_than_this_build_asks_to_upgrade(db_path: Path) -> None:
    async with Database(db_path) as db:
        await db.conn.execute("PRAGMA user_version = 99")
    with pytest.raises(MigrationError, match="upgrade"):
        async with Database(db_path):
            pass
    # Nothing was touched: the newer build can still use it.
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 99


async def test_database_instance_cannot_be_reentered(db_path: Path) -> None:
    db = Database(db_path)
    async with db:
        with pytest.raises(RuntimeError, match="re-entering"):
            await db.__aenter__()
        assert await scalar(db, "SELECT 1") == 1  # the failed re-entry left the open instance usable
    with pytest.raises(RuntimeError):
        await db.__aenter__()
    with pytest.raises(RuntimeError, match="not open"):
        _ = db.conn


async def test_reader_connection_is_read_only(db: Database) -> None:
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await db.reader.execute("INSERT INTO kv (key, value) VALUES ('k', 'v')")


# -- transactions ----------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


async def test_transaction_commits_on_success(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO kv (key, value) VALUES ('a', '1')")
    assert await db.read(repo.get_kv, "a") == "1"


async def test_transaction_rolls_back_on_exception(db: Database) -> None:
    async def failing() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO kv (key, value) VALUES ('a', '1')")
            await conn.execute("INSERT INTO kv (key, value) VALUES ('b', '2')")
            raise Boom

    with pytest.raises(Boom):
        await failing()
    assert await db.fetchall("SELECT * FROM kv") == []
    assert not db.conn.in_transaction
    # The writer is usable again afterwards.
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO kv (key, value) VALUES ('c', '3')")
    assert await db.read(repo.get_kv, "c") == "3"


async def test_sqlite_errors_in_a_transaction_become_store_errors(db: Database) -> None:
    async def bad() -> None:
        async with db.transaction("doing something odd") as conn:
            await conn.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(StoreError, match="doing something odd"):
        await bad()


async def test_reader_never_sees_an_uncommitted_transaction(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO kv (key, value) VALUES ('pending', 'x')")
        assert await db.fetchall("SELECT * FROM kv WHERE key = 'pending'") == []
        async with conn.execute("SELECT value FROM kv WHERE key = 'pending'") as cur:
            assert [tuple(r) for r in await cur.fetchall()] == [("x",)]  # the writer sees its own write
    assert [tuple(r) for r in await db.fetchall("SELECT key, value FROM kv")] == [("pending", "x")]


# -- group commit ----------------------------------------------------------------------------------------------


def put(conn: sqlite3.Connection, key: str, value: str) -> str:
    conn.execute("INSERT INTO kv (key, value) VALUES (?, ?)", (key, value))
    return key


def put_then_fail(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("INSERT INTO kv (key, value) VALUES (?, 'half')", (key,))
    raise Boom(key)


async def kv(db: Database) -> dict[str, str]:
    return {r["key"]: r["value"] for r in await db.fetchall("SELECT key, value FROM kv")}


async def test_writes_queued_together_share_one_commit(db: Database) -> None:
    before = db.group_commits
    keys = await asyncio.gather(*(db.write("test", put, f"k{i}", str(i)) for i in range(64)))
    assert keys == [f"k{i}" for i in range(64)]
    assert db.group_commits - before == 1  # all 64 were queued before the first commit began
    assert await kv(db) == {f"k{i}": str(i) for i in range(64)}
    # later writers see what the earlier ones of the same group wrote, in queue order
    seen = await asyncio.gather(
        db.write("test", put, "a", "1"),
        db.write("test", lambda conn: conn.execute("SELECT value FROM kv WHERE key = 'a'").fetchone()[0]),
    )
    assert seen == ["a", "1"]


async def test_a_failing_write_is_undone_alone(db: Database) -> None:
    results = await asyncio.gather(
        db.write("test", put, "first", "1"),
        db.write("test", put_then_fail, "broken"),
        db.write("adding a duplicate", put, "first", "again"),  # UNIQUE: refused, the first stays
        db.write("test", put, "last", "3"),
        return_exceptions=True,
    )
    assert results[0] == "first"
    assert isinstance(results[1], Boom)
    assert isinstance(results[2], StoreError)
    assert "adding a duplicate" in str(results[2])
    assert isinstance(results[2].__cause__, sqlite3.IntegrityError)
    assert results[3] == "last"
    assert await kv(db) == {"first": "1", "last": "3"}
    assert not db.conn.in_transaction


async def test_a_lone_failing_write_leaves_nothing(db: Database) -> None:
    with pytest.raises(Boom):
        await db.write("test", put_then_fail, "alone")
    assert await kv(db) == {}
    assert await db.write("test", put, "after", "ok") == "after"


async def test_a_write_cancelled_before_it_is_taken_is_never_run(db: Database) -> None:
    async with db.transaction() as conn:  # holds the writer: the writes below queue
        first = asyncio.ensure_future(db.write("test", put, "kept", "1"))
        dropped = asyncio.ensure_future(db.write("test", put, "dropped", "1"))
        await asyncio.sleep(0)
        dropped.cancel()
        await conn.execute("INSERT INTO kv (key, value) VALUES ('tx', '1')")
    assert await first == "kept"
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert await kv(db) == {"tx": "1", "kept": "1"}


async def test_closing_commits_what_was_queued(tmp_path: Path) -> None:
    async with Database(tmp_path / "agent.db") as db:
        pending = [asyncio.ensure_future(db.write("test", put, f"k{i}", "v")) for i in range(10)]
        await asyncio.sleep(0)
    assert [p.result() for p in pending] == [f"k{i}" for i in range(10)]
    async with Database(tmp_path / "agent.db") as db:
        assert len(await kv(db)) == 10


async def test_a_transaction_cancelled_while_beginning_leaves_the_writer_clean(db: Database) -> None:
    # Another connection holds SQLite's write lock, so BEGIN IMMEDIATE waits (busy_timeout) on aiosqlite's
    # thread; the task is cancelled meanwhile.
    blocker = sqlite3.connect(db.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")

        async def begin() -> None:
            async with db.transaction():
                pass

        task = asyncio.ensure_future(begin())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.1)
        blocker.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        blocker.close()
    assert not db.conn.in_transaction
    assert await db.write("test", put, "after", "ok") == "after"
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO kv (key, value) VALUES ('tx', '1')")
    assert await kv(db) == {"after": "ok", "tx": "1"}


# -- corruption and recovery -----------------------------------------------------------------------------------


# Three kinds of damage: a data page of the members table (the schema stays readable), everything after
# page 1 (the schema itself spills over into later pages, so it is lost too), and a file that is not SQLite.
CORRUPTIONS = ("members-page", "page-2-onward", "whole-file")


def damage(path: Path, kind: str, page_size: int, members_root: int) -> None:
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{path}{suffix}").exists(), "the database should have been closed cleanly"
    size = path.stat().st_size
    if kind == "members-page":
        offset, length = (members_root - 1) * page_size, page_size
    elif kind == "page-2-onward":
        offset, length = page_size, size - page_size
    else:
        offset, length = 0, size
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(random.Random(7).randbytes(length))


def contents(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


async def make_damaged_db(path: Path, kind: str) -> dict[str, int]:
    """A closed database with members, events and kv rows, then damaged; returns the row counts it had."""
    async with Database(path) as db:
        await apply(db, [member("m1", cards=["0A01"]), member("m2", cards=["0B01"]), member("m3")])

        def fill(conn: sqlite3.Connection) -> None:
            repo.enable_destinations(conn, ("ziggy", "cloud"))
            repo.append_events(conn, STAMP, [repo.NewEvent("session.started", {"n": 1})])
            for name in ("ziggy", "cloud"):
                repo.queue_deliveries(conn, name, 100)
            repo.set_kv(conn, "k", "v")

        await db.write("test", fill)
        if kind == "page-2-onward":  # with enough rows that tables span many pages
            await apply(db, [member(f"x{i}", cards=[f"{i:08X}"]) for i in range(2000)])
        counts = {t: await scalar(db, f"SELECT COUNT(*) FROM {t}") for t in SALVAGE_TABLES}  # noqa: S608
        page_size = await scalar(db, "PRAGMA page_size")
        members_root = await scalar(db, "SELECT rootpage FROM sqlite_master WHERE name = 'members'")
    damage(path, kind, page_size, members_root)
    return counts


@pytest.mark.parametrize("kind", CORRUPTIONS)
async def test_corrupt_file_refuses_to_open(db_path: Path, kind: str) -> None:
    await make_damaged_db(db_path, kind)
    with pytest.raises(StoreCorrupt, match="club-agent store recover"):
        async with Database(db_path):
            pass
    assert not list(db_path.parent.glob("*.corrupt-*"))  # opening never moves anything


@pytest.mark.parametrize("kind", CORRUPTIONS)
async def test_recover_moves_a_corrupt_file_aside_and_reports(db_path: Path, kind: str) -> None:
    counts = await make_damaged_db(db_path, kind)
    damaged = contents(db_path)

    report = await recover(db_path)

    aside = Path(report["moved_to"])
    assert aside.parent == db_path.parent
    assert aside.name.startswith("agent.db.corrupt-")
    assert contents(aside) == damaged  # the corrupt file is kept as it was
    assert set(report) == {"moved_to", *SALVAGE_TABLES}
    assert report["members"].startswith("unreadable")
    if kind == "members-page":
        # Tables the damage did not reach are salvaged in full.
        for table in ("events", "deliveries", "delivery_cursors", "kv", "member_list"):
            assert report[table] == f"{counts[table]} rows", table
    async with Database(db_path) as db:
        assert await scalar(db, "PRAGMA user_version") == len(MIGRATION_FILES)
        assert await scalar(db, "SELECT COUNT(*) FROM member_list") == 1  # the list row survives a failed salvage
        assert await scalar(db, "SELECT COUNT(*) FROM members") == 0
        if kind == "members-page":
            assert await db.read(repo.get_kv, "k") == "v"
            assert await scalar(db, "SELECT COUNT(*) FROM deliveries") == 2
        await apply(db, [member("m1", cards=["0A01"])])
        assert (await by_card(db, "0A01")).member is not None


async def test_recover_salvages_every_row_of_a_healthy_database(db_path: Path) -> None:
    async with Database(db_path) as db:
        await apply(
            db,
            [member(f"m{i}", f"N{i}", cards=[f"AA{i:06X}"], member_code=f"{1000 + i}", credits=i) for i in range(50)],
            synced_at=T0,
        )

        def fill(conn: sqlite3.Connection) -> None:
            repo.open_session(
                conn,
                session_id="s-old",
                member_id="m1",
                court_id="c1",
                card_id="AA000001",
                opened_by="reader-c1",
                started_at=T0 - timedelta(hours=3),
                list_version=1,
            )
            repo.close_session(conn, "s-old", T0 - timedelta(hours=2), "tap")
            repo.open_session(
                conn,
                session_id="s-open",
                member_id="m1",
                court_id="c2",
                card_id="AA000001",
                opened_by="reader-c2",
                started_at=T0,
                list_version=1,
            )
            repo.enable_destinations(conn, ("ziggy", "cloud"))
            events = repo.append_events(
                conn,
                STAMP,
                [
                    repo.NewEvent("access.decided", {"granted": True}, session_id="s-open", device_id="reader-c2"),
                    repo.NewEvent("session.started", {"court": "c2"}, session_id="s-open", device_id="reader-c2"),
                ],
            )
            repo.queue_deliveries(conn, "cloud", 100)  # ziggy's are left to queue: its cursor stays behind
            repo.spend_credits(conn, "m1", 1, "s-open", events[1][1], T0)
            repo.remember_answer(conn, "reader-c2", "msg-1", {"status": "granted"}, T0)
            repo.insert_highlight(
                conn,
                highlight_id="h1",
                court_id="c2",
                session_id="s-open",
                button_id="button-c2",
                pressed_at=T0,
                start_at=T0 - timedelta(seconds=30),
                duration_ms=30000,
                kind="short",
            )
            repo.set_kv(conn, "last_trusted_wall", "1772461800123")

        await db.write("test", fill)
        before = {table: await table_rows(db, table) for table in SALVAGE_TABLES}
    assert all(before[t] for t in SALVAGE_TABLES), "every table should hold something to salvage"
    max_seq = max(r[0] for r in before["events"])

    report = await recover(db_path)

    assert contents(Path(report["moved_to"]))
    for table in SALVAGE_TABLES:
        assert report[table] == f"{len(before[table])} rows", table
    async with Database(db_path) as db:
        for table in SALVAGE_TABLES:
            assert await table_rows(db, table) == before[table], table
        found = await by_card(db, "AA000001")
        assert found.member is not None
        assert found.member.member_id == "m1"
        assert found.state.open_session is not None
        assert found.state.open_session.session_id == "s-open"
        assert found.state.pending_credits == -1
        assert found.cache.version == 1
        assert found.cache.synced_at == T0
        # New events continue after the salvaged ones: seq never goes back.
        [(seq, _)] = await db.write("test", repo.append_events, STAMP, [repo.NewEvent("session.ended", {})])
        assert seq > max_seq


# -- member import files ---------------------------------------------------------------------------------------

CSV_HEADER = "member_id,first_name,last_name,member_code,status,cards,credits,requires_credit,valid_until,groups\n"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_read_csv(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "members.csv",
        CSV_HEADER
        + "m1,Ana,Silva,1001,active,04:a1:b2:c3;04 d4 e5 f6,5,true,2026-03-31,padel;beach\n"
        + "m2,Bruno,,,suspended,,,,,\n"
        + "m3, Carla ,Souza,1003,expired,0a-0b-0c-0d,0,false,2025-12-31T18:00:00-03:00,beach\n",
    )
    records = read_member_file(path)
    assert [r.member_id for r in records] == ["m1", "m2", "m3"]
    ana, bruno, carla = records
    assert ana.cards == ["04A1B2C3", "04D4E5F6"]
    assert (ana.last_name, ana.member_code, ana.status) == ("Silva", "1001", MemberStatus.ACTIVE)
    assert (ana.credits, ana.requires_credit, ana.needs_credit()) == (5, True, True)
    assert ana.valid_until == date(2026, 3, 31)
    assert ana.groups == ["padel", "beach"]
    assert bruno.status is MemberStatus.SUSPENDED
    assert (bruno.member_code, bruno.credits, bruno.requires_credit, bruno.valid_until) == (None, None, None, None)
    assert (bruno.cards, bruno.groups, bruno.last_name) == ([], [], "")
    assert carla.first_name == "Carla"
    assert carla.cards == ["0A0B0C0D"]
    assert carla.status is MemberStatus.EXPIRED
    assert carla.valid_until == datetime(2025, 12, 31, 21, 0, tzinfo=UTC)


def test_read_json_list(tmp_path: Path) -> None:
    doc = [
        {"member_id": "m1", "first_name": "Ana", "cards": ["04-a1-b2-c3", "abc"], "credits": 2, "groups": ["padel"]},
        {"member_id": "m2", "first_name": "Bruno", "status": "cancelled", "unknown_field": 1},
    ]
    records = read_member_file(write(tmp_path, "members.json", json.dumps(doc)))
    assert [(r.member_id, r.status) for r in records] == [("m1", MemberStatus.ACTIVE), ("m2", MemberStatus.CANCELLED)]
    assert records[0].cards == ["04A1B2C3", "0ABC"]
    assert records[0].credits == 2


async def test_read_json_object_with_nested_plan(tmp_path: Path, db: Database) -> None:
    doc = {
        "members": [
            {
                "member_id": "m1",
                "first_name": "Ana",
                "cards": ["04:A1:B2:C3"],
                "credits": 3,
                "plan": {
                    "requires_credit": True,
                    "hours": [
                        {"days": ["mon", "tue"], "from": "06:00", "to": "12:00"},
                        {"days": [6, 7], "from": "20:00", "to": "02:00"},
                    ],
                },
            }
        ]
    }
    # Not named .json: the format is detected from the content.
    [record] = read_member_file(write(tmp_path, "members.txt", json.dumps(doc)))
    assert record.needs_credit() is True
    assert record.requires_credit is None
    assert record.plan is not None
    assert len(record.plan.hours) == 2

    await apply(db, [record])
    found = await by_card(db, "04A1B2C3")
    assert found.member is not None
    assert found.member.requires_credit is True
    assert found.member.hours == (
        TimeWindow(days=frozenset({1, 2}), start=dtime(6), end=dtime(12)),
        TimeWindow(days=frozenset({6, 7}), start=dtime(20), end=dtime(2)),
    )


@pytest.mark.parametrize(
    ("name", "content", "line", "field", "words"),
    [
        pytest.param(
            "m.csv", CSV_HEADER + "m1,Ana,,,active,,,,,\nm2,Bruno,,,vip,,,,,\n", 3, "status", ["vip"], id="bad-status"
        ),
        pytest.param(
            "m.csv", CSV_HEADER + "m1,Ana,,,active,,-1,,,\n", 2, "credits", ["greater than or equal"], id="neg-credits"
        ),
        pytest.param(
            "m.csv",
            CSV_HEADER + "m1,Ana,,,active,04ZZ99,,,,\n",
            2,
            "cards",
            ["04ZZ99"],
            id="non-hex-card",
        ),
        pytest.param(
            "m.csv",
            CSV_HEADER + "m1,Ana,,,active,,,,,\nm2,Bruno,,,active,,,,,\nm1,Carla,,,active,,,,,\n",
            4,
            "member_id",
            ["'m1'", "line 2"],
            id="duplicate-member-id",
        ),
        pytest.param(
            "m.csv",
            CSV_HEADER + "m1,Ana,,,active,04A1B2C3,,,,\nm2,Bruno,,,active,04:a1:b2:c3,,,,\n",
            3,
            "cards",
            ["04A1B2C3", "'m1'", "line 2"],
            id="card-on-two-members",
        ),
        pytest.param(
            "m.csv", CSV_HEADER + "m1,Ana,,,active,,,,,,extra\n", 2, None, ["more cells"], id="csv-extra-cells"
        ),
        pytest.param(
            "m.json",
            '[\n  {"member_id": "m1", "first_name": "Ana"},\n  {"member_id": "m2",,}\n]\n',
            3,
            None,
            ["not valid JSON"],
            id="invalid-json",
        ),
        pytest.param(
            "m.json",
            json.dumps([{"member_id": "m1", "first_name": "Ana"}, {"member_id": "m2"}]),
            2,
            "first_name",
            ["required"],
            id="json-missing-field",
        ),
        pytest.param("m.csv", b"member_id,first_name\nm1,Jos\xe9\n", None, None, ["not UTF-8"], id="not-utf8"),
    ],
)
def test_read_errors_name_line_and_field(
    tmp_path: Path, name: str, content: str | bytes, line: int | None, field: str | None, words: list[str]
) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(ImportFileError) as info:
        read_member_file(path)
    err = info.value
    message = str(err)
    assert (err.line, err.field) == (line, field)
    if line is not None:
        assert message.startswith(f"line {line}")
    if field is not None:
        assert f"field '{field}'" in message
    for word in words:
        assert word in message


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="no such file"):
        read_member_file(tmp_path / "nope.csv")


# -- applying member lists -------------------------------------------------------------------------------------


async def test_upsert_bumps_version_and_counts_members(db: Database) -> None:
    result = await apply(db, [member("m1"), member("m2"), member("m3")])
    assert (result.version, result.upserted, result.deleted, result.members) == (1, 3, 0, 3)
    result = await apply(db, [member("m3", "Carla"), member("m4")])
    assert (result.version, result.upserted, result.deleted, result.members) == (2, 2, 0, 4)
    row = await db.fetchone("SELECT version, members, source, synced_at FROM member_list")
    assert row is not None
    assert tuple(row) == (2, 4, "test", None)
    assert (await db.read(repo.lookup, member_id="m3")).member.first_name == "Carla"  # type: ignore[union-attr]


async def test_replace_removes_members_absent_from_the_new_list(db: Database) -> None:
    await apply(db, [member("a", cards=["A1"]), member("b", cards=["B1"]), member("c", cards=["C1"])])
    result = await apply(db, [member("a", cards=["A1"]), member("d", cards=["D1"])], replace=True)
    assert (result.version, result.members) == (2, 2)
    ids = [r[0] for r in await db.fetchall("SELECT member_id FROM members ORDER BY 1")]
    assert ids == ["a", "d"]
    assert (await by_card(db, "B1")).member is None
    assert (await by_card(db, "D1")).member is not None
    assert [r[0] for r in await db.fetchall("SELECT card_id FROM cards ORDER BY 1")] == ["A1", "D1"]


async def test_tombstone_removes_member_and_cards_at_once(db: Database) -> None:
    await apply(db, [member("a", cards=["0A01", "0A02"]), member("b", cards=["0B01"])])
    result = await apply(db, [member("a", "Ana", deleted=True)])
    assert (result.version, result.upserted, result.deleted, result.members) == (2, 0, 1, 1)
    gone = await by_card(db, "0A01")
    assert gone.member is None
    assert gone.cache.version == 2
    assert await db.fetchall("SELECT * FROM cards WHERE member_id = 'a'") == []
    assert (await by_card(db, "0B01")).member is not None


async def test_card_moved_to_another_member_resolves_to_the_new_one(db: Database) -> None:
    await apply(db, [member("a", "Ana", cards=["04A1B2C3"]), member("b", "Bruno")])
    await apply(db, [member("b", "Bruno", cards=["04A1B2C3"])])
    found = await by_card(db, "04A1B2C3")
    assert found.member is not None
    assert found.member.member_id == "b"
    assert await db.read(repo.cards_of, "a") == []
    assert await db.read(repo.cards_of, "b") == ["04A1B2C3"]


async def test_member_code_moved_to_another_member(db: Database) -> None:
    await apply(db, [member("a", member_code="1234"), member("b")])
    await apply(db, [member("b", "Bruno", member_code="1234")])
    found = await db.read(repo.lookup, member_code="1234")
    assert found.member is not None
    assert found.member.member_id == "b"


async def test_dates_are_whole_days_in_club_time_and_synced_at_is_kept(db: Database) -> None:
    synced = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    await apply(db, [member("m1", valid_from="2026-01-01", valid_until="2026-03-31")], synced_at=synced)
    found = await db.read(repo.lookup, member_id="m1")
    assert found.member is not None
    assert found.member.valid_from == datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    assert found.member.valid_until == datetime(2026, 4, 1, 3, 0, tzinfo=UTC)
    assert found.cache.synced_at == synced
    # An import without synced_at does not reset it.
    await apply(db, [member("m2")])
    assert (await db.read(repo.lookup, member_id="m2")).cache.synced_at == synced
    assert await scalar(db, "SELECT synced_at FROM member_list") == repo.to_ms(synced)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-03-31T10:00:00Z", datetime(2026, 3, 31, 10, 0, tzinfo=UTC)),
        ("2026-03-31T10:00:00", datetime(2026, 3, 31, 13, 0, tzinfo=UTC)),  # naive: club-local time
        ("2026-03-31T00:00:00Z", datetime(2026, 3, 31, 0, 0, tzinfo=UTC)),  # an instant, not "the whole day"
        ("2026-03-31T00:00:00", datetime(2026, 3, 31, 3, 0, tzinfo=UTC)),  # local midnight, not the next one
    ],
)
async def test_valid_until_as_a_datetime_is_that_instant(db: Database, given: str, expected: datetime) -> None:
    await apply(db, [member("m1", valid_until=given)])
    found = await db.read(repo.lookup, member_id="m1")
    assert found.member is not None
    assert found.member.valid_until == expected


async def test_hundred_thousand_members_import_and_lookup(db: Database) -> None:
    started = time.monotonic()
    records = [
        MemberRecord(member_id=f"m{i:06d}", first_name=f"N{i}", cards=[f"{0x04000000 + i:08X}"], credits=i % 7)
        for i in range(100_000)
    ]
    result = await apply(db, records)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"100k-member import took {elapsed:.1f} s"
    assert (result.members, result.upserted, result.version) == (100_000, 100_000, 1)
    rng = random.Random(42)
    for i in rng.sample(range(100_000), 200):
        found = await by_card(db, f"{0x04000000 + i:08X}")
        assert found.member is not None
        assert (found.member.member_id, found.member.credits) == (f"m{i:06d}", i % 7)
    assert (await by_card(db, "FFFFFFFF")).member is None


# -- lookups ---------------------------------------------------------------------------------------------------


async def test_lookup_by_card_code_and_id_with_session_ledger_and_last_checkin(db: Database) -> None:
    await apply(
        db,
        [member("m1", "Ana", cards=["04A1B2C3"], member_code="1001", credits=5, groups=["padel"]), member("m2")],
        synced_at=T0,
    )
    earlier = T0 - timedelta(days=1)

    def fill(conn: sqlite3.Connection) -> None:
        for session_id, started in (("s-yesterday", earlier), ("s-now", T0)):
            repo.open_session(
                conn,
                session_id=session_id,
                member_id="m1",
                court_id="c1",
                card_id="04A1B2C3",
                opened_by="reader-c1",
                started_at=started,
                list_version=1,
            )
            if session_id == "s-yesterday":
                repo.close_session(conn, session_id, earlier + timedelta(hours=1), "tap")
        conn.execute(
            "INSERT INTO credit_ledger (member_id, delta, session_id, event_id, created_at, confirmed)"
            " VALUES ('m1', -1, 's-now', 'e1', ?, 0), ('m1', -2, 's-yesterday', 'e0', ?, 1),"
            " ('m2', -4, NULL, 'e2', ?, 0)",
            (repo.to_ms(T0), repo.to_ms(earlier), repo.to_ms(T0)),
        )

    await db.write("test", fill)
    by_code = await db.read(repo.lookup, member_code="1001")
    by_id = await db.read(repo.lookup, member_id="m1")
    found = await by_card(db, "04A1B2C3")
    assert found == by_code == by_id
    assert found.member is not None
    assert (found.member.member_id, found.member.first_name, found.member.credits) == ("m1", "Ana", 5)
    assert found.member.groups == frozenset({"padel"})
    session = found.state.open_session
    assert session is not None
    assert (session.session_id, session.court_id, session.started_at) == ("s-now", "c1", T0)
    assert found.state.pending_credits == -1  # confirmed entries and other members' entries do not count
    assert found.state.last_checkin_at == T0
    assert (found.cache.version, found.cache.synced_at) == (1, T0)

    other = await db.read(repo.lookup, member_id="m2")
    assert other.state == MemberState(open_session=None, last_checkin_at=None, pending_credits=-4)


async def test_unknown_credentials_return_no_member_with_cache_version(db: Database) -> None:
    await apply(db, [member("m1", cards=["0A"])])
    await apply(db, [member("m2")])
    for found in (
        await by_card(db, "DEADBEEF"),
        await db.read(repo.lookup, member_code="9999"),
        await db.read(repo.lookup, member_id="nobody"),
    ):
        assert found.member is None
        assert found.state == MemberState()
        assert (found.cache.version, found.cache.synced_at) == (2, None)
    with pytest.raises(ValueError, match="needs"):
        await db.read(repo.lookup)


# -- one open session per member -------------------------------------------------------------------------------


async def test_at_most_one_open_session_per_member(db: Database) -> None:
    await apply(db, [member("m1")])

    async def open_one(session_id: str, court: str) -> None:
        await db.write(
            "opening a session",
            repo.open_session,
            session_id=session_id,
            member_id="m1",
            court_id=court,
            card_id=None,
            opened_by="tablet-desk",
            started_at=T0,
            list_version=1,
        )

    await open_one("s1", "c1")
    with pytest.raises(StoreError, match="UNIQUE") as info:
        await open_one("s2", "c2")
    assert not isinstance(info.value, StoreCorrupt)
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    assert [tuple(r) for r in await db.fetchall("SELECT session_id FROM sessions")] == [("s1",)]

    assert await db.write("test", repo.close_session, "s1", T0 + timedelta(minutes=5), "tap") is True
    assert await db.write("test", repo.close_session, "s1", T0 + timedelta(minutes=6), "tap") is False
    await open_one("s2", "c2")
    assert [s.session_id for s in await db.read(repo.open_sessions)] == ["s2"]


# -- the event log ---------------------------------------------------------------------------------------------


async def test_events_get_delivery_rows_per_enabled_destination_and_route(db: Database) -> None:
    batch = [
        repo.NewEvent("access.decided", {"granted": True}, session_id="s1", device_id="reader-c1"),
        repo.NewEvent("session.started", {"court_id": "c1", "name": "Conceição"}, session_id="s1"),
    ]

    def append(conn: sqlite3.Connection, enabled: tuple[str, ...]) -> list[tuple[int, str]]:
        repo.enable_destinations(conn, enabled)
        written = repo.append_events(conn, STAMP, batch)
        assert conn.execute("SELECT COUNT(*) FROM deliveries WHERE seq >= ?", (written[0][0],)).fetchone()[0] == 0
        left = {name: repo.queue_deliveries(conn, name, 1) for name in ("ziggy", "cloud")}  # one seq at a time
        assert left == {name: (1 if name in enabled else None) for name in ("ziggy", "cloud")}
        for name in enabled:
            assert repo.queue_deliveries(conn, name, 100) == 0
            assert repo.queue_deliveries(conn, name, 100) == 0  # queuing again adds nothing
        return written

    both = await db.write("test", append, ("ziggy", "cloud"))
    cloud_only = await db.write("test", append, ("cloud",))
    none = await db.write("test", append, ())
    out = both + cloud_only + none

    seqs = [seq for seq, _ in out]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    ids = [event_id for _, event_id in out]
    assert len(set(ids)) == len(ids)
    for event_id in ids:
        parsed = uuid.UUID(event_id)
        assert parsed.version == 7
        assert str(parsed) == event_id

    deliveries = [
        tuple(r) for r in await db.fetchall("SELECT seq, destination, state, attempts FROM deliveries ORDER BY 1, 2")
    ]
    (d1, _), (s1, _), (d2, _), (s2, _) = both + cloud_only
    assert deliveries == [
        (d1, "cloud", "pending", 0),
        (s1, "cloud", "pending", 0),
        (s1, "ziggy", "pending", 0),
        (d2, "cloud", "pending", 0),
        (s2, "cloud", "pending", 0),
    ]
    # A destination enabled again starts from the newest event: what happened while it was off is not its own.
    await db.write("test", repo.enable_destinations, ("ziggy",))
    assert await db.write("test", repo.queue_deliveries, "ziggy", 100) == 0
    assert await scalar(db, "SELECT COUNT(*) FROM deliveries WHERE destination = 'ziggy'") == 1

    row = await db.fetchone("SELECT * FROM events WHERE seq = ?", (s1,))
    assert row is not None
    assert row["type"] == "session.started"
    assert row["occurred_at"] == repo.to_ms(T0)
    assert (row["mono_ns"], row["boot_id"], row["clock_synced"]) == (123_456_789, "boot-1", 1)
    assert (row["session_id"], row["device_id"]) == ("s1", None)
    assert json.loads(row["data"]) == {"court_id": "c1", "name": "Conceição"}


async def test_upgrade_to_delivery_cursors_keeps_the_rows_written_with_each_event(db_path: Path) -> None:
    """A database from before 0006 had every enabled destination's rows written with the event: each such
    destination (with rows or a recorded state) gets its cursor at the newest seq, so nothing is queued twice
    and the rows already there wait as before."""
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        for m in migrations()[:5]:
            raw.executescript(f"BEGIN;\n{m.sql}\nPRAGMA user_version = {m.version};\nCOMMIT;")
        for seq in (1, 2, 3):
            raw.execute(
                "INSERT INTO events (seq, event_id, type, occurred_at, mono_ns, boot_id, clock_synced, data)"
                " VALUES (?, ?, 'session.started', 0, 0, 'b', 1, '{}')",
                (seq, f"e{seq}"),
            )
        raw.execute("INSERT INTO deliveries (destination, seq) VALUES ('ziggy', 1), ('cloud', 2)")
        raw.execute("INSERT INTO destination_state (destination) VALUES ('archive')")

    async with Database(db_path) as db:
        cursors = sorted(tuple(r) for r in await db.fetchall("SELECT destination, upto FROM delivery_cursors"))
        assert cursors == [("archive", 3), ("cloud", 3), ("ziggy", 3)]
        assert await db.write("test", repo.queue_deliveries, "cloud", 100) == 0
        assert await scalar(db, "SELECT COUNT(*) FROM deliveries") == 2


async def test_events_not_queued_yet_are_pending_and_never_pruned(db: Database) -> None:
    """Between a decision's commit and its worker's next round, its events have no delivery rows: `outbox status`
    counts them all the same, and retention leaves them alone however old they are."""
    await db.write("test", repo.enable_destinations, ("ziggy", "cloud"))
    batch = [repo.NewEvent("session.started", {}, session_id="s1"), repo.NewEvent("access.decided", {})]
    await db.write("test", repo.append_events, STAMP, batch)
    states = await status.destination_states(db, ["ziggy", "cloud"])
    assert [(s.destination, s.pending, s.oldest_pending_ms) for s in states] == [
        ("ziggy", 1, repo.to_ms(T0)),
        ("cloud", 2, repo.to_ms(T0)),
    ]
    retention = Retention(
        db, retention_s=0, require_ack=False, batch=10, interval_s=60, now_ms=lambda: repo.to_ms(T0) + 10**9
    )
    assert await retention.prune() == 0
    for name in ("ziggy", "cloud"):
        assert await db.write("test", repo.queue_deliveries, name, 100) == 0
    assert [s.pending for s in await status.destination_states(db, ["ziggy", "cloud"])] == [1, 2]
    assert await retention.prune() == 0  # queued, but still pending
    async with db.transaction() as conn:
        await conn.execute("UPDATE deliveries SET state = 'delivered'")
    assert await retention.prune() == 2
    assert [s.pending for s in await status.destination_states(db, ["ziggy", "cloud"])] == [0, 0]


def test_duplicate_member_code_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "member_id,first_name,member_code\nm1,Ana,1001\nm2,Bruno,1001\n")
    with pytest.raises(ImportFileError, match=r"line 3, field 'member_code': .*'1001' already appears on line 2"):
        read_member_file(path)


async def test_tombstone_needs_only_its_id(tmp_path: Path, db: Database) -> None:
    await apply(db, [member("m1", cards=["0A0B"])])
    path = write(tmp_path, "gone.json", json.dumps([{"member_id": "m1", "deleted": True}]))
    await apply(db, read_member_file(path))
    assert (await by_card(db, "0A0B")).member is None
    with pytest.raises(ImportFileError, match="first_name is required"):
        read_member_file(write(tmp_path, "bad.json", json.dumps([{"member_id": "m2"}])))


async def test_recover_refuses_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nothing to recover"):
        await recover(tmp_path / "absent.db")
    assert list(tmp_path.iterdir()) == []


async def test_recover_never_overwrites_an_earlier_corrupt_copy(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    for _ in range(2):
        db_path.write_bytes(b"not a database at all" * 100)
        await recover(db_path)
    kept = sorted(
        p.name for p in db_path.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))
    )
    assert len(kept) == 2
