"""Member sync: 100,000 members from the sandbox cloud into a fresh database through the real MemberSync.

    .venv/bin/python benchmarks/member_sync.py [--members 100000] [--repeat 3] [--page-limit 5000]
                                               [--changes 1000] [--in-process] [--keep]

1. The sandbox cloud (`club-agent sandbox --members N`) starts as a subprocess on a free loopback port: a real
   cloud is another machine, and does not share this process's core, GIL or garbage collector. `--in-process`
   serves it from this event loop instead (slower: its handlers share the core, and its 100,000 pre-serialised
   members lengthen every full garbage collection of this process).
2. Each repeat syncs into a fresh database in a temporary directory (WAL, synchronous=FULL, as in production),
   from no cursor: a token, every page of `--page-limit` members, staging, one apply transaction. Beside it a
   writer probe runs a no-op write transaction every 20 ms: its waits are what a tap would wait for the
   database writer while a sync runs (the longest one is the final apply).
3. Then `--changes` members change at the cloud (admin API) and a delta sync is timed: the periodic case.
4. This process's RSS (glibc tuned as the agent tunes it) is sampled every 50 ms.

Prints a table, then as the very last line of stdout one JSON object. Exit code 0 within budget (median of the
full syncs <= 5 s, every member stored), 1 otherwise. Everything runs on loopback; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from rich.console import Console
from rich.table import Table

from agent.app import limit_malloc_growth
from agent.config import CloudSection
from agent.logs import configure
from agent.loop import run_async
from agent.sandbox.options import AgentSettings, SandboxOptions
from agent.sandbox.server import SandboxServer
from agent.store.db import Database
from agent.sync.cloud import CloudClient
from agent.sync.members import MemberSync

HOST = "127.0.0.1"
BUDGET_S = 5.0
TZ = ZoneInfo("America/Sao_Paulo")
SANDBOX_START_TIMEOUT_S = 120.0
SYNC_TIMEOUT_S = 300.0
PROBE_EVERY_S = 0.02
SLOW_WAIT_MS = 20.0  # the tap latency budget (DESIGN 6)
RSS_EVERY_S = 0.05


@dataclass
class Run:
    seconds: float
    members: int
    pages: int
    version: int
    rss_peak: int
    probe_ms: list[float] = field(default_factory=list)


@dataclass
class Bench:
    full: list[Run]
    delta: list[Run]
    rss_start: int
    sandbox: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def club_agent_command() -> list[str]:
    script = Path(sys.executable).parent / "club-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


@contextlib.asynccontextmanager
async def sandbox_subprocess(members: int) -> AsyncIterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        *club_agent_command(),
        "sandbox",
        "--members",
        str(members),
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    url = f"http://{HOST}:{port}"
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + SANDBOX_START_TIMEOUT_S
            while True:
                if proc.returncode is not None:
                    stderr = await proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"the sandbox exited with {proc.returncode}: {stderr.decode()[-500:]}")
                with contextlib.suppress(httpx.HTTPError):
                    health = (await client.get(url + "/_sandbox/health", timeout=2)).json()
                    if health["members"] == members:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sandbox did not start within {SANDBOX_START_TIMEOUT_S:g} s")
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def sandbox_in_process(members: int) -> AsyncIterator[str]:
    async with SandboxServer(SandboxOptions(members=members), host=HOST, port=0) as server:
        yield server.url


async def sample_rss(proc: psutil.Process, stop: asyncio.Event, out: list[int]) -> None:
    while not stop.is_set():
        out.append(proc.memory_info().rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)


async def probe(db: Database, stop: asyncio.Event, out: list[float]) -> None:
    """A no-op write transaction every 20 ms: how long the writer keeps a tap waiting."""
    while not stop.is_set():
        started = time.perf_counter()
        async with db.transaction("probe", notify=False) as conn:
            await conn.execute("SELECT 1")
        out.append((time.perf_counter() - started) * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_EVERY_S)


async def timed_sync(sync: MemberSync, db: Database, me: psutil.Process, *, full: bool) -> Run:
    stop = asyncio.Event()
    rss: list[int] = []
    waits: list[float] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sample_rss(me, stop, rss))
        tg.create_task(probe(db, stop, waits))
        try:
            started = time.perf_counter()
            result = await asyncio.wait_for(sync.run(full=full), SYNC_TIMEOUT_S)
            seconds = time.perf_counter() - started
        finally:
            stop.set()
    return Run(seconds, result.members, result.pages, result.version, max(rss, default=0), waits)


async def change_members(url: str, count: int, round_: int) -> None:
    changed = [
        {"member_id": f"m-{i:06d}", "first_name": f"Changed{round_}", "cards": [f"05{round_:02X}{i:08X}"]}
        for i in range(1, count + 1)
    ]
    async with httpx.AsyncClient() as client:
        response = await client.post(url + "/_sandbox/members", json={"upsert": changed}, timeout=60)
        response.raise_for_status()


async def bench(args: argparse.Namespace, root: Path, console: Console) -> Bench:
    me = psutil.Process()
    serve = sandbox_in_process if args.in_process else sandbox_subprocess
    console.print(f"[dim]starting the sandbox cloud with {args.members:,} members...[/]")
    async with serve(args.members) as url:
        settings = AgentSettings.of(SandboxOptions(), url)
        section = CloudSection(
            base_url=settings.cloud_base_url, token_url=settings.token_url, client_id=settings.cloud_client_id
        )
        rss_start = me.memory_info().rss
        full: list[Run] = []
        delta: list[Run] = []
        for n in range(1, args.repeat + 1):
            async with Database(root / f"run{n}" / "agent.db") as db:
                cloud = CloudClient(section, settings.cloud_client_secret, settings.signing_secret)
                sync = MemberSync(db, cloud, tz=TZ, page_limit=args.page_limit)
                try:
                    run = await timed_sync(sync, db, me, full=True)
                    full.append(run)
                    console.print(f"[dim]run {n}: full sync {run.seconds:.2f} s[/]")
                    if args.changes:
                        await change_members(url, min(args.changes, args.members), n)
                        delta.append(await timed_sync(sync, db, me, full=False))
                finally:
                    await sync.aclose()
            if not args.keep:
                shutil.rmtree(root / f"run{n}", ignore_errors=True)
    return Bench(full, delta, rss_start, "in-process" if args.in_process else "subprocess")


def report(console: Console, args: argparse.Namespace, result: Bench) -> tuple[bool, dict[str, Any]]:
    seconds = [r.seconds for r in result.full]
    median = statistics.median(seconds)
    rate = args.members / median
    rss_peak = max(r.rss_peak for r in result.full) / 2**20
    waits = [w for r in result.full for w in r.probe_ms]
    wait_max = max(waits, default=float("nan"))
    slow_waits = sum(1 for w in waits if w > SLOW_WAIT_MS)
    delta_median = statistics.median([r.seconds for r in result.delta]) if result.delta else None

    table = Table(title=f"member sync benchmark (sandbox cloud {result.sandbox}, loopback)")
    for column in ("run", "kind", "members", "pages", "seconds", "members/s", "RSS peak", "writer wait max"):
        table.add_column(column, justify="left" if column in ("run", "kind") else "right")
    for n, run in enumerate(result.full, 1):
        table.add_row(
            str(n),
            "full",
            f"{run.members:,}",
            str(run.pages),
            f"{run.seconds:.2f}",
            f"{run.members / run.seconds:,.0f}",
            f"{run.rss_peak / 2**20:.0f} MB",
            f"{max(run.probe_ms, default=float('nan')):.0f} ms",
        )
        if n <= len(result.delta):
            d = result.delta[n - 1]
            table.add_row(
                "",
                f"delta ({args.changes:,} changed)",
                f"{d.members:,}",
                str(d.pages),
                f"{d.seconds:.2f}",
                "-",
                f"{d.rss_peak / 2**20:.0f} MB",
                f"{max(d.probe_ms, default=float('nan')):.0f} ms",
            )
    console.print(table)
    console.print(
        f"median full sync {median:.2f} s ({rate:,.0f} members/s, page limit {args.page_limit}); RSS of this process "
        f"{result.rss_start / 2**20:.0f} MB before, {rss_peak:.0f} MB at peak; {slow_waits} of {len(waits)} probe "
        f"writes waited over {SLOW_WAIT_MS:g} ms, the longest {wait_max:.0f} ms (the final apply, one transaction)"
    )
    checks = [
        (f"median full sync <= {BUDGET_S:g} s", median <= BUDGET_S, f"{median:.2f} s"),
        (
            "every member stored",
            all(r.members == args.members for r in result.full),
            ", ".join(f"{r.members:,}" for r in result.full),
        ),
    ]
    ok = True
    for name, passed, got in checks:
        ok = ok and passed
        console.print(f"budget {name:<28} {got:>22}  {'[green]PASS[/]' if passed else '[red]FAIL[/]'}")
    summary = {
        "bench": "member_sync",
        "members": args.members,
        "seconds": round(median, 3),
        "runs_s": [round(s, 3) for s in seconds],
        "members_per_s": round(rate),
        "delta_seconds": None if delta_median is None else round(delta_median, 3),
        "delta_changes": args.changes,
        "rss_mb": round(rss_peak, 1),
        "writer_wait_max_ms": round(wait_max, 1),
        "writer_waits_over_20ms": slow_waits,
        "page_limit": args.page_limit,
        "sandbox": result.sandbox,
        "budget_s": BUDGET_S,
        "pass": ok,
    }
    return ok, summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--members", type=int, default=100_000, help="members at the cloud (default 100000)")
    p.add_argument("--repeat", type=int, default=3, help="full syncs, each into a fresh database (default 3)")
    p.add_argument("--page-limit", type=int, default=5000, help="members per page, 1..5000 (default 5000)")
    p.add_argument("--changes", type=int, default=1000, help="members changed before each delta sync (0: none)")
    p.add_argument("--in-process", action="store_true", help="serve the sandbox from this process's event loop")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if not 1 <= args.members <= 1_000_000:
        p.error("--members must be 1..1000000")
    if not 1 <= args.repeat <= 50:
        p.error("--repeat must be 1..50")
    if not 1 <= args.page_limit <= 5000:
        p.error("--page-limit must be 1..5000")
    if args.changes < 0:
        p.error("--changes must be 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure(json=False, level="warning")  # the table is the report; a skipped record would still be said
    limit_malloc_growth()  # as the agent does at start, so that RSS is the agent's
    console = Console(width=max(100, shutil.get_terminal_size((120, 40)).columns))
    root = Path(tempfile.mkdtemp(prefix="member-sync-bench-"))
    try:
        result = run_async(bench(args, root, console))
        ok, summary = report(console, args, result)
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
