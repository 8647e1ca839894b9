"""The SQLite store: one file, WAL, synchronous=FULL, numbered migrations, integrity check at start.

One writer connection, serialised by an asyncio lock: a decision reads and writes inside one `BEGIN IMMEDIATE`
transaction, so two taps never see each other half-done and a crash leaves both or neither.

Decisions go through `write()`: each is a plain function run on the writer's thread in one hop, and the writes
queued while one commit is on its way to disk share the next transaction (group commit); a write that fails is
taken out and the others run again, so it is undone alone.
Eight readers tapping at once cost one fsync, not eight, and nobody is answered before their write is durable.
`transaction()` is for the longer, multi-step work (member sync, the outbox's bookkeeping), in the same lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import aiosqlite

from ..errors import MigrationError, StoreCorrupt, StoreError
from ..logs import get_logger

log = get_logger("agent.store")

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",  # a granted tap is on disk before the door opens
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA cache_size = -8000",  # 8 MiB page cache: the card index of 100k members stays hot
)

# SQLite's primary result codes that are about the database, not about one write (busy, locked, out of memory,
# read-only, I/O error, corrupt, full, not a database): they fail the whole group at once.
_GROUP_FATAL = frozenset({5, 6, 7, 8, 10, 11, 13, 26})
GROUP_MAX = 256  # writes sharing one commit at most: bounds how long the last of a burst waits for its answer
# WAL checkpoints run on a connection of their own, off the commit path (see `_checkpoints`): SQLite's automatic
# one runs inside the COMMIT that crosses 1,000 pages, copying 4 MB into the database file and fsyncing it, and
# the taps of that group wait for it (spikes of 80-270 ms in the latency benchmarks).
CHECKPOINT_POLL_S = 1.0
CHECKPOINT_WAL_BYTES = 4 << 20  # SQLite's own threshold (1,000 pages of 4 KiB)
SLOW_S = 0.1  # a group commit or a checkpoint longer than this is logged: taps wait behind the first
T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    out = []
    for entry in resources.files("agent.store").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, name = entry.name.removesuffix(".sql").partition("_")
            out.append(Migration(int(number), name, entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    expected = list(range(1, len(out) + 1))
    if [m.version for m in out] != expected:
        raise MigrationError(f"migration files must be numbered 1..n without gaps, found {[m.version for m in out]}")
    return out


def translate(exc: sqlite3.Error, doing: str) -> StoreError:
    """sqlite3 errors become ours, in one place, with the operator's next step where there is one."""
    text = str(exc)
    if "malformed" in text or "not a database" in text:
        return StoreCorrupt(f"{doing}: database is corrupt ({text}); run 'club-agent store recover'")
    if "disk is full" in text or "disk I/O error" in text:
        return StoreError(f"{doing}: {text}: free space on the data partition")
    if "readonly" in text:
        return StoreError(f"{doing}: {text}: the data directory is not writable")
    return StoreError(f"{doing}: {text}")


async def _on_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn` on the connection's own thread, with its sqlite3 connection, in one hop.

    aiosqlite 0.22 has no public call for this; `_execute` and `_conn` have had this meaning since 0.17, and
    pyproject pins aiosqlite below 0.23 so that a change shows up as a failing test, not as a surprise."""
    raw = conn._conn
    result: T = await conn._execute(fn, raw)  # type: ignore[no-untyped-call]
    return result


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    doing: str
    notify: bool = True
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _fatal(exc: Exception) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _GROUP_FATAL


def _run_group(conn: sqlite3.Connection, group: list[_Write]) -> list[tuple[bool, Any]]:
    """On the writer's thread: the group's writes in one transaction; (ok, result or exception) per write.

    No savepoint per write (they cost as much as a small write): when a write raises, the transaction is rolled
    back and run again without it, its error kept for its caller. Nothing of a rolled-back run has left this
    function, so running a write again is safe as long as it touches nothing outside the connection, which
    `Database.write` asks of it. An error SQLite answers by rolling back on its own (a full disk, an I/O error)
    fails the whole group, and so does a failed COMMIT: nobody is told "done" for a write that is not on disk."""
    failed: dict[int, BaseException] = {}
    while True:
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for i, write in enumerate(group):
                if i in failed:
                    results.append((False, failed[i]))
                    continue
                try:
                    results.append((True, write.fn(conn)))
                except Exception as exc:
                    if not conn.in_transaction or _fatal(exc):
                        raise
                    failed[i] = exc
                    break
            else:
                conn.execute("COMMIT")
                return results
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        conn.execute("ROLLBACK")


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Database:
    """The agent's database. Use as `async with Database(path) as db:`."""

    def __init__(self, path: Path, *, check: bool = True) -> None:
        self.path = path
        self._check = check
        self._conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._state = _State.NEW
        self._writes: list[_Write] = []
        self._committer: asyncio.Task[None] | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints_task: asyncio.Task[None] | None = None
        self.checkpoints = 0  # passive checkpoints run by `_checkpoints`
        self._checkpointing = False
        self.group_commits = 0  # transactions committed by write(), and the writes they carried
        self.group_writes = 0
        self.on_commit: list[Callable[[], None]] = []

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"Database is {self._state.value}; open a new instance instead of re-entering")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = await aiosqlite.connect(self.path, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            for pragma in PRAGMAS:
                await self._conn.execute(pragma)
            if self._check:
                await self._quick_check()
            await self._migrate()
            # Reads outside decisions use their own connection: WAL lets it see only committed data, never
            # the half-written transaction another coroutine has open on the writer.
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            self._reader.row_factory = sqlite3.Row
            await self._reader.execute("PRAGMA query_only = ON")
            await self._reader.execute("PRAGMA busy_timeout = 5000")
            await self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            await self._close()
            raise translate(exc, f"opening {self.path}") from exc
        except BaseException:
            await self._close()
            raise
        self._state = _State.OPEN
        self._checkpoints_task = asyncio.create_task(self._checkpoints(), name="store-checkpoints")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._checkpoints_task is not None:
            self._checkpoints_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints_task
            self._checkpoints_task = None
        if self._committer is not None:  # the writes already queued are committed and answered first
            await asyncio.shield(self._committer)
        self._state = _State.CLOSED
        # The writer last: closing the last connection checkpoints what the WAL still holds.
        for conn in (self._checkpointer, self._reader, self._conn):
            if conn is not None:
                await conn.close()
        self._conn = self._reader = self._checkpointer = None

    async def _checkpoints(self) -> None:
        """Copy the WAL into the database file once it passes CHECKPOINT_WAL_BYTES, on this connection's own
        thread: PASSIVE takes no lock a writer needs, so commits go on meanwhile (their fsync is of the WAL, not
        of the file being copied into), and the WAL restarts from its beginning at the next commit after one
        completes. A failure (a full disk) is logged once and tried again."""
        assert self._checkpointer is not None
        wal = self.path.with_name(self.path.name + "-wal")
        failing = False
        while True:
            await asyncio.sleep(CHECKPOINT_POLL_S)
            try:
                size = wal.stat().st_size
            except OSError:
                continue
            if size < CHECKPOINT_WAL_BYTES:
                continue
            began = time.monotonic()
            self._checkpointing = True
            try:
                rows = await self._checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                if not failing:
                    log.warning("store_checkpoint_failed", error=str(exc), wal_bytes=size)
                failing = True
                continue
            finally:
                self._checkpointing = False
            failing = False
            self.checkpoints += 1
            took = time.monotonic() - began
            if took > SLOW_S:
                _, frames, copied = next(iter(rows), (0, 0, 0))
                log.info("store_slow_checkpoint", ms=round(took * 1000), wal_frames=frames, copied=copied)

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None or self._state is not _State.OPEN:
            raise RuntimeError("database is not open")
        return self._conn

    @property
    def reader(self) -> aiosqlite.Connection:
        """A read-only connection that sees committed data only."""
        if self._reader is None or self._state is not _State.OPEN:
            raise RuntimeError("database is not open")
        return self._reader

    async def _quick_check(self) -> None:
        assert self._conn is not None
        rows = await self._conn.execute_fetchall("PRAGMA quick_check")
        problems = [row[0] for row in rows]
        if problems != ["ok"]:
            raise StoreCorrupt(
                f"{self.path} failed its integrity check ({'; '.join(problems[:3])}). Stop the agent and run "
                f"'club-agent store recover' to move it aside and salvage what is readable."
            )

    async def _migrate(self) -> None:
        assert self._conn is not None
        (current,) = next(iter(await self._conn.execute_fetchall("PRAGMA user_version")))
        known = migrations()
        if current > len(known):
            raise MigrationError(
                f"{self.path} has schema version {current}, newer than this build knows ({len(known)}); "
                f"upgrade the agent instead of downgrading"
            )
        for migration in known[current:]:
            # executescript runs the whole file plus the version bump in one transaction.
            await self._conn.executescript(
                f"BEGIN IMMEDIATE;\n{migration.sql}\nPRAGMA user_version = {migration.version};\nCOMMIT;"
            )

    async def write(
        self,
        doing: str,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run `fn(conn, *args, **kwargs)` in a write transaction on the writer's thread; returns its result once
        the transaction is on disk, or raises (StoreError for SQLite's errors, with `doing` in the message).
        The `on_commit` callbacks run after each commit.

        `fn` is synchronous and does only SQLite work: it runs on another thread, beside other writes of the same
        group. It may run more than once (when another write of its group fails, the rest run again without
        it), so it must touch nothing outside the connection. A caller cancelled after its write was taken
        still has it committed, as after a crash; requests carry ids so that a retry finds the answer."""
        result: T = await self._submit(_Write(lambda conn: fn(conn, *args, **kwargs), doing))
        return result

    async def write_quietly(
        self,
        doing: str,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`write` for bookkeeping nobody needs to hear about: its commit alone runs no `on_commit` callback."""
        result: T = await self._submit(_Write(lambda conn: fn(conn, *args, **kwargs), doing, notify=False))
        return result

    async def _submit(self, write: _Write) -> Any:
        if self._state is not _State.OPEN:
            raise RuntimeError("database is not open")
        self._writes.append(write)
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_writes(), name="store-group-commit")
        return await write.future

    async def _commit_writes(self) -> None:
        """Commit the queued writes, as many as are waiting (up to GROUP_MAX) per transaction, until none is."""
        group: list[_Write] = []
        try:
            while self._writes:
                group = [w for w in self._writes[:GROUP_MAX] if not w.future.cancelled()]
                del self._writes[:GROUP_MAX]
                if not group:
                    continue
                async with self._lock:
                    began = time.monotonic()
                    try:
                        results = await _on_thread(self.conn, functools.partial(_run_group, group=group))
                    except Exception as exc:  # the whole group failed (SQLite, or aiosqlite's "Connection closed")
                        results = [(False, exc)] * len(group)
                    took = time.monotonic() - began
                if took > SLOW_S:
                    log.warning(
                        "store_slow_commit",
                        ms=round(took * 1000),
                        writes=len(group),
                        doing=sorted({w.doing for w in group})[:4],
                        checkpointing=self._checkpointing,
                    )
                committed = any(ok for ok, _ in results)
                if committed:
                    self.group_commits += 1
                    self.group_writes += len(group)
                for write, (ok, value) in zip(group, results, strict=True):
                    if write.future.done():
                        continue
                    if ok:
                        write.future.set_result(value)
                    elif isinstance(value, sqlite3.Error):
                        error = translate(value, write.doing)
                        error.__cause__ = value
                        write.future.set_exception(error)
                    else:
                        write.future.set_exception(value)
                if committed and any(w.notify for w in group):
                    for callback in self.on_commit:
                        callback()
        finally:
            self._committer = None
            # only when this task is cancelled (the loop is going down): nobody may wait forever
            for write in [*group, *self._writes]:
                if not write.future.done():
                    write.future.set_exception(StoreError(f"{write.doing}: the store was shut down; outcome unknown"))
            self._writes.clear()

    async def read(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(conn, *args, **kwargs)` on the read-only connection's thread, in one hop; it sees committed
        data only."""
        try:
            return await _on_thread(self.reader, lambda conn: fn(conn, *args, **kwargs))
        except sqlite3.Error as exc:
            raise translate(exc, "reading") from exc

    @asynccontextmanager
    async def transaction(self, doing: str = "writing", *, notify: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """An exclusive write transaction; commits on success, rolls back on any error (or cancellation).

        After a commit the `on_commit` callbacks run (the outbox wakes for new delivery rows); `notify=False`
        for writes nobody needs to hear about (the outbox's own bookkeeping)."""
        conn = self.conn
        async with self._lock:
            # BEGIN runs on aiosqlite's thread whatever happens to this task: a cancel must wait for it and undo
            # it, or the next user of the lock would find the connection inside a transaction.
            begin = asyncio.ensure_future(conn.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                with contextlib.suppress(sqlite3.Error):
                    await begin
                    await conn.execute("ROLLBACK")
                raise
            except sqlite3.Error as exc:
                raise translate(exc, doing) from exc
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the original error is the one worth reporting
                        await conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise translate(exc, doing) from exc
                raise
        if notify:
            for callback in self.on_commit:
                callback()

    async def fetchall(self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        """Rows of a read on the read-only connection; `params` positional, or by name as a mapping."""
        bound = params if isinstance(params, Mapping) else tuple(params)
        try:
            return list(await self.reader.execute_fetchall(sql, bound))
        except sqlite3.Error as exc:
            raise translate(exc, "reading") from exc

    async def fetchone(self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


SALVAGE_TABLES = (
    "members",
    "cards",
    "member_list",
    "sessions",
    "credit_ledger",
    "events",
    "deliveries",
    "delivery_cursors",
    "device_requests",
    "highlights",
    "kv",
)


def _move_aside(path: Path) -> Path:
    if not path.exists():
        raise StoreError(f"no database at {path}: nothing to recover")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():  # never overwrite an earlier corrupt copy
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            shutil.move(src, Path(f"{aside}{suffix}"))
    return aside


async def recover(path: Path) -> dict[str, str]:
    """Move a corrupt database aside and copy every readable row into a fresh one.

    Returns a line per table: rows copied, or why it could not be read. The corrupt file is kept.
    """
    aside = await asyncio.to_thread(_move_aside, path)
    report: dict[str, str] = {"moved_to": str(aside)}
    async with Database(path, check=False) as fresh:
        conn = fresh.conn
        try:
            await conn.execute("ATTACH DATABASE ? AS old", (str(aside),))
        except sqlite3.Error as exc:  # even the schema is unreadable: start empty, keep the corrupt copy
            report.update({table: f"unreadable: {exc}" for table in SALVAGE_TABLES})
            return report
        for table in SALVAGE_TABLES:
            try:
                async with fresh.transaction(f"salvaging {table}"):
                    if table == "member_list":
                        await conn.execute("DELETE FROM member_list")
                    cursor = await conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM old.{table}")  # noqa: S608
                    report[table] = f"{cursor.rowcount} rows"
            except StoreError as exc:
                report[table] = f"unreadable: {(exc.__cause__ or exc)}"
        await conn.execute("DETACH DATABASE old")
        if not report["delivery_cursors"].endswith(" rows"):
            # Without the cursors, each destination resumes after its newest delivery row: rows are queued in
            # seq order, so nothing after it was queued (re-queuing what was is a no-op).
            async with fresh.transaction("rebuilding the delivery cursors"):
                await conn.execute(
                    "INSERT OR IGNORE INTO delivery_cursors (destination, upto)"
                    " SELECT destination, MAX(seq) FROM deliveries GROUP BY destination"
                )
    return report
