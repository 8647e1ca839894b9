"""The cloud's pull feed on the agent's own HTTP server (DESIGN 2.4), and retention of the event log it reads:
a real agent on loopback, real HTTP, the sandbox cloud as the outbox's destinations where delivery matters."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.sandbox.server import SandboxServer
from agent.store.repo import NewEvent, Stamp, append_events
from agent.sync import feed
from tests.conftest import ANA, Premises, PremisesFactory

pytestmark = pytest.mark.embedded_only  # the feed does not depend on the broker; run it once

TOKEN = "pull-token-0123456789-abcdef"
DAY_S = 86400.0


def overrides(directory: Path, *, token: str | None = TOKEN, sandbox: SandboxServer | None = None) -> dict[str, Any]:
    """Config sections for an agent with a secrets file holding the pull token (and the sandbox's secrets)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'cloud_pull_token = "{token}"'] if token else []
    lines.append('[api_tokens]\nfront-desk = "front-desk-token-0123456789"')
    out: dict[str, Any] = {}
    if sandbox is not None:
        s = sandbox.settings
        lines.insert(
            0,
            f'ziggy_api_key = "{s.ziggy_api_key}"\ncloud_client_secret = "{s.cloud_client_secret}"\n'
            f'cloud_signing_secret = "{s.signing_secret}"',
        )
        out["ziggy"] = {"base_url": s.ziggy_base_url, "client_id": s.ziggy_client_id}
        out["cloud"] = {"base_url": s.cloud_base_url, "token_url": s.token_url, "client_id": s.cloud_client_id}
    secrets = directory / "secrets.toml"
    secrets.write_text("\n".join(lines) + "\n")
    secrets.chmod(0o600)
    return {"agent": {"secrets_file": str(secrets)}, **out}


def api(premises: Premises, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{premises.agent.api_port}", headers=headers, timeout=10)


async def append(
    premises: Premises, n: int, *, kind: str = "access.decided", session_id: str | None = None
) -> list[int]:
    """n events written as the agent writes them, in one transaction."""
    db = premises.agent.db
    assert db is not None
    stamp = Stamp(premises.clock.wall(), premises.clock.monotonic_ns(), "boot-test", True)
    events = [NewEvent(kind, {"i": i, "name": 'Ana "Bia" Çé'}, session_id, "r1") for i in range(n)]
    written = await db.write("test", append_events, stamp, events)
    return [seq for seq, _ in written]


async def all_pages(client: httpx.AsyncClient, limit: int | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        params = {"after": after} if limit is None else {"after": after, "limit": limit}
        answer = (await client.get("/api/v1/sync/changes", params=params)).raise_for_status().json()
        events += answer["events"]
        assert answer["count"] == len(answer["events"])
        if answer["events"]:
            assert answer["next_after"] == answer["events"][-1]["seq"]
        if not answer["has_more"]:
            return events
        after = answer["next_after"]


async def settled(premises: Premises, within: float = 15.0) -> None:
    """Until nothing is left to deliver, except to destinations no worker serves."""
    for _ in range(int(within / 0.05)):
        if await premises.pending("ziggy", "cloud") == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"deliveries still pending after {within} s")


# -- the feed ------------------------------------------------------------------------------------------------


async def test_pages_cover_the_log_in_seq_order_with_the_push_wire_shape(
    premises_factory: PremisesFactory, tmp_path: Path
) -> None:
    premises = await premises_factory(**overrides(tmp_path / "secrets"))
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["status"] == "granted"  # real events first: decided, started
    await append(premises, 1203)
    rows = await premises.rows(
        "SELECT seq, event_id, type, occurred_at, mono_ns, boot_id, clock_synced, session_id, device_id, data"
        " FROM events ORDER BY seq"
    )
    assert len(rows) == 1205
    async with api(premises) as client:
        first = (await client.get("/api/v1/sync/changes")).json()
        assert (first["after"], first["count"], first["has_more"]) == (0, feed.DEFAULT_LIMIT, True)
        assert first["newest_seq"] == rows[-1][0]
        assert first["acked_upto"] == 0
        paged = await all_pages(client, limit=500)
        assert await all_pages(client, limit=feed.MAX_LIMIT) == paged
        last = (await client.get("/api/v1/sync/changes", params={"after": rows[-1][0]})).json()
        assert (last["events"], last["next_after"], last["has_more"]) == ([], rows[-1][0], False)
    assert [e["seq"] for e in paged] == [r[0] for r in rows]
    for event, row in zip(paged, rows, strict=True):
        assert event == {
            "seq": row[0],
            "event_id": row[1],
            "type": row[2],
            "occurred_at": datetime.fromtimestamp(row[3] / 1000, UTC).isoformat(timespec="milliseconds"),
            "mono_ns": row[4],
            "boot_id": row[5],
            "clock_synced": bool(row[6]),
            "session_id": row[7],
            "device_id": row[8],
            "data": json.loads(row[9]),
        }
    assert paged[1]["type"] == "session.started"
    assert paged[2]["data"]["name"] == 'Ana "Bia" Çé'
    assert premises.metric("pull_feed_events_total") >= 2 * 1205


async def test_bad_parameters(premises_factory: PremisesFactory, tmp_path: Path) -> None:
    premises = await premises_factory(**overrides(tmp_path / "secrets"))
    await append(premises, 3)
    cases: list[tuple[Any, str]] = [
        ({"after": "-1"}, "after='-1'"),
        ({"after": "abc"}, "after='abc'"),
        ({"after": "1.5"}, "after='1.5'"),
        ({"after": ""}, "after=''"),
        ({"after": "9" * 30}, "after='999999999999999999999999...'"),
        ({"limit": "0"}, "limit=0"),
        ({"limit": "5001"}, "limit=5001"),
        ({"limit": "-5"}, "limit='-5'"),
        ({"limit": "ten"}, "limit='ten'"),
        ([("after", "1"), ("after", "2")], "after is given 2 times"),
    ]
    async with api(premises) as client:
        for params, named in cases:
            answer = await client.get("/api/v1/sync/changes", params=params)
            assert answer.status_code == 400, params
            body = answer.json()
            assert body["error"] == "invalid_parameter"
            assert body["detail"].startswith(named), body
        beyond = await client.get("/api/v1/sync/changes", params={"after": 4})
        assert beyond.status_code == 409
        assert beyond.json()["error"] == "after_beyond_newest"
        assert "newest seq 3" in beyond.json()["detail"]
        assert (await client.get("/api/v1/sync/changes", params={"after": 3, "limit": 5000})).status_code == 200


async def test_only_the_cloud_pull_token_reads_the_feed(premises_factory: PremisesFactory, tmp_path: Path) -> None:
    premises = await premises_factory(**overrides(tmp_path / "secrets"))
    await append(premises, 2)
    routes = [("GET", "/api/v1/sync/changes", None), ("POST", "/api/v1/sync/ack", {"upto": 1})]
    callers = {
        "none": {},
        "wrong": {"Authorization": "Bearer not-the-token-0123456789"},
        "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
        "front-desk": {"Authorization": "Bearer front-desk-token-0123456789"},  # a valid api_tokens entry
        "basic": {"Authorization": f"Basic {TOKEN}"},
        "empty": {"Authorization": "Bearer"},
    }
    async with api(premises, token=None) as client:
        for method, path, body in routes:
            for name, headers in callers.items():
                answer = await client.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (path, name)
                assert answer.headers["WWW-Authenticate"].startswith("Bearer"), (path, name)
                assert answer.json()["error"] in ("missing_token", "invalid_token")
                assert "events" not in answer.text
            right = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert right.status_code == 200, right.text
            lower = await client.request(method, path, json=body, headers={"Authorization": f"bearer {TOKEN}"})
            assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    assert premises.metric("pull_feed_acked_seq") == 1


async def test_without_the_secret_the_feed_is_off(premises_factory: PremisesFactory, tmp_path: Path) -> None:
    premises = await premises_factory(**overrides(tmp_path / "secrets", token=None))
    await append(premises, 2)
    async with api(premises) as client:
        for method, path in (("GET", "/api/v1/sync/changes"), ("POST", "/api/v1/sync/ack")):
            answer = await client.request(method, path, json={"upto": 1})
            assert answer.status_code == 503
            assert answer.json()["error"] == "pull_feed_not_configured"
            assert "cloud_pull_token" in answer.json()["detail"]
    assert await premises.rows("SELECT value FROM kv WHERE key = ?", feed.ACKED_KEY) == []


async def test_ack_is_monotonic_and_bounded_by_the_newest_seq(
    premises_factory: PremisesFactory, tmp_path: Path
) -> None:
    premises = await premises_factory(**overrides(tmp_path / "secrets"))
    await append(premises, 10)
    async with api(premises) as client:

        async def ack(body: Any) -> httpx.Response:
            return await client.post("/api/v1/sync/ack", content=json.dumps(body))

        assert (await ack({"upto": 6})).json() == {"acked_upto": 6, "changed": True, "newest_seq": 10}
        assert (await ack({"upto": 3})).json() == {"acked_upto": 6, "changed": False, "newest_seq": 10}
        assert (await ack({"upto": 6})).json()["changed"] is False
        beyond = await ack({"upto": 11})
        assert beyond.status_code == 409
        assert beyond.json()["error"] == "ack_beyond_newest"
        assert "newest seq 10" in beyond.json()["detail"]
        for bad in ({"upto": "7"}, {"upto": True}, {"upto": -1}, {"upto": 1.5}, {}, [7], "7", None):
            answer = await ack(bad)
            assert answer.status_code == 400, bad
            assert answer.json()["error"] == "invalid_body"
        garbage = await client.post("/api/v1/sync/ack", content=b"\xff{not json")
        assert garbage.status_code == 400
        page = (await client.get("/api/v1/sync/changes", params={"after": 6})).json()
        assert page["acked_upto"] == 6
        assert [e["seq"] for e in page["events"]] == [7, 8, 9, 10]
        assert (await ack({"upto": 10})).json() == {"acked_upto": 10, "changed": True, "newest_seq": 10}
    assert await premises.rows("SELECT value FROM kv WHERE key = ?", feed.ACKED_KEY) == [("10",)]


@pytest.mark.deadline(120)
async def test_a_5000_event_page_is_served_well_under_100_ms(premises_factory: PremisesFactory, tmp_path: Path) -> None:
    premises = await premises_factory(**overrides(tmp_path / "secrets"))
    for _ in range(6):
        await append(premises, 1000)
    timings: dict[str, list[float]] = {"identity": [], "gzip": []}
    async with api(premises) as client:
        for encoding in ("identity", "gzip") * 5:
            started = time.perf_counter()
            answer = await client.get(
                "/api/v1/sync/changes", params={"after": 500, "limit": 5000}, headers={"Accept-Encoding": encoding}
            )
            timings[encoding].append(time.perf_counter() - started)
            assert answer.status_code == 200
            assert answer.headers.get("Content-Encoding", "identity") == encoding
            page = answer.json()
            assert (page["count"], page["next_after"], page["has_more"]) == (5000, 5500, True)
    raw = len(json.dumps(page).encode())
    best = {k: min(v) * 1000 for k, v in timings.items()}
    print(f"5000-event page: {raw / 1e6:.2f} MB, best of 5 {best['identity']:.1f} ms, gzip {best['gzip']:.1f} ms")
    assert best["identity"] < 100
    assert best["gzip"] < 100
    assert len(gzip.compress(json.dumps(page).encode())) < raw / 4


# -- retention -----------------------------------------------------------------------------------------------


async def test_pruning_waits_for_every_delivery_the_ack_and_the_session_to_close(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory()
    premises = await premises_factory(
        **overrides(tmp_path / "secrets", sandbox=server), sync={"retention_days": 1, "prune_batch": 7}
    )
    retention = premises.agent.retention
    assert retention is not None
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"  # 1, 2: ANA's session stays open
    session_seqs = [s for (s,) in await premises.rows("SELECT seq FROM events ORDER BY seq")]
    plain = await append(premises, 20)  # 3..22
    poison = await append(premises, 2, kind="test.unknown")  # 23, 24: the cloud refuses them for good
    waiting = await append(premises, 1)  # 25: also for a destination whose worker never runs (no secrets)
    db = premises.agent.db
    assert db is not None
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO deliveries (destination, seq) VALUES ('archive', ?)", (waiting[0],))
    await settled(premises)
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'") == [(2,)]

    assert await retention.prune() == 0  # all too young
    premises.clock.advance(seconds=2 * DAY_S)
    assert await retention.prune() == 0  # old enough, but the cloud has not acknowledged any
    async with api(premises) as client:
        await client.post("/api/v1/sync/ack", json={"upto": plain[9]})
        assert await retention.prune() == 10  # plain[0..9]: not the open session's two events
        remaining = [e["seq"] for e in await all_pages(client)]
        assert remaining == [*session_seqs, *plain[10:], *poison, *waiting]

        await client.post("/api/v1/sync/ack", json={"upto": waiting[0]})
        assert await retention.prune() == 12  # the rest of plain, and the dead letters too
        remaining = [e["seq"] for e in await all_pages(client)]
        assert remaining == [*session_seqs, *waiting]  # the open session, and the undelivered one

        async with premises.reader("r1") as reader:
            premises.clock.advance(seconds=120)
            assert (await reader.tap(ANA)).payload["action"] == "checkout"
        await settled(premises)
        newest = (await client.get("/api/v1/sync/changes")).json()["newest_seq"]
        await client.post("/api/v1/sync/ack", json={"upto": newest})
        assert await retention.prune() == 2  # the session is closed: its first two events go; the checkout's are new
        premises.clock.advance(seconds=2 * DAY_S)
        assert await retention.prune() == 2
        assert [e["seq"] for e in await all_pages(client)] == waiting  # pending for 'archive': kept for good
    assert await premises.rows("SELECT destination, state FROM deliveries ORDER BY 1") == [
        ("archive", "pending"),
        ("cloud", "delivered"),
    ]
    assert premises.metric("events_pruned_total") == 26
    assert await premises.rows("SELECT value FROM kv WHERE key = 'retention.pruned_total'") == [("26",)]


async def test_without_the_feed_pruning_needs_no_ack_and_works_in_batches(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory()
    premises = await premises_factory(
        **overrides(tmp_path / "secrets", token=None, sandbox=server), sync={"retention_days": 0.5, "prune_batch": 50}
    )
    retention = premises.agent.retention
    assert retention is not None
    await append(premises, 1234)
    await settled(premises, within=30)
    premises.clock.advance(seconds=DAY_S)
    fresh = await append(premises, 3)
    await settled(premises)
    assert await retention.prune() == 1234
    assert await premises.rows("SELECT seq FROM events ORDER BY seq") == [(s,) for s in fresh]
    assert await premises.rows("SELECT COUNT(*) FROM deliveries") == [(3,)]


# -- configuration -------------------------------------------------------------------------------------------


def test_sync_settings_are_validated_and_the_token_never_echoed(tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    assert parse_config({}).sync.retention_days == 30
    with pytest.raises(ConfigError, match=r"sync.backoff_cap_s = 0.5 is below sync.backoff_base_s = 2"):
        parse_config({"sync": {"backoff_base_s": 2, "backoff_cap_s": 0.5}})
    with pytest.raises(ConfigError, match=r"sync.retention_days = -1"):
        parse_config({"sync": {"retention_days": -1}})
    with pytest.raises(ConfigError, match=r"sync.prune_batch = 0"):
        parse_config({"sync": {"prune_batch": 0}})
    short = overrides(tmp_path, token="short-secret")
    with pytest.raises(ConfigError, match="cloud_pull_token") as info:
        parse_config(short)
    assert "short-secret" not in str(info.value)
