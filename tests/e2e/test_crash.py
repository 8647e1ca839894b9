"""Durable before the answer: the agent is SIGKILLed right after a reader heard "granted"; after restart the
session and its events are there, and the reader's retry of the same message gets the same answer."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sim
from agent.store import repo
from agent.store.db import Database
from agent.sync import status
from tests.conftest import BRUNO, DEVICES, PASSWORDS, make_config, seed

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_toml(path: Path, data_dir: Path, broker_port: int, api_port: int) -> None:
    hashes = {d.id: d.password_hash for d in make_config(data_dir).devices}
    lines = [
        "[agent]",
        f'data_dir = "{data_dir}"',
        'club_id = "club-test"',
        'agent_id = "edge-test"',
        "trust_clock = true",
        "[broker]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        "[api]",
        'host = "127.0.0.1"',
        f"port = {api_port}",
        "[ziggy]",
        'base_url = "http://127.0.0.1:9/api/v1"',
        'client_id = "club-test"',
        "[[courts]]",
        'id = "c1"',
        "[[courts]]",
        'id = "c2"',
    ]
    for device in DEVICES:
        lines += [
            "[[devices]]",
            *(f'{k} = "{v}"' for k, v in device.items()),
            f'password_hash = "{hashes[device["id"]]}"',
        ]
    path.write_text("\n".join(lines) + "\n")


class AgentProcess:
    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_path.with_name("agent.log")

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    async def wait_ready(self, within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while True:
                assert self.proc is not None
                assert self.proc.poll() is None, self.output()
                try:
                    async with sim.reader("127.0.0.1", self.port, "r2", PASSWORDS["r2"]) as probe:
                        await probe.tap("0000000001", reply_within=2)
                    return
                except Exception:  # not up yet: refused, or no answer
                    await asyncio.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentProcess]:
    data_dir = tmp_path / "data"
    port = free_port()
    config_path = tmp_path / "agent.toml"
    write_toml(config_path, data_dir, port, free_port())
    asyncio.run(seed(make_config(data_dir)))
    process = AgentProcess(config_path, port)
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.stop(signal.SIGKILL)


async def test_sigkill_right_after_granted_loses_nothing(agent_process: AgentProcess, tmp_path: Path) -> None:
    agent_process.start()
    await agent_process.wait_ready()
    async with sim.reader("127.0.0.1", agent_process.port, "r1", PASSWORDS["r1"]) as reader:
        granted = await reader.tap(BRUNO, msg_id="door-1")
        os.kill(agent_process.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    assert granted.payload["status"] == "granted"
    assert agent_process.stop() == -signal.SIGKILL

    agent_process.start()
    await agent_process.wait_ready()
    async with sim.reader("127.0.0.1", agent_process.port, "r1", PASSWORDS["r1"]) as reader:
        retry = await reader.tap(BRUNO, msg_id="door-1")
    assert retry.payload == granted.payload  # answered from the store, not decided again
    assert agent_process.stop() == 0  # SIGTERM is a clean stop

    async with Database(tmp_path / "data" / "agent.db") as db:
        sessions = [tuple(r) for r in await db.fetchall("SELECT session_id, member_id, ended_at FROM sessions")]
        events = [
            tuple(r)
            for r in await db.fetchall("SELECT type, session_id FROM events WHERE device_id = 'r1' ORDER BY seq")
        ]
        # Ziggy is enabled without its key (no worker runs): its events wait past its cursor, counted as pending,
        # and are queued as its worker would queue them.
        [ziggy] = await status.destination_states(db, ["ziggy"])
        assert await db.write("test", repo.queue_deliveries, "ziggy", 1000) == 0
        deliveries = [
            tuple(r)
            for r in await db.fetchall(
                "SELECT d.destination, e.type FROM deliveries d JOIN events e USING (seq) WHERE e.device_id = 'r1'"
                " ORDER BY d.seq, d.destination"
            )
        ]
    session_id = granted.payload["session_id"]
    assert sessions == [(session_id, "m-bruno", None)]
    assert events == [("access.decided", session_id), ("session.started", session_id)]
    assert ziggy.pending == 1
    assert deliveries == [("ziggy", "session.started")]
