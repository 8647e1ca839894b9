"""Shared fixtures: a real agent with its embedded broker on an ephemeral loopback port, a SQLite store in
tmp_path seeded with a handful of members, and a manual clock the tests move by hand.

With CLUB_AGENT_TEST_BROKER=mosquitto every agent runs in external mode instead: each test starts Debian's
mosquitto on loopback, configured by the agent's own `export-mosquitto`, and the agent connects to it as a
client (`make test` runs the suite both ways). Tests of the embedded broker itself are marked embedded_only.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import inspect
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import pytest
import uvloop

from agent import sim
from agent.app import Agent, running
from agent.clock import ManualClock
from agent.config import Config, parse_config
from agent.lan import topics
from agent.lan.auth import hash_password
from agent.lan.mosquitto import export_mosquitto
from agent.store import repo
from agent.store.db import Database
from agent.store.members import MemberRecord, apply_members
from agent.sync import status

# Monday 2 March 2026, 12:00 in São Paulo: inside every opening hour used below.
T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)

DEVICES: list[dict[str, Any]] = [
    {"id": "r1", "kind": "reader", "court": "c1"},
    {"id": "r2", "kind": "reader", "court": "c2"},
    {"id": "rx", "kind": "reader", "court": "c1", "direction": "out"},
    {"id": "rb", "kind": "reader", "pos": "bar-1"},  # at the bar: a tap picks whose order it is
    {"id": "b1", "kind": "button", "court": "c1"},
    {"id": "t1", "kind": "tablet", "court": "c1"},
    {"id": "desk", "kind": "tablet"},
    {"id": "d1", "kind": "display", "court": "c2"},
]
PASSWORDS = {d["id"]: f"pw-{d['id']}-0123456789" for d in DEVICES}
_HASHES: dict[str, str] = {}

BROKER = os.environ.get("CLUB_AGENT_TEST_BROKER", "embedded")
if BROKER not in ("embedded", "mosquitto"):
    raise RuntimeError(f"CLUB_AGENT_TEST_BROKER={BROKER!r}: expected embedded or mosquitto")
AGENT_BROKER_PASSWORD = "agent-on-mosquitto-0123456789"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The tests run on the loop the agent runs on in production (agent/loop.py)."""
    if os.environ.get("CLUB_AGENT_TEST_LOOP") == "asyncio":  # for debugging: stdlib tracebacks, SIGUSR1 dumps
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


# pytest-timeout's signal method cannot stop a test on uvloop: its SIGALRM handler runs inside a loop callback,
# where the loop logs the exception and carries on. So an async test's body gets its own deadline here (a clean
# failure of that one test), and pytest-timeout, with the thread method at a longer limit (pyproject), is the
# backstop for a hang anywhere else: it prints every thread's stack and ends the run.
TEST_BODY_DEADLINE_S = 90.0


_test_loop: asyncio.AbstractEventLoop | None = None


def _dump_tasks() -> None:
    out = sys.__stderr__  # not pytest's capture
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=out)
        task.print_stack(file=out)


def _dump_on_sigusr1() -> None:
    """`kill -USR1 <pytest pid>` prints where every asyncio task of the running test is waiting. A thread waits
    for the signal: uvloop, idle in epoll, would not run a Python signal handler."""
    while True:
        signal.sigwait({signal.SIGUSR1})
        _request_dump("SIGUSR1")


def _request_dump(why: str) -> None:
    print(f"\n=== {why}; its asyncio tasks:", file=sys.__stderr__)
    loop = _test_loop
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(_dump_tasks)


TEARDOWN_DUMP_AFTER_S = 30.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A teardown that hangs prints where its tasks wait (before the thread backstop ends the run)."""
    timer = threading.Timer(TEARDOWN_DUMP_AFTER_S, _request_dump, (f"teardown of {item.nodeid} still running",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # threads started later inherit the mask
threading.Thread(target=_dump_on_sigusr1, name="sigusr1-task-dump", daemon=True).start()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(item.obj):
        return
    body = item.obj
    marker = item.get_closest_marker("deadline")
    limit = float(marker.args[0]) if marker else TEST_BODY_DEADLINE_S

    @functools.wraps(body)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        global _test_loop
        _test_loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await body(*args, **kwargs)
        except TimeoutError:
            if not deadline.expired():
                raise  # the test's own TimeoutError
        pytest.fail(f"{item.nodeid} ran longer than its {limit:.0f} s deadline", pytrace=False)

    item.obj = bounded


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BROKER == "mosquitto":
        skip = pytest.mark.skip(reason="tests the embedded broker; this run uses mosquitto")
        for item in items:
            if "embedded_only" in item.keywords:
                item.add_marker(skip)


ANA = "04A1B2C3D4"  # active, 2 credits, code 1001
BRUNO = "04B0B0B0B0"  # active, no credit plan
CARLA = "04CA0CA0CA"  # suspended
DIEGO = "04D1E60000"  # expired
EVA = "04E0A00000"  # active, 0 credits
FABIO = "04FAB10000"  # beach only: not allowed on padel court c1
UNKNOWN = "DEADBEEF01"


def members() -> list[MemberRecord]:
    future = date(2027, 1, 1)

    def member(member_id: str, name: str, card: str, **kw: Any) -> MemberRecord:
        return MemberRecord(member_id=member_id, first_name=name, cards=[card], valid_until=future, **kw)

    return [
        member("m-ana", "Ana", ANA, member_code="1001", credits=2, requires_credit=True, groups=["padel"]),
        member("m-bruno", "Bruno", BRUNO, member_code="1002", groups=["padel", "beach"]),
        member("m-carla", "Carla", CARLA, status="suspended", groups=["padel"]),
        MemberRecord(
            member_id="m-diego", first_name="Diego", cards=[DIEGO], valid_until=date(2026, 1, 31), groups=["padel"]
        ),
        member("m-eva", "Eva", EVA, credits=0, requires_credit=True, groups=["padel"]),
        member("m-fabio", "Fabio", FABIO, groups=["beach"]),
    ]


def make_config(data_dir: Path, **overrides: Any) -> Config:
    if not _HASHES:
        # mosquitto checks only its own PBKDF2 format; the embedded broker takes both, argon2 by default
        scheme: Literal["argon2", "pbkdf2"] = "pbkdf2" if BROKER == "mosquitto" else "argon2"
        _HASHES.update({k: hash_password(v, scheme) for k, v in PASSWORDS.items()})
    raw: dict[str, Any] = {
        "agent": {
            "club_id": "club-test",
            "agent_id": "edge-test",
            "data_dir": str(data_dir),
            "timezone": "America/Sao_Paulo",
        },
        "broker": {"host": "127.0.0.1", "port": 0},
        "api": {"host": "127.0.0.1", "port": 0},
        "policy": {"debounce_s": 3, "second_tap_grace_s": 60, "session_max_minutes": 120},
        "courts": [
            {
                "id": "c1",
                "name": "Quadra 1",
                "access_groups": ["padel"],
                "hours": [{"days": [1, 2, 3, 4, 5, 6, 7], "from": "06:00", "to": "23:00"}],
            },
            {"id": "c2", "name": "Quadra 2"},
        ],
        "devices": [{**d, "password_hash": _HASHES[d["id"]]} for d in DEVICES],
        "ziggy": {"base_url": "http://127.0.0.1:9/api/v1", "client_id": "club-test"},
        "cloud": {"base_url": "http://127.0.0.1:9", "token_url": "http://127.0.0.1:9/token", "client_id": "edge-test"},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return parse_config(raw, source="test")


async def seed(config: Config, records: list[MemberRecord] | None = None, synced_at: datetime | None = T0) -> None:
    async with Database(config.db_path) as db:
        await apply_members(
            db,
            records if records is not None else members(),
            tz=config.domain_policy().timezone,
            source="test",
            synced_at=synced_at,
        )


@dataclass
class Premises:
    agent: Agent
    config: Config
    clock: ManualClock
    host: str = "127.0.0.1"

    @property
    def embedded(self) -> bool:
        """The agent runs its own broker (so broker-side refusals are counted in its metrics)."""
        return self.config.broker.mode == "embedded"

    @property
    def port(self) -> int:
        if self.config.broker.mode == "external":
            return self.config.broker.external_port
        assert self.agent.broker_port is not None
        return self.agent.broker_port

    def reader(self, reader_id: str = "r1") -> Any:
        return sim.reader(self.host, self.port, reader_id, PASSWORDS[reader_id])

    def button(self, button_id: str = "b1", court_id: str = "c1") -> Any:
        return sim.button(self.host, self.port, button_id, court_id, PASSWORDS[button_id])

    def tablet(self, tablet_id: str = "t1") -> Any:
        return sim.tablet(self.host, self.port, tablet_id, PASSWORDS[tablet_id])

    def client(self, username: str, **kw: Any) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            username=username,
            password=PASSWORDS.get(username, "x"),
            identifier=kw.pop("identifier", username),
            socket_options=topics.NODELAY,
            **kw,
        )

    async def rows(self, sql: str, *params: Any) -> list[Any]:
        assert self.agent.db is not None
        return [tuple(r) for r in await self.agent.db.fetchall(sql, params)]

    async def pending(self, *destinations: str) -> int:
        """Events still to deliver to the given destinations (all known ones by default), as `outbox status`
        counts them: rows pending, and events the destination's worker has not queued yet."""
        db = self.agent.db
        assert db is not None
        names = list(destinations) or await status.known_destinations(db)
        return sum(s.pending for s in await status.destination_states(db, names))

    async def queue_deliveries(self) -> None:
        """Queue every event's delivery rows now, as each enabled destination's worker does before its round
        (for tests that look at the rows of a destination that has no worker)."""
        db = self.agent.db
        assert db is not None
        for (name,) in await self.rows("SELECT destination FROM delivery_cursors"):
            assert await db.write("test", repo.queue_deliveries, name, 1 << 40) == 0

    def metric(self, name: str, **labels: str) -> float:
        return self.agent.metrics.value(name, labels)


PremisesFactory = Callable[..., Any]


@pytest.fixture
async def premises_factory(tmp_path: Path) -> AsyncIterator[PremisesFactory]:
    """Start agents on demand (config overrides as keyword sections); all are stopped at teardown."""
    stack: list[Any] = []

    running_agents: dict[int, Any] = {}

    async def start(
        *,
        records: list[MemberRecord] | None = None,
        clock: ManualClock | None = None,
        synced_at: datetime | None = T0,
        restart: Premises | None = None,
        **overrides: Any,
    ) -> Premises:
        """A new agent; with `restart`, that agent is stopped and a new one runs on its config and store."""
        if restart is not None:
            ctx = running_agents.pop(id(restart.agent), None)
            if ctx is not None:
                await ctx.__aexit__(None, None, None)
            config, clock = restart.config, clock or restart.clock
        else:
            data_dir = tmp_path / f"agent{len(stack)}"
            if BROKER == "mosquitto":
                overrides = _external(data_dir, overrides)
            config = make_config(data_dir, **overrides)
            if BROKER == "mosquitto":
                stack.append(await site_mosquitto(config, data_dir / "mosquitto"))
            await seed(config, records, synced_at)
            clock = clock or ManualClock(T0)
        agent = Agent(config, clock=clock)
        ctx = running(agent)
        await ctx.__aenter__()
        running_agents[id(agent)] = ctx
        stack.append(agent)
        return Premises(agent, config, clock)

    yield start
    for item in reversed(stack):
        ctx = running_agents.pop(id(item), None) if isinstance(item, Agent) else item
        if ctx is not None:
            await ctx.__aexit__(None, None, None)


def _external(data_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides that put an agent in external mode, with its broker password in a secrets file."""
    from tests.brokers import free_port

    data_dir.mkdir(parents=True, exist_ok=True)
    secrets = data_dir / "secrets.toml"
    given = overrides.get("agent", {}).get("secrets_file")  # a test's own secrets (the cloud's) are kept
    kept = Path(given).read_text() if given else ""
    secrets.write_text(kept + f'broker_password = "{AGENT_BROKER_PASSWORD}"\n')
    secrets.chmod(0o600)
    broker = {**overrides.get("broker", {}), "mode": "external", "external_port": free_port()}
    agent = {**overrides.get("agent", {}), "secrets_file": str(secrets)}
    return {**overrides, "broker": broker, "agent": agent}


async def site_mosquitto(config: Config, directory: Path) -> Any:
    """Start mosquitto on exactly the files `club-agent broker export-mosquitto` writes for `config`."""
    from tests.brokers import Mosquitto  # tests.brokers imports this module

    conf = export_mosquitto(config, directory).conf

    class ExportedMosquitto(Mosquitto):
        def config_text(self) -> str:
            # as root, mosquitto would drop to user 'mosquitto' and could not read tmp_path
            return conf.read_text() + f"user {getpass.getuser()}\nlog_dest stderr\nlog_type all\n"

    site = ExportedMosquitto(directory, port=config.broker.external_port, websockets=False, persistence=False)
    await site.__aenter__()
    return site


@pytest.fixture
async def premises(premises_factory: PremisesFactory) -> Premises:
    result: Premises = await premises_factory()
    return result


async def next_message(client: aiomqtt.Client, topic_filter: str, within: float = 5.0) -> dict[str, Any]:
    """The next message on a topic matching `topic_filter`, decoded."""
    async with asyncio.timeout(within):
        async for message in client.messages:
            if topics.matches(message.topic.value, topic_filter):
                payload = message.payload
                assert isinstance(payload, bytes | bytearray)
                decoded: dict[str, Any] = json.loads(payload)
                return decoded
    raise AssertionError("message stream ended")
