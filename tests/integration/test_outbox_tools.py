"""Operating the outbox: `club-agent outbox status|dead|requeue|purge|audit` (typer's runner, in a thread, against
the database of a running agent) and `GET /api/v1/health/integrations`, with the sandbox cloud as destination.

Dead letters are real: the sandbox cloud refuses an event type it does not know (`unknown_type`) for good, and
the outbox dead-letters it. "The cloud learns the type" (a cloud release) is the sandbox's type list growing,
after which a requeued letter goes through.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from agent.cli import app
from agent.sandbox import events as sandbox_events
from agent.store.db import Database
from agent.store.repo import NewEvent, Stamp, append_events, enable_destinations, queue_deliveries
from agent.sync import operator, outbox
from agent.sync.status import Health, judge
from tests.conftest import ANA, Premises, PremisesFactory
from tests.sandboxes import sandbox_overrides

pytestmark = pytest.mark.embedded_only  # the outbox does not depend on the broker; run it once

POISON = "test.poison"


def cli_config(premises: Premises, path: Path) -> Path:
    """The agent's config as a TOML file, for the operator's commands."""
    cfg = premises.config
    lines = ["[agent]", f'data_dir = "{cfg.agent.data_dir}"', f'timezone = "{cfg.agent.timezone}"']
    if cfg.agent.secrets_file is not None:
        lines.append(f'secrets_file = "{cfg.agent.secrets_file}"')
    for name in ("ziggy", "cloud"):
        section = getattr(cfg, name)
        if section is not None:
            lines += [f"[{name}]", *(f'{k} = "{v}"' for k, v in section.model_dump(exclude={"enabled"}).items())]
    path.write_text("\n".join(lines) + "\n")
    return path


async def club_agent(*args: str, actor: str = "ops-ana") -> Result:
    """`club-agent ARGS` through typer's runner, on a thread: the command runs its own event loop, as it does
    beside a running agent in production."""
    env = {"SUDO_USER": actor, "COLUMNS": "200"}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def words(text: str) -> str:
    return " ".join(text.replace("│", " ").replace("┃", " ").split())


async def append(premises: Premises, n: int, kind: str = "access.decided") -> list[int]:
    db = premises.agent.db
    assert db is not None
    stamp = Stamp(premises.clock.wall(), premises.clock.monotonic_ns(), "boot-test", True)
    events = [NewEvent(kind, {"i": i}) for i in range(n)]
    written = await db.write("test", append_events, stamp, events)
    return [seq for seq, _ in written]


async def until(check: Callable[[], Any], within: float = 15.0) -> Any:
    for _ in range(int(within / 0.05)):
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within} s")


async def health(premises: Premises) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{premises.agent.api_port}") as client:
        answer = await client.get("/api/v1/health/integrations")
        assert answer.status_code == 200
        body: dict[str, Any] = answer.json()
        return body


@pytest.fixture
def quick_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker looks for due rows every 0.2 s instead of 30 s (rows requeued by another process)."""
    monkeypatch.setattr(outbox, "IDLE_MAX_S", 0.2)


# -- operator commands ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("quick_idle")
async def test_dead_letters_listed_requeued_delivered_purged_and_audited(
    premises_factory: PremisesFactory,
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await sandbox_factory()
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    config = str(cli_config(premises, tmp_path / "agent.toml"))
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"
    poison = await append(premises, 3, POISON)
    await append(premises, 2)

    async def dead_rows() -> list[Any]:
        return await premises.rows("SELECT seq, attempts FROM deliveries WHERE state = 'dead' ORDER BY seq")

    async def settled() -> bool:
        return await premises.pending() == 0 and await dead_rows() == [(s, 1) for s in poison]

    await until(settled)

    status = await club_agent("outbox", "status", "-c", config)
    assert status.exit_code == 0, status.output
    text = words(status.stdout)
    assert "cloud 0 3" in text  # destination, pending, dead
    assert "ziggy 0 0" in text
    assert "rejected by the cloud: unknown_type" in text
    assert "closed" in text
    assert "pull feed: not configured" in text
    assert "retention: 30 days; 0 events pruned" in text

    listed = await club_agent("outbox", "dead", "-c", config)
    assert listed.exit_code == 0, listed.output
    text = words(listed.stdout)
    for seq in poison:
        assert f"{seq} cloud {POISON}" in text
    assert "3 dead letters" in text
    assert "no dead letters on ziggy" in (await club_agent("outbox", "dead", "-d", "ziggy", "-c", config)).stdout
    limited = await club_agent("outbox", "dead", "--limit", "1", "-c", config)
    assert "showing the first 1" in words(limited.stdout)

    unknown = await club_agent("outbox", "dead", "--destination", "nope", "-c", config)
    assert unknown.exit_code == 1
    assert unknown.stderr.strip() == "error: unknown destination 'nope' (known: cloud, ziggy)"
    neither = await club_agent("outbox", "requeue", "-c", config)
    assert neither.exit_code == 2
    assert "give the seqs" in neither.stderr
    both = await club_agent("outbox", "requeue", "--all", str(poison[0]), "-c", config)
    assert both.exit_code == 2
    missing = await club_agent("outbox", "requeue", str(poison[0]), "99999", "-c", config)
    assert missing.exit_code == 1
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "no dead letter on any destination for seq 99999" in missing.stderr
    not_on_ziggy = await club_agent("outbox", "requeue", "-d", "ziggy", str(poison[0]), "-c", config)
    assert not_on_ziggy.exit_code == 1
    assert f"no dead letter on ziggy for seq {poison[0]}" in not_on_ziggy.stderr
    assert await dead_rows() == [(s, 1) for s in poison]  # refusals change nothing

    snapshot = await health(premises)
    assert snapshot["integrations"]["cloud"]["status"] == "degraded"  # calls succeed, letters wait for a person
    assert snapshot["integrations"]["cloud"]["dead"] == 3

    # The cloud learns the event type; the operator sends two of the letters again.
    monkeypatch.setattr(sandbox_events, "EVENT_TYPES", sandbox_events.EVENT_TYPES | {POISON})
    requeued = await club_agent("outbox", "requeue", "-d", "cloud", str(poison[0]), str(poison[1]), "-c", config)
    assert requeued.exit_code == 0, requeued.output
    assert "requeued 2 dead letters (cloud 2)" in words(requeued.stdout)

    async def redelivered() -> bool:
        rows = await premises.rows(
            "SELECT seq, state, attempts FROM deliveries WHERE destination = 'cloud' AND seq IN (?, ?)", *poison[:2]
        )
        return rows == [(poison[0], "delivered", 1), (poison[1], "delivered", 1)]

    await until(redelivered)  # by the running agent, woken by nothing but its idle timer
    received = {e["seq"] for e in server.sandbox.log if e["kind"] == "event" and e["type"] == POISON}
    assert received == set(poison[:2])

    unconfirmed = await club_agent("outbox", "purge", str(poison[2]), "-c", config)
    assert unconfirmed.exit_code == 2
    assert "--yes" in unconfirmed.stderr
    purged = await club_agent("outbox", "purge", "-d", "cloud", str(poison[2]), "--yes", "-c", config)
    assert purged.exit_code == 0, purged.output
    assert "purged 1 dead letter (cloud 1)" in words(purged.stdout)
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE seq = ?", poison[2]) == [(0,)]
    assert await premises.rows("SELECT type FROM events WHERE seq = ?", poison[2]) == [(POISON,)]  # the event stays

    nothing = await club_agent("outbox", "requeue", "--all", "-c", config)
    assert nothing.exit_code == 0
    assert "no dead letters: nothing changed" in nothing.stdout

    audit = await club_agent("outbox", "audit", "-c", config)
    assert audit.exit_code == 0, audit.output
    text = words(audit.stdout)
    assert f"ops-ana requeue cloud 2 ({poison[0]}-{poison[1]}): rejected by the cloud: unknown_type x2" in text
    assert f"ops-ana purge cloud 1 ({poison[2]})" in text
    rows = await premises.rows("SELECT actor, action, destination, detail FROM outbox_audit ORDER BY id")
    assert [(a, b, c) for a, b, c, _ in rows] == [("ops-ana", "requeue", "cloud"), ("ops-ana", "purge", "cloud")]
    assert json.loads(rows[0][3]) == {
        "count": 2,
        "seqs": f"{poison[0]}-{poison[1]}",
        "selected": "seqs",
        "reasons": {"rejected by the cloud: unknown_type": 2},
    }

    after = words((await club_agent("outbox", "status", "-c", config)).stdout)
    assert "cloud 0 0" in after

    async def healthy() -> bool:  # the endpoint reuses store counts for up to a second
        return bool((await health(premises))["integrations"]["cloud"]["status"] == "healthy")

    await until(healthy)


async def test_requeue_all_works_in_short_transactions_with_one_audit_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an agent: dead rows as the outbox leaves them, requeued --all in chunks of 4."""
    monkeypatch.setattr(operator, "CHUNK", 4)
    data = tmp_path / "data"
    async with Database(data / "agent.db") as db:
        stamp = Stamp(datetime.now(UTC), 1, "boot", True)

        def poison(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            enable_destinations(conn, ["cloud"])
            written = append_events(conn, stamp, [NewEvent(POISON, {}) for _ in range(10)])
            assert queue_deliveries(conn, "cloud", 100) == 0
            conn.execute(
                "UPDATE deliveries SET state = 'dead', attempts = 3, last_error = 'rejected by the cloud: unknown_type'"
            )
            return written

        written = await db.write("test", poison)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndata_dir = "{data}"\n')
    done = await club_agent("outbox", "requeue", "--all", "-d", "cloud", "-c", str(config), actor="ops-bia")
    assert done.exit_code == 0, done.output
    assert "requeued 10 dead letters (cloud 10)" in words(done.stdout)
    async with Database(data / "agent.db") as db:
        rows = await db.fetchall("SELECT state, attempts, next_attempt_at FROM deliveries")
        assert {tuple(r) for r in rows} == {("pending", 0, 0)}
        audit = await db.fetchall("SELECT actor, detail FROM outbox_audit")
    assert len(audit) == 1
    assert audit[0][0] == "ops-bia"
    first, last = written[0][0], written[-1][0]
    assert json.loads(audit[0][1])["seqs"] == f"{first}-{last}"
    assert json.loads(audit[0][1])["count"] == 10


async def test_commands_without_a_database_say_so_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndata_dir = "{tmp_path / "nothing"}"\n')
    for args in (["status"], ["dead"], ["requeue", "--all"], ["purge", "--all", "--yes"], ["audit"]):
        result = await club_agent("outbox", *args, "-c", str(config))
        assert result.exit_code == 1, args
        assert result.stderr.startswith("error: no database at"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nothing").exists()  # looking did not create an empty store
    broken = await club_agent("outbox", "status", "-c", str(tmp_path / "missing.toml"))
    assert broken.exit_code == 2
    assert broken.stderr.startswith("config error:")


def test_seq_ranges_and_health_rules() -> None:
    assert operator.seq_ranges([9, 1, 2, 3, 7, 10, 2]) == "1-3,7,9-10"
    assert operator.seq_ranges([]) == ""
    ok: dict[str, Any] = {"running": True, "breaker": "closed", "last_call_ok": True, "dead": 0}
    assert judge(**ok, oldest_pending_age_s=None) is Health.HEALTHY
    assert judge(**{**ok, "last_call_ok": None}, oldest_pending_age_s=None) is Health.HEALTHY  # not called yet
    assert judge(**{**ok, "dead": 1}, oldest_pending_age_s=None) is Health.DEGRADED
    assert judge(**ok, oldest_pending_age_s=3600) is Health.DEGRADED
    assert judge(**{**ok, "last_call_ok": False}, oldest_pending_age_s=None) is Health.UNHEALTHY
    assert judge(**{**ok, "breaker": "open"}, oldest_pending_age_s=None) is Health.UNHEALTHY
    assert judge(**{**ok, "running": False}, oldest_pending_age_s=None) is Health.UNHEALTHY


# -- integration health --------------------------------------------------------------------------------------


async def test_health_is_unhealthy_while_the_cloud_fails_and_healthy_after(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory({"endpoint": "cloud.events", "kind": "503", "rate": 1.0})
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    before = await health(premises)
    assert before["status"] == "healthy"
    assert before["integrations"]["cloud"]["latency_ms"] is None  # not called yet, nothing to send
    await append(premises, 1)

    async def failing() -> dict[str, Any] | None:
        snapshot = await health(premises)
        return snapshot if snapshot["integrations"]["cloud"]["status"] == "unhealthy" else None

    down = await until(failing)
    cloud = down["integrations"]["cloud"]
    assert down["status"] == "unhealthy"
    assert "HTTP 503" in cloud["last_error"]
    assert cloud["latency_ms"] >= 0
    assert cloud["consecutive_failures"] >= 1
    assert cloud["last_success_at"] is None
    assert down["integrations"]["ziggy"]["status"] == "healthy"  # nothing for Ziggy: not called, not failing
    settings = server.settings
    for secret in (settings.cloud_client_secret, settings.signing_secret, settings.ziggy_api_key):
        assert secret not in json.dumps(down)
    assert await until(lambda: _pending(premises)) == 1

    server.sandbox.faults.replace([])

    async def recovered() -> dict[str, Any] | None:
        snapshot = await health(premises)
        c = snapshot["integrations"]["cloud"]
        return snapshot if c["status"] == "healthy" and c["pending"] == 0 else None

    up = await until(recovered, within=30)
    cloud = up["integrations"]["cloud"]
    assert up["status"] == "healthy"
    assert cloud["breaker"] == "closed"
    assert cloud["consecutive_failures"] == 0
    assert cloud["last_success_at"] is not None
    assert cloud["latency_median_ms"] > 0
    assert "HTTP 503" in cloud["last_error"]  # the last error stays on record, with its time
    assert up["pull_feed"] == {"configured": False, "acked_upto": 0, "acked_at": None, "newest_seq": 1, "lag": 1}


async def _pending(premises: Premises) -> int:
    return int((await health(premises))["integrations"]["cloud"]["pending"])


async def test_health_names_an_enabled_destination_that_cannot_run(premises: Premises) -> None:
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["status"] == "granted"
    snapshot = await until(lambda: _with_pending(premises))
    for name in ("ziggy", "cloud"):
        entry = snapshot["integrations"][name]
        assert entry["status"] == "unhealthy"
        assert "secrets are missing" in entry["last_error"]
        assert entry["pending"] >= 1
    assert snapshot["status"] == "unhealthy"


async def _with_pending(premises: Premises) -> dict[str, Any] | None:
    snapshot = await health(premises)
    return snapshot if snapshot["integrations"]["ziggy"]["pending"] else None
