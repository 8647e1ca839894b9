"""Tap latency under load: a real agent subprocess, 100,000 cached members, chattering tablets, busy readers.

    .venv/bin/python benchmarks/tap_latency.py [--members 100000] [--taps 2000] [--devices 100]
                                               [--heartbeat-hz 1.0] [--readers 8] [--tap-hz 5]

1. A temporary data dir with a TOML config (4 courts, the readers, `--devices` tablets used as heartbeat
   devices, random passwords with argon2 hashes, loopback ports) and a members JSON file, imported with the
   real CLI (`club-agent members import ... --synced`, timed).
2. `python -m agent.cli run --config ...` as a subprocess, so its resident memory is measured alone.
3. The tablets connect (a few at a time: the agent verifies argon2 hashes one at a time) and publish
   `tablet/{id}/status` heartbeats at `--heartbeat-hz` each, staggered, for the whole measurement.
4. The readers tap, one presentation at a time each (a tap waits for its reply), `--tap-hz` times a second
   each (0: back to back, a saturation test): new players drawn uniformly from the members plus ~5% unknown
   cards check in, and players on court tap out again, so occupancy stays bounded as in a club. The first
   `--warmup` taps are not counted.
5. The agent's RSS is sampled every 0.5 s and its CPU time is measured over the tap phase.
6. SIGTERM stops the agent; its exit code must be 0 (or -15).

Prints a table, then as the very last line of stdout one JSON object. Exit code 0 within budget, 1 otherwise.
Everything runs on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from rich.console import Console
from rich.table import Table

from agent import sim
from agent.lan import topics
from agent.lan.auth import hash_password

HOST = "127.0.0.1"
COURTS = ("c1", "c2", "c3", "c4")
BUDGET_P99_MS = 20.0
BUDGET_RSS_MB = 150.0
UNKNOWN_SHARE = 0.05
# Half the taps of a reader with players on court are those players leaving, so occupancy stays bounded
# (a busy padel court has four to eight players, not hundreds).
CHECKOUT_SHARE = 0.5
MAX_ON_COURT = 12
# The agent's per-reader scan limit is raised to its maximum for the benchmark (readers here tap back to back);
# the readers keep to a client-side bucket just inside it so that no tap is rate-limited.
SCAN_RATE_PER_S = 100.0
SCAN_BURST = 1000
CLIENT_RATE_PER_S = 95.0
CLIENT_BURST = 900
REPLY_TIMEOUT_S = 5.0
START_TIMEOUT_S = 20.0
CONNECT_CONCURRENCY = 10
RSS_SAMPLE_S = 0.5
STOP_TIMEOUT_S = 10.0
IMPORT_TIMEOUT_S = 600.0
BENCH_TIMEOUT_S = 1800.0
MAX_TAP_ERRORS = 50  # a reader gives up after this many failed taps in a row
FIRST_NAMES = ("Ana", "Bruno", "Carla", "Diego", "Eduarda", "Felipe", "Gabriela", "Henrique", "Isabela", "João")


# -- set-up ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    id: str
    kind: str
    court: str | None
    password: str


@dataclass(frozen=True)
class Setup:
    root: Path
    config_path: Path
    members_path: Path
    log_path: Path
    broker_port: int
    api_port: int
    readers: list[Device]
    tablets: list[Device]
    cards: list[str]
    unknown_cards: list[str]
    tap_pool: list[str]  # the member cards taps draw from (all of them unless --active-cards)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open until every port is chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_str(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


def make_cards(rng: random.Random, members: int, unknown: int) -> tuple[list[str], list[str]]:
    seen: set[str] = set()
    cards: list[str] = []
    while len(cards) < members:  # bounded: 64-bit collisions are vanishingly rare
        card = f"{rng.getrandbits(64):016X}"
        if card not in seen:
            seen.add(card)
            cards.append(card)
    unknowns: list[str] = []
    while len(unknowns) < unknown:
        card = f"{rng.getrandbits(64):016X}"
        if card not in seen:
            seen.add(card)
            unknowns.append(card)
    return cards, unknowns


def write_members(path: Path, cards: Sequence[str]) -> None:
    members = [
        {
            "member_id": f"m{i + 1:06d}",
            "first_name": FIRST_NAMES[i % len(FIRST_NAMES)],
            "status": "active",
            "cards": [card],
            "requires_credit": False,
            "groups": [],
        }
        for i, card in enumerate(cards)
    ]
    path.write_text(json.dumps({"members": members}, separators=(",", ":")), encoding="utf-8")


def write_config(
    path: Path,
    data_dir: Path,
    broker_port: int,
    api_port: int,
    devices: Sequence[Device],
    *,
    publish_rate_per_s: float | None = None,
) -> None:
    """`publish_rate_per_s`: the broker's per-device limit (None: the agent's default; 0: none)."""
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:  # argon2 releases the GIL
        hashes = list(pool.map(hash_password, [d.password for d in devices]))
    lines = [
        "# Generated by benchmarks/tap_latency.py",
        "[agent]",
        'club_id = "bench-club"',
        'agent_id = "bench-edge"',
        'name = "Benchmark Club"',
        f"data_dir = {toml_str(str(data_dir))}",
        "trust_clock = true",
        "",
        "[broker]",
        f"host = {toml_str(HOST)}",
        f"port = {broker_port}",
        *([] if publish_rate_per_s is None else [f"publish_rate_per_s = {publish_rate_per_s:g}"]),
        "",
        "[api]",
        f"host = {toml_str(HOST)}",
        f"port = {api_port}",
        "",
        "[policy]",
        "debounce_s = 0",
        "second_tap_grace_s = 0",
        f"scan_rate_per_s = {SCAN_RATE_PER_S}",
        f"scan_burst = {SCAN_BURST}",
        "",
    ]
    for court in COURTS:
        lines += ["[[courts]]", f"id = {toml_str(court)}", f'name = "Court {court}"', "access_groups = []", ""]
    for device, password_hash in zip(devices, hashes, strict=True):
        lines += ["[[devices]]", f"id = {toml_str(device.id)}", f"kind = {toml_str(device.kind)}"]
        if device.court is not None:
            lines.append(f"court = {toml_str(device.court)}")
        lines += [f"password_hash = {toml_str(password_hash)}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def build(root: Path, args: argparse.Namespace) -> Setup:
    rng = random.Random(args.seed)
    readers = [
        Device(f"r{n}", "reader", COURTS[(n - 1) % len(COURTS)], secrets.token_urlsafe(18))
        for n in range(1, args.readers + 1)
    ]
    tablets = [Device(f"t{n:03d}", "tablet", None, secrets.token_urlsafe(18)) for n in range(1, args.devices + 1)]
    broker_port, api_port = free_ports(2)
    cards, unknown = make_cards(rng, args.members, max(100, args.members // 100))
    config_path, members_path = root / "agent.toml", root / "members.json"
    # Back to back (--tap-hz 0) is a saturation run: a reader at hundreds of taps a second would meet the
    # broker's per-device limit (20/s), which is what it is for, but not what this measures.
    limit = 0.0 if args.tap_hz <= 0 else None
    write_config(config_path, root / "data", broker_port, api_port, readers + tablets, publish_rate_per_s=limit)
    write_members(members_path, cards)
    return Setup(
        root=root,
        config_path=config_path,
        members_path=members_path,
        log_path=root / "agent.log",
        broker_port=broker_port,
        api_port=api_port,
        readers=readers,
        tablets=tablets,
        cards=cards,
        unknown_cards=unknown,
        tap_pool=rng.sample(cards, args.active_cards) if 0 < args.active_cards < len(cards) else cards,
    )


def clean_env() -> dict[str, str]:
    """The environment without CLUB_AGENT_* overrides, which would change the configuration under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")}


def club_agent_command() -> list[str]:
    script = Path(sys.executable).parent / "club-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def import_members(setup: Setup) -> tuple[float, str]:
    cmd = [
        *club_agent_command(),
        "members",
        "import",
        str(setup.members_path),
        "--config",
        str(setup.config_path),
        "--synced",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=setup.root, env=clean_env(), capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"members import failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return elapsed, " ".join(done.stdout.split())


# -- measurement -------------------------------------------------------------------------------------------------


@dataclass
class HeartbeatStats:
    connected: int = 0
    connect_failed: int = 0
    sent: int = 0
    errors: int = 0


@dataclass
class TapStats:
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    errors: int = 0


async def court_state_sizes(setup: Setup) -> dict[str, int]:
    """Bytes of each retained court/{c}/state, read by a second connection of the first tablet."""
    if not setup.tablets:
        return {}
    tablet = setup.tablets[0]
    sizes: dict[str, int] = {}
    try:
        async with (
            asyncio.timeout(10),
            sim.connect(HOST, setup.broker_port, tablet.id, tablet.password, identifier=f"{tablet.id}-probe") as c,
        ):
            await c.subscribe("court/+/state", qos=0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    async for message in c.messages:
                        payload = message.payload
                        sizes[message.topic.value] = len(payload) if isinstance(payload, bytes | bytearray) else 0
                        if len(sizes) >= len(COURTS):
                            break
    except (aiomqtt.MqttError, TimeoutError):
        pass
    return sizes


@dataclass
class Result:
    taps: TapStats
    heartbeats: HeartbeatStats
    tap_wall_s: float
    heartbeat_rate: float
    rss_samples: list[int]
    cpu_pct: float
    bench_cpu_pct: float
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    connect_s: float
    court_state_bytes: dict[str, int]
    rss_ready: int  # once the first reader is answered (members loaded, nothing else connected)
    rss_connected: int  # after every reader and tablet connected (argon2 verifies done), before warm-up


class ClientBucket:
    """Keeps one reader under the agent's scan rate limit (a token bucket like the agent's own)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.last = float(burst), time.monotonic()

    async def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            await asyncio.sleep((1.0 - self.tokens) / self.rate)
            self.tokens, self.last = 1.0, time.monotonic()
        self.tokens -= 1.0


async def wait_for_agent(setup: Setup, proc: psutil.Process, stack: contextlib.AsyncExitStack) -> sim.SimReader:
    """Connect the first reader, retrying for START_TIMEOUT_S, then wait until a probe tap is answered."""
    first = setup.readers[0]
    deadline = time.monotonic() + START_TIMEOUT_S
    reader: sim.SimReader | None = None
    last_error = ""
    while reader is None and time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError("the agent exited during start-up (see its log)")
        try:
            reader = await stack.enter_async_context(sim.reader(HOST, setup.broker_port, first.id, first.password))
        except aiomqtt.MqttError as exc:
            last_error = str(exc)
            await asyncio.sleep(0.2)
    if reader is None:
        raise RuntimeError(f"the agent did not accept MQTT connections within {START_TIMEOUT_S:.0f} s: {last_error}")
    # The broker listens before the agent's own client has subscribed: probe until a tap is answered.
    while time.monotonic() < deadline:
        try:
            await reader.tap(setup.unknown_cards[0], reply_within=1.0)
            return reader
        except TimeoutError:
            continue
    raise RuntimeError(f"the agent did not answer a tap within {START_TIMEOUT_S:.0f} s")


async def heartbeat_device(
    setup: Setup,
    device: Device,
    hz: float,
    gate: asyncio.Semaphore,
    stop: asyncio.Event,
    stats: HeartbeatStats,
    rng: random.Random,
    deadline: float,
) -> None:
    period = 1.0 / hz
    max_messages = math.ceil(hz * BENCH_TIMEOUT_S)
    async with contextlib.AsyncExitStack() as stack:
        try:
            async with gate:
                client = await stack.enter_async_context(
                    sim.connect(HOST, setup.broker_port, device.id, device.password)
                )
        except aiomqtt.MqttError:
            stats.connect_failed += 1
            return
        stats.connected += 1
        tablet = sim.SimTablet(client, device.id, topics.tablet_response(device.id))
        loop = asyncio.get_running_loop()
        next_at = loop.time() + rng.uniform(0.0, period)  # staggered: the devices do not beat in step
        for _ in range(max_messages):
            delay = next_at - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                await tablet.heartbeat(battery=rng.randint(5, 100), app_version="2.3.1")
            except aiomqtt.MqttError:
                stats.errors += 1
                return
            stats.sent += 1
            next_at = max(next_at + period, loop.time())  # late: carry on, do not burst to catch up


class Occupancy:
    """Who is on court, per reader: players who checked in tap out again later, as in a real club."""

    def __init__(self) -> None:
        self.by_reader: dict[str, list[str]] = {}

    def pick(self, reader_id: str, setup: Setup, rng: random.Random) -> str:
        here = self.by_reader.setdefault(reader_id, [])
        if here and (len(here) >= MAX_ON_COURT or rng.random() < CHECKOUT_SHARE):
            return here.pop(rng.randrange(len(here)))
        if rng.random() < UNKNOWN_SHARE:
            return rng.choice(setup.unknown_cards)
        return setup.tap_pool[rng.randrange(len(setup.tap_pool))]

    def record(self, reader_id: str, card: str, payload: dict[str, Any]) -> None:
        if payload.get("action") == "checkin":
            self.by_reader.setdefault(reader_id, []).append(card)


async def reader_taps(
    reader: sim.SimReader,
    count: int,
    setup: Setup,
    rng: random.Random,
    stats: TapStats | None,
    deadline: float,
    tap_hz: float = 0.0,
    occupancy: Occupancy | None = None,
) -> None:
    """`count` taps, one at a time, `tap_hz` per second (0: back to back); `stats` None for warm-up taps."""
    bucket = ClientBucket(CLIENT_RATE_PER_S, CLIENT_BURST)
    occupancy = occupancy or Occupancy()
    failures_in_row = 0
    period = 1.0 / tap_hz if tap_hz > 0 else 0.0
    next_at = time.monotonic() + rng.uniform(0, period)  # readers do not tap in lockstep
    for _ in range(count):
        if time.monotonic() > deadline or failures_in_row >= MAX_TAP_ERRORS:
            return
        card = occupancy.pick(reader.device_id, setup, rng)
        if period:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + period, time.monotonic())
        await bucket.take()
        try:
            reply = await reader.tap(card, reply_within=REPLY_TIMEOUT_S)
        except TimeoutError:
            failures_in_row += 1
            if stats is not None:
                stats.timeouts += 1
            continue
        except aiomqtt.MqttError:
            failures_in_row += 1
            if stats is not None:
                stats.errors += 1
            await asyncio.sleep(0.1)
            continue
        failures_in_row = 0
        occupancy.record(reader.device_id, card, reply.payload)
        if stats is not None:
            p = reply.payload
            stats.latencies_ms.append(reply.latency_s * 1000.0)
            stats.outcomes[f"{p.get('status')}/{p.get('action')}/{p.get('reason')}"] += 1


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def sample_rss(proc: psutil.Process, stop: asyncio.Event, out: list[int]) -> None:
    max_samples = int(BENCH_TIMEOUT_S / RSS_SAMPLE_S) + 1
    for _ in range(max_samples):
        out.append(int(proc.memory_info().rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_SAMPLE_S)
        if stop.is_set():
            break
    out.append(int(proc.memory_info().rss))  # the final sample, at the end of the tap phase


async def scrape_metrics(port: int) -> dict[str, float]:
    """The agent's Prometheus text, as {'name{labels}': value}; empty if the API does not answer."""
    try:
        async with asyncio.timeout(5):
            r, w = await asyncio.open_connection(HOST, port)
            w.write(f"GET /metrics HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            await w.drain()
            chunks: list[bytes] = []
            for _ in range(4096):  # HTTP/1.0: the body ends when the server closes; at most 4096 reads
                chunk = await r.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
            body = b"".join(chunks)
    except (OSError, TimeoutError):
        return {}
    out: dict[str, float] = {}
    text = body.decode("utf-8", "replace").partition("\r\n\r\n")[2]
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def bench(setup: Setup, pid: int, args: argparse.Namespace) -> Result:
    proc = psutil.Process(pid)
    me = psutil.Process()
    rng = random.Random(args.seed + 1)
    deadline = time.monotonic() + BENCH_TIMEOUT_S
    async with contextlib.AsyncExitStack() as stack:
        connect_started = time.perf_counter()
        first = await wait_for_agent(setup, proc, stack)
        rss_ready = int(proc.memory_info().rss)
        readers = [first]
        for device in setup.readers[1:]:
            readers.append(
                await stack.enter_async_context(sim.reader(HOST, setup.broker_port, device.id, device.password))
            )

        hb_stats = HeartbeatStats()
        hb_stop = asyncio.Event()
        hb_tasks: list[asyncio.Task[None]] = []
        if args.heartbeat_hz > 0:
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
            hb_tasks = [
                asyncio.create_task(
                    heartbeat_device(
                        setup, d, args.heartbeat_hz, gate, hb_stop, hb_stats, random.Random(rng.random()), deadline
                    )
                )
                for d in setup.tablets
            ]
            connect_deadline = time.monotonic() + 60.0 + 0.1 * len(setup.tablets)
            while hb_stats.connected + hb_stats.connect_failed < len(setup.tablets):
                if time.monotonic() > connect_deadline:
                    raise RuntimeError(f"only {hb_stats.connected} of {len(setup.tablets)} tablets connected")
                await asyncio.sleep(0.05)
            if hb_stats.connect_failed:
                raise RuntimeError(f"{hb_stats.connect_failed} heartbeat devices could not connect")
        connect_s = time.perf_counter() - connect_started
        rss_connected = int(proc.memory_info().rss)

        occupancy = Occupancy()
        try:
            # Warm-up, not counted: lets every path (SQLite pages, broker sessions, pydantic) get hot.
            await asyncio.gather(
                *(
                    reader_taps(r, n, setup, random.Random(rng.random()), None, deadline, 0.0, occupancy)
                    for r, n in zip(readers, split(args.warmup, len(readers)), strict=True)
                )
            )
            await asyncio.sleep(1.0)  # every heartbeat device is beating by now (staggered over one period)

            metrics_before = await scrape_metrics(setup.api_port)
            stats = TapStats()
            rss: list[int] = []
            rss_stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(proc, rss_stop, rss))
            sent_before = hb_stats.sent
            cpu_before, me_before = cpu_seconds(proc), cpu_seconds(me)
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    reader_taps(r, n, setup, random.Random(rng.random()), stats, deadline, args.tap_hz, occupancy)
                    for r, n in zip(readers, split(args.taps, len(readers)), strict=True)
                )
            )
            wall = time.perf_counter() - started
            cpu_after, me_after = cpu_seconds(proc), cpu_seconds(me)
            hb_rate = (hb_stats.sent - sent_before) / wall if wall > 0 else 0.0
            rss_stop.set()
            await sampler
            metrics_after = await scrape_metrics(setup.api_port)
            state_sizes = await court_state_sizes(setup)
        finally:
            hb_stop.set()
            if hb_tasks:
                _, pending = await asyncio.wait(hb_tasks, timeout=30)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*hb_tasks, return_exceptions=True)
    return Result(
        taps=stats,
        heartbeats=hb_stats,
        tap_wall_s=wall,
        heartbeat_rate=hb_rate,
        rss_samples=rss,
        cpu_pct=100.0 * (cpu_after - cpu_before) / wall if wall > 0 else 0.0,
        bench_cpu_pct=100.0 * (me_after - me_before) / wall if wall > 0 else 0.0,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        connect_s=connect_s,
        court_state_bytes=state_sizes,
        rss_ready=rss_ready,
        rss_connected=rss_connected,
    )


# -- agent process -----------------------------------------------------------------------------------------------


def start_agent(setup: Setup, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(setup.config_path)],
        cwd=setup.root,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_agent(agent: subprocess.Popen[bytes]) -> tuple[int, float]:
    """SIGTERM, wait up to STOP_TIMEOUT_S, then kill; returns (exit code, seconds to stop)."""
    started = time.perf_counter()
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
    return int(agent.returncode), time.perf_counter() - started


def open_sessions(db_path: Path) -> dict[str, int]:
    """Open sessions per court, read from the stopped agent's database."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as conn:
            rows = conn.execute(
                "SELECT court_id, COUNT(*) FROM sessions WHERE ended_at IS NULL GROUP BY court_id ORDER BY court_id"
            ).fetchall()
    except sqlite3.Error:
        return {}
    return {str(court): int(n) for court, n in rows}


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- report ------------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """Upper bound (ms) of the Prometheus bucket holding quantile q of the samples observed between scrapes."""
    prefix = f'{name}_bucket{{le="'
    buckets: list[tuple[float, float]] = []
    for key, value in after.items():
        if key.startswith(prefix):
            buckets.append((float(key[len(prefix) : -2]), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= target:
            return bound * 1000.0
    return None


def metric_delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def report(
    console: Console,
    args: argparse.Namespace,
    import_s: float,
    import_line: str,
    result: Result,
    exit_code: int,
    stop_s: float,
    sessions: dict[str, int],
) -> tuple[bool, dict[str, Any]]:
    lat = sorted(result.taps.latencies_ms)
    p50, p90, p99 = percentile(lat, 0.50), percentile(lat, 0.90), percentile(lat, 0.99)
    worst = lat[-1] if lat else float("nan")
    mean = sum(lat) / len(lat) if lat else float("nan")
    rss_max = max(result.rss_samples) / 2**20 if result.rss_samples else float("nan")
    rss_final = result.rss_samples[-1] / 2**20 if result.rss_samples else float("nan")
    before, after = result.metrics_before, result.metrics_after
    decisions = metric_delta(before, after, "decision_seconds_count")
    decision_mean = (
        1000.0 * metric_delta(before, after, "decision_seconds_sum") / decisions if decisions else float("nan")
    )
    d50 = histogram_quantile(before, after, "decision_seconds", 0.50)
    d99 = histogram_quantile(before, after, "decision_seconds", 0.99)
    slow = {
        le: decisions - metric_delta(before, after, f'decision_seconds_bucket{{le="{le}"}}') for le in ("0.01", "0.05")
    }
    hb_seen = metric_delta(before, after, 'heartbeats_total{kind="tablet"}')
    rejected = {
        k: metric_delta(before, after, k)
        for k in after
        if k.startswith("messages_rejected_total{") and metric_delta(before, after, k)
    }

    table = Table(title="tap latency benchmark (agent subprocess, loopback)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("members", f"{args.members:,}")
    table.add_row("import (CLI, --synced)", f"{import_s:.2f} s  ({import_line})")
    table.add_row("connect (readers + tablets)", f"{result.connect_s:.2f} s")
    table.add_row(
        "taps answered",
        f"{len(lat)} of {args.taps} in {result.tap_wall_s:.2f} s ({len(lat) / result.tap_wall_s:.0f}/s); "
        f"timeouts {result.taps.timeouts}, errors {result.taps.errors}; warm-up {args.warmup} not counted",
    )
    table.add_row("readers", f"{args.readers} (one tap at a time each)")
    table.add_row(
        "heartbeat devices",
        f"{result.heartbeats.connected} x {args.heartbeat_hz:g} Hz -> {result.heartbeat_rate:.1f} msg/s sent "
        f"({hb_seen / result.tap_wall_s:.1f}/s counted by the agent); errors {result.heartbeats.errors}",
    )
    table.add_row(
        "latency p50 / p90 / p99 / max",
        f"{p50:.2f} / {p90:.2f} / {p99:.2f} / {worst:.2f} ms  (mean {mean:.2f} ms)",
    )
    quarters = split(len(result.taps.latencies_ms), 4)
    parts, at = [], 0
    for n in quarters:
        chunk = sorted(result.taps.latencies_ms[at : at + n])
        at += n
        parts.append(f"{percentile(chunk, 0.5):.1f}/{percentile(chunk, 0.99):.1f}")
    table.add_row("p50/p99 by quarter of the run", "  ".join(parts) + " ms (taps in arrival order)")
    table.add_row(
        "agent decision (metric)",
        f"mean {decision_mean:.2f} ms; p50 <= {d50 if d50 is not None else float('nan'):g} ms, "
        f"p99 <= {d99 if d99 is not None else float('nan'):g} ms (histogram bucket bounds); "
        f"{slow['0.01']:.0f} over 10 ms, {slow['0.05']:.0f} over 50 ms",
    )
    table.add_row(
        "agent RSS max / final",
        f"{rss_max:.1f} / {rss_final:.1f} MB ({len(result.rss_samples)} samples; {result.rss_ready / 2**20:.1f} MB "
        f"when first answering, {result.rss_connected / 2**20:.1f} MB with every device connected)",
    )
    table.add_row("agent CPU", f"{result.cpu_pct:.1f} % of one core (benchmark process {result.bench_cpu_pct:.1f} %)")
    table.add_row("agent stop", f"exit code {exit_code} after {stop_s:.2f} s")
    table.add_row(
        "open sessions at the end",
        ", ".join(f"{c} {n}" for c, n in sessions.items()) or "none",
    )
    table.add_row(
        "retained court state size",
        ", ".join(f"{t.split('/')[1]} {n:,} B" for t, n in sorted(result.court_state_bytes.items())) or "-",
    )
    if 0 < args.active_cards < args.members:
        table.add_row("tap pool (--active-cards)", f"{args.active_cards} member cards (+ unknown cards)")
    for outcome, n in result.taps.outcomes.most_common():
        table.add_row(f"  {outcome}", str(n))
    for key, count in sorted(rejected.items()):
        table.add_row(f"  rejected {key.removeprefix('messages_rejected_total')}", f"{count:.0f}")
    console.print(table)

    checks = [
        (f"p99 <= {BUDGET_P99_MS:g} ms", p99 <= BUDGET_P99_MS, f"{p99:.2f} ms"),
        (f"RSS < {BUDGET_RSS_MB:g} MB", rss_max < BUDGET_RSS_MB, f"{rss_max:.1f} MB"),
        ("every tap answered", len(lat) == args.taps, f"{len(lat)}/{args.taps}"),
        ("agent exits cleanly on SIGTERM", exit_code in (0, -signal.SIGTERM), f"exit {exit_code}"),
    ]
    ok = True
    for name, passed, got in checks:
        ok = ok and passed
        console.print(f"budget {name:<32} {got:>12}  {'[green]PASS[/]' if passed else '[red]FAIL[/]'}")
    summary = {
        "bench": "tap_latency",
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "rss_mb": round(rss_max, 1),
        "members": args.members,
        "taps": len(lat),
        "heartbeat_msgs_per_s": round(result.heartbeat_rate, 1),
        "readers": args.readers,
        "taps_per_s": round(len(lat) / result.tap_wall_s, 1) if result.tap_wall_s > 0 else 0.0,
        "cpu_pct": round(result.cpu_pct, 1),
    }
    return ok, summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--members", type=int, default=100_000, help="members in the cache (default 100000)")
    p.add_argument("--taps", type=int, default=2000, help="measured taps in total (default 2000)")
    p.add_argument("--devices", type=int, default=100, help="heartbeat tablets (default 100, at most 999)")
    p.add_argument("--heartbeat-hz", type=float, default=1.0, help="heartbeats per second per tablet (0: none)")
    p.add_argument("--readers", type=int, default=8, help="readers tapping concurrently (default 8)")
    p.add_argument(
        "--tap-hz",
        type=float,
        default=5.0,
        help="taps per second per reader (default 5: 40 taps/s with 8 readers, ~20x a busy club; 0: back to back)",
    )
    p.add_argument("--warmup", type=int, default=50, help="taps before measuring, not counted (default 50)")
    p.add_argument(
        "--active-cards",
        type=int,
        default=0,
        help="diagnostic: draw member taps from only this many cards, so sessions toggle (default 0: all members)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for cards and taps (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (config, db, agent log)")
    args = p.parse_args(argv)
    if not 1 <= args.members <= 2_000_000:
        p.error("--members must be 1..2000000")
    if not 1 <= args.taps <= 1_000_000:
        p.error("--taps must be 1..1000000")
    if not 0 <= args.devices <= 999:
        p.error("--devices must be 0..999")
    if not 0 <= args.heartbeat_hz <= 100:
        p.error("--heartbeat-hz must be 0..100")
    if not 1 <= args.readers <= 64:
        p.error("--readers must be 1..64")
    if not 0 <= args.warmup <= 100_000:
        p.error("--warmup must be 0..100000")
    if not 0 <= args.tap_hz <= 100:
        p.error("--tap-hz must be 0..100")
    if args.active_cards < 0:
        p.error("--active-cards must be 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(100, shutil.get_terminal_size((120, 40)).columns))
    tmp = tempfile.mkdtemp(prefix="tap-bench-")
    root = Path(tmp)
    try:
        console.print(f"[dim]set-up in {root}: config, {args.members:,} members, argon2 hashes...[/]")
        setup = build(root, args)
        import_s, import_line = import_members(setup)
        console.print(f"[dim]imported in {import_s:.2f} s; starting the agent...[/]")
        with setup.log_path.open("wb") as log:
            agent = start_agent(setup, log)
            try:
                result = asyncio.run(bench(setup, agent.pid, args))
            except BaseException:
                exit_code, _ = stop_agent(agent)
                console.print(f"[red]benchmark failed[/]; agent exit {exit_code}; agent log tail:")
                console.print(log_tail(setup.log_path), markup=False, highlight=False)
                raise
            exit_code, stop_s = stop_agent(agent)
        if exit_code not in (0, -signal.SIGTERM):
            console.print(f"[red]agent exit code {exit_code}[/]; log tail:")
            console.print(log_tail(setup.log_path), markup=False, highlight=False)
        sessions = open_sessions(root / "data" / "agent.db")
        ok, summary = report(console, args, import_s, import_line, result, exit_code, stop_s, sessions)
    finally:
        if args.keep:
            console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
