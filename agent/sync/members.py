"""Member sync from the club cloud (DESIGN 2.3): `GET /edge/members?cursor=&limit=`, a delta feed, pulled from
the last stored cursor until the feed says it is caught up.

Atomicity. Decisions read `members` and `cards`; a run never writes them until its last page is in. Each page
is staged (`member_sync_staging`, in short transactions so a tap waits behind at most one chunk, while the
next page is fetched), then one transaction applies the staged run, the new cursor, the list version bump,
the sync time and the ledger confirmations together. A network error, a 5xx, a garbage page, a crash or `kill -9`
mid-run leaves the previous list and cursor exactly as they were; the next run discards what was staged.
Only one run stages at a time, across processes too: a run that starts removes any other run's row
(`member_sync_runs`) and staged pages, and every later write of a run first checks that its row is still there,
so a superseded run fails cleanly instead of applying someone else's half list.

Deltas and resyncs. Tombstones remove the member and (by the foreign key) their cards at once. A run is a full
resync, replacing the whole list (members absent from it are removed), when there is no cursor, when asked
(`--full`), when the list changed by other means since the cursor was stored (an import: the cursor no longer
describes the list), and when the cloud answers `410 cursor_expired` (its list was rebuilt).

Bad input. A record the cloud sends that `MemberRecord` would refuse is skipped, logged with its reason (the
first few of a run at warning) and counted; the run goes on. A page that is not the contract's shape (not JSON,
a missing list, a cursor that does not advance) fails the run with a clear error and the previous list stays.

Speed (benchmarks/member_sync.py: 100,000 members in about 2.5 s on a 2-core box). Most records take a fast
path that checks plain JSON types exactly as `MemberRecord` would; anything unusual (a string where a list is
expected, "5" as credits, an unknown status) goes through `MemberRecord` itself, which accepts it as an import
would or says why not (per-row pydantic costs about 0.6 s per 100,000). The cyclic garbage collector is paused
while a run lasts: parsing pages allocates a million short-lived containers, and each of the ten or so full
collections they trigger rescans the whole agent heap (measured: 0.6 s per 100,000 members with a small
heap, more in the agent). Reference counting frees the parsed pages as usual; the young generation is
collected after each page for the little that is cyclic (an HTTP response and its body).
The final apply of a full sync holds the writer about 0.4 s: the one moment a tap waits on a sync.

Credits ledger reconciliation. Offline spending is a `credit_ledger` row (negative delta, confirmed = 0) that
lowers the synced balance (`members.credits`) until the cloud's balance includes it. The rule:

    a pending entry is confirmed once (1) the cloud accepted the event that carries it (the entry's event has
    its delivery row to destination 'cloud' in state 'delivered') and (2) a sync run that STARTED after that
    acceptance brought that member's record (an upsert in a delta, or any full resync that lists them).

(1) is read when the run starts, inside its first transaction, so "started after" needs no wall clock (a Pi
has no RTC); (2) and the confirmation are in the apply transaction, with the balance they make redundant.
A confirmed entry no longer lowers the balance decisions and screens use. A member the cloud has not sent
again keeps their pending entries: their old balance may not include the spend yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import aiosqlite
from pydantic import ValidationError

from ..config import Config
from ..domain.model import MemberStatus, normalize_card_id
from ..errors import AgentError, ConfigError, StoreError
from ..logs import OnceLogger, get_logger
from ..metrics import Metrics
from ..store.db import Database
from ..store.members import MAX_CREDITS, MemberRecord, PlanRecord, _bound_ms, _date_or_instant, _member_row
from ..store.repo import new_id, to_ms
from .cloud import CloudClient
from .delivery import Permanent, Transient
from .metered import metered_client

log = get_logger("agent.sync.members")

SOURCE = "cloud"
PATH = "/edge/members"
DEFAULT_PAGE_LIMIT = 5000
MAX_PAGE_LIMIT = 5000  # the contract's maximum
DEFAULT_INTERVAL_S = 300.0
STAGE_CHUNK = 1000  # rows per staging transaction: what a tap may wait behind while a sync runs
MAX_PAGES = 100_000  # a feed that never says it is done stops here (10 million records at the maximum limit)
MAX_RESTARTS = 2  # 410s within one run before giving up until the next
SKIPS_LOGGED = 20  # skipped records logged at warning per run; the rest at debug, all counted
RETRY_BASE_S = 10.0  # after a failed run: 10 s, 20 s, 40 s ... capped at the sync interval
_CACHE_MAX = 4096  # distinct dates and plans remembered while converting (a club has a handful)
_STATUSES = frozenset(s.value for s in MemberStatus)

# One staged member: member_id, ord, deleted, then the members columns the apply copies.
_STAGE_SQL = (
    "INSERT OR REPLACE INTO member_sync_staging (member_id, ord, deleted, first_name, last_name, member_code,"
    " status, credits, requires_credit, valid_from, valid_until, groups_json, hours_json, cards_json)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_MEMBER_COLUMNS = (
    "member_id, first_name, last_name, member_code, status, credits, requires_credit, valid_from, valid_until,"
    " groups_json, hours_json"
)
# Prepared once every page is in, before (and outside) the apply transaction: each member code's and each
# card's newest holder in the run, as an import gives a reassigned code or card to the newest record.
_PREPARE = (
    "INSERT OR REPLACE INTO member_sync_staging_codes (member_code, member_id)"
    " SELECT member_code, member_id FROM member_sync_staging"
    " WHERE deleted = 0 AND member_code IS NOT NULL ORDER BY ord",
    "UPDATE member_sync_staging SET member_code = NULL WHERE member_code IS NOT NULL AND NOT EXISTS"
    " (SELECT 1 FROM member_sync_staging_codes c"
    " WHERE c.member_code = member_sync_staging.member_code AND c.member_id = member_sync_staging.member_id)",
    "INSERT OR REPLACE INTO member_sync_staging_cards (card_id, member_id)"
    " SELECT j.value, s.member_id FROM member_sync_staging s, json_each(s.cards_json) j"
    " WHERE s.deleted = 0 ORDER BY s.ord",
)
_STAGING_TABLES = ("member_sync_staging", "member_sync_staging_codes", "member_sync_staging_cards")

# The apply writes only what differs from the list it replaces: a resync of an unchanged list writes nearly
# nothing, and the transaction decisions wait behind stays short.
_DELETE_ABSENT = (
    "DELETE FROM members WHERE member_id NOT IN (SELECT member_id FROM member_sync_staging WHERE deleted = 0)"
)
_DELETE_TOMBSTONED = (
    "DELETE FROM members WHERE member_id IN (SELECT member_id FROM member_sync_staging WHERE deleted = 1)"
)
# A member code given to someone else in this run leaves its holder first (the UNIQUE index would refuse).
_RELEASE_CODES = """
UPDATE members SET member_code = NULL
WHERE member_code IN (SELECT member_code FROM member_sync_staging_codes)
  AND NOT EXISTS (SELECT 1 FROM member_sync_staging_codes c
                  WHERE c.member_code = members.member_code AND c.member_id = members.member_id)
"""
_CHANGED = " OR ".join(f"{c} IS NOT excluded.{c}" for c in _MEMBER_COLUMNS.split(", ")[1:])
_UPSERT_MEMBERS = f"""
INSERT INTO members ({_MEMBER_COLUMNS}, updated_at)
SELECT {_MEMBER_COLUMNS}, ? FROM member_sync_staging WHERE deleted = 0
ON CONFLICT (member_id) DO UPDATE SET first_name = excluded.first_name, last_name = excluded.last_name,
    member_code = excluded.member_code, status = excluded.status, credits = excluded.credits,
    requires_credit = excluded.requires_credit, valid_from = excluded.valid_from,
    valid_until = excluded.valid_until, groups_json = excluded.groups_json, hours_json = excluded.hours_json,
    updated_at = excluded.updated_at
WHERE {_CHANGED}
"""  # noqa: S608 - constant SQL, parameters bound
# Cards no longer listed for a member this run brought (every member, in a full sync) go; cards new to their
# member come, taken from any other holder.
_CARD_GONE = (
    "NOT EXISTS (SELECT 1 FROM member_sync_staging_cards sc"
    " WHERE sc.card_id = cards.card_id AND sc.member_id = cards.member_id)"
)
_DELETE_CARDS_FULL = f"DELETE FROM cards WHERE {_CARD_GONE}"  # noqa: S608
_DELETE_CARDS_DELTA = (
    "DELETE FROM cards WHERE member_id IN (SELECT member_id FROM member_sync_staging WHERE deleted = 0)"  # noqa: S608
    f" AND {_CARD_GONE}"
)
_INSERT_CARDS = """
INSERT OR REPLACE INTO cards (card_id, member_id)
SELECT sc.card_id, sc.member_id FROM member_sync_staging_cards sc
WHERE NOT EXISTS (SELECT 1 FROM cards c WHERE c.card_id = sc.card_id AND c.member_id = sc.member_id)
"""
_LEDGER_ACCEPTED = """
SELECT l.entry_id FROM credit_ledger l
JOIN events e ON e.event_id = l.event_id
JOIN deliveries d ON d.seq = e.seq AND d.destination = 'cloud'
WHERE l.confirmed = 0 AND d.state = 'delivered'
"""
_LEDGER_CONFIRM = """
UPDATE credit_ledger SET confirmed = 1
WHERE confirmed = 0 AND entry_id IN (SELECT value FROM json_each(?))
  AND member_id IN (SELECT member_id FROM member_sync_staging WHERE deleted = 0)
"""


class MemberSyncError(AgentError):
    """A sync run failed; the previous member list and cursor are kept. `retry_after_s` when the cloud said."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Superseded(MemberSyncError):
    """Another run (this process or another) started, or the list changed, while this one was paging."""


class CloudApi(Protocol):
    """What member sync needs of the cloud: `CloudClient.request`."""

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncResult:
    version: int
    full: bool
    upserts: int
    tombstones: int
    skipped: int
    members: int
    pages: int
    confirmed: int  # ledger entries confirmed by this run
    seconds: float

    def summary(self) -> str:
        kind = "full" if self.full else "delta"
        return (
            f"{kind} sync: {self.upserts} upserts, {self.tombstones} tombstones, {self.skipped} skipped; "
            f"{self.members} members, version {self.version}, {self.seconds:.2f} s"
        )


# -- records ---------------------------------------------------------------------------------------------------

Row = tuple[Any, ...]  # member_id, first_name, last_name, member_code, status, credits, requires_credit, ...


class _Fallback(Exception):
    """The fast path does not take this record as it is; MemberRecord decides."""


class Skip(Exception):
    """A record left out of the sync, and why."""

    def __init__(self, member_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.member_id = member_id
        self.reason = reason


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')} (value {str(err.get('input'))[:40]!r})")
    return "; ".join(parts)


def _text(value: Any, max_len: int) -> str:
    # Surrounding whitespace goes to MemberRecord: pydantic strips a narrower set of characters than str.strip().
    if not isinstance(value, str) or len(value) > max_len or (value and (value[0].isspace() or value[-1].isspace())):
        raise _Fallback
    return value


def _strings(value: Any) -> list[str]:
    if type(value) is not list:
        raise _Fallback
    for item in value:
        if type(item) is not str or (item and (item[0].isspace() or item[-1].isspace())):
            raise _Fallback
    return value


class RecordReader:
    """Turns the cloud's member objects into staging rows exactly as `MemberRecord` and an import would."""

    def __init__(self, tz: ZoneInfo) -> None:
        self._tz = tz
        self._bounds: dict[tuple[str, bool], int | None] = {}
        self._plans: dict[str, tuple[bool, str]] = {}

    def read(self, raw: Any) -> tuple[Row, list[str]] | str:
        """(row, cards) for a member, its id for a tombstone (`deleted: true`); raises Skip."""
        if not isinstance(raw, dict):
            raise Skip(None, f"a member is a JSON object, got {type(raw).__name__}")
        try:
            return self._fast(raw)
        except _Fallback:
            pass
        try:
            record = MemberRecord.model_validate(raw)
        except ValidationError as exc:
            member_id = raw.get("member_id")
            raise Skip(member_id if isinstance(member_id, str) else None, _explain(exc)) from exc
        if record.deleted:
            return record.member_id
        row = _member_row(record, self._tz, 0)[:-1]  # without updated_at, which the apply sets
        return row, record.cards

    def _fast(self, raw: dict[str, Any]) -> tuple[Row, list[str]]:
        get = raw.get
        member_id = _text(get("member_id"), 128)
        first_name = _text(get("first_name"), 128)
        if not member_id or not first_name or get("deleted", False) is not False:
            raise _Fallback
        last_name = _text(get("last_name", ""), 128)
        code = get("member_code")
        if code is not None:
            code = _text(code, 64) or None
        status = get("status", "active")
        if type(status) is not str or status not in _STATUSES:
            raise _Fallback
        try:
            cards = [normalize_card_id(card) for card in _strings(get("cards", []))]
        except ValueError as exc:
            raise _Fallback from exc
        credits = get("credits")
        if credits is not None and (type(credits) is not int or not 0 <= credits <= MAX_CREDITS):
            raise _Fallback
        requires_credit = get("requires_credit")
        if requires_credit is not None and type(requires_credit) is not bool:
            raise _Fallback
        groups = json.dumps(sorted(set(_strings(get("groups", [])))))
        plan_credit, hours = self._plan(get("plan"))
        return (
            member_id,
            first_name,
            last_name,
            code,
            status,
            credits,
            int(requires_credit if requires_credit is not None else plan_credit),
            self._bound(get("valid_from"), end=False),
            self._bound(get("valid_until"), end=True),
            groups,
            hours,
        ), cards

    def _bound(self, value: Any, *, end: bool) -> int | None:
        if value is None:
            return None
        if type(value) is not str:
            raise _Fallback
        key = (value, end)
        if key not in self._bounds:
            try:
                parsed: date | datetime | None = _date_or_instant(value)
            except ValueError as exc:
                raise _Fallback from exc
            if len(self._bounds) >= _CACHE_MAX:
                self._bounds.clear()
            self._bounds[key] = _bound_ms(parsed, self._tz, end=end)
        return self._bounds[key]

    def _plan(self, value: Any) -> tuple[bool, str]:
        if value is None:
            return False, "[]"
        if type(value) is not dict:
            raise _Fallback
        key = json.dumps(value, sort_keys=True)
        if key not in self._plans:
            try:
                plan = PlanRecord.model_validate(value)
            except ValidationError as exc:
                raise _Fallback from exc
            if len(self._plans) >= _CACHE_MAX:
                self._plans.clear()
            self._plans[key] = (
                plan.requires_credit,
                MemberRecord.model_construct(member_id="", plan=plan).hours_json(),
            )
        return self._plans[key]


# -- the sync --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    run_id: str
    started: datetime
    base_version: int
    full: bool
    accepted: list[int]  # ledger entries whose event the cloud had accepted when the run started
    cursor: str = ""
    ord: int = 0
    pages: int = 0
    upserts: int = 0
    tombstones: int = 0
    skipped: int = 0
    restarts: int = 0


class MemberSync:
    """One sync at a time (`run`), or forever at an interval (`run_periodically`). Owns its cloud client."""

    def __init__(
        self,
        db: Database,
        cloud: CloudApi,
        *,
        tz: ZoneInfo,
        page_limit: int = DEFAULT_PAGE_LIMIT,
        interval_s: float = DEFAULT_INTERVAL_S,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
    ) -> None:
        if not 1 <= page_limit <= MAX_PAGE_LIMIT:
            raise ValueError(f"page_limit must be 1..{MAX_PAGE_LIMIT}")
        self._db = db
        self._cloud = cloud
        self._tz = tz
        self._limit = page_limit
        self._interval_s = interval_s
        self._wall = wall
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._once = OnceLogger(log)
        self._unfinished: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(
        cls,
        config: Config,
        db: Database,
        *,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
    ) -> MemberSync:
        """The sync `config` describes; ConfigError naming what is missing (the [cloud] section, its secret)."""
        section = config.cloud
        if section is None:
            raise ConfigError("member sync needs a [cloud] section (base_url, token_url, client_id)", key="cloud")
        secrets = config.secrets
        if secrets.cloud_client_secret is None:
            raise ConfigError(
                "member sync needs cloud_client_secret in the secrets file", key="secrets.cloud_client_secret"
            )
        # A member page is a GET without a body: nothing to sign, so the signing secret is optional here.
        signing = secrets.cloud_signing_secret.get_secret_value() if secrets.cloud_signing_secret else ""
        http = metered_client(metrics, "cloud", section.base_url) if metrics is not None else None
        client = CloudClient(section, secrets.cloud_client_secret.get_secret_value(), signing, http)
        return cls(
            db,
            client,
            tz=config.domain_policy().timezone,
            page_limit=section.members_page_limit,
            interval_s=section.members_sync_interval_s,
            wall=wall,
            metrics=metrics,
        )

    async def aclose(self) -> None:
        await self._cloud.aclose()

    # -- one run ---------------------------------------------------------------------------------------------------

    async def run(self, *, full: bool = False, progress: Callable[[int], None] | None = None) -> SyncResult:
        """Pull every change since the stored cursor (everything when `full`) and apply it in one transaction.

        `progress` is told the number of records received so far after each page. Raises MemberSyncError
        (the previous list kept), StoreError."""
        async with self._lock:
            began = time.monotonic()
            try:
                with _collection_paused():
                    result = await self._run(full, progress, began)
            except MemberSyncError as exc:
                await self._failed(exc, "superseded" if isinstance(exc, Superseded) else "failed")
                raise
            except StoreError as exc:
                await self._failed(exc, "failed")
                raise
        if self._metrics is not None:
            self._metrics.members_cached.set(result.members)
            self._metrics.member_syncs.labels("ok").inc()
            for kind, n in (("upsert", result.upserts), ("tombstone", result.tombstones), ("skipped", result.skipped)):
                self._metrics.member_sync_records.labels(kind).inc(n)
        log.info(
            "members_synced",
            full=result.full,
            upserts=result.upserts,
            tombstones=result.tombstones,
            skipped=result.skipped,
            members=result.members,
            version=result.version,
            confirmed_ledger=result.confirmed,
            seconds=round(result.seconds, 3),
        )
        return result

    async def _run(self, full: bool, progress: Callable[[int], None] | None, began: float) -> SyncResult:
        run = await self._start(full)
        reader = RecordReader(self._tz)
        received = 0
        # A page is staged (in SQLite's thread) while the next one is fetched and read: one in flight at most.
        staging: asyncio.Task[None] | None = None
        applied = False
        try:
            while True:
                page = await self._fetch(run)
                if page is None:  # 410: the cloud rebuilt its list; start over from nothing
                    staging = await _settle(staging)
                    await self._restart(run)
                    received = 0
                    continue
                rows, tombstones = self._read_page(page, reader, run)
                staging = await _settle(staging)
                staging = asyncio.create_task(self._stage(run, rows, tombstones), name="member-sync-stage")
                run.pages += 1
                received += len(page["members"]) + len(page["tombstones"])
                # The young generation only: what this page allocated. An HTTP response sits in a reference
                # cycle with its body, which would otherwise wait for the end of the run.
                gc.collect(0)
                if progress is not None:
                    progress(received)
                next_cursor = page["next_cursor"]
                if not page["has_more"]:
                    run.cursor = next_cursor
                    break
                if next_cursor == run.cursor:
                    raise MemberSyncError(f"the cloud's member feed did not advance past cursor {run.cursor!r}")
                if run.pages >= MAX_PAGES:
                    raise MemberSyncError(f"the cloud's member feed did not finish within {MAX_PAGES} pages")
                run.cursor = next_cursor
            staging = await _settle(staging)
            version, members, confirmed = await self._apply(run, began)
            applied = True
        finally:
            if staging is not None and not staging.done():
                # Waited for, never cancelled: a chunk is short, and a transaction cancelled while its BEGIN is
                # in flight would leave the shared writer connection inside it. Kept referenced until done in
                # case this task is cancelled while waiting.
                self._unfinished.add(staging)
                staging.add_done_callback(self._finished)
                await asyncio.wait({staging})
            elif staging is not None and not staging.cancelled():
                staging.exception()  # retrieved: the error that matters is the one already raised
            if not applied:
                with contextlib.suppress(StoreError, sqlite3.Error):
                    await self._abandon(run)
        return SyncResult(
            version=version,
            full=run.full,
            upserts=run.upserts,
            tombstones=run.tombstones,
            skipped=run.skipped,
            members=members,
            pages=run.pages,
            confirmed=confirmed,
            seconds=time.monotonic() - began,
        )

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._unfinished.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the error that matters is the one the run already raised

    async def _start(self, full: bool) -> _Run:
        run_id = new_id()
        started = self._wall()
        async with self._db.transaction("starting a member sync", notify=False) as conn:
            # Whatever another run staged is dropped; that run notices at its next write and stops.
            await conn.execute("DELETE FROM member_sync_runs")
            await _clear_staging(conn)
            [(version, cursor, cursor_version)] = await conn.execute_fetchall(
                "SELECT version, cursor, cursor_version FROM member_list WHERE id = 1"
            )
            # A cursor describes the list it was stored with; an import since then makes it meaningless.
            full = full or not cursor or cursor_version != version
            await conn.execute(
                "INSERT INTO member_sync_runs (run_id, started_at, base_version, full) VALUES (?, ?, ?, ?)",
                (run_id, to_ms(started), version, int(full)),
            )
            accepted = [int(r[0]) for r in await conn.execute_fetchall(_LEDGER_ACCEPTED)]
            await conn.execute(
                "UPDATE member_sync_state SET last_attempt_at = ? WHERE id = 1", (to_ms(datetime.now(UTC)),)
            )
        return _Run(run_id, started, int(version), full, accepted, cursor="" if full else str(cursor))

    async def _fetch(self, run: _Run) -> dict[str, Any] | None:
        """The next page, checked for shape; None for a 410 (the run must start over as a full one)."""
        params: dict[str, Any] = {"limit": self._limit}
        if run.cursor:
            params["cursor"] = run.cursor
        try:
            page = await self._cloud.request("GET", PATH, params=params)
        except Transient as exc:
            raise MemberSyncError(
                f"could not get the member feed from the cloud: {exc.reason}", exc.retry_after_s
            ) from exc
        except Permanent as exc:
            if exc.status != 410:
                raise MemberSyncError(f"the cloud refused the member feed: {exc.reason}") from exc
            if run.restarts >= MAX_RESTARTS:
                raise MemberSyncError(f"cursor expired {run.restarts + 1} times in one sync; try again") from exc
            log.info("members_cursor_expired", detail=exc.reason, restarts=run.restarts)
            return None
        _check_page(page)
        return dict(page)

    async def _restart(self, run: _Run) -> None:
        async with self._db.transaction("restarting a member sync", notify=False) as conn:
            await self._own(conn, run)
            await _clear_staging(conn)
            await conn.execute("UPDATE member_sync_runs SET full = 1 WHERE run_id = ?", (run.run_id,))
        run.full, run.cursor, run.restarts = True, "", run.restarts + 1
        run.upserts = run.tombstones = run.skipped = run.pages = 0

    def _read_page(
        self, page: dict[str, Any], reader: RecordReader, run: _Run
    ) -> tuple[dict[str, tuple[Row, list[str]]], dict[str, None]]:
        """Members by id (the last copy in the page wins) and tombstoned ids, which win over an upsert."""
        rows: dict[str, tuple[Row, list[str]]] = {}
        tombstones: dict[str, None] = {}
        for raw in page["members"]:
            try:
                got = reader.read(raw)
            except Skip as exc:
                self._skip(run, exc)
                continue
            if isinstance(got, str):
                tombstones[got] = None
            else:
                rows.pop(got[0][0], None)  # re-inserted: keeps the page's order for the newest copy
                rows[got[0][0]] = got
        for member_id in page["tombstones"]:
            if type(member_id) is not str or not 0 < len(member_id.strip()) <= 128:
                self._skip(run, Skip(None, f"a tombstone is a member id (a string), got {str(member_id)[:40]!r}"))
                continue
            tombstones[member_id.strip()] = None
        for member_id in tombstones:
            rows.pop(member_id, None)
        run.upserts += len(rows)
        run.tombstones += len(tombstones)
        return rows, tombstones

    def _skip(self, run: _Run, exc: Skip) -> None:
        run.skipped += 1
        if run.skipped <= SKIPS_LOGGED:
            log.warning("member_skipped", member_id=exc.member_id, reason=exc.reason, run_skipped=run.skipped)
        else:
            log.debug("member_skipped", member_id=exc.member_id, reason=exc.reason, run_skipped=run.skipped)

    async def _own(self, conn: aiosqlite.Connection, run: _Run) -> None:
        rows = list(await conn.execute_fetchall("SELECT 1 FROM member_sync_runs WHERE run_id = ?", (run.run_id,)))
        if not rows:
            raise Superseded("another member sync started while this one was running; it carries on instead")

    async def _stage(self, run: _Run, rows: dict[str, tuple[Row, list[str]]], tombstones: dict[str, None]) -> None:
        staged: list[Row] = []
        dumps = json.dumps
        for row, cards in rows.values():
            run.ord += 1
            staged.append((row[0], run.ord, 0, *row[1:], dumps(cards)))
        for member_id in tombstones:
            run.ord += 1
            staged.append((member_id, run.ord, 1, *(None,) * 11))
        for start in range(0, len(staged), STAGE_CHUNK):
            async with self._db.transaction("staging member pages", notify=False) as conn:
                await self._own(conn, run)
                await conn.executemany(_STAGE_SQL, staged[start : start + STAGE_CHUNK])

    async def _prepare(self, run: _Run) -> None:
        async with self._db.transaction("preparing the synced member list", notify=False) as conn:
            await self._own(conn, run)
            for sql in _PREPARE:
                await conn.execute(sql)

    async def _apply(self, run: _Run, began: float) -> tuple[int, int, int]:
        await self._prepare(run)
        now_ms = to_ms(self._wall())
        async with self._db.transaction("applying the synced member list") as conn:
            await self._own(conn, run)
            [(version,)] = await conn.execute_fetchall("SELECT version FROM member_list WHERE id = 1")
            if version != run.base_version:
                raise Superseded(
                    f"the member list changed while syncing (version {run.base_version} -> {version}, an import?); "
                    f"the next sync starts over"
                )
            # Deleting a member deletes their cards (foreign key): a tombstone takes effect here, whole.
            await conn.execute(_DELETE_ABSENT if run.full else _DELETE_TOMBSTONED)
            await conn.execute(_RELEASE_CODES)
            await conn.execute(_UPSERT_MEMBERS, (now_ms,))
            await conn.execute(_DELETE_CARDS_FULL if run.full else _DELETE_CARDS_DELTA)
            await conn.execute(_INSERT_CARDS)
            cursor = await conn.execute(_LEDGER_CONFIRM, (json.dumps(run.accepted),))
            confirmed = max(cursor.rowcount, 0)
            [(members,)] = await conn.execute_fetchall("SELECT COUNT(*) FROM members")
            synced_ms = to_ms(run.started)
            # A delta that changed nothing refreshes the sync time (the cache age) but not the version, which
            # names a list's content.
            bump = int(run.full or bool(run.upserts) or bool(run.tombstones))
            await conn.execute(
                "UPDATE member_list SET version = version + ?, source = ?, members = ?, synced_at = ?, cursor = ?,"
                " cursor_version = version + ?, cursor_at = ? WHERE id = 1",
                (bump, SOURCE, members, synced_ms, run.cursor, bump, synced_ms),
            )
            await conn.execute("DELETE FROM member_sync_runs")
            await conn.execute(
                "UPDATE member_sync_state SET last_success_at = ?, full = ?, upserts = ?, tombstones = ?,"
                " skipped = ?, seconds = ? WHERE id = 1",
                (
                    to_ms(datetime.now(UTC)),
                    int(run.full),
                    run.upserts,
                    run.tombstones,
                    run.skipped,
                    round(time.monotonic() - began, 3),
                ),
            )
        # The staged pages are dead now; a run that started meanwhile cleared them itself and is left alone.
        with contextlib.suppress(StoreError):
            async with self._db.transaction("clearing a member sync", notify=False) as conn:
                if not list(await conn.execute_fetchall("SELECT 1 FROM member_sync_runs")):
                    await _clear_staging(conn)
        return int(version) + bump, int(members), confirmed

    async def _abandon(self, run: _Run) -> None:
        """Drop this run's staged pages, if they are still its own."""
        async with self._db.transaction("abandoning a member sync", notify=False) as conn:
            cursor = await conn.execute("DELETE FROM member_sync_runs WHERE run_id = ?", (run.run_id,))
            if cursor.rowcount:
                await _clear_staging(conn)

    async def _failed(self, exc: Exception, result: str) -> None:
        if self._metrics is not None:
            self._metrics.member_syncs.labels(result).inc()
        with contextlib.suppress(StoreError):
            async with self._db.transaction("recording a failed member sync", notify=False) as conn:
                await conn.execute(
                    "UPDATE member_sync_state SET last_error = ?, last_error_at = ? WHERE id = 1",
                    (str(exc)[:500], to_ms(datetime.now(UTC))),
                )

    # -- forever ---------------------------------------------------------------------------------------------------

    async def run_periodically(self) -> None:
        """Sync every interval, the first time as soon as the cached list is an interval old (at once when it
        was never synced); a failure is logged and retried sooner, with backoff, never raised."""
        await asyncio.sleep(await self.first_delay())
        failures = 0
        while True:
            retry_after: float | None = None
            try:
                await self.run()
                failures = 0
            except (MemberSyncError, StoreError) as exc:
                failures += 1
                retry_after = getattr(exc, "retry_after_s", None)
                self._once.warning("member_sync_failed", str(exc)[:60], error=str(exc), failures=failures)
            except Exception as exc:  # a bug here must not stop the door: said loudly, retried
                failures += 1
                log.exception("member_sync_crashed", error=f"{exc.__class__.__name__}: {exc}")
            await asyncio.sleep(self.next_delay(failures, retry_after))

    async def first_delay(self) -> float:
        """Seconds until the cached list is an interval old: a restart does not pull the list again."""
        row = await self._db.fetchone("SELECT synced_at FROM member_list WHERE id = 1")
        if row is None or row[0] is None:
            return 0.0
        age_s = (to_ms(self._wall()) - int(row[0])) / 1000
        return min(max(self._interval_s - age_s, 0.0), self._interval_s)

    def next_delay(self, failures: int, retry_after_s: float | None = None) -> float:
        if failures == 0:
            return self._interval_s
        backoff = min(self._interval_s, RETRY_BASE_S * 2.0 ** min(failures - 1, 20)) * random.uniform(0.5, 1.0)
        return max(backoff, retry_after_s or 0.0)


async def _clear_staging(conn: aiosqlite.Connection) -> None:
    for table in _STAGING_TABLES:
        await conn.execute(f"DELETE FROM {table}")  # noqa: S608 - our own table names


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a run (see Speed above); left alone if someone else turned it off."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _settle(task: asyncio.Task[None] | None) -> asyncio.Task[None] | None:
    """Wait for a staging task and raise its error; None, to clear the caller's reference."""
    if task is not None:
        await task
    return None


def _check_page(page: Any) -> None:
    """The contract's MemberPage shape, or MemberSyncError saying what is wrong with it."""
    if not isinstance(page, dict):
        raise MemberSyncError(f"the cloud answered the member feed with a JSON {type(page).__name__}, not an object")
    problems = []
    for key, kind in (("members", list), ("tombstones", list), ("next_cursor", str), ("has_more", bool)):
        if not isinstance(page.get(key), kind):
            problems.append(f"'{key}' is {type(page.get(key)).__name__ if key in page else 'missing'}")
    if problems:
        raise MemberSyncError(f"the cloud's member page is not the contract's shape: {', '.join(problems)}")


# -- status ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncStatus:
    version: int
    source: str
    members: int
    synced_at: int | None  # ms
    cursor: str | None
    cursor_at: int | None  # ms
    cursor_current: bool  # the cursor describes the list as it is (no import since)
    last_attempt_at: int | None
    last_success_at: int | None
    last_error: str | None
    last_error_at: int | None
    pending_ledger: int


async def sync_status(db: Database) -> SyncStatus:
    row = await db.fetchone(
        "SELECT l.version, l.source, l.members, l.synced_at, l.cursor, l.cursor_at, l.cursor_version,"
        " s.last_attempt_at, s.last_success_at, s.last_error, s.last_error_at,"
        " (SELECT COUNT(*) FROM credit_ledger WHERE confirmed = 0) AS pending"
        " FROM member_list l, member_sync_state s WHERE l.id = 1 AND s.id = 1"
    )
    assert row is not None
    return SyncStatus(
        version=row["version"],
        source=row["source"],
        members=row["members"],
        synced_at=row["synced_at"],
        cursor=row["cursor"],
        cursor_at=row["cursor_at"],
        cursor_current=row["cursor"] is not None and row["cursor_version"] == row["version"],
        last_attempt_at=row["last_attempt_at"],
        last_success_at=row["last_success_at"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
        pending_ledger=row["pending"],
    )
