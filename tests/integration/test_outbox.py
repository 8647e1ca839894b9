"""The outbox against the sandbox cloud (Ziggy + club cloud in-process on loopback), whose received log is the
oracle: every event arrives exactly once, a session's events in order, Ziggy's own session id on the checkout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.faults import FaultRule
from agent.sandbox.options import SandboxOptions
from agent.sandbox.server import SandboxServer
from tests.conftest import ANA, Premises, PremisesFactory

pytestmark = pytest.mark.embedded_only  # the outbox does not depend on the broker; run it once


def sandbox_overrides(server: SandboxServer, directory: Path) -> dict[str, Any]:
    s = server.settings
    directory.mkdir(parents=True, exist_ok=True)
    secrets = directory / "secrets.toml"
    secrets.write_text(
        f'ziggy_api_key = "{s.ziggy_api_key}"\n'
        f'cloud_client_secret = "{s.cloud_client_secret}"\n'
        f'cloud_signing_secret = "{s.signing_secret}"\n'
    )
    secrets.chmod(0o600)
    return {
        "agent": {"secrets_file": str(secrets)},
        "ziggy": {"base_url": s.ziggy_base_url, "client_id": s.ziggy_client_id},
        "cloud": {"base_url": s.cloud_base_url, "token_url": s.token_url, "client_id": s.cloud_client_id},
    }


@pytest.fixture
async def sandbox_factory() -> AsyncIterator[Callable[..., Any]]:
    servers: list[SandboxServer] = []

    async def start(*faults: dict[str, Any]) -> SandboxServer:
        options = SandboxOptions(members=0, faults=tuple(FaultRule.model_validate(f) for f in faults))
        server = SandboxServer(options, port=0)
        await server.__aenter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.__aexit__(None, None, None)


async def delivered(premises: Premises, within: float = 15.0) -> None:
    """Until no delivery row is pending."""
    for _ in range(int(within / 0.05)):
        if await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'") == [(0,)]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"deliveries still pending after {within} s")


async def check_in_and_out(premises: Premises) -> None:
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"
        premises.clock.advance(seconds=120)
        assert (await reader.tap(ANA)).payload["action"] == "checkout"


def exactly_once_in_order(server: SandboxServer, premises_events: list[tuple[Any, ...]]) -> None:
    received = [e for e in server.sandbox.log if e["kind"] == "event"]
    ids = [e["event_id"] for e in received]
    assert sorted(ids) == sorted(row[0] for row in premises_events)  # every event, once
    by_session: dict[str, list[int]] = {}
    for e in received:
        if e["session_id"]:
            by_session.setdefault(e["session_id"], []).append(e["seq"])
    assert all(seqs == sorted(seqs) for seqs in by_session.values())


async def test_a_session_reaches_ziggy_and_the_cloud_once_with_ziggys_session_id(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory()
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    await check_in_and_out(premises)
    await delivered(premises)
    events = await premises.rows("SELECT event_id, type FROM events ORDER BY seq")
    assert [t for _, t in events] == ["access.decided", "session.started", "access.decided", "session.ended"]
    exactly_once_in_order(server, events)
    calls = [e for e in server.sandbox.log if e["kind"] == "call" and e["route"].startswith("ziggy.")]
    assert [(c["route"], c["acted"]) for c in calls] == [("ziggy.checkin", True), ("ziggy.checkout", True)]
    [(ours, theirs)] = await premises.rows("SELECT session_id, ziggy_session_id FROM ziggy_sessions")
    assert theirs != ours
    assert theirs in repr(calls[1]["effect"])  # the checkout named Ziggy's session, not ours


async def test_faults_delay_but_never_lose_or_double_an_event(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory(
        {"endpoint": "cloud.events", "kind": "503", "count": 2},
        {"endpoint": "ziggy.checkin", "kind": "garbage", "count": 1},  # acts, then answers nonsense
        {"endpoint": "ziggy.checkout", "kind": "429", "count": 1, "retry_after_s": 0.5},
    )
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    await check_in_and_out(premises)
    await delivered(premises, within=30)
    events = await premises.rows("SELECT event_id, type FROM events ORDER BY seq")
    exactly_once_in_order(server, events)
    checkins = [e for e in server.sandbox.log if e["kind"] == "call" and e["route"] == "ziggy.checkin"]
    assert sum(1 for c in checkins if c["acted"]) == 1  # the retry after the garbage answer was replayed
    assert await premises.rows("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'") == [(0,)]
    retried = await premises.rows("SELECT destination, MAX(attempts) FROM deliveries GROUP BY destination ORDER BY 1")
    assert retried[0][1] >= 3  # cloud: two 503s, then accepted
    assert retried[1][1] >= 2  # ziggy: the garbage answer, then a replay (and the checkout's 429)
