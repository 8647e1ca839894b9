"""Soak: the agent under premises load for half an hour; memory, fds, tap latency and outbox depth over time.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--sample-s 60] [--members 100000] [--devices 100]
                                        [--readers 8] [--tap-hz 5] [--buttons 4] [--orders-per-min 30]
                                        [--outage-s N] [--outage-at 0.25] [--out .artifacts/soak.png]

1. The sandbox cloud in a subprocess (benchmarks/outbox.py's, Ziggy and the club cloud on one loopback port),
   holding the same 100,000 members the agent imports through the real CLI (tap_latency.py's set-up, not marked
   synced), so that the agent's member sync (a full one as it starts, before the clock runs; deltas every 5
   minutes) keeps the list rather than emptying it.
2. The agent as a subprocess (`python -m agent.cli run`), with the cloud and Ziggy configured: the outbox drains
   to the sandbox throughout, at the agent's default retry and breaker settings.
3. Premises load for `--minutes`: `--devices` tablets heartbeating at 1 Hz; `--readers` readers tapping at
   `--tap-hz` each (tap_latency.py's loop: check-ins, check-outs, ~5% unknown cards); a bar tablet ordering for
   players on court; one highlight button per court; a few members changed in the sandbox every minute (what the
   delta syncs bring). In runs of 10 minutes or more the cloud and Ziggy answer 503 for a while by default (10% of
   the run, at most 2 minutes, from a quarter of the way in; `--outage-s`, `--outage-at`): the outbox depth rises
   and must fall again, before the second half.
4. Every `--sample-s`: the agent's RSS (and its children's, separately), open fds (/proc/<pid>/fd), threads,
   tap latency p50/p99 over the interval, taps/s, outbox depth (pending deliveries plus events not yet queued,
   read from the agent's SQLite read-only; also every 5 s for the plot), CPU of the agent and of everything else.
5. Load stops; the outbox must come back near zero (and is timed until empty) within `--drain-timeout-s`; SIGTERM
   stops the agent (exit 0 expected).

Verdict (the thresholds, and why, are next to their constants below): no growth trend (a least-squares slope over
the second half, after warm-up and the outage, for RSS and fds), tap latency stable (each second-half interval's
p99 within `--p99-factor` of the first half's median interval p99 and under the 20 ms budget), RSS under the
150 MB budget, every tap answered, the outbox not growing (back near zero at least once in the last quarter) and
back near zero after the load, no dead letters, the agent alive and stopping cleanly. The machine is shared: the
CPU of other processes is sampled and reported with each interval, so that a latency excursion can be read against
it.

Writes a 4-panel PNG (RSS, fds, latency with the budget, outbox depth; verdict in the title) to `--out` and the
samples as JSON beside it; prints the samples as a table, then the summary, then as the very last line of stdout
one JSON object `{"bench": "soak", ...}`. Exit code 0 on pass, 1 on fail. Loopback only; every loop is bounded
in count and time; the agent and the sandbox are stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import outbox as ob  # the sandbox cloud in a subprocess
import tap_latency as tl  # the agent's set-up, the readers' tap loop

from agent import sim
from agent.app import LOOP_STALL_S
from agent.lan import topics
from agent.sandbox.options import AgentSettings, SandboxOptions
from agent.store import repo
from agent.store.db import SLOW_S

HOST = tl.HOST
MB = 2**20
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".artifacts" / "soak.png"

BUDGET_P99_MS = tl.BUDGET_P99_MS  # DESIGN 6: tap to reply p99 <= 20 ms
BUDGET_RSS_MB = tl.BUDGET_RSS_MB  # DESIGN 6: the whole agent under 150 MB with 100,000 members
# Growth limits, fitted over the second half of the run. The agent runs for weeks between restarts on a 1 GB Pi,
# with ~40 MB of headroom under the RSS budget at this load (about 110 MB measured): 5 MB/h would use it up within
# a working day, so anything at that rate is a leak worth failing on; much less cannot be told apart from allocator
# noise (RSS moves by a fraction of a MB to a MB as arenas and SQLite's page caches settle) in a 15-minute fit --
# the slope's standard error is 1-2 MB/h there. Longer runs resolve smaller slopes. fds are integers and a healthy
# agent's count is flat once every device is connected: 10/h (one descriptor lost every 6 minutes) is already a
# leak, yet one reconnecting device in the fit window does not trip it.
RSS_SLOPE_MAX_MB_PER_H = 5.0
FDS_SLOPE_MAX_PER_H = 10.0
P99_FACTOR = 2.0  # a late interval's p99 against the first half's median interval p99
# Outbox depth that counts as "near zero": the events of a few seconds of this load (~40 taps/s, each one or two
# events for the cloud and, for check-ins and check-outs, one for Ziggy) waiting for a worker's next round. A
# backlog that only grows never comes back under it; one that a burst (or a starved CPU) built up and the workers
# then worked off does, and the check asks for that within the last quarter of the run, then after the load.
OUTBOX_NEAR_ZERO = 200
DEPTH_EVERY_S = 5.0
DISK_PROBE_S = 0.1  # the disk probe's period
DISK_PROBE_BLOCKS = 256  # the 1 MiB it overwrites in turn
DISK_SLOW_MS = 100.0
# The default outage: 10% of the run, at most this long, from a quarter of the way in; none in runs shorter than
# OUTAGE_MIN_RUN_S. After an outage the agent's breaker (sync.breaker_open_s, 60 s by default) keeps a destination
# alone for up to a minute before it probes again, so the backlog drains a minute or so after the cloud is back:
# in a 30-minute run that is long before the second half, whose samples the growth and latency checks judge.
OUTAGE_MAX_S = 120.0
OUTAGE_MIN_RUN_S = 600.0
BREAKER_OPEN_S = 60.0  # config.SyncSection's default, for the warning when an outage ends too late
OUTAGE_RETRY_AFTER_S = 5.0  # what the sandbox's 503s say (the agent honours Retry-After)
DESTINATIONS = ("cloud", "ziggy")
ITEMS = (("agua", "Agua", 5.5), ("cerveja", "Cerveja", 12.0), ("isotonico", "Isotonico", 9.9))
REPLY_TIMEOUT_S = tl.REPLY_TIMEOUT_S
SYNC_TIMEOUT_S = 120.0  # the agent's first member sync (a full one: 100,000 members) after start
HTTP_TIMEOUT = httpx.Timeout(120.0, connect=5.0)  # one upsert of 100,000 members is ~15 MB of JSON
CONNECT_TIMEOUT_S = 120.0


# -- set-up ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rig:
    setup: tl.Setup
    buttons: list[tl.Device]
    bar: tl.Device
    db_path: Path
    sandbox_url: str


def build(root: Path, args: argparse.Namespace, sandbox_url: str) -> Rig:
    """tap_latency's config and members, plus buttons, a bar tablet, and the sandbox as cloud and Ziggy."""
    rng = random.Random(args.seed)
    readers = [
        tl.Device(f"r{n}", "reader", tl.COURTS[(n - 1) % len(tl.COURTS)], secrets.token_urlsafe(18))
        for n in range(1, args.readers + 1)
    ]
    tablets = [tl.Device(f"t{n:03d}", "tablet", None, secrets.token_urlsafe(18)) for n in range(1, args.devices + 1)]
    buttons = [
        tl.Device(f"b{n}", "button", tl.COURTS[(n - 1) % len(tl.COURTS)], secrets.token_urlsafe(18))
        for n in range(1, args.buttons + 1)
    ]
    bar = tl.Device("bar", "tablet", None, secrets.token_urlsafe(18))
    broker_port, api_port = tl.free_ports(2)
    cards, unknown = tl.make_cards(rng, args.members, max(100, args.members // 100))
    config_path, members_path = root / "agent.toml", root / "members.json"
    tl.write_config(config_path, root / "data", broker_port, api_port, [*readers, *tablets, *buttons, bar])
    settings = AgentSettings.of(SandboxOptions(members=0), sandbox_url)  # the sandbox child's credentials
    secrets_path = root / "secrets.toml"
    secrets_path.write_text(settings.secrets_toml(), encoding="utf-8")
    secrets_path.chmod(0o600)
    text = config_path.read_text(encoding="utf-8")
    text = text.replace("[agent]\n", f"[agent]\nsecrets_file = {tl.toml_str(str(secrets_path))}\n", 1)
    config_path.write_text(text + "\n" + settings.config_toml(), encoding="utf-8")
    tl.write_members(members_path, cards)
    setup = tl.Setup(
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
        tap_pool=cards,
    )
    return Rig(setup, buttons, bar, root / "data" / "agent.db", sandbox_url)


def member_record(index: int, card: str, first_name: str | None = None) -> dict[str, Any]:
    """Member `index` as tap_latency.write_members writes it (the sandbox and the import must agree)."""
    return {
        "member_id": f"m{index + 1:06d}",
        "first_name": first_name or tl.FIRST_NAMES[index % len(tl.FIRST_NAMES)],
        "status": "active",
        "cards": [card],
        "requires_credit": False,
        "groups": [],
    }


def seed_sandbox(rig: Rig) -> None:
    """The sandbox's member feed gets the imported list, so the agent's full sync at start changes nothing."""
    members = [member_record(i, card) for i, card in enumerate(rig.setup.cards)]
    with httpx.Client(base_url=rig.sandbox_url, timeout=HTTP_TIMEOUT) as http:
        answer = http.post("/_sandbox/members", json={"upsert": members})
        answer.raise_for_status()
        if answer.json().get("members") != len(members):
            raise RuntimeError(f"the sandbox holds {answer.json().get('members')} members, not {len(members)}")


def import_members(setup: tl.Setup) -> tuple[float, str]:
    """tap_latency's import through the real CLI, without --synced: the list is then "never synced", so the
    agent's member sync runs at once when it starts (a full one, before the soak's clock starts) rather than
    five minutes into the soak."""
    cmd = [*tl.club_agent_command(), "members", "import", str(setup.members_path), "--config", str(setup.config_path)]
    started = time.perf_counter()
    done = subprocess.run(
        cmd,
        cwd=setup.root,
        env=tl.clean_env(),
        capture_output=True,
        text=True,
        timeout=tl.IMPORT_TIMEOUT_S,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"members import failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return elapsed, " ".join(done.stdout.split())


def start_agent(rig: Rig, log: Any) -> subprocess.Popen[bytes]:
    """tap_latency's agent command; the agent gets SIGTERM if this process dies without cleaning up."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(rig.setup.config_path)],
        cwd=rig.setup.root,
        env=tl.clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=ob.die_with_parent,  # safe: no other thread runs in this process yet
    )


# -- reading the agent from outside ------------------------------------------------------------------------------

_PENDING_SQL = "SELECT COUNT(*) FROM deliveries WHERE destination = ? AND state = 'pending'"
# Events routed to the destination that its worker has not given a delivery row yet (past its cursor).
_UNQUEUED_SQL = {
    dest: "SELECT COUNT(*) FROM events WHERE seq > (SELECT upto FROM delivery_cursors WHERE destination = ?)"  # noqa: S608
    f" AND {repo.routed_to(dest)[0]}"
    for dest in DESTINATIONS
}


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)


def outbox_depth(db: Path, *, dead: bool = False) -> dict[str, int]:
    """Per destination: deliveries pending plus events not yet queued; with `dead`, dead letters too."""
    out: dict[str, int] = {}
    with contextlib.closing(_read_only(db)) as conn:
        for dest in DESTINATIONS:
            pending = conn.execute(_PENDING_SQL, (dest,)).fetchone()[0]
            unqueued = conn.execute(_UNQUEUED_SQL[dest], (dest, repo.routed_to(dest)[1])).fetchone()[0]
            out[dest] = int(pending or 0) + int(unqueued or 0)
        if dead:
            out["dead"] = int(conn.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'").fetchone()[0])
            out["seq"] = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
    return out


def total(metrics: dict[str, float], name: str) -> float:
    """A counter summed over its labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def calls(metrics: dict[str, float], integration: str) -> float:
    """The agent's HTTP calls to one integration so far (integration_requests_total, every operation)."""
    prefix = f'integration_requests_total{{integration="{integration}"'
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def member_sync_done(db: Path) -> bool:
    with contextlib.closing(_read_only(db)) as conn:
        row = conn.execute("SELECT last_success_at FROM member_sync_state WHERE id = 1").fetchone()
    return row is not None and row[0] is not None


def db_bytes(db: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += (db.parent / (db.name + suffix)).stat().st_size
    return total


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (RssAnon, RssFile, ...), 0 if absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        t = proc.cpu_times()
        return float(t.user + t.system)
    return 0.0


def written_bytes(proc: psutil.Process) -> float:
    """Bytes the process caused to be written to storage (/proc/PID/io write_bytes): WAL, checkpoints, logs."""
    with contextlib.suppress(psutil.Error, AttributeError):
        return float(proc.io_counters().write_bytes)
    return 0.0


def host_busy_s() -> float:
    """Seconds of CPU the whole machine spent busy (all cores), since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


# -- the load ----------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """The devices' counters; the sampler takes the tap latencies interval by interval."""

    taps: tl.TapStats = field(default_factory=tl.TapStats)
    all_latencies: list[float] = field(default_factory=list)
    heartbeats: tl.HeartbeatStats = field(default_factory=tl.HeartbeatStats)
    presses: Counter[str] = field(default_factory=Counter)
    press_ms: list[float] = field(default_factory=list)
    orders: Counter[str] = field(default_factory=Counter)
    order_ms: list[float] = field(default_factory=list)
    churn: Counter[str] = field(default_factory=Counter)
    outage: list[float] = field(default_factory=list)  # [start, end] in soak seconds, as they happened


async def paced(
    period_s: float, stop: asyncio.Event, rng: random.Random, max_runs: int, action: Callable[[], Awaitable[bool]]
) -> None:
    """`action` every `period_s` (staggered start; late: carry on, no burst) until `stop` or until it returns
    False, at most `max_runs` times."""
    loop = asyncio.get_running_loop()
    next_at = loop.time() + rng.uniform(0.0, period_s)
    for _ in range(max_runs):
        delay = next_at - loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set() or not await action():
            return
        next_at = max(next_at + period_s, loop.time())


async def heartbeats(
    rig: Rig, device: tl.Device, hz: float, gate: asyncio.Semaphore, stop: asyncio.Event, load: Load, max_runs: int
) -> None:
    """One tablet: connects (a few at a time: the agent verifies argon2 hashes one by one), then beats."""
    stats = load.heartbeats
    async with contextlib.AsyncExitStack() as stack:
        try:
            async with gate:
                client = await stack.enter_async_context(
                    sim.connect(HOST, rig.setup.broker_port, device.id, device.password)
                )
        except aiomqtt.MqttError:
            stats.connect_failed += 1
            return
        stats.connected += 1
        tablet = sim.SimTablet(client, device.id, topics.tablet_response(device.id))
        rng = random.Random(device.id)

        async def beat() -> bool:
            try:
                await tablet.heartbeat(battery=rng.randint(5, 100), app_version="2.3.1")
            except aiomqtt.MqttError:
                stats.errors += 1
                return False
            stats.sent += 1
            return True

        await paced(1.0 / hz, stop, rng, max_runs, beat)


async def press_loop(button: sim.SimButton, period_s: float, stop: asyncio.Event, load: Load, max_runs: int) -> None:
    async def press() -> bool:
        try:
            reply = await button.press(reply_within=REPLY_TIMEOUT_S)
        except TimeoutError:
            load.presses["timeout"] += 1
            return True
        except aiomqtt.MqttError:
            load.presses["error"] += 1
            await asyncio.sleep(1.0)
            return True
        load.presses[str(reply.payload.get("status"))] += 1
        load.press_ms.append(reply.latency_s * 1000.0)
        return True

    await paced(period_s, stop, random.Random(button.device_id), max_runs, press)


async def order_loop(
    bar: sim.SimTablet, period_s: float, occupancy: tl.Occupancy, stop: asyncio.Event, load: Load, max_runs: int
) -> None:
    rng = random.Random("bar")

    async def order() -> bool:
        on_court = [card for cards in occupancy.by_reader.values() for card in cards]
        if not on_court:
            load.orders["nobody on court"] += 1
            return True
        items = [
            {"item_id": item_id, "name": name, "quantity": rng.randint(1, 3), "unit_price": price}
            for item_id, name, price in rng.sample(ITEMS, rng.randint(1, 2))
        ]
        try:
            reply = await bar.order(items, card_id=rng.choice(on_court), reply_within=REPLY_TIMEOUT_S)
        except TimeoutError:
            load.orders["timeout"] += 1
            return True
        except aiomqtt.MqttError:
            load.orders["error"] += 1
            await asyncio.sleep(1.0)
            return True
        p = reply.payload
        load.orders[f"{p.get('status')}/{p.get('reason')}" if p.get("reason") else str(p.get("status"))] += 1
        load.order_ms.append(reply.latency_s * 1000.0)
        return True

    await paced(period_s, stop, rng, max_runs, order)


async def churn_loop(
    rig: Rig, http: httpx.AsyncClient, per_min: int, stop: asyncio.Event, load: Load, max_runs: int
) -> None:
    """Every minute a few members change in the cloud (a new first name): the agent's delta syncs bring them."""
    rng = random.Random("churn")
    generation = 0

    async def change() -> bool:
        nonlocal generation
        generation += 1
        picks = rng.sample(range(len(rig.setup.cards)), min(per_min, len(rig.setup.cards)))
        upsert = [member_record(i, rig.setup.cards[i], f"Changed{generation}") for i in picks]
        try:
            answer = await http.post("/_sandbox/members", json={"upsert": upsert})
            answer.raise_for_status()
            load.churn["changed"] += len(upsert)
        except httpx.HTTPError:
            load.churn["failed"] += 1
        return True

    await paced(60.0, stop, rng, max_runs, change)


async def outage(
    http: httpx.AsyncClient, t0: float, start_s: float, length_s: float, stop: asyncio.Event, load: Load
) -> None:
    """The cloud and Ziggy answer 503 (Retry-After) to everything from `start_s` for `length_s`."""
    rule = {"endpoint": "*", "kind": "503", "rate": 1.0, "retry_after_s": OUTAGE_RETRY_AFTER_S}
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, t0 + start_s - loop.time()))
    if stop.is_set():
        return
    (await http.put("/_sandbox/faults", json=[rule])).raise_for_status()
    load.outage.append(loop.time() - t0)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), length_s)
    finally:
        with contextlib.suppress(httpx.HTTPError):
            await asyncio.shield(http.put("/_sandbox/faults", json=[]))
        load.outage.append(loop.time() - t0)


# -- sampling ----------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float  # seconds since the load started (end of the interval)
    interval_s: float
    rss_mb: float
    rss_anon_mb: float
    rss_file_mb: float
    children: int
    children_rss_mb: float
    fds: int
    threads: int
    taps: int
    taps_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    timeouts: int
    errors: int
    outbox: int
    outbox_cloud: int
    outbox_ziggy: int
    dead: int
    decision_p99_ms: float | None  # the agent's own histogram: upper bound of the p99 bucket
    events_per_s: float  # events committed to the agent's log
    cloud_calls_per_s: float  # the agent's HTTP calls (token, members, events) to the cloud
    ziggy_calls_per_s: float
    agent_cpu_pct: float  # of one core
    bench_cpu_pct: float
    sandbox_cpu_pct: float
    others_cores: float  # busy cores the machine spent on other processes (the noise)
    load1: float
    heartbeats_per_s: float
    sandbox_rss_mb: float
    db_mb: float
    outage: bool
    member_syncs: int  # member sync runs the agent finished in the interval (member_syncs_total, any result)
    slow_commits: int = 0  # the agent's store_slow_commit warnings: a commit over agent.store.db.SLOW_S
    slow_commit_max_ms: float = 0.0
    loop_stalls: int = 0  # the agent's event_loop_stalled warnings: its loop over agent.app.LOOP_STALL_S late
    disk_sync_max_ms: float = 0.0  # the disk probe's slowest fdatasync in the interval
    disk_syncs_slow: int = 0  # probe syncs over DISK_SLOW_MS
    written_mb_per_s: float = 0.0  # what the agent wrote to storage (an SD card's wear)


class DiskProbe:
    """The disk's own latency beside the agent's: a 4 KiB write and fdatasync every DISK_PROBE_S, on a thread, to
    a file next to the agent's database (overwriting in place, as a restarted WAL does). A commit cannot be faster
    than this; on a shared machine it says which latency excursions were the disk's."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "disk-probe"
        self._lock = threading.Lock()
        self._ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-probe", daemon=True)

    def __enter__(self) -> DiskProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        block = b"\0" * 4096
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, block * DISK_PROBE_BLOCKS, 0)
            os.fsync(fd)
            for i in itertools.count():
                if self._stop.wait(DISK_PROBE_S):
                    return
                began = time.perf_counter()
                os.pwrite(fd, block, (i % DISK_PROBE_BLOCKS) * 4096)
                os.fdatasync(fd)
                with self._lock:
                    self._ms.append((time.perf_counter() - began) * 1000)
        finally:
            os.close(fd)

    def take(self) -> list[float]:
        with self._lock:
            out, self._ms = self._ms, []
        return out


class AgentLog:
    """The agent's own slow-commit and loop-stall warnings, read from its log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._at = 0

    def take(self) -> tuple[list[float], int]:
        """(ms of each slow commit, loop stalls) logged since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._at)
                data = f.read()
        except OSError:
            return [], 0
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._at += end
        commits: list[float] = []
        stalls = 0
        for line in data[:end].splitlines():
            if b"store_slow_commit" not in line and b"event_loop_stalled" not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "store_slow_commit":
                commits.append(float(entry.get("ms", 0)))
            elif entry.get("event") == "event_loop_stalled":
                stalls += 1
        return commits, stalls


class Sampler:
    def __init__(
        self,
        rig: Rig,
        agent: psutil.Process,
        sandbox: psutil.Process,
        load: Load,
        t0: float,
        probe: DiskProbe | None = None,
    ) -> None:
        self.rig, self.agent, self.sandbox, self.load, self.t0 = rig, agent, sandbox, load, t0
        self.probe = probe
        self.agent_log = AgentLog(rig.setup.log_path)
        self.me = psutil.Process()
        self.samples: list[Sample] = []
        self.depths: list[tuple[float, int, int]] = []  # (t, cloud, ziggy) every DEPTH_EVERY_S
        self._last = self._counters()
        self._metrics: dict[str, float] = {}
        self._seq = 0
        self._taps_timeouts = 0
        self._taps_errors = 0
        self.poll_errors: Counter[str] = Counter()
        self.poll_s = 0.0  # the slowest depth reading

    def _counters(self) -> dict[str, float]:
        return {
            "t": time.monotonic(),
            "agent": cpu_s(self.agent),
            "me": cpu_s(self.me),
            "sandbox": cpu_s(self.sandbox),
            "host": host_busy_s(),
            "written": written_bytes(self.agent),
            "hb": float(self.load.heartbeats.sent),
        }

    async def prime(self) -> None:
        self._metrics = await tl.scrape_metrics(self.rig.setup.api_port)
        self.agent_log.take()
        if self.probe is not None:
            self.probe.take()
        with contextlib.suppress(sqlite3.Error):
            self._seq = (await asyncio.to_thread(outbox_depth, self.rig.db_path, dead=True))["seq"]
        self._last = self._counters()
        self._taps_timeouts, self._taps_errors = self.load.taps.timeouts, self.load.taps.errors

    def in_outage(self, start: float, end: float) -> bool:
        o = self.load.outage
        if not o:
            return False
        o_end = o[1] if len(o) > 1 else math.inf
        return start < o_end and o[0] < end

    async def take(self, *, latencies: bool = True) -> Sample:
        """One sample: the interval since the last one. `latencies` False: leave the tap latencies alone."""
        if not self.agent.is_running() or self.agent.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError("the agent exited during the soak (see its log)")
        now = self._counters()
        last, self._last = self._last, now
        wall = max(1e-9, now["t"] - last["t"])
        lat: list[float] = []
        if latencies:
            lat, self.load.taps.latencies_ms = self.load.taps.latencies_ms, []
            self.load.all_latencies.extend(lat)
        lat.sort()
        mem = self.agent.memory_info()
        kids = []
        with contextlib.suppress(psutil.Error):
            kids = self.agent.children(recursive=True)
        kids_rss = 0
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kids_rss += kid.memory_info().rss
        sandbox_rss = 0
        with contextlib.suppress(psutil.Error):
            sandbox_rss = self.sandbox.memory_info().rss
        depth = await asyncio.to_thread(outbox_depth, self.rig.db_path, dead=True)
        metrics = await tl.scrape_metrics(self.rig.setup.api_port)
        d99 = tl.histogram_quantile(self._metrics, metrics, "decision_seconds", 0.99) if metrics else None
        cloud_calls = calls(metrics, "cloud") - calls(self._metrics, "cloud") if metrics else 0.0
        member_syncs = (
            total(metrics, "member_syncs_total") - total(self._metrics, "member_syncs_total") if metrics else 0
        )
        ziggy_calls = calls(metrics, "ziggy") - calls(self._metrics, "ziggy") if metrics else 0.0
        self._metrics = metrics or self._metrics
        seq, self._seq = depth["seq"] - self._seq, depth["seq"]
        timeouts, errors = self.load.taps.timeouts, self.load.taps.errors
        ours = now["agent"] - last["agent"] + now["me"] - last["me"] + now["sandbox"] - last["sandbox"]
        t_end = now["t"] - self.t0
        sample = Sample(
            t_s=round(t_end, 2),
            interval_s=round(wall, 2),
            rss_mb=mem.rss / MB,
            rss_anon_mb=proc_status_kb(self.agent.pid, "RssAnon") / 1024,
            rss_file_mb=proc_status_kb(self.agent.pid, "RssFile") / 1024,
            children=len(kids),
            children_rss_mb=kids_rss / MB,
            fds=open_fds(self.agent.pid),
            threads=self.agent.num_threads(),
            taps=len(lat),
            taps_per_s=len(lat) / wall,
            p50_ms=tl.percentile(lat, 0.50) if lat else None,
            p99_ms=tl.percentile(lat, 0.99) if lat else None,
            max_ms=lat[-1] if lat else None,
            timeouts=timeouts - self._taps_timeouts,
            errors=errors - self._taps_errors,
            outbox=depth["cloud"] + depth["ziggy"],
            outbox_cloud=depth["cloud"],
            outbox_ziggy=depth["ziggy"],
            dead=depth["dead"],
            decision_p99_ms=d99,
            events_per_s=seq / wall,
            cloud_calls_per_s=cloud_calls / wall,
            ziggy_calls_per_s=ziggy_calls / wall,
            agent_cpu_pct=100.0 * (now["agent"] - last["agent"]) / wall,
            bench_cpu_pct=100.0 * (now["me"] - last["me"]) / wall,
            sandbox_cpu_pct=100.0 * (now["sandbox"] - last["sandbox"]) / wall,
            others_cores=max(0.0, (now["host"] - last["host"] - ours) / wall),
            load1=os.getloadavg()[0],
            heartbeats_per_s=(now["hb"] - last["hb"]) / wall,
            sandbox_rss_mb=sandbox_rss / MB,
            db_mb=db_bytes(self.rig.db_path) / MB,
            outage=self.in_outage(t_end - wall, t_end),
            member_syncs=round(member_syncs),
        )
        commits, sample.loop_stalls = self.agent_log.take()
        sample.slow_commits, sample.slow_commit_max_ms = len(commits), max(commits, default=0.0)
        synced = self.probe.take() if self.probe is not None else []
        sample.disk_sync_max_ms = max(synced, default=0.0)
        sample.disk_syncs_slow = sum(1 for v in synced if v > DISK_SLOW_MS)
        sample.written_mb_per_s = (now["written"] - last["written"]) / wall / MB
        self._taps_timeouts, self._taps_errors = timeouts, errors
        self.depths.append((t_end, depth["cloud"], depth["ziggy"]))
        return sample

    async def poll_depth(self, stop: asyncio.Event, max_runs: int) -> None:
        for _ in range(max_runs):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEPTH_EVERY_S)
            if stop.is_set():
                return
            began = time.monotonic()
            try:
                depth = await asyncio.to_thread(outbox_depth, self.rig.db_path)
            except sqlite3.Error as exc:
                self.poll_errors[str(exc)] += 1
                continue
            finally:
                self.poll_s = max(self.poll_s, time.monotonic() - began)
            self.depths.append((time.monotonic() - self.t0, depth["cloud"], depth["ziggy"]))


def sample_line(s: Sample) -> str:
    def ms(v: float | None) -> str:
        return f"{v:6.2f}" if v is not None else "     -"

    cpu = f"agent {s.agent_cpu_pct:3.0f}%  others {s.others_cores:4.2f} cores" if s.interval_s >= 1 else ""
    disk = f"  disk max {s.disk_sync_max_ms:5.0f} ms  slow commits {s.slow_commits:3d}" if s.interval_s >= 1 else ""
    return (
        f"{s.t_s / 60:6.2f} min  RSS {s.rss_mb:6.1f} MB  fds {s.fds:4d}  taps/s {s.taps_per_s:5.1f}  "
        f"p50 {ms(s.p50_ms)}  p99 {ms(s.p99_ms)}  max {ms(s.max_ms)} ms  outbox {s.outbox:6d}  {cpu}{disk}"
        f"{'  OUTAGE' if s.outage else ''}{'  member sync' if s.member_syncs else ''}"
    )


# -- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    samples: list[Sample]
    after_drain: Sample | None
    depths: list[tuple[float, int, int]]
    load: Load
    total_s: float
    connect_s: float
    sync_s: float
    near_zero_s: float | None  # seconds from the end of the load to a depth <= OUTBOX_NEAR_ZERO; None: not in time
    drain_s: float | None  # seconds from the end of the load to an empty outbox; None: not within the timeout
    outcomes: Counter[str]
    poll_errors: Counter[str]
    poll_s: float


async def soak(rig: Rig, agent_pid: int, sandbox_pid: int, args: argparse.Namespace, console: Console) -> Run:
    setup = rig.setup
    agent = psutil.Process(agent_pid)
    sandbox = psutil.Process(sandbox_pid)
    total_s = args.minutes * 60.0
    n_samples = max(1, math.ceil(total_s / args.sample_s - 1e-9))
    bound = math.ceil(total_s + args.drain_timeout_s + 600.0)  # every loop's count bound, in seconds of activity
    rng = random.Random(args.seed + 1)
    load = Load()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=rig.sandbox_url, timeout=HTTP_TIMEOUT))
        try:
            connect_started = time.monotonic()
            first = await tl.wait_for_agent(setup, agent, stack)
            readers = [first]
            for device in setup.readers[1:]:
                readers.append(
                    await stack.enter_async_context(sim.reader(HOST, setup.broker_port, device.id, device.password))
                )
            buttons = [
                await stack.enter_async_context(sim.button(HOST, setup.broker_port, b.id, str(b.court), b.password))
                for b in rig.buttons
            ]
            bar = await stack.enter_async_context(sim.tablet(HOST, setup.broker_port, rig.bar.id, rig.bar.password))
            gate = asyncio.Semaphore(tl.CONNECT_CONCURRENCY)
            tasks += [
                asyncio.create_task(heartbeats(rig, d, args.heartbeat_hz, gate, stop, load, bound * 101))
                for d in (setup.tablets if args.heartbeat_hz > 0 else [])
            ]
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while load.heartbeats.connected + load.heartbeats.connect_failed < len(tasks):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {load.heartbeats.connected} of {len(tasks)} tablets connected")
                await asyncio.sleep(0.05)
            if load.heartbeats.connect_failed:
                raise RuntimeError(f"{load.heartbeats.connect_failed} tablets could not connect")
            connect_s = time.monotonic() - connect_started

            # The agent's first member sync (a full one, 100,000 members) must be in before the clock starts.
            sync_started = time.monotonic()
            while not await asyncio.to_thread(_safe, member_sync_done, rig.db_path):
                if time.monotonic() - sync_started > SYNC_TIMEOUT_S:
                    raise RuntimeError(f"the agent's first member sync did not finish within {SYNC_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.25)
            sync_s = time.monotonic() - sync_started
            console.print(
                f"[dim]connected {len(readers)} readers, {len(buttons)} buttons, the bar and "
                f"{load.heartbeats.connected} tablets in {connect_s:.1f} s; first member sync in by +{sync_s:.1f} s[/]"
            )

            occupancy = tl.Occupancy()
            far = time.monotonic() + tl.BENCH_TIMEOUT_S
            await asyncio.gather(
                *(
                    tl.reader_taps(r, n, setup, random.Random(rng.random()), None, far, 0.0, occupancy)
                    for r, n in zip(readers, tl.split(args.warmup, len(readers)), strict=True)
                )
            )
            await asyncio.sleep(1.0)

            # -- the soak: load for total_s, a sample every sample_s ------------------------------------------
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            probe = stack.enter_context(DiskProbe(rig.db_path.parent))
            sampler = Sampler(rig, agent, sandbox, load, t0, probe)
            await sampler.prime()
            baseline = await sampler.take()
            baseline.t_s = 0.0
            samples: list[Sample] = []
            console.print(sample_line(baseline) + "  (baseline, after warm-up)")
            end = time.monotonic() + total_s
            per_reader = math.ceil(args.tap_hz * (total_s + 60.0)) if args.tap_hz > 0 else bound * 10_000
            tasks += [
                asyncio.create_task(
                    tl.reader_taps(
                        r, per_reader, setup, random.Random(rng.random()), load.taps, end, args.tap_hz, occupancy
                    )
                )
                for r in readers
            ]
            if args.press_s > 0:
                tasks += [asyncio.create_task(press_loop(b, args.press_s, stop, load, bound)) for b in buttons]
            if args.orders_per_min > 0:
                tasks.append(
                    asyncio.create_task(order_loop(bar, 60.0 / args.orders_per_min, occupancy, stop, load, bound * 60))
                )
            if args.member_changes_per_min > 0:
                tasks.append(asyncio.create_task(churn_loop(rig, http, args.member_changes_per_min, stop, load, bound)))
            if args.outage_s > 0:
                tasks.append(asyncio.create_task(outage(http, t0, args.outage_at * total_s, args.outage_s, stop, load)))
            poller = asyncio.create_task(sampler.poll_depth(stop, bound))
            tasks.append(poller)
            await sampler.prime()
            for k in range(1, n_samples + 1):
                await asyncio.sleep(max(0.0, t0 + min(k * args.sample_s, total_s) - loop.time()))
                for task in tasks:  # a device loop that died: say why now, not at the end
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise RuntimeError("a load task failed") from task.exception()
                sample = await sampler.take()
                samples.append(sample)
                console.print(sample_line(sample))

            # -- load off: the outbox must drain -----------------------------------------------------------------
            stop.set()
            load_end = loop.time()
            _, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Near zero is the verdict; empty is reported too (a last few rows may wait out a retry's backoff).
            near_zero_s: float | None = None
            drain_s: float | None = None
            drain_deadline = load_end + args.drain_timeout_s
            while loop.time() < drain_deadline:
                with contextlib.suppress(sqlite3.Error):
                    depth = await asyncio.to_thread(outbox_depth, rig.db_path)
                    sampler.depths.append((loop.time() - t0, depth["cloud"], depth["ziggy"]))
                    left = depth["cloud"] + depth["ziggy"]
                    if near_zero_s is None and left <= OUTBOX_NEAR_ZERO:
                        near_zero_s = loop.time() - load_end
                    if left == 0:
                        drain_s = loop.time() - load_end
                        break
                await asyncio.sleep(1.0)
            after = await sampler.take(latencies=False)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return Run(
        samples=[baseline, *samples],
        after_drain=after,
        depths=sampler.depths,
        load=load,
        total_s=total_s,
        connect_s=connect_s,
        sync_s=sync_s,
        near_zero_s=near_zero_s,
        drain_s=drain_s,
        outcomes=load.taps.outcomes,
        poll_errors=sampler.poll_errors,
        poll_s=sampler.poll_s,
    )


def _safe(check: Callable[[Path], bool], db: Path) -> bool:
    try:
        return check(db)
    except sqlite3.Error:
        return False


# -- verdict -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    slope_per_h: float
    intercept: float
    t_from_s: float
    t_to_s: float
    points: int


def fit(points: Sequence[tuple[float, float]]) -> Fit:
    """Least squares of value against time (hours); NaN slope with fewer than 3 points."""
    if len(points) < 3 or len({t for t, _ in points}) < 2:
        return Fit(math.nan, math.nan, points[0][0] if points else 0.0, points[-1][0] if points else 0.0, len(points))
    line = statistics.linear_regression([t / 3600.0 for t, _ in points], [v for _, v in points])
    return Fit(line.slope, line.intercept, points[0][0], points[-1][0], len(points))


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    got: str


@dataclass
class Verdict:
    checks: list[Check]
    rss_fit: Fit
    fds_fit: Fit
    early_p99_median: float
    p99_limit: float
    late: list[Sample]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def judge(run: Run, args: argparse.Namespace, exit_code: int) -> Verdict:
    half = run.total_s / 2.0
    intervals = run.samples[1:]  # the baseline is a point in time, not an interval
    second = [s for s in intervals if s.t_s >= half - 1e-6]
    rss_fit = fit([(s.t_s, s.rss_mb + s.children_rss_mb) for s in second])
    fds_fit = fit([(s.t_s, float(s.fds)) for s in second])
    early = [s for s in intervals if s.t_s <= half + 1e-6 and s.p99_ms is not None]
    late = [s for s in intervals if s.t_s - s.interval_s >= half - 1e-6 and s.p99_ms is not None]
    if not early or not late:  # a run too short to split: compare every interval with the median of all
        early = late = [s for s in intervals if s.p99_ms is not None]
    early_median = statistics.median(s.p99_ms for s in early if s.p99_ms is not None) if early else math.nan
    limit = args.p99_factor * early_median
    late_p99 = [s.p99_ms for s in late if s.p99_ms is not None]
    late_max = max(late_p99) if late_p99 else math.nan
    over_factor = sum(1 for v in late_p99 if v > limit)
    over_budget = sum(1 for v in late_p99 if v > BUDGET_P99_MS)
    # which of them the disk stalled (the probe's fdatasync, not the agent's): read with the agent's slow commits
    over_disk = sum(1 for x in late if (x.p99_ms or 0) > BUDGET_P99_MS and x.disk_sync_max_ms > DISK_SLOW_MS)
    rss_max = max(s.rss_mb + s.children_rss_mb for s in run.samples)
    unanswered = run.load.taps.timeouts + run.load.taps.errors
    depth_late = [c + z for t, c, z in run.depths if half <= t <= run.total_s]
    depth_median = statistics.median(depth_late) if depth_late else math.nan
    depth_last_quarter = [c + z for t, c, z in run.depths if 0.75 * run.total_s <= t <= run.total_s]
    depth_low = min(depth_last_quarter) if depth_last_quarter else math.nan
    final = run.after_drain or run.samples[-1]

    def slope_text(f: Fit, unit: str, limit: float) -> str:
        span = f"{f.t_from_s / 60:.1f}-{f.t_to_s / 60:.1f} min"
        return f"{f.slope_per_h:+.2f} {unit}/h (limit {limit:g}; {f.points} samples, {span})"

    checks = [
        Check(
            f"no RSS growth: slope <= {RSS_SLOPE_MAX_MB_PER_H:g} MB/h (2nd half)",
            not math.isnan(rss_fit.slope_per_h) and rss_fit.slope_per_h <= RSS_SLOPE_MAX_MB_PER_H,
            slope_text(rss_fit, "MB", RSS_SLOPE_MAX_MB_PER_H),
        ),
        Check(
            f"no fd growth: slope <= {FDS_SLOPE_MAX_PER_H:g}/h (2nd half)",
            not math.isnan(fds_fit.slope_per_h) and fds_fit.slope_per_h <= FDS_SLOPE_MAX_PER_H,
            slope_text(fds_fit, "fds", FDS_SLOPE_MAX_PER_H),
        ),
        Check(
            f"latency stable: late p99 <= {args.p99_factor:g} x early median",
            over_factor == 0 and not math.isnan(late_max),
            f"max {late_max:.2f} ms vs {limit:.2f} ms ({args.p99_factor:g} x {early_median:.2f}); "
            f"{over_factor} of {len(late_p99)} intervals over",
        ),
        Check(
            f"late p99 <= {BUDGET_P99_MS:g} ms (DESIGN 6), each interval",
            over_budget == 0 and not math.isnan(late_max),
            f"max {late_max:.2f} ms; {over_budget} of {len(late_p99)} intervals over"
            + (f" ({over_disk} with a disk sync over {DISK_SLOW_MS:g} ms)" if over_budget else ""),
        ),
        Check(f"RSS < {BUDGET_RSS_MB:g} MB (DESIGN 6)", rss_max < BUDGET_RSS_MB, f"max {rss_max:.1f} MB"),
        Check(
            "every tap answered", unanswered == 0, f"{run.load.taps.timeouts} timeouts, {run.load.taps.errors} errors"
        ),
        Check(
            f"outbox not growing: back to <= {OUTBOX_NEAR_ZERO} in the last quarter",
            not math.isnan(depth_low) and depth_low <= OUTBOX_NEAR_ZERO,
            f"lowest {depth_low:.0f} of {len(depth_last_quarter)} readings; 2nd half median {depth_median:.0f}, "
            f"max {max(depth_late, default=0)}",
        ),
        Check(
            f"outbox back to <= {OUTBOX_NEAR_ZERO} after the load (<= {args.drain_timeout_s:g} s)",
            run.near_zero_s is not None,
            (f"in {run.near_zero_s:.1f} s" if run.near_zero_s is not None else "not in time")
            + "; empty "
            + (f"in {run.drain_s:.1f} s" if run.drain_s is not None else f"not in time ({final.outbox} left)"),
        ),
        Check("no dead letters", final.dead == 0, f"{final.dead}"),
        Check("agent exits cleanly on SIGTERM", exit_code in (0, -signal.SIGTERM), f"exit {exit_code}"),
    ]
    return Verdict(checks, rss_fit, fds_fit, early_median, limit, late)


# -- report ------------------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"


def sample_table(run: Run) -> Table:
    """One row per sample (threads, dead letters, load average and the database's size are in the JSON)."""
    kids = any(s.children for s in run.samples)
    table = Table(title="soak samples (each row: the interval ending at that minute)", box=box.SIMPLE_HEAD)
    names = ["min", "RSS MB", "anon", *(["kids MB"] if kids else []), "fds", "taps/s", "p50 ms", "p99 ms", "max ms"]
    names += ["dec p99<=", "slow commits", "disk max", "MB/s", "ev/s", "cloud/s", "ziggy/s", "outbox c/z", "agent %"]
    names += ["others", ""]
    for name in names:
        table.add_column(name, justify="right" if name else "left", no_wrap=True)
    rows = [*run.samples, *([run.after_drain] if run.after_drain else [])]
    for i, s in enumerate(rows):
        note = "baseline" if i == 0 else ("after drain" if s is run.after_drain else ("outage" if s.outage else ""))
        if i and s.member_syncs:
            note = f"{note} member sync".strip()
        table.add_row(
            f"{s.t_s / 60:.2f}",
            f"{s.rss_mb:.1f}",
            f"{s.rss_anon_mb:.1f}",
            *([f"{s.children_rss_mb:.1f}"] if kids else []),
            str(s.fds),
            f"{s.taps_per_s:.1f}" if s.taps else "-",
            _ms(s.p50_ms),
            _ms(s.p99_ms),
            _ms(s.max_ms),
            f"{s.decision_p99_ms:g}" if s.decision_p99_ms is not None else "-",
            (f"{s.slow_commits} (max {s.slow_commit_max_ms:.0f})" if s.slow_commits else "0") if i else "-",
            f"{s.disk_sync_max_ms:.0f}" if i else "-",
            f"{s.written_mb_per_s:.1f}" if i else "-",
            f"{s.events_per_s:.0f}" if i else "-",
            f"{s.cloud_calls_per_s:.0f}" if i else "-",
            f"{s.ziggy_calls_per_s:.0f}" if i else "-",
            f"{s.outbox_cloud}/{s.outbox_ziggy}",
            f"{s.agent_cpu_pct:.0f}" if i else "-",
            f"{s.others_cores:.2f}" if i else "-",
            note,
        )
    return table


def summary_table(run: Run, args: argparse.Namespace, import_s: float, stop: tuple[int, float]) -> Table:
    lat = sorted(run.load.all_latencies)
    intervals = run.samples[1:]
    table = Table(title="soak summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "load",
        f"{args.minutes:g} min; {args.members:,} members; {args.readers} readers x {args.tap_hz:g} taps/s; "
        f"{run.load.heartbeats.connected} tablets x {args.heartbeat_hz:g} Hz; {args.buttons} buttons every "
        f"{args.press_s:g} s; bar {args.orders_per_min:g} orders/min; {args.member_changes_per_min} member "
        f"changes/min in the cloud",
    )
    table.add_row(
        "set-up",
        f"import {import_s:.1f} s; devices connected in {run.connect_s:.1f} s; first member sync +{run.sync_s:.1f} s",
    )
    if len(run.load.outage) >= 2:
        o0, o1 = run.load.outage[0], run.load.outage[1]
        table.add_row("cloud outage (503 to all)", f"{o0 / 60:.2f}-{o1 / 60:.2f} min ({o1 - o0:.0f} s)")
    disk_max = max((s.disk_sync_max_ms for s in intervals), default=0.0)
    commit_max = max((s.slow_commit_max_ms for s in intervals), default=0.0)
    table.add_row(
        "disk and store",
        f"disk probe (4 KiB fdatasync every {DISK_PROBE_S:g} s): max {disk_max:.0f} ms, "
        f"{sum(s.disk_syncs_slow for s in intervals)} over {DISK_SLOW_MS:g} ms; agent: "
        f"{sum(s.slow_commits for s in intervals)} commits over {SLOW_S * 1000:g} ms (max {commit_max:.0f} ms), "
        f"{sum(s.loop_stalls for s in intervals)} event loop stalls over {LOOP_STALL_S * 1000:g} ms; agent wrote "
        f"{statistics.median(s.written_mb_per_s for s in intervals) if intervals else 0:.1f} MB/s (median)",
    )
    table.add_row(
        "taps",
        f"{len(lat):,} answered ({len(lat) / run.total_s:.1f}/s); timeouts {run.load.taps.timeouts}, "
        f"errors {run.load.taps.errors}",
    )
    table.add_row(
        "tap latency, whole run",
        f"p50 {tl.percentile(lat, 0.5):.2f} / p90 {tl.percentile(lat, 0.9):.2f} / p99 {tl.percentile(lat, 0.99):.2f}"
        f" / max {lat[-1] if lat else math.nan:.2f} ms",
    )
    p99s = [s.p99_ms for s in intervals if s.p99_ms is not None]
    table.add_row(
        "interval p99",
        f"median {statistics.median(p99s) if p99s else math.nan:.2f} ms, min {min(p99s, default=math.nan):.2f}, "
        f"max {max(p99s, default=math.nan):.2f}",
    )
    for outcome, n in run.outcomes.most_common():
        table.add_row(f"  {outcome}", f"{n:,}")
    order_ms = sorted(run.load.order_ms)
    table.add_row(
        "bar orders",
        ", ".join(f"{k} {v}" for k, v in run.load.orders.most_common())
        + (f"; p99 {tl.percentile(order_ms, 0.99):.2f} ms" if order_ms else ""),
    )
    press_ms = sorted(run.load.press_ms)
    table.add_row(
        "button presses",
        ", ".join(f"{k} {v}" for k, v in run.load.presses.most_common())
        + (f"; p99 {tl.percentile(press_ms, 0.99):.2f} ms" if press_ms else ""),
    )
    hb = [s.heartbeats_per_s for s in intervals]
    table.add_row(
        "heartbeats",
        f"{run.load.heartbeats.sent:,} sent ({statistics.median(hb) if hb else 0:.1f}/s median); "
        f"errors {run.load.heartbeats.errors}",
    )
    table.add_row("member changes (cloud)", ", ".join(f"{k} {v}" for k, v in run.load.churn.most_common()) or "-")
    first, last = run.samples[0], run.samples[-1]
    table.add_row(
        "agent RSS",
        f"{first.rss_mb:.1f} -> {last.rss_mb:.1f} MB (anon {first.rss_anon_mb:.1f} -> {last.rss_anon_mb:.1f}, "
        f"file {first.rss_file_mb:.1f} -> {last.rss_file_mb:.1f}); max {max(s.rss_mb for s in run.samples):.1f}; "
        f"children {max(s.children for s in run.samples)} ({max(s.children_rss_mb for s in run.samples):.1f} MB max)",
    )
    table.add_row(
        "agent fds / threads",
        f"{first.fds} -> {last.fds} (max {max(s.fds for s in run.samples)}) / {first.threads} -> {last.threads}",
    )
    cpu = [s.agent_cpu_pct for s in intervals]
    others = [s.others_cores for s in intervals]
    table.add_row(
        "CPU",
        f"agent {statistics.median(cpu) if cpu else 0:.0f} % of a core (median), benchmark "
        f"{statistics.median([s.bench_cpu_pct for s in intervals]) if intervals else 0:.0f} %, sandbox "
        f"{statistics.median([s.sandbox_cpu_pct for s in intervals]) if intervals else 0:.0f} %",
    )
    table.add_row(
        "the machine (shared)",
        f"other processes {statistics.median(others) if others else 0:.2f} cores median, "
        f"{max(others, default=0):.2f} max, of {psutil.cpu_count()}; load average "
        f"{min(s.load1 for s in run.samples):.2f}-{max(s.load1 for s in run.samples):.2f}",
    )
    table.add_row(
        "outbox",
        f"max depth {max((c + z for _, c, z in run.depths), default=0):,}; after the load <= {OUTBOX_NEAR_ZERO} "
        + (f"in {run.near_zero_s:.1f} s" if run.near_zero_s is not None else "NOT in time")
        + ", empty "
        + (f"in {run.drain_s:.1f} s" if run.drain_s is not None else "NOT in time")
        + f"; dead letters {(run.after_drain or last).dead}",
    )
    ev = statistics.median(s.events_per_s for s in intervals) if intervals else 0.0
    cloud = statistics.median(s.cloud_calls_per_s for s in intervals) if intervals else 0.0
    ziggy = statistics.median(s.ziggy_calls_per_s for s in intervals) if intervals else 0.0
    table.add_row(
        "outbox traffic (medians)",
        f"{ev:.0f} events/s committed; cloud {cloud:.0f} calls/s"
        + (f" (about {ev / cloud:.1f} events each)" if cloud else "")
        + f", Ziggy {ziggy:.0f} calls/s (one event each)",
    )
    table.add_row(
        "outbox readings (read-only SQLite)",
        f"{len(run.depths)}, slowest {run.poll_s * 1000:.0f} ms; failed: "
        + (", ".join(f"{e} x{n}" for e, n in run.poll_errors.most_common()) or "none"),
    )
    table.add_row(
        "sandbox / database",
        f"sandbox RSS {first.sandbox_rss_mb:.0f} -> {last.sandbox_rss_mb:.0f} MB (it keeps every call it received); "
        f"agent DB {first.db_mb:.0f} -> {last.db_mb:.0f} MB",
    )
    table.add_row("agent stop", f"exit code {stop[0]} after {stop[1]:.2f} s")
    return table


def plot(run: Run, verdict: Verdict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    mins = [s.t_s / 60 for s in run.samples]
    half_min = run.total_s / 120

    def fit_line(ax: Any, f: Fit, label: str) -> None:
        if not math.isnan(f.slope_per_h):
            xs = [f.t_from_s / 60, f.t_to_s / 60]
            ax.plot(xs, [f.intercept + f.slope_per_h * x / 60 for x in xs], "k--", lw=1, label=label)

    ax = axes[0]
    ax.plot(mins, [s.rss_mb for s in run.samples], "o-", label="agent RSS")
    ax.plot(mins, [s.rss_anon_mb for s in run.samples], ".:", label="of which anonymous")
    if any(s.children for s in run.samples):
        ax.plot(mins, [s.children_rss_mb for s in run.samples], "s-", label="children RSS")
    fit_line(ax, verdict.rss_fit, f"fit {verdict.rss_fit.slope_per_h:+.2f} MB/h (limit {RSS_SLOPE_MAX_MB_PER_H:g})")
    ax.set_ylabel("MB")
    ax.set_title(f"resident memory (budget {BUDGET_RSS_MB:g} MB)", fontsize=10)

    ax = axes[1]
    ax.plot(mins, [s.fds for s in run.samples], "o-", color="tab:green", label="open fds")
    ax.plot(mins, [s.threads for s in run.samples], ".:", color="tab:olive", label="threads")
    fit_line(ax, verdict.fds_fit, f"fit {verdict.fds_fit.slope_per_h:+.1f} fds/h (limit {FDS_SLOPE_MAX_PER_H:g})")
    ax.set_ylabel("count")
    ax.set_title("open file descriptors (/proc/<pid>/fd)", fontsize=10)

    ax = axes[2]
    iv = [s for s in run.samples[1:] if s.p99_ms is not None]
    ax.plot([s.t_s / 60 for s in iv], [s.p50_ms for s in iv], "o-", label="p50")
    ax.plot([s.t_s / 60 for s in iv], [s.p99_ms for s in iv], "o-", color="tab:red", label="p99")
    ax.axhline(BUDGET_P99_MS, color="tab:red", ls="--", lw=1, label=f"budget p99 {BUDGET_P99_MS:g} ms")
    if not math.isnan(verdict.p99_limit):
        ax.axhline(verdict.p99_limit, color="grey", ls=":", lw=1, label=f"{args.p99_factor:g} x early median p99")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title("tap -> reply through the embedded broker, per interval; grey: other processes' CPU", fontsize=10)
    noise = ax.twinx()  # the shared machine: what everything else ran, interval by interval
    steps = run.samples[1:]
    noise.fill_between(
        [0.0, *(s.t_s / 60 for s in steps)],
        [steps[0].others_cores if steps else 0.0, *(s.others_cores for s in steps)],
        step="pre",
        color="grey",
        alpha=0.15,
    )
    noise.set_ylim(0, max(psutil.cpu_count() or 2, 1))
    noise.set_ylabel("other processes (cores)", color="grey")

    ax = axes[3]
    dm = [t / 60 for t, _, _ in run.depths]
    ax.plot(dm, [c + z for _, c, z in run.depths], "-", color="tab:purple", label="pending (cloud + Ziggy)")
    ax.plot(dm, [c for _, c, _ in run.depths], ":", lw=1, label="cloud")
    ax.plot(dm, [z for _, _, z in run.depths], ":", lw=1, label="Ziggy")
    ax.axvline(run.total_s / 60, color="k", lw=1, ls="-.", label="load off")
    ax.set_ylabel("events")
    ax.set_xlabel("minutes")
    ax.set_title(f"outbox depth (every {DEPTH_EVERY_S:g} s)", fontsize=10)

    for i, ax in enumerate(axes):
        if len(run.load.outage) >= 2:
            o0, o1 = run.load.outage[0] / 60, run.load.outage[1] / 60
            ax.axvspan(o0, o1, color="tab:red", alpha=0.08, label="cloud outage" if i in (0, 3) else None)
        ax.axvline(half_min, color="grey", lw=0.8, ls=":", label="second half from here" if i == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    failed = [c.name for c in verdict.checks if not c.passed]
    title = (
        f"club-agent soak: {'PASS' if verdict.passed else 'FAIL'} - {args.minutes:g} min, {args.members:,} members, "
        f"{args.readers} readers x {args.tap_hz:g}/s, {args.devices} tablets"
    )
    if failed:
        title += "\n" + "\n".join(textwrap.wrap("failed: " + "; ".join(failed), 120))
    fig.suptitle(title, fontsize=11, color="tab:green" if verdict.passed else "tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (default 60)")
    p.add_argument("--members", type=int, default=100_000, help="members in the cache and the cloud (100000)")
    p.add_argument("--devices", type=int, default=100, help="heartbeat tablets (default 100, at most 999)")
    p.add_argument("--heartbeat-hz", type=float, default=1.0, help="heartbeats per second per tablet (default 1)")
    p.add_argument("--readers", type=int, default=8, help="readers tapping (default 8)")
    p.add_argument("--tap-hz", type=float, default=5.0, help="taps per second per reader (default 5)")
    p.add_argument("--warmup", type=int, default=50, help="taps before the soak starts, not counted (default 50)")
    p.add_argument("--buttons", type=int, default=len(tl.COURTS), help="highlight buttons (default: one per court)")
    p.add_argument("--press-s", type=float, default=30.0, help="seconds between presses of a button (default 30)")
    p.add_argument("--orders-per-min", type=float, default=30.0, help="bar orders a minute (default 30)")
    p.add_argument("--member-changes-per-min", type=int, default=20, help="members changed in the cloud a minute")
    p.add_argument(
        "--outage-s",
        type=float,
        default=None,
        help=f"seconds the cloud and Ziggy answer 503 (default 10%% of the run, at most {OUTAGE_MAX_S:g}; none in "
        f"runs under {OUTAGE_MIN_RUN_S / 60:g} min; 0: none)",
    )
    p.add_argument("--outage-at", type=float, default=0.25, help="when the outage starts, a fraction of the run")
    p.add_argument("--drain-timeout-s", type=float, default=300.0, help="outbox drain after the load (default 300)")
    p.add_argument("--p99-factor", type=float, default=P99_FACTOR, help="late p99 against the early median (2)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the plot (default .artifacts/soak.png)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (config, db, logs)")
    args = p.parse_args(argv)
    if not 0.5 <= args.minutes <= 24 * 60:
        p.error("--minutes must be 0.5..1440")
    if not 5 <= args.sample_s <= args.minutes * 60:
        p.error("--sample-s must be 5 s .. the run's length")
    if not 1 <= args.members <= 2_000_000:
        p.error("--members must be 1..2000000")
    if not 0 <= args.devices <= 999 or not 0 <= args.heartbeat_hz <= 100:
        p.error("--devices must be 0..999, --heartbeat-hz 0..100")
    if not 1 <= args.readers <= 64 or not 0 <= args.tap_hz <= 100 or not 0 <= args.warmup <= 100_000:
        p.error("--readers must be 1..64, --tap-hz 0..100, --warmup 0..100000")
    if not 0 <= args.buttons <= 64 or args.press_s < 0 or not 0 <= args.orders_per_min <= 6000:
        p.error("--buttons must be 0..64, --press-s >= 0, --orders-per-min 0..6000")
    if not 0 <= args.member_changes_per_min <= 10_000:
        p.error("--member-changes-per-min must be 0..10000")
    total_s = args.minutes * 60
    if args.outage_s is None:
        args.outage_s = min(OUTAGE_MAX_S, round(0.1 * total_s)) if total_s >= OUTAGE_MIN_RUN_S else 0.0
    if not 0 <= args.outage_at < 1 or args.outage_s < 0 or args.outage_at * total_s + args.outage_s > total_s:
        p.error("the outage (--outage-at, --outage-s) must end within the run")
    if not 10 <= args.drain_timeout_s <= 3600 or not 1 < args.p99_factor <= 100:
        p.error("--drain-timeout-s must be 10..3600, --p99-factor 1..100")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(160, shutil.get_terminal_size((160, 40)).columns))
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does
    started = time.monotonic()
    total_s = args.minutes * 60
    if total_s < OUTAGE_MIN_RUN_S:
        console.print(
            "[yellow]a run this short sees the warm-up, not a trend: the growth fits are for 10 minutes up[/]"
        )
    if args.outage_s and args.outage_at * total_s + args.outage_s + BREAKER_OPEN_S > total_s / 2:
        console.print(
            "[yellow]the outage and the breaker's minute after it reach into the second half: the growth fits, the "
            "latency checks and the outbox depth check will see the backlog[/]"
        )
    try:
        with ob.SandboxProcess(root) as sandbox:
            console.print(f"[dim]sandbox cloud on {sandbox.url} (pid {sandbox.pid}); set-up in {root}...[/]")
            rig = build(root, args, sandbox.url)
            seed_sandbox(rig)
            import_s, import_line = import_members(rig.setup)
            console.print(f"[dim]{import_line} ({import_s:.1f} s); starting the agent...[/]")
            with rig.setup.log_path.open("wb") as log:
                agent = start_agent(rig, log)
                try:
                    run = asyncio.run(soak(rig, agent.pid, sandbox.pid, args, console))
                except BaseException:
                    code, _ = tl.stop_agent(agent)
                    console.print(f"[red]soak failed[/]; agent exit {code}; agent log tail:")
                    console.print(tl.log_tail(rig.setup.log_path), markup=False, highlight=False)
                    raise
                stop = tl.stop_agent(agent)
            if stop[0] not in (0, -signal.SIGTERM):
                console.print(f"[red]agent exit code {stop[0]}[/]; log tail:")
                console.print(tl.log_tail(rig.setup.log_path), markup=False, highlight=False)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the agent and the sandbox are stopped[/]")
        return 130
    finally:
        if args.keep:
            console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)

    verdict = judge(run, args, stop[0])
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        plot(run, verdict, args, out)
    except Exception as exc:  # the figures stand without the picture: say so, and fail the run
        verdict.checks.append(Check("plot written", False, f"{exc.__class__.__name__}: {exc}"))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "samples": [asdict(s) for s in run.samples],
                "after_drain": asdict(run.after_drain) if run.after_drain else None,
                "depths": run.depths,
                "outage": run.load.outage,
                "checks": [asdict(c) for c in verdict.checks],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    console.print(sample_table(run))
    console.print(summary_table(run, args, import_s, stop))
    for c in verdict.checks:
        console.print(f"{c.name:<58} {c.got:<80} {'[green]PASS[/]' if c.passed else '[red]FAIL[/]'}")
    p99s = [s.p99_ms for s in run.samples[1:] if s.p99_ms is not None]
    first, last = run.samples[0], run.samples[-1]
    summary = {
        "bench": "soak",
        "minutes": args.minutes,
        "rss_mb_start": round(first.rss_mb, 1),
        "rss_mb_end": round(last.rss_mb, 1),
        "rss_slope_mb_per_h": round(verdict.rss_fit.slope_per_h, 2),
        "fds_slope_per_h": round(verdict.fds_fit.slope_per_h, 2),
        "p99_ms_median": round(statistics.median(p99s), 3) if p99s else None,
        "p99_ms_max": round(max(p99s), 3) if p99s else None,
        "p99_ms_run": round(tl.percentile(sorted(run.load.all_latencies), 0.99), 3) if run.load.all_latencies else None,
        "outbox_max": max((c + z for _, c, z in run.depths), default=0),
        "pass": verdict.passed,
        "plot": str(out),
        "fds_start": first.fds,
        "fds_end": last.fds,
        "taps": len(run.load.all_latencies),
        "timeouts": run.load.taps.timeouts,
        "near_zero_s": round(run.near_zero_s, 1) if run.near_zero_s is not None else None,
        "drain_s": round(run.drain_s, 1) if run.drain_s is not None else None,
        "outage_s": round(run.load.outage[1] - run.load.outage[0], 1) if len(run.load.outage) >= 2 else 0,
        "others_cores_median": round(statistics.median(s.others_cores for s in run.samples[1:]), 2),
        "disk_sync_max_ms": round(max((s.disk_sync_max_ms for s in run.samples[1:]), default=0.0), 1),
        "slow_commits": sum(s.slow_commits for s in run.samples[1:]),
        "loop_stalls": sum(s.loop_stalls for s in run.samples[1:]),
        "written_mb_per_s_median": round(statistics.median(s.written_mb_per_s for s in run.samples[1:]), 2),
        "runtime_s": round(time.monotonic() - started, 1),
        "failed": [c.name for c in verdict.checks if not c.passed],
    }
    console.print(f"plot: {out}  samples: {out.with_suffix('.json')}")
    sys.stdout.flush()
    print(json.dumps(summary))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
