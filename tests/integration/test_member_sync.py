"""Member sync against the sandbox cloud on loopback (and, for answers the sandbox cannot give, a small rogue
cloud that is just as real HTTP): the list is replaced all at once or not at all, the cursor only moves with
it, and a bad record or a bad page never costs the club the list it has."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import sys
from collections.abc import Callable
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.config import Config
from agent.sandbox.members import MemberFeed, seeded_members
from agent.sandbox.server import SandboxServer
from agent.store import repo
from agent.store.db import Database
from agent.store.members import MemberRecord, _member_row, apply_members
from agent.sync import members as member_sync
from agent.sync.members import MemberSync, MemberSyncError, RecordReader, Skip, Superseded, sync_status
from tests.conftest import ANA, BRUNO, PremisesFactory, make_config, members
from tests.sandboxes import delivered, sandbox_overrides

TZ = ZoneInfo("America/Sao_Paulo")
MEMBER_COLUMNS = (
    "member_id, first_name, last_name, member_code, status, credits, requires_credit, valid_from, valid_until,"
    " groups_json, hours_json"
)
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("club-agent")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "agent.cli"]


# -- the clouds ------------------------------------------------------------------------------------------------


@pytest.fixture
def cloud_factory(sandbox_factory: Callable[..., Any]) -> Callable[..., Any]:
    """Sandbox clouds with `members` seeded members and a fault plan, on free loopback ports."""

    async def start(members: int = 300, *faults: dict[str, Any]) -> SandboxServer:
        server: SandboxServer = await sandbox_factory(*faults, members=members)
        return server

    return start


class RogueCloud:
    """A club cloud that answers the member feed with the bodies a test gives it, in order (the last repeats)."""

    def __init__(self, *bodies: bytes | dict[str, Any]) -> None:
        self.bodies = [b if isinstance(b, bytes) else json.dumps(b).encode() for b in bodies]
        self.calls = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> RogueCloud:
        async def token(request: web.Request) -> web.Response:
            return web.json_response({"access_token": "rogue-token", "expires_in": 300})

        async def members(request: web.Request) -> web.Response:
            body = self.bodies[min(self.calls, len(self.bodies) - 1)]
            self.calls += 1
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_post("/token", token)
        app.router.add_get("/edge/members", members)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def config_for(tmp_path: Path, server: SandboxServer | RogueCloud, page_limit: int = 100, **cloud: Any) -> Config:
    if isinstance(server, SandboxServer):
        overrides = sandbox_overrides(server, tmp_path / "secrets")
    else:
        secrets = tmp_path / "secrets" / "secrets.toml"
        secrets.parent.mkdir(parents=True, exist_ok=True)
        secrets.write_text('cloud_client_secret = "rogue"\n')
        secrets.chmod(0o600)
        overrides = {
            "agent": {"secrets_file": str(secrets)},
            "cloud": {"base_url": server.url, "token_url": server.url + "/token", "client_id": "edge"},
        }
    overrides["cloud"] |= {"members_page_limit": page_limit, **cloud}
    return make_config(tmp_path / "agent", **overrides)


async def admin(server: SandboxServer, path: str, body: Any = None, method: str = "POST") -> Any:
    async with httpx.AsyncClient() as client:
        response = await client.request(method, server.url + path, json=body, timeout=30)
        response.raise_for_status()
        return response.json()


def wire(record: MemberRecord) -> dict[str, Any]:
    return record.model_dump(mode="json", by_alias=True, exclude={"deleted"})


async def tables(db: Database) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    rows = await db.fetchall(f"SELECT {MEMBER_COLUMNS} FROM members ORDER BY member_id")  # noqa: S608
    cards = await db.fetchall("SELECT card_id, member_id FROM cards ORDER BY card_id")
    return [tuple(r) for r in rows], [tuple(r) for r in cards]


async def list_state(db: Database) -> tuple[Any, ...]:
    row = await db.fetchone("SELECT version, source, members, synced_at, cursor, cursor_version FROM member_list")
    assert row is not None
    return tuple(row)


async def as_imported(tmp_path: Path, server: SandboxServer) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The sandbox's current list as `members import` would store it: the oracle of what a sync must store."""
    page = json.loads(server.sandbox.feed.page(0, 1_000_000))
    records = [MemberRecord.model_validate(m) for m in page["members"]]
    async with Database(tmp_path / "reference.db") as ref:
        await apply_members(ref, records, tz=TZ, source="reference", replace=True)
        return await tables(ref)


async def staged(db: Database) -> int:
    rows = await db.fetchall(
        "SELECT (SELECT COUNT(*) FROM member_sync_staging) + (SELECT COUNT(*) FROM member_sync_runs)"
    )
    return int(rows[0][0])


# -- full and delta --------------------------------------------------------------------------------------------


async def test_first_sync_stores_the_whole_list_as_an_import_would(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # 'slow' faults of a millisecond answer in full, and put every call in the sandbox's received log.
    logged = [{"endpoint": e, "kind": "slow", "rate": 1.0, "delay_s": 0.001} for e in ("token", "cloud.members")]
    server = await cloud_factory(1234, *logged)
    config = config_for(tmp_path, server, page_limit=250)
    progress: list[int] = []
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            result = await sync.run(progress=progress.append)
        finally:
            await sync.aclose()
        assert (result.full, result.upserts, result.tombstones, result.skipped) == (True, 1234, 0, 0)
        assert (result.members, result.version, result.pages) == (1234, 1, 5)
        assert progress == [250, 500, 750, 1000, 1234]
        assert await tables(db) == await as_imported(tmp_path, server)
        version, source, count, synced_at, cursor, cursor_version = await list_state(db)
        assert (version, source, count, cursor_version) == (1, "cloud", 1234, 1)
        assert synced_at is not None
        assert cursor
        assert await staged(db) == 0
    # One token for the whole run, and every page asked for with the configured limit.
    calls = [e for e in server.sandbox.log if e["kind"] == "call"]
    assert [c["route"] for c in calls] == ["token"] + ["cloud.members"] * 5
    assert all("limit=250" in c["path"] for c in calls[1:])


async def test_a_delta_brings_changes_and_tombstones_remove_members_with_their_cards(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(0)
    await admin(server, "/_sandbox/members", {"upsert": [wire(r) for r in members()]})
    config = config_for(tmp_path, server)
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            first = await sync.run()
            assert (first.full, first.members) == (True, 6)
            ana = wire(members()[0]) | {"first_name": "Ana Maria", "cards": [ANA, "04ABCDEF"], "credits": 9}
            newcomer = {"member_id": "m-gil", "first_name": "Gil", "cards": ["04:60:11"], "member_code": "1002"}
            await admin(server, "/_sandbox/members", {"upsert": [ana, newcomer], "delete": ["m-bruno"]})
            delta = await sync.run()
            # Bruno's code moved to Gil: the sandbox sends Bruno's tombstone, Ana and Gil.
            got = (delta.full, delta.upserts, delta.tombstones, delta.members, delta.version)
            assert got == (False, 2, 1, 6, 2)
            assert await db.read(repo.cards_of, "m-bruno") == []
            assert (await db.read(repo.lookup, card_id=BRUNO)).member is None
            found = await db.read(repo.lookup, card_id="04ABCDEF")
            assert found.member is not None
            assert found.member.first_name == "Ana Maria"
            assert found.member.credits == 9
            gil = await db.read(repo.lookup, member_code="1002")
            assert gil.member is not None
            assert gil.member.member_id == "m-gil"
            assert await tables(db) == await as_imported(tmp_path, server)

            # Nothing changed: the sync time is refreshed, the version (which names the content) is not.
            before = await list_state(db)
            quiet = await sync.run()
            assert (quiet.full, quiet.upserts, quiet.tombstones, quiet.version) == (False, 0, 0, 2)
            after = await list_state(db)
            assert after[:3] + after[4:] == before[:3] + before[4:]
            assert after[3] > before[3]
        finally:
            await sync.aclose()


async def test_codes_and_cards_that_change_hands_follow_the_newest_record(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(20)
    config = config_for(tmp_path, server)
    feed = server.sandbox.feed
    one, two = feed.get("m-000001"), feed.get("m-000002")
    assert one is not None
    assert two is not None
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            await sync.run()
            # Swap the two members' codes, give two's card to one: the sandbox changes both (and a third).
            swapped = [one | {"member_code": two["member_code"], "cards": one["cards"] + two["cards"][:1]}]
            await admin(server, "/_sandbox/members", {"upsert": swapped})
            await admin(server, "/_sandbox/members", {"upsert": [two | {"member_code": one["member_code"]}]})
            delta = await sync.run()
            assert delta.full is False
            assert await tables(db) == await as_imported(tmp_path, server)
            found = await db.read(repo.lookup, member_code=one["member_code"])
            assert found.member is not None
            assert found.member.member_id == "m-000002"

            # A full resync of an unchanged list: a new version, the same content, no row rewritten.
            stamps = [tuple(r) for r in await db.fetchall("SELECT member_id, updated_at FROM members")]
            full = await sync.run(full=True)
            assert (full.full, full.members, full.version) == (True, 20, delta.version + 1)
            assert await tables(db) == await as_imported(tmp_path, server)
            assert [tuple(r) for r in await db.fetchall("SELECT member_id, updated_at FROM members")] == stamps
        finally:
            await sync.aclose()


async def test_an_import_after_a_sync_makes_the_next_sync_a_full_one(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(50)
    config = config_for(tmp_path, server)
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            await sync.run()
            await apply_members(db, members(), tz=TZ, source="import:local.csv")
            assert (await sync_status(db)).cursor_current is False
            result = await sync.run()
            assert (result.full, result.members) == (True, 50)  # the imported members were not the cloud's
            assert await tables(db) == await as_imported(tmp_path, server)
        finally:
            await sync.aclose()


# -- failures keep the list ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "500", "garbage", "timeout"])
async def test_a_failure_on_the_second_page_keeps_the_old_list_and_cursor(
    cloud_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    server = await cloud_factory(250)
    config = config_for(tmp_path, server, page_limit=100)
    monkeypatch.setattr("agent.sync.cloud.TIMEOUT", httpx.Timeout(1.0))
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            await sync.run()
            changed = [
                {"member_id": f"m-{i:06d}", "first_name": f"Changed {i}", "cards": [f"05{i:08X}"]}
                for i in range(1, 251)
            ]
            await admin(server, "/_sandbox/members", {"upsert": changed})
            before_tables, before_state = await tables(db), await list_state(db)
            # The first page goes through (a 'slow' fault answers in full), the second fails.
            second = {"endpoint": "cloud.members", "kind": kind, "count": 1}
            if kind == "timeout":
                second["delay_s"] = 3.0
            await admin(
                server,
                "/_sandbox/faults",
                [{"endpoint": "cloud.members", "kind": "slow", "count": 1, "delay_s": 0.01}, second],
                method="PUT",
            )
            with pytest.raises(MemberSyncError, match="member feed"):
                await sync.run()
            assert await tables(db) == before_tables
            assert await list_state(db) == before_state
            assert await staged(db) == 0
            status = await sync_status(db)
            assert status.last_error is not None
            assert status.last_error_at is not None

            result = await sync.run()  # the faults are spent: the same delta, whole
            assert (result.full, result.upserts, result.version) == (False, 250, before_state[0] + 1)
            assert await tables(db) == await as_imported(tmp_path, server)
        finally:
            await sync.aclose()


async def test_a_sync_killed_mid_run_leaves_the_list_and_the_next_one_completes(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """`kill -9` of `club-agent members sync` while its second page is on the wire."""
    server = await cloud_factory(300)
    config = config_for(tmp_path, server, page_limit=100)
    toml = write_toml(tmp_path, config)
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            await sync.run()
            await admin(
                server, "/_sandbox/members", {"upsert": [{"member_id": "m-new", "first_name": "New", "cards": ["0A"]}]}
            )
            before_tables, before_state = await tables(db), await list_state(db)
            await admin(
                server,
                "/_sandbox/faults",
                [
                    {"endpoint": "cloud.members", "kind": "slow", "count": 1, "delay_s": 0.01},
                    {"endpoint": "cloud.members", "kind": "slow", "count": 1, "delay_s": 30},
                ],
                method="PUT",
            )
            proc = await asyncio.create_subprocess_exec(
                *COMMAND, "members", "sync", "--full", "--config", str(toml), env=cli_env(), cwd=ROOT
            )
            try:
                for _ in range(600):  # until its second page is being trickled
                    if sum(1 for e in server.sandbox.log if e.get("fault") == "slow") == 2:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the CLI never asked for its second page")
                await asyncio.sleep(0.3)  # its first page staged
                proc.send_signal(signal.SIGKILL)
            finally:
                await proc.wait()
            assert await tables(db) == before_tables
            assert await list_state(db) == before_state
            assert await staged(db) > 0  # what the dead run staged is still there, and never used

            result = await sync.run()
            assert (result.full, result.upserts, result.members) == (False, 1, 301)
            assert await tables(db) == await as_imported(tmp_path, server)
            assert await staged(db) == 0
        finally:
            await sync.aclose()


async def test_a_second_sync_supersedes_a_running_one_which_then_fails_cleanly(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Two processes (two connections to one file): the one that started last wins, the other stops."""
    server = await cloud_factory(300)
    config = config_for(tmp_path, server, page_limit=100)
    await admin(
        server,
        "/_sandbox/faults",
        [
            {"endpoint": "cloud.members", "kind": "slow", "count": 1, "delay_s": 0.01},
            {"endpoint": "cloud.members", "kind": "slow", "count": 1, "delay_s": 1.5},
        ],
        method="PUT",
    )
    async with Database(config.db_path) as db_a, Database(config.db_path, check=False) as db_b:
        first, second = MemberSync.from_config(config, db_a), MemberSync.from_config(config, db_b)
        try:
            slow = asyncio.create_task(first.run())
            for _ in range(200):
                if sum(1 for e in server.sandbox.log if e.get("fault") == "slow") == 2:
                    break
                await asyncio.sleep(0.02)
            result = await second.run()
            assert (result.full, result.members, result.version) == (True, 300, 1)
            with pytest.raises(Superseded):
                await slow
            assert (await list_state(db_a))[0] == 1  # only the winner applied
            assert await tables(db_a) == await as_imported(tmp_path, server)
            assert await staged(db_a) == 0
        finally:
            await first.aclose()
            await second.aclose()


async def test_cursor_expired_after_a_cloud_reset_resyncs_from_scratch(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(200)
    config = config_for(tmp_path, server)
    async with Database(config.db_path) as db:
        sync = MemberSync.from_config(config, db)
        try:
            await sync.run()
            await admin(
                server, "/_sandbox/members", {"upsert": [{"member_id": "m-new", "first_name": "N", "cards": ["0B"]}]}
            )
            assert (await sync.run()).members == 201
            await admin(server, "/_sandbox/reset")  # a rebuilt list: m-new is gone, old cursors answer 410
            with capture_logs() as logs:
                result = await sync.run()
            assert (result.full, result.members, result.version) == (True, 200, 3)
            assert (await db.read(repo.lookup, member_id="m-new")).member is None
            assert await tables(db) == await as_imported(tmp_path, server)
            assert [e["event"] for e in logs if e["event"] == "members_cursor_expired"] == ["members_cursor_expired"]
        finally:
            await sync.aclose()


GOOD = {"member_id": "m-1", "first_name": "Ana", "cards": ["04A1"], "status": "active"}


def page(members: list[Any], tombstones: list[Any] | None = None, cursor: str = "c1", more: bool = False) -> Any:
    return {"members": members, "tombstones": tombstones or [], "next_cursor": cursor, "has_more": more}


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"members": [{"member_id": "m-1", "first', "unreadable body"),
        (b"<html><body>502 Bad Gateway</body></html>", "unreadable body"),
        (b"[]", "JSON list, not an object"),
        (b'"ok"', "unexpected body"),
        (json.dumps({"members": {}, "tombstones": [], "next_cursor": "c", "has_more": False}).encode(), "'members'"),
        (json.dumps({"members": [GOOD], "tombstones": []}).encode(), "'next_cursor' is missing"),
        (json.dumps(page([GOOD], more=True, cursor="")).encode(), "did not advance"),
    ],
)
async def test_a_cloud_answering_garbage_fails_the_run_and_keeps_the_list(
    tmp_path: Path, body: bytes, said: str
) -> None:
    async with RogueCloud(body) as cloud:
        config = config_for(tmp_path, cloud)
        async with Database(config.db_path) as db:
            await apply_members(db, members(), tz=TZ, source="import:local.csv")
            before_tables, before_state = await tables(db), await list_state(db)
            sync = MemberSync.from_config(config, db)
            try:
                with pytest.raises(MemberSyncError, match=said):
                    await sync.run()
            finally:
                await sync.aclose()
            assert await tables(db) == before_tables
            assert await list_state(db) == before_state
            assert await staged(db) == 0


async def test_malformed_records_are_skipped_logged_and_counted(tmp_path: Path) -> None:
    records = [
        GOOD,
        {"member_id": "m-2"},  # no first name
        {"member_id": "m-3", "first_name": "Carla", "cards": ["XYZ"]},
        42,
        {"member_id": "m-5", "first_name": "Eva", "credits": "7", "cards": "04:AA:BB;04cc"},  # lax, but fine
        {"member_id": "", "first_name": "Fabio"},
        {"member_id": "m-7", "first_name": "Gil", "status": "vip"},
    ]
    async with RogueCloud(page(records, tombstones=[17, "m-gone"])) as cloud:
        config = config_for(tmp_path, cloud)
        async with Database(config.db_path) as db:
            sync = MemberSync.from_config(config, db)
            try:
                with capture_logs() as logs:
                    result = await sync.run()
            finally:
                await sync.aclose()
            assert (result.upserts, result.tombstones, result.skipped, result.members) == (2, 1, 6, 2)
            eva = await db.read(repo.lookup, card_id="04CC")
            assert eva.member is not None
            assert (eva.member.member_id, eva.member.credits) == ("m-5", 7)
    skipped = [e for e in logs if e["event"] == "member_skipped"]
    assert len(skipped) == 6
    reasons = " | ".join(e["reason"] for e in skipped)
    for expected in ("first_name", "cards", "a member is a JSON object", "member_id", "status", "tombstone"):
        assert expected in reasons
    assert [e["member_id"] for e in skipped if e["member_id"]] == ["m-2", "m-3", "m-7"]


# -- the fast path agrees with MemberRecord --------------------------------------------------------------------


def reference(raw: Any) -> tuple[tuple[Any, ...], list[str]] | str:
    """What the import path makes of one record."""
    try:
        record = MemberRecord.model_validate(raw)
    except Exception as exc:
        raise Skip(None, str(exc)) from exc
    if record.deleted:
        return record.member_id
    return _member_row(record, TZ, 0)[:-1], record.cards


def test_the_fast_path_takes_the_sandbox_members_and_agrees_with_member_record() -> None:
    feed = json.loads(MemberFeed(seeded_members(2000, 1)).page(0, 5000))["members"]
    reader = RecordReader(TZ)
    for raw in feed:
        assert reader._fast(raw) == reference(raw)


def _text() -> st.SearchStrategy[Any]:
    return st.one_of(st.text(max_size=6), st.sampled_from(["", " ", " Ana ", "x" * 129]), st.none(), st.integers())


MEMBERISH = st.fixed_dictionaries(
    {"member_id": _text(), "first_name": _text()},
    optional={
        "last_name": _text(),
        "member_code": _text(),
        "deleted": st.one_of(st.booleans(), st.none(), st.just(0)),
        "status": st.sampled_from(["active", "suspended", "expired", "cancelled", "vip", " active", 1]),
        "cards": st.one_of(
            st.lists(st.sampled_from(["04A1", "04:a1:b2", " 0a ", "XYZ", "", "1" * 33, "0"]), max_size=3),
            st.sampled_from(["04A1;04B2", None, 5]),
        ),
        "credits": st.one_of(st.integers(-2, 30), st.none(), st.sampled_from(["3", "", 2.0, 2.5, True])),
        "requires_credit": st.one_of(st.booleans(), st.none(), st.sampled_from(["true", 1, "", 0])),
        "valid_from": st.sampled_from([None, "", "2026-01-01", "2026-01-01T10:00:00Z", "2026-13-01", 7]),
        "valid_until": st.sampled_from([None, "2027-12-31", " 2027-12-31 ", "2027-12-31T23:00:00", "soon"]),
        "groups": st.one_of(st.lists(st.sampled_from(["padel", " beach ", "padel", ""]), max_size=3), st.just("a;b")),
        "plan": st.sampled_from(
            [
                None,
                {"requires_credit": True},
                {"hours": [{"days": [1, 2], "from": "06:00", "to": "17:00"}]},
                {"hours": [{"days": ["mon"], "from": "25:00", "to": "17:00"}]},
                "monthly",
            ]
        ),
        "extra": st.just({"ignored": True}),
    },
)


@settings(max_examples=400, deadline=None)
@given(MEMBERISH)
def test_any_record_reads_as_member_record_reads_it(raw: dict[str, Any]) -> None:
    try:
        expected: Any = reference(raw)
    except Skip:
        expected = Skip
    try:
        got: Any = RecordReader(TZ).read(raw)
    except Skip:
        got = Skip
    assert got == expected


# -- the credits ledger ----------------------------------------------------------------------------------------


async def test_offline_spending_is_confirmed_by_a_sync_after_the_cloud_accepted_it(
    premises_factory: PremisesFactory, cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The cloud holds the session.started event 3 s (then drops it): the outbox retries and lands it after.
    server = await cloud_factory(0, {"endpoint": "cloud.events", "kind": "timeout", "count": 1, "delay_s": 3})
    await admin(server, "/_sandbox/members", {"upsert": [wire(r) for r in members()]})
    overrides = sandbox_overrides(server, tmp_path / "secrets")
    premises = await premises_factory(**overrides, sync={"backoff_base_s": 0.1, "backoff_cap_s": 0.5})
    sync = premises.agent.member_sync
    assert sync is not None

    async def ana() -> tuple[int | None, int]:
        found = await premises.agent.db.read(repo.lookup, card_id=ANA)  # type: ignore[union-attr]
        assert found.member is not None
        return found.member.credits, found.state.pending_credits

    async with premises.reader("r1") as reader:
        reply = await reader.tap(ANA)
    assert (reply.payload["action"], reply.payload["credits_left"]) == ("checkin", 1)
    pending = "SELECT confirmed FROM credit_ledger"

    # 1. The cloud has not accepted the event yet: a sync (which lists Ana) must not confirm the spend.
    first = await sync.run()
    assert (first.full, first.confirmed) == (True, 0)
    assert await premises.rows(pending) == [(0,)]
    assert await ana() == (2, -1)

    # 2. Accepted, but Ana's record has not changed at the cloud since: her balance may not include it yet.
    await delivered(premises)
    second = await sync.run()
    assert (second.upserts, second.confirmed) == (0, 0)
    assert await ana() == (2, -1)

    # 3. The cloud applied the spend to her balance; the next sync brings it and confirms the entry.
    await admin(server, "/_sandbox/members", {"upsert": [wire(members()[0]) | {"credits": 1}]})
    third = await sync.run()
    assert (third.upserts, third.confirmed) == (1, 1)
    assert await premises.rows(pending) == [(1,)]
    assert await ana() == (1, 0)  # 1 left, counted once


# -- in the running agent --------------------------------------------------------------------------------------


async def wait_for(check: Callable[[], Any], within: float = 15.0) -> None:
    for _ in range(int(within / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within} s")


async def test_the_agent_syncs_at_start_and_every_interval_and_a_tombstone_denies_the_card(
    premises_factory: PremisesFactory, cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(0)
    await admin(server, "/_sandbox/members", {"upsert": [wire(r) for r in members()]})
    overrides = sandbox_overrides(server, tmp_path / "secrets")
    overrides["cloud"] |= {"members_sync_interval_s": 1}
    # Never synced: the first sync runs at start.
    premises = await premises_factory(**overrides, synced_at=None)

    async def synced(times: int) -> bool:
        return premises.metric("member_syncs_total", result="ok") >= times

    await wait_for(lambda: synced(1))
    assert await premises.rows("SELECT source, members FROM member_list") == [("cloud", 6)]
    assert premises.metric("members_cached") == 6
    async with premises.reader("r2") as reader:
        assert (await reader.tap(BRUNO)).payload["status"] == "granted"
        await admin(server, "/_sandbox/members", {"delete": ["m-bruno"]})

        async def gone() -> bool:
            return await premises.rows("SELECT COUNT(*) FROM cards WHERE card_id = ?", BRUNO) == [(0,)]

        await wait_for(gone)
        premises.clock.advance(seconds=10)  # past the debounce of the first tap
        reply = await reader.tap(BRUNO)
    assert (reply.payload["status"], reply.payload["reason"]) == ("denied", "unknown_card")
    assert premises.metric("members_cached") == 5
    assert premises.metric("member_sync_records_total", kind="tombstone") == 1


async def test_a_failing_sync_is_retried_and_never_stops_the_agent(
    premises_factory: PremisesFactory,
    cloud_factory: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(member_sync, "RETRY_BASE_S", 0.05)
    server = await cloud_factory(0, {"endpoint": "cloud.members", "kind": "500", "count": 2})
    await admin(server, "/_sandbox/members", {"upsert": [wire(r) for r in members()]})
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"), synced_at=None)

    async def recovered() -> bool:
        return premises.metric("member_syncs_total", result="ok") >= 1

    await wait_for(recovered)
    assert premises.metric("member_syncs_total", result="failed") == 2
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["status"] == "granted"


async def test_a_recent_list_is_not_pulled_again_at_start(
    premises_factory: PremisesFactory, cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(10)
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))  # synced at the clock's now
    sync = premises.agent.member_sync
    assert sync is not None
    assert await sync.first_delay() == pytest.approx(300)
    premises.clock.advance(seconds=200)
    assert await sync.first_delay() == pytest.approx(100)
    premises.clock.advance(seconds=200)
    assert await sync.first_delay() == 0


# -- the CLI ---------------------------------------------------------------------------------------------------


def write_toml(tmp_path: Path, config: Config) -> Path:
    assert config.cloud is not None
    path = tmp_path / "agent.toml"
    path.write_text(
        "[agent]\n"
        f'data_dir = "{config.agent.data_dir}"\n'
        f'secrets_file = "{config.agent.secrets_file}"\n'
        "[cloud]\n"
        f'base_url = "{config.cloud.base_url}"\n'
        f'token_url = "{config.cloud.token_url}"\n'
        f'client_id = "{config.cloud.client_id}"\n'
        f"members_page_limit = {config.cloud.members_page_limit}\n"
    )
    return path


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_") and k not in ("COLUMNS", "LINES")}


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *COMMAND, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(), cwd=ROOT
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.mark.slow
async def test_cli_members_sync_and_status(cloud_factory: Callable[..., Any], tmp_path: Path) -> None:
    server = await cloud_factory(420)
    toml = write_toml(tmp_path, config_for(tmp_path, server, page_limit=100))
    code, out, err = await cli("members", "status", "--config", str(toml))
    assert code == 1
    assert "no database" in err

    code, out, err = await cli("members", "sync", "--config", str(toml))
    assert (code, err) == (0, "")
    assert out.startswith("synced full sync: 420 upserts, 0 tombstones, 0 skipped; 420 members, version 1, ")
    await admin(server, "/_sandbox/members", {"delete": ["m-000001", "m-000002"]})
    code, out, err = await cli("members", "sync", "--config", str(toml))
    assert code == 0
    assert "delta sync: 0 upserts, 2 tombstones, 0 skipped; 418 members, version 2" in out

    code, out, err = await cli("members", "status", "--config", str(toml))
    assert code == 0, err
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines() if line.strip())
    assert (lines["version"], lines["source"], lines["members"]) == ("2", "cloud", "418")
    assert lines["cursor"].startswith("age ")
    assert lines["last sync"].endswith("ago)")
    assert "last error" not in lines


@pytest.mark.slow
async def test_cli_members_sync_says_in_one_line_why_it_failed(
    cloud_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await cloud_factory(10)
    config = config_for(tmp_path, server)
    toml = write_toml(tmp_path, config)
    await server.__aexit__(None, None, None)  # the cloud is gone
    code, out, err = await cli("members", "sync", "--config", str(toml))
    assert code == 1
    assert out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith("error: could not get the member feed from the cloud: ConnectError")

    bare = tmp_path / "bare.toml"
    bare.write_text(f'[agent]\ndata_dir = "{config.agent.data_dir}"\n')
    code, out, err = await cli("members", "sync", "--config", str(bare))
    assert code == 2
    assert err.strip() == "config error: member sync needs a [cloud] section (base_url, token_url, client_id)"
    with closing(sqlite3.connect(config.db_path)) as conn:  # a failed sync leaves an empty list, version 0
        assert conn.execute("SELECT version, members FROM member_list").fetchone() == (0, 0)


def test_a_date_is_a_whole_day_in_the_club_time_zone() -> None:
    row, _ = RecordReader(TZ)._fast(GOOD | {"valid_from": "2026-03-01", "valid_until": "2026-03-31"})
    assert row[7:9] == (repo.to_ms(datetime(2026, 3, 1, tzinfo=TZ)), repo.to_ms(datetime(2026, 4, 1, tzinfo=TZ)))
