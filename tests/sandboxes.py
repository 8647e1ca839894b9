"""The sandbox cloud in tests: an in-process SandboxServer per test (fixture `sandbox_factory`), the agent
config that points at it, and the received-log checks the sync tests use as their oracle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.faults import FaultRule
from agent.sandbox.options import SandboxOptions
from agent.sandbox.server import SandboxServer
from tests.conftest import ANA, Premises


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

    async def start(*faults: dict[str, Any], **options_: Any) -> SandboxServer:
        rules = tuple(FaultRule.model_validate(f) for f in faults)
        options = SandboxOptions(**{"members": 0, **options_}, faults=rules)
        server = SandboxServer(options, port=0)
        await server.__aenter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.__aexit__(None, None, None)


async def delivered(premises: Premises, within: float = 15.0) -> None:
    """Until nothing is left to deliver."""
    for _ in range(int(within / 0.05)):
        if await premises.pending() == 0:
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
