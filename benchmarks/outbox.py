"""Outbox: durable enqueue against persist-queue, drain to the sandbox cloud, and a 1,000,000-event backlog.

    .venv/bin/python benchmarks/outbox.py [--events 5000] [--producers 8] [--repeat 3] [--drain-events 20000]
                                          [--ziggy-events 20000] [--backlog 1000000 | --quick]
                                          [--only enqueue,drain,backlog] [--backlog-timeout 600]

Durable enqueue (`--events` items per path, `--repeat` rounds, medians; within a round the paths take turns 100
items at a time, in rotating order, all under one temporary directory, so on one filesystem and under the same
disk weather: this VM's fsync latency swings from 0.1 to 5 ms while other work runs). `--producers` (default 8,
the tap benchmark's readers) callers enqueue at once, each waiting until its item is durable before its next one,
as a reader waits for its answer:
* agent: what a decision commits, through the agent's own code: `Database.write` (the writer's thread, WAL,
  synchronous=FULL) around `store.repo.append_events`, which writes the event row; its delivery rows (one per
  destination it is routed to) are added after the commit by each destination's outbox worker, in bulk
  (`store.repo.queue_deliveries`), so they are not part of what a caller waits for. Writes queued together share
  one transaction and one fsync (group commit); each caller is answered after that COMMIT. The item is a
  `session.started` event (ROUTES sends it to both ziggy and cloud, ~230 bytes of JSON data). An `access.decided`
  event (~270 bytes; the cloud only) is measured too, for information. After each round the workers' queuing is
  run and checked (every event has its rows: two, or one for access.decided) and its rate printed; not timed
  as enqueue.
* peer: persist-queue's `SQLiteAckQueue`, one `put()` per item from `--producers` threads (`multithreading=True`,
  its thread-safe mode), the same event (envelope + data, a fresh UUIDv7 event id per item, as the agent gives one)
  pickled by persist-queue. Durability is matched: `auto_commit=True` (its default; the ack queue refuses anything
  else) commits every put in its own transaction before put returns; persist-queue puts its connection in WAL
  itself; SQLite's `synchronous` is set to FULL on its put connection (persist-queue has no option for it, so
  `PRAGMA synchronous = FULL` goes through its `_putter` connection) and both connections' pragmas are read back
  and printed. So on both sides no item is acknowledged before an fsync of the WAL that holds it.
* both again with one producer (`multithreading=False` for the peer: its cheapest path), for information.
* enqueue_ratio = agent / peer at `--producers` (session.started items), the median of the rounds' ratios.
  Budget >= 3x.

Drain (`--drain-events` cloud events, `--ziggy-events` Ziggy events, each round on a fresh database): the events
(a club's mix: overlapping sessions' check-in and check-out taps, a few denied taps) are written with the real
`append_events` and queued with the real `queue_deliveries` (as the worker does while its destination is down:
a backlog waiting to drain), then the real `Outbox` runs with the real `CloudDestination` (or `ZiggyDestination`,
one event per call) against the in-repo sandbox, with the replay pacing raised (`replay_per_s=1e9`) so that the
figure is the pipeline's capacity. Rate = events delivered after the first one's `delivered_at` / (last - first
`delivered_at`). Checked: every delivery row is `delivered`; the sandbox accepted exactly the database's event ids,
each once (cloud: `/_sandbox/received?kind=event` and the inbox's de-duplication count; Ziggy: exactly one acted
check-in or check-out call per event id). Budget (cloud) >= 1,000 events/s. Bounded by `--drain-timeout`.

Backlog (`--backlog` N, default 1,000,000; `--quick` 100,000): the database is filled by bulk inserts straight into
the schema (`executemany`, synchronous=OFF, 50,000 rows a transaction: set-up, not the agent's write path), the
outbox's due-event queries are timed once and their plans printed (EXPLAIN QUERY PLAN), then the outbox drains it to
the cloud while this process's RSS (and the sandbox's) is sampled every second. backlog_rss_growth_mb = max - RSS
at the start of the drain. Bounded by `--backlog-timeout`: a drain cut short reports how far it got.

The sandbox runs in a subprocess (this script with `--serve-sandbox`: `SandboxServer(SandboxOptions(members=0),
port=0)` on the agent's loop, without the per-event console echo of `club-agent sandbox`), so that its CPU (it
validates and fingerprints every event) and its memory (it remembers every event it accepted) are not counted as
the agent's; the agent side runs on `agent.loop.run_async` (uvloop), with `limit_malloc_growth()` as `Agent.run`.

Prints a table, budget verdicts, then as the very last line of stdout one JSON object. Exit code 0 even when a budget
is missed (this is a measurement); 2 when something failed or an event was lost or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import pickle
import random
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from persistqueue import SQLiteAckQueue
from rich.console import Console
from rich.table import Table

from agent.app import limit_malloc_growth
from agent.config import CloudSection, ZiggySection
from agent.logs import configure
from agent.loop import run_async
from agent.sandbox.options import AgentSettings, SandboxOptions
from agent.store import repo
from agent.store.db import Database
from agent.store.repo import NewEvent, Stamp
from agent.sync import outbox as outbox_module
from agent.sync import status
from agent.sync.cloud import CloudDestination
from agent.sync.delivery import Destination
from agent.sync.outbox import Outbox
from agent.sync.ziggy import ZiggyDestination

HOST = "127.0.0.1"
AGENT_ID = "edge-01"  # config.AgentSection's default agent_id: the cloud's device_id
BOOT_ID = "9c1d7e52-3f0a-4b7e-8f61-2d4c5a6b7e80"
DESTINATIONS = ("ziggy", "cloud")
BUDGET_RATIO = 3.0
BUDGET_DRAIN_PER_S = 1000.0
REPLAY_PER_S = 1e9  # the pacing knob raised out of the way: the pipeline's capacity is measured
ENQUEUE_CHUNK = 100  # items per turn of a path in the interleaved enqueue rounds
FILL_CHUNK = 500  # events per transaction when the drains' databases are filled with append_events
BULK_CHUNK = 50_000  # rows per transaction of the backlog's bulk insert
OPEN_SESSIONS = 40  # sessions open at once in the generated club day
DENIED_SHARE = 0.08
POLL_S = 0.1
SETTLE_TIMEOUT_S = 30.0  # the sandbox has the last event; the worker records it
RSS_SAMPLE_S = 1.0
PROGRESS_S = 10.0
QUERY_CAP_S = 60.0  # a due query timed before the backlog drain is interrupted after this long
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
SERVE_MAX_S = 6 * 3600.0  # the sandbox process ends by itself after this long, whatever happens
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # /_sandbox/received of 20,000 events is a few MB of JSON
RECEIVED_CHECK_MAX = 100_000  # above this the oracle check uses the sandbox's counts, not its whole log
PR_SET_PDEATHSIG = 1
MB = 2**20
COURTS = ("court-1", "court-2", "court-3", "court-4", "court-5", "court-6")


class BenchError(Exception):
    """The benchmark could not measure (a process did not start, an event was lost or doubled)."""


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so that no sandbox outlives a killed run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wall_ms() -> int:
    return int(time.time() * 1000)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the events ----------------------------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    return repo.iso(dt)


def access_decided(rng: random.Random, session_id: str | None, member: str | None, action: str) -> NewEvent:
    """An access.decided event as agent/access.py writes it (~300 bytes of JSON)."""
    court = rng.choice(COURTS)
    device = f"reader-{court}"
    granted = session_id is not None
    data = {
        "device_id": device,
        "court_id": court,
        "card_id": f"{rng.getrandbits(56):014X}",
        "result": "granted" if granted else "denied",
        "action": action if granted else "none",
        "reason": "ok" if granted else "unknown_card",
        "member_id": member,
        "list_version": 1042,
        "msg_id": repo.new_id(),
        "session_id": session_id,
    }
    return NewEvent("access.decided", data, session_id=session_id, device_id=device)


def session_started(rng: random.Random, session_id: str, member: str, at: datetime) -> NewEvent:
    court = rng.choice(COURTS)
    device = f"reader-{court}"
    data = {
        "session_id": session_id,
        "member_id": member,
        "court_id": court,
        "card_id": f"{rng.getrandbits(56):014X}",
        "device_id": device,
        "started_at": _iso(at),
        "credits_spent": 1,
        "list_version": 1042,
    }
    return NewEvent("session.started", data, session_id=session_id, device_id=device)


def session_ended(session_id: str, member: str, court: str, started: datetime, ended: datetime) -> NewEvent:
    data = {
        "session_id": session_id,
        "member_id": member,
        "court_id": court,
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "duration_minutes": int((ended - started).total_seconds() // 60),
        "end_reason": "tap",
    }
    return NewEvent("session.ended", data, session_id=session_id, device_id=f"reader-{court}")


@dataclass
class _Open:
    session_id: str
    member: str
    court: str
    started: datetime


def club_day(n: int, seed: int, *, ziggy_only: bool = False) -> Iterator[NewEvent]:
    """`n` events as a busy club produces them: check-in taps (access.decided + session.started) and check-out taps
    (access.decided + session.ended) of up to OPEN_SESSIONS overlapping sessions, a few denied taps.

    `ziggy_only`: only the session events (what Ziggy is sent). Every session has its own member, so Ziggy's "one
    active session per user" never refuses a check-in."""
    rng = random.Random(seed)
    at = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    open_: list[_Open] = []
    made = 0
    sessions = 0
    while made < n:
        at += timedelta(seconds=rng.randint(5, 40))
        out: list[NewEvent] = []
        r = rng.random()
        if not ziggy_only and r < DENIED_SHARE:
            out.append(access_decided(rng, None, None, "none"))
        elif open_ and (len(open_) >= OPEN_SESSIONS or r < 0.5):
            s = open_.pop(rng.randrange(len(open_)))
            if not ziggy_only:
                out.append(access_decided(rng, s.session_id, s.member, "checkout"))
            out.append(session_ended(s.session_id, s.member, s.court, s.started, at))
        else:
            sessions += 1
            session_id, member = repo.new_id(), f"m-{seed:02d}-{sessions:07d}"
            started = session_started(rng, session_id, member, at)
            if not ziggy_only:
                out.append(access_decided(rng, session_id, member, "checkin"))
            out.append(started)
            open_.append(_Open(session_id, member, started.data["court_id"], at))
        for ev in out[: n - made]:
            made += 1
            yield ev


def stamp_now() -> Stamp:
    return Stamp(datetime.now(UTC), time.monotonic_ns(), BOOT_ID, True)


def json_size(data: dict[str, Any]) -> int:
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


# -- the sandbox in a subprocess -----------------------------------------------------------------------------------


def serve_sandbox() -> int:
    """The child: the in-repo sandbox cloud on a free loopback port until SIGTERM."""
    from agent.sandbox.server import SandboxServer

    die_with_parent()
    configure(json=False, level="warning")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with SandboxServer(SandboxOptions(members=0), host=HOST, port=0) as server:
            print(f"READY {server.url}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SERVE_MAX_S)

    run_async(main())
    return 0


class SandboxProcess:
    """`benchmarks/outbox.py --serve-sandbox` as a context manager: its URL, its pid, the agent's settings for it."""

    def __init__(self, root: Path) -> None:
        self.log_path = root / "sandbox.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def settings(self) -> AgentSettings:
        return AgentSettings.of(SandboxOptions(members=0), self.url)  # the child's options: the same credentials

    def __enter__(self) -> SandboxProcess:
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve-sandbox"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parent.parent,
            )
        try:
            line = self._read_line(time.monotonic() + START_TIMEOUT_S)
            if not line.startswith("READY "):
                raise BenchError(f"the sandbox did not start ({line!r}): {self.log_tail()}")
            self.url = line.split()[1]
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_line(self, deadline: float) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        out = self._proc.stdout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self._proc.poll() is not None:
                return buf.decode(errors="replace")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    return buf.decode(errors="replace")
                buf += chunk
        return buf.decode(errors="replace").strip()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()


class SandboxControl:
    """The sandbox's oracle and controls (/_sandbox/), from the benchmark's own HTTP client."""

    def __init__(self, url: str) -> None:
        self._client = httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self) -> dict[str, Any]:
        response = await self._client.get("/_sandbox/health")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def accepted(self) -> int:
        return int((await self.health())["events_accepted"])

    async def reset(self) -> None:
        (await self._client.post("/_sandbox/reset")).raise_for_status()

    async def received(self, **params: str) -> list[dict[str, Any]]:
        response = await self._client.get("/_sandbox/received", params=params)
        response.raise_for_status()
        entries: list[dict[str, Any]] = response.json()["entries"]
        return entries


def cloud_destination(settings: AgentSettings) -> CloudDestination:
    section = CloudSection(
        base_url=settings.cloud_base_url, token_url=settings.token_url, client_id=settings.cloud_client_id
    )
    return CloudDestination(section, settings.cloud_client_secret, settings.signing_secret, AGENT_ID)


def ziggy_destination(settings: AgentSettings, db: Database) -> ZiggyDestination:
    section = ZiggySection(base_url=settings.ziggy_base_url, client_id=settings.ziggy_client_id)
    return ZiggyDestination(section, settings.ziggy_api_key, db)


# -- durable enqueue -----------------------------------------------------------------------------------------------


@dataclass
class Durability:
    journal_mode: str
    synchronous: int

    def text(self) -> str:
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return f"journal_mode={self.journal_mode}, synchronous={names.get(self.synchronous, self.synchronous)}"


def envelope(ev: NewEvent) -> dict[str, Any]:
    """The peer's item: the same event the agent stores (a fresh event id, the stamps, the data)."""
    stamp = stamp_now()
    return {
        "event_id": repo.new_id(),
        "type": ev.type,
        "occurred_at": repo.to_ms(stamp.wall),
        "mono_ns": stamp.mono_ns,
        "boot_id": stamp.boot_id,
        "clock_synced": stamp.clock_synced,
        "session_id": ev.session_id,
        "device_id": ev.device_id,
        "data": ev.data,
    }


def slices(items: Sequence[NewEvent], producers: int) -> list[Sequence[NewEvent]]:
    """Items dealt to producers round-robin, as taps arrive from several readers."""
    return [items[k::producers] for k in range(producers) if items[k::producers]]


async def agent_chunk(db: Database, items: Sequence[NewEvent], producers: int) -> None:
    """Items as decisions commit them: each through `Database.write` (event + delivery rows via append_events),
    `producers` callers at once, each awaiting its item's durable commit before its next one."""

    async def producer(mine: Sequence[NewEvent]) -> None:
        for ev in mine:
            await db.write("recording a decision", repo.append_events, stamp_now(), [ev])

    await asyncio.gather(*(producer(mine) for mine in slices(items, producers)))


def peer_chunk(queue: SQLiteAckQueue, pool: ThreadPoolExecutor, items: Sequence[NewEvent], producers: int) -> None:
    """The same on persist-queue: `producers` threads, each put returning after its own commit."""

    def producer(mine: Sequence[NewEvent]) -> None:
        for ev in mine:
            queue.put(envelope(ev))

    if producers == 1:
        producer(items)
        return
    for done in [pool.submit(producer, mine) for mine in slices(items, producers)]:
        done.result()


async def agent_durability(db: Database) -> Durability:
    (mode,) = next(iter(await db.conn.execute_fetchall("PRAGMA journal_mode")))
    (sync,) = next(iter(await db.conn.execute_fetchall("PRAGMA synchronous")))
    return Durability(str(mode), int(sync))


def open_peer(path: Path, *, threads: bool) -> tuple[SQLiteAckQueue, Durability]:
    """persist-queue's ack queue at the agent's durability: WAL, synchronous=FULL, a commit per put.
    `multithreading=True` is its thread-safe mode (one connection, puts serialised by its lock)."""
    queue = SQLiteAckQueue(str(path), multithreading=threads, auto_commit=True)
    putter = queue._putter  # persist-queue offers no option for `synchronous`: set it on its connection
    assert putter is not None
    putter.execute("PRAGMA synchronous = FULL")
    mode = putter.execute("PRAGMA journal_mode").fetchone()[0]
    sync = putter.execute("PRAGMA synchronous").fetchone()[0]
    return queue, Durability(str(mode), int(sync))


# agent and peer at --producers, the access.decided item at --producers, and both sides with one producer
PATHS = ("agent", "peer", "agent_access", "agent_1", "peer_1")


async def enqueue_round(
    base: Path,
    started: Sequence[NewEvent],
    access: Sequence[NewEvent],
    chunk: int,
    producers: int,
    result: EnqueueResult,
) -> dict[str, float]:
    """One round: the paths take turns, `chunk` items at a time (the order rotating), so a slow patch of the disk
    (this VM's fsync latency varies from 0.1 to 5 ms) falls on all of them alike; each path's rate is its items
    over the sum of its own chunks' times."""
    spent = dict.fromkeys(PATHS, 0.0)
    n = len(started)
    dbs = {who: Database(base / who / "agent.db") for who in ("agent", "agent_access", "agent_1")}
    async with contextlib.AsyncExitStack() as stack:
        for db in dbs.values():
            await stack.enter_async_context(db)
            await db.write("enabling", repo.enable_destinations, DESTINATIONS)
        queue, result.peer_durability = open_peer(base / "peer", threads=True)
        queue_1, _ = open_peer(base / "peer_1", threads=False)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=producers, thread_name_prefix="peer"))
        try:
            for i, at in enumerate(range(0, n, chunk)):
                turn = i % len(PATHS)
                for who in PATHS[turn:] + PATHS[:turn]:
                    t0 = time.perf_counter()
                    if who == "agent":
                        await agent_chunk(dbs[who], started[at : at + chunk], producers)
                    elif who == "agent_access":
                        await agent_chunk(dbs[who], access[at : at + chunk], producers)
                    elif who == "agent_1":
                        await agent_chunk(dbs[who], started[at : at + chunk], 1)
                    elif who == "peer":
                        peer_chunk(queue, pool, started[at : at + chunk], producers)
                    else:
                        peer_chunk(queue_1, pool, started[at : at + chunk], 1)
                    spent[who] += time.perf_counter() - t0
            for q in (queue, queue_1):
                if q.qsize() != n:
                    raise BenchError(f"persist-queue holds {q.qsize()} items, expected {n}")
        finally:
            queue.close()
            queue_1.close()
        result.agent_durability = await agent_durability(dbs["agent"])
        result.writes_per_commit.append(dbs["agent"].group_writes / max(1, dbs["agent"].group_commits))
        for who, rows_per_item in (("agent", 2), ("agent_access", 1), ("agent_1", 2)):
            result.queue_per_s.append(n * rows_per_item / await queue_all(dbs[who], DESTINATIONS))
            rows = await dbs[who].fetchall("SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM deliveries)")
            if tuple(rows[0]) != (n, n * rows_per_item):
                raise BenchError(f"agent enqueue ({who}) wrote {tuple(rows[0])} rows, expected {n} events")
    return {who: n / spent[who] for who in PATHS}


@dataclass
class EnqueueResult:
    producers: int
    rates: dict[str, list[float]] = field(default_factory=lambda: {who: [] for who in PATHS})
    ratios: list[float] = field(default_factory=list)
    ratios_1: list[float] = field(default_factory=list)
    writes_per_commit: list[float] = field(default_factory=list)
    queue_per_s: list[float] = field(default_factory=list)  # delivery rows queued per second, after each round
    agent_durability: Durability | None = None
    peer_durability: Durability | None = None
    item_json_bytes: int = 0
    access_json_bytes: int = 0
    peer_item_bytes: int = 0


def run_enqueue(root: Path, args: argparse.Namespace, console: Console) -> EnqueueResult:
    rng = random.Random(args.seed)
    at = datetime.now(UTC)
    started = [session_started(rng, repo.new_id(), f"m-{i:07d}", at) for i in range(args.events)]
    access = [access_decided(rng, repo.new_id(), f"m-{i:07d}", "checkin") for i in range(args.events)]
    result = EnqueueResult(
        producers=args.producers,
        item_json_bytes=round(statistics.mean(json_size(e.data) for e in started)),
        access_json_bytes=round(statistics.mean(json_size(e.data) for e in access)),
        peer_item_bytes=len(pickle.dumps(envelope(started[0]))),
    )
    for r in range(args.repeat):
        base = root / f"enqueue-{r}"
        rates = run_async(enqueue_round(base, started, access, ENQUEUE_CHUNK, args.producers, result))
        for who in PATHS:
            result.rates[who].append(rates[who])
        result.ratios.append(rates["agent"] / rates["peer"])
        result.ratios_1.append(rates["agent_1"] / rates["peer_1"])
        console.print(
            f"[dim]enqueue round {r + 1}/{args.repeat}, {args.producers} producers: agent {rates['agent']:,.0f}/s, "
            f"persist-queue {rates['peer']:,.0f}/s (ratio {result.ratios[-1]:.2f}); one producer: agent "
            f"{rates['agent_1']:,.0f}/s, persist-queue {rates['peer_1']:,.0f}/s (ratio {result.ratios_1[-1]:.2f})"
            f"; {result.writes_per_commit[-1]:.1f} writes per commit[/]"
        )
        shutil.rmtree(base, ignore_errors=True)
    return result


# -- drains --------------------------------------------------------------------------------------------------------


@dataclass
class Drain:
    destination: str
    events: int
    delivered: int = 0
    pending: int = 0
    dead: int = 0
    first_to_last_s: float = 0.0
    start_to_last_s: float = 0.0
    per_s: float = 0.0
    complete: bool = False
    checked: str = ""


async def fill(db: Database, events: Iterator[NewEvent], destinations: Sequence[str]) -> tuple[int, float]:
    """Write events with the agent's own append_events, FILL_CHUNK to a transaction, then queue their delivery
    rows as the destinations' workers do (set-up, not timed as drain). Returns the events written and the
    seconds the queuing took."""
    await db.write("enabling", repo.enable_destinations, destinations)
    written = 0
    chunk: list[NewEvent] = []
    while True:
        chunk.clear()
        for ev in events:
            chunk.append(ev)
            if len(chunk) == FILL_CHUNK:
                break
        if not chunk:
            break
        written += len(await db.write("filling", repo.append_events, stamp_now(), chunk))
    return written, await queue_all(db, destinations)


async def queue_all(db: Database, destinations: Sequence[str]) -> float:
    """Queue every event's delivery rows for `destinations`, in the outbox worker's chunks; returns seconds."""
    t0 = time.perf_counter()
    for name in destinations:
        while await db.write_quietly("queuing", repo.queue_deliveries, name, outbox_module.QUEUE_CHUNK):
            pass
    return time.perf_counter() - t0


async def pending_count(db: Database, destination: str) -> int:
    """What `outbox status` calls pending: rows pending and events not queued yet."""
    [state] = await status.destination_states(db, [destination])
    return state.pending


async def drain(
    db: Database,
    destination: Destination,
    expected: int,
    *,
    delivered_so_far: Callable[[], Awaitable[int]],
    timeout_s: float,
    progress: Callable[[int, float], None] | None = None,
) -> Drain:
    """Run the real Outbox on `destination` until `expected` events are delivered (or `timeout_s`)."""
    name = destination.name
    outbox = Outbox(db, [destination], replay_per_s=REPLAY_PER_S)
    db.on_commit.append(outbox.notify)
    start_ms = wall_ms()
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    next_progress = t0 + PROGRESS_S
    task = asyncio.create_task(outbox.run(), name=f"outbox-{name}")
    result = Drain(name, expected)
    try:
        while time.monotonic() < deadline and not task.done():
            done = await delivered_so_far()
            if done >= expected:
                settle = time.monotonic() + SETTLE_TIMEOUT_S
                # The worker records a batch after the sandbox has answered: poll the rows (no event to await).
                while await pending_count(db, name) and time.monotonic() < settle:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                break
            if progress is not None and time.monotonic() >= next_progress:
                progress(done, time.monotonic() - t0)
                next_progress += PROGRESS_S
            await asyncio.sleep(POLL_S)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        db.on_commit.remove(outbox.notify)
    states = dict(
        (str(r[0]), int(r[1]))
        for r in await db.fetchall("SELECT state, COUNT(*) FROM deliveries WHERE destination = ? GROUP BY 1", (name,))
    )
    result.delivered, result.pending, result.dead = (states.get(s, 0) for s in ("delivered", "pending", "dead"))
    result.complete = result.delivered == expected
    row = await db.fetchone(
        "SELECT MIN(delivered_at), MAX(delivered_at) FROM deliveries WHERE destination = ? AND state = 'delivered'",
        (name,),
    )
    if row is not None and row[0] is not None:
        first, last = int(row[0]), int(row[1])
        after = await db.fetchone(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ? AND state = 'delivered' AND delivered_at > ?",
            (name, first),
        )
        result.first_to_last_s = (last - first) / 1000
        result.start_to_last_s = (last - start_ms) / 1000
        if last > first and after is not None:
            result.per_s = int(after[0]) / result.first_to_last_s
    return result


def in_flight(run: Drain, batch_size: int) -> int:
    """How many events the sandbox may have that the database does not call delivered: none after a complete
    drain; one batch when the drain was cut short (its answer never recorded: re-sent and de-duplicated later)."""
    return 0 if run.complete else batch_size


async def check_cloud(db: Database, control: SandboxControl, run: Drain) -> None:
    """The sandbox accepted exactly the database's delivered cloud events, each once."""
    accepted = await control.accepted()
    extra = accepted - run.delivered
    if not 0 <= extra <= in_flight(run, CloudDestination.batch_size):
        raise BenchError(f"cloud: the sandbox accepted {accepted} events, the database says {run.delivered}")
    note = f" (+{extra} in flight when cut short)" if extra else ""
    if accepted > RECEIVED_CHECK_MAX:
        run.checked = f"sandbox accepted {accepted:,} distinct events (its de-duplication count) = rows delivered{note}"
        return
    ids = [e["event_id"] for e in await control.received(kind="event")]
    rows = await db.fetchall(
        "SELECT e.event_id FROM events e JOIN deliveries d ON d.seq = e.seq"
        " WHERE d.destination = 'cloud' AND d.state = 'delivered'"
    )
    ours = {str(r[0]) for r in rows}
    if len(ids) != len(set(ids)) or not ours <= set(ids) or len(set(ids) - ours) != extra:
        raise BenchError(f"cloud: received {len(ids)} events ({len(set(ids))} distinct), delivered {len(ours)}")
    run.checked = f"received log: {len(ids):,} events, each once, = the delivered event ids{note}"


async def check_ziggy(db: Database, control: SandboxControl, run: Drain) -> None:
    """Ziggy acted exactly once per delivered event (its Idempotency-Key is the event id)."""
    acted: Counter[str] = Counter()
    for route in ("ziggy.checkin", "ziggy.checkout"):
        for entry in await control.received(kind="call", route=route):
            if entry["acted"]:
                acted[str(entry["idempotency_key"])] += 1
    rows = await db.fetchall(
        "SELECT e.event_id FROM events e JOIN deliveries d ON d.seq = e.seq"
        " WHERE d.destination = 'ziggy' AND d.state = 'delivered'"
    )
    ours = {str(r[0]) for r in rows}
    twice = sum(1 for n in acted.values() if n > 1)
    extra = len(set(acted) - ours)
    if twice or not ours <= set(acted) or extra > in_flight(run, ZiggyDestination.batch_size):
        raise BenchError(f"ziggy: {len(acted)} events acted on ({twice} more than once), delivered {len(ours)}")
    note = f" (+{extra} in flight when cut short)" if extra else ""
    run.checked = f"{len(acted):,} check-in/check-out calls acted, each once, = the delivered event ids{note}"


async def drain_round(
    root: Path, sandbox: SandboxProcess, kind: str, n: int, seed: int, timeout_s: float, console: Console
) -> Drain:
    control = SandboxControl(sandbox.url)
    try:
        await control.reset()
        async with Database(root / "agent.db") as db:
            written, queue_s = await fill(db, club_day(n, seed, ziggy_only=kind == "ziggy"), (kind,))
            console.print(f"[dim]{kind}: {written:,} events queued for delivery in {queue_s:.2f} s[/]")
            rows = await db.fetchone("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
            if rows is None or rows[0] != n:
                raise BenchError(f"{kind}: {written} events written but not {n} delivery rows")
            if kind == "cloud":
                run = await drain(
                    db, cloud_destination(sandbox.settings), n, delivered_so_far=control.accepted, timeout_s=timeout_s
                )
                await check_cloud(db, control, run)
            else:

                async def delivered() -> int:
                    return n - await pending_count(db, "ziggy")

                run = await drain(
                    db,
                    ziggy_destination(sandbox.settings, db),
                    n,
                    delivered_so_far=delivered,
                    timeout_s=timeout_s,
                )
                await check_ziggy(db, control, run)
    finally:
        await control.aclose()
    if not run.complete:
        console.print(f"[yellow]{kind} drain incomplete after {timeout_s:g} s: {run.delivered:,} of {n:,}[/]")
    return run


# -- the backlog ---------------------------------------------------------------------------------------------------

_EVENT_INSERT = (
    "INSERT INTO events (seq, event_id, type, occurred_at, mono_ns, boot_id, clock_synced, session_id, device_id,"
    " data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def bulk_fill(path: Path, n: int, seed: int, console: Console) -> float:
    """N pending cloud events straight into the schema (set-up only: not the agent's write path)."""
    t0 = time.perf_counter()
    run_async(_create(path))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        wall = wall_ms()
        events: list[tuple[Any, ...]] = []
        for seq, ev in enumerate(club_day(n, seed), 1):
            data = json.dumps(ev.data, separators=(",", ":"), ensure_ascii=False)
            events.append((seq, repo.new_id(), ev.type, wall, seq, BOOT_ID, 1, ev.session_id, ev.device_id, data))
            if len(events) == BULK_CHUNK or seq == n:
                conn.execute("BEGIN")
                conn.executemany(_EVENT_INSERT, events)
                conn.executemany(
                    "INSERT INTO deliveries (destination, seq) VALUES ('cloud', ?)", ((e[0],) for e in events)
                )
                conn.execute("COMMIT")
                events.clear()
                if seq % 200_000 == 0 or seq == n:
                    console.print(f"[dim]backlog fill: {seq:,} / {n:,} events ({time.perf_counter() - t0:.0f} s)[/]")
        # queued as the cloud's worker queues them while the cloud is down: every event has its row
        conn.execute("INSERT OR REPLACE INTO delivery_cursors (destination, upto) VALUES ('cloud', ?)", (n,))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - t0


async def _create(path: Path) -> None:
    async with Database(path):
        pass


@dataclass
class QueryTiming:
    name: str
    ms: float | None  # None: interrupted after QUERY_CAP_S
    rows: int
    plan: list[str]


def time_due_queries(path: Path, batch_size: int) -> list[QueryTiming]:
    """The outbox's due-event queries on the filled backlog, as the cloud and Ziggy workers issue them."""
    now = wall_ms()
    half = batch_size // 2
    queries = [
        ("due oldest (relaxed), cloud", outbox_module._DUE_RELAXED, ("cloud", now, "cloud", now, batch_size - half)),
        ("due freshest, cloud", outbox_module._DUE_FRESH, ("cloud", now, "cloud", half)),
        ("due freshest, LIMIT 1 (Ziggy's)", outbox_module._DUE_FRESH, ("cloud", now, "cloud", 1)),
        (
            "idle: earliest retry",
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ? AND state = 'pending'",
            ("cloud",),
        ),
    ]
    out = []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for name, sql, params in queries:
            plan = [str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]

            def too_long(until: float = time.monotonic() + QUERY_CAP_S) -> int:
                return int(time.monotonic() > until)

            conn.set_progress_handler(too_long, 100_000)
            t0 = time.perf_counter()
            try:
                rows = len(conn.execute(sql, params).fetchall())
                ms: float | None = (time.perf_counter() - t0) * 1000
            except sqlite3.OperationalError:
                rows, ms = 0, None
            conn.set_progress_handler(None, 0)
            out.append(QueryTiming(name, ms, rows, plan))
    finally:
        conn.close()
    return out


class RssSampler:
    """This process's and the sandbox's RSS every RSS_SAMPLE_S, on a thread of its own."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: dict[str, list[int]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> dict[str, int]:
        now = {}
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                now[name] = int(proc.memory_info().rss)
                self.samples[name].append(now[name])
        return now

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def last(self, name: str) -> int:
        return self.samples[name][-1] if self.samples[name] else 0


@dataclass
class Backlog:
    events: int
    fill_s: float
    queries: list[QueryTiming]
    run: Drain
    rss: dict[str, list[int]]
    wall_s: float


def run_backlog(root: Path, sandbox: SandboxProcess, args: argparse.Namespace, console: Console) -> Backlog:
    path = root / "backlog" / "agent.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = args.backlog
    console.print(f"[dim]backlog: bulk-inserting {n:,} pending cloud events into {path}...[/]")
    fill_s = bulk_fill(path, n, args.seed + 7, console)
    console.print(f"[dim]backlog: {path.stat().st_size / MB:,.0f} MB; timing the outbox's due queries...[/]")
    queries = time_due_queries(path, CloudDestination.batch_size)
    for q in queries:
        took = f"{q.ms:,.1f} ms" if q.ms is not None else f"> {QUERY_CAP_S:g} s (interrupted)"
        console.print(f"[dim]  {q.name}: {took}, {q.rows} rows; plan: {' / '.join(q.plan)}[/]")

    async def main() -> tuple[Drain, dict[str, list[int]], float]:
        control = SandboxControl(sandbox.url)
        try:
            await control.reset()
            async with Database(path) as db:
                with RssSampler({"agent": os.getpid(), "sandbox": sandbox.pid}) as rss:

                    def progress(done: int, elapsed: float) -> None:
                        console.print(
                            f"backlog: {done:,} / {n:,} delivered in {elapsed:,.0f} s ({done / elapsed:,.0f}/s); "
                            f"RSS {rss.last('agent') / MB:,.1f} MB (sandbox {rss.last('sandbox') / MB:,.0f} MB)",
                            highlight=False,
                        )

                    t0 = time.monotonic()
                    run = await drain(
                        db,
                        cloud_destination(sandbox.settings),
                        n,
                        delivered_so_far=control.accepted,
                        timeout_s=args.backlog_timeout,
                        progress=progress,
                    )
                    wall_s = time.monotonic() - t0
                await check_cloud(db, control, run)
                return run, rss.samples, wall_s
        finally:
            await control.aclose()

    run, samples, wall_s = run_async(main())
    return Backlog(n, fill_s, queries, run, samples, wall_s)


# -- report --------------------------------------------------------------------------------------------------------


def fs_of(path: Path) -> str:
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    return f"{best.mountpoint} ({best.fstype}, {best.device})" if best is not None else "?"


def rates_text(values: Sequence[float]) -> str:
    return f"{median(values):,.0f}/s  (rounds: {', '.join(f'{v:,.0f}' for v in values)})"


def drain_text(runs: Sequence[Drain]) -> str:
    rounds = ", ".join(
        f"{r.per_s:,.0f}/s ({r.delivered:,} in {r.first_to_last_s:.2f} s{'' if r.complete else ', INCOMPLETE'})"
        for r in runs
    )
    return f"{median([r.per_s for r in runs]):,.0f}/s  (rounds: {rounds})"


def report(
    console: Console,
    args: argparse.Namespace,
    root: Path,
    enq: EnqueueResult | None,
    drains: dict[str, list[Drain]],
    backlog: Backlog | None,
) -> dict[str, Any]:
    table = Table(title="outbox benchmark (loopback, one temporary directory)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("temporary directory", f"{root} on {fs_of(root)}")
    summary: dict[str, Any] = {"bench": "outbox"}
    if enq is not None:
        assert enq.agent_durability is not None
        assert enq.peer_durability is not None
        ratio = median(enq.ratios)
        table.add_row(
            "enqueue items",
            f"{args.events:,} per path per round, {args.repeat} round(s), medians; session.started data "
            f"{enq.item_json_bytes} B JSON (peer: the whole event pickled, {enq.peer_item_bytes} B)",
        )
        many = f"{enq.producers} producers"
        table.add_row(f"agent, {many}: session.started event", rates_text(enq.rates["agent"]))
        table.add_row(f"persist-queue SQLiteAckQueue put, {many}", rates_text(enq.rates["peer"]))
        table.add_row(
            f"enqueue_ratio (agent / peer, {many})",
            f"{ratio:.2f}  (rounds: {', '.join(f'{r:.2f}' for r in enq.ratios)})",
        )
        table.add_row(
            f"  agent writes per commit, {many}",
            ", ".join(f"{w:.1f}" for w in enq.writes_per_commit) + " (group commit)",
        )
        table.add_row(
            "  then: delivery rows queued by the workers (info)",
            f"{median(enq.queue_per_s):,.0f} rows/s (each path, each round; checked: every event has its rows)",
        )
        table.add_row("agent, one producer (info)", rates_text(enq.rates["agent_1"]))
        table.add_row("persist-queue, one producer (info)", rates_text(enq.rates["peer_1"]))
        table.add_row(
            "  ratio, one producer (info)",
            f"{median(enq.ratios_1):.2f}  (rounds: {', '.join(f'{r:.2f}' for r in enq.ratios_1)})",
        )
        table.add_row(
            f"agent, {many}: access.decided event (info)",
            f"{rates_text(enq.rates['agent_access'])}; data {enq.access_json_bytes} B",
        )
        table.add_row(
            "durability, agent",
            f"{enq.agent_durability.text()} (read back); each write answered only after the COMMIT of its "
            "transaction (Database.write: one transaction per group of writes queued together)",
        )
        table.add_row(
            "durability, persist-queue",
            f"{enq.peer_durability.text()} (read back on its put connection); auto_commit=True: one commit per put; "
            "PRAGMA synchronous = FULL set on its _putter (no option for it); WAL is its own default",
        )
        summary |= {
            "enqueue_per_s": round(median(enq.rates["agent"]), 1),
            "peer_enqueue_per_s": round(median(enq.rates["peer"]), 1),
            "enqueue_ratio": round(ratio, 3),
            "enqueue_producers": enq.producers,
            "enqueue_ratio_one_producer": round(median(enq.ratios_1), 3),
            "enqueue_one_producer_per_s": round(median(enq.rates["agent_1"]), 1),
            "peer_enqueue_one_producer_per_s": round(median(enq.rates["peer_1"]), 1),
            "writes_per_commit": round(median(enq.writes_per_commit), 2),
            "queue_rows_per_s": round(median(enq.queue_per_s), 1),
            "enqueue_access_decided_per_s": round(median(enq.rates["agent_access"]), 1),
        }
    else:
        summary |= {"enqueue_per_s": None, "peer_enqueue_per_s": None, "enqueue_ratio": None}
    for kind, key in (("cloud", "drain_per_s"), ("ziggy", "ziggy_drain_per_s")):
        runs = drains.get(kind, [])
        if runs:
            n = runs[0].events
            table.add_row(f"drain {kind} ({n:,} events, first->last)", drain_text(runs))
            table.add_row(f"  {kind}: start -> last delivered", ", ".join(f"{r.start_to_last_s:.2f} s" for r in runs))
            table.add_row(f"  {kind}: check", runs[-1].checked)
            summary[key] = round(median([r.per_s for r in runs]), 1)
        else:
            summary[key] = None
    if backlog is not None:
        b = backlog
        agent_rss, sandbox_rss = b.rss.get("agent", []), b.rss.get("sandbox", [])
        growth = (max(agent_rss) - agent_rss[0]) / MB if agent_rss else float("nan")
        table.add_row("backlog", f"{b.events:,} pending cloud events, bulk-inserted in {b.fill_s:.1f} s (set-up)")
        for q in b.queries:
            took = f"{q.ms:,.1f} ms" if q.ms is not None else f"> {QUERY_CAP_S:g} s, interrupted"
            table.add_row(f"  {q.name}", f"{took}; {' / '.join(q.plan)}")
        state = "complete" if b.run.complete else f"INCOMPLETE after --backlog-timeout {args.backlog_timeout:g} s"
        table.add_row(
            "backlog drain",
            f"{b.run.delivered:,} of {b.events:,} delivered ({state}); {b.run.per_s:,.1f}/s first->last "
            f"({b.run.first_to_last_s:,.1f} s), {b.run.delivered / b.wall_s:,.1f}/s over {b.wall_s:,.1f} s",
        )
        if agent_rss:
            table.add_row(
                "backlog RSS, this process",
                f"start {agent_rss[0] / MB:.1f} MB, max {max(agent_rss) / MB:.1f} MB, end {agent_rss[-1] / MB:.1f} "
                f"MB; growth {growth:.1f} MB ({len(agent_rss)} samples)",
            )
        if sandbox_rss:
            table.add_row(
                "backlog RSS, sandbox process",
                f"start {sandbox_rss[0] / MB:.0f} MB, max {max(sandbox_rss) / MB:.0f} MB, end "
                f"{sandbox_rss[-1] / MB:.0f} MB (its de-duplication set and received log: not the agent's)",
            )
        table.add_row("  check", b.run.checked)
        summary |= {
            "backlog": b.events,
            "backlog_delivered": b.run.delivered,
            "backlog_complete": b.run.complete,
            "backlog_drain_per_s": round(b.run.per_s, 1),
            "backlog_rss_growth_mb": round(growth, 1),
        }
    else:
        summary |= {"backlog": None, "backlog_drain_per_s": None, "backlog_rss_growth_mb": None}
    console.print(table)
    checks = []
    if summary.get("enqueue_ratio") is not None:
        checks.append((f"enqueue_ratio >= {BUDGET_RATIO:g}x", summary["enqueue_ratio"] >= BUDGET_RATIO, "x"))
    if summary.get("drain_per_s") is not None:
        checks.append(
            (f"cloud drain >= {BUDGET_DRAIN_PER_S:,.0f}/s", summary["drain_per_s"] >= BUDGET_DRAIN_PER_S, "/s")
        )
    if backlog is not None:
        checks.append((f"{backlog.events:,} backlog drained", backlog.run.complete, ""))
    for name, ok, _ in checks:
        console.print(f"budget {name:<32} {'[green]PASS[/]' if ok else '[red]FAIL[/]'}")
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=None, help="enqueue: items per path per round (default 5000)")
    p.add_argument("--repeat", type=int, default=None, help="rounds of enqueue and drains; medians (default 3)")
    p.add_argument(
        "--producers",
        type=int,
        default=8,
        help="enqueue: concurrent producers, each awaiting its own item (default 8, a club's readers)",
    )
    p.add_argument("--drain-events", type=int, default=None, help="cloud drain: events (default 20000)")
    p.add_argument("--ziggy-events", type=int, default=None, help="Ziggy drain: events (default 20000)")
    p.add_argument("--backlog", type=int, default=None, help="backlog: pending events (default 1000000)")
    p.add_argument(
        "--quick", action="store_true", help="a short run: backlog 100000, 1 round, 2000 items, 5000-event drains"
    )
    p.add_argument("--drain-timeout", type=float, default=300.0, help="seconds a drain may take (default 300)")
    p.add_argument("--backlog-timeout", type=float, default=600.0, help="seconds the backlog drain may take (600)")
    p.add_argument("--only", default="enqueue,drain,backlog", help="comma list of enqueue, drain, backlog")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated events (default 1)")
    p.add_argument("--tmp", type=Path, default=None, help="where the temporary directory goes (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--serve-sandbox", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, short in (
        ("events", 5000, 2000),
        ("repeat", 3, 1),
        ("drain_events", 20_000, 5000),
        ("ziggy_events", 20_000, 5000),
        ("backlog", 1_000_000, 100_000),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.parts = {s.strip() for s in args.only.split(",") if s.strip()}
    if not args.parts <= {"enqueue", "drain", "backlog"}:
        p.error("--only takes enqueue, drain, backlog")
    if not 1 <= args.events <= 1_000_000:
        p.error("--events must be 1..1000000")
    if not 1 <= args.producers <= 64:
        p.error("--producers must be 1..64")
    if not 1 <= args.repeat <= 20:
        p.error("--repeat must be 1..20")
    for name in ("drain_events", "ziggy_events"):
        if not 10 <= getattr(args, name) <= 1_000_000:
            p.error(f"--{name.replace('_', '-')} must be 10..1000000")
    if not 1000 <= args.backlog <= 10_000_000:
        p.error("--backlog must be 1000..10000000")
    if not 1 <= args.drain_timeout <= 7200 or not 1 <= args.backlog_timeout <= 6 * 3600:
        p.error("--drain-timeout is 1..7200 s, --backlog-timeout 1..21600 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sandbox:
        return serve_sandbox()
    configure(json=False, level="warning")  # as `club-agent run`, quieter: a retry warning would show here
    limit_malloc_growth()  # as Agent.run does
    console = Console(width=max(120, shutil.get_terminal_size((140, 40)).columns))
    root = Path(tempfile.mkdtemp(prefix="outbox-bench-", dir=args.tmp))
    enq: EnqueueResult | None = None
    drains: dict[str, list[Drain]] = {}
    backlog: Backlog | None = None
    failed = False
    try:
        if "enqueue" in args.parts:
            console.print(f"[dim]enqueue: {args.events:,} items per path, {args.repeat} round(s), in {root}[/]")
            enq = run_enqueue(root, args, console)
        if args.parts & {"drain", "backlog"}:
            with SandboxProcess(root) as sandbox:
                console.print(f"[dim]sandbox on {sandbox.url} (pid {sandbox.pid})[/]")
                if "drain" in args.parts:
                    for r in range(args.repeat):
                        for kind, n in (("cloud", args.drain_events), ("ziggy", args.ziggy_events)):
                            where = root / f"drain-{kind}-{r}"
                            run = asyncio_run_drain(where, sandbox, kind, n, args.seed + r, args.drain_timeout, console)
                            drains.setdefault(kind, []).append(run)
                            console.print(
                                f"[dim]drain {kind} round {r + 1}/{args.repeat}: {run.per_s:,.0f}/s "
                                f"({run.delivered:,}/{n:,} in {run.first_to_last_s:.2f} s first->last)[/]"
                            )
                            shutil.rmtree(where, ignore_errors=True)
                if "backlog" in args.parts:
                    backlog = run_backlog(root, sandbox, args, console)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        failed = True
    finally:
        if args.keep:
            console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = report(console, args, root, enq, drains, backlog)
    sys.stdout.flush()
    print(json.dumps(summary))
    return 2 if failed else 0


def asyncio_run_drain(
    root: Path, sandbox: SandboxProcess, kind: str, n: int, seed: int, timeout_s: float, console: Console
) -> Drain:
    root.mkdir(parents=True, exist_ok=True)
    return run_async(drain_round(root, sandbox, kind, n, seed, timeout_s, console))


if __name__ == "__main__":
    sys.exit(main())
