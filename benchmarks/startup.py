"""Start-up: from `exec` of the agent to systemd's READY=1, with 100,000 members cached, and its resident memory.

    .venv/bin/python benchmarks/startup.py [--members 100000] [--starts 5] [--devices 100]

1. tap_latency.py's set-up: a temporary data dir, its config (4 courts, 8 readers, `--devices` tablets with argon2
   hashes, loopback ports), 100,000 members imported with the real CLI.
2. `--starts` times: the agent runs as a subprocess (`python -m agent.cli run`) with NOTIFY_SOCKET pointing at a
   datagram socket this script owns, as systemd's would; the time from the spawn to READY=1 is measured, then the
   first reader tap is answered (the decision path really works), RSS is read, and the agent is stopped with
   SIGTERM (the time to stop is reported too). The first start is the first after the import (cold page cache
   for the agent's files, broker state created).
3. There is no peer: DESIGN names none for start-up.

Budget (DESIGN 6): ready within 3 s of start; resident memory under 150 MB with 100,000 members. Prints a table;
the last line of stdout is one JSON object `{"bench": "startup", "ready_s_median": ..., "ready_s_max": ...,
"rss_mb": ...}`. Exit 1 over budget. Loopback only; every wait bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import tap_latency as tl  # the set-up (config, members, devices) is shared

from agent import sim

BUDGET_READY_S = 3.0
BUDGET_RSS_MB = 150.0
READY_TIMEOUT_S = 60.0


def wait_ready(sock: socket.socket, started: float, agent: subprocess.Popen[bytes]) -> float:
    """Seconds from `started` to the READY=1 datagram."""
    deadline = started + READY_TIMEOUT_S
    while time.perf_counter() < deadline:
        if agent.poll() is not None:
            raise SystemExit(f"the agent exited with {agent.returncode} before READY=1")
        sock.settimeout(max(0.01, min(0.5, deadline - time.perf_counter())))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        if "READY=1" in data.decode(errors="replace").split("\n"):
            return time.perf_counter() - started
    raise SystemExit(f"no READY=1 within {READY_TIMEOUT_S} s")


async def first_tap(setup: tl.Setup) -> float:
    reader = setup.readers[0]
    async with sim.reader(tl.HOST, setup.broker_port, reader.id, reader.password) as r:
        reply = await r.tap(setup.cards[0])
    return reply.latency_s * 1000


def one_start(setup: tl.Setup, notify_path: Path) -> dict[str, float]:
    notify_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, setup.log_path.open("ab") as log:
        sock.bind(str(notify_path))
        env = {**tl.clean_env(), "NOTIFY_SOCKET": str(notify_path)}
        started = time.perf_counter()
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(setup.config_path)],
            cwd=setup.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ready_s = wait_ready(sock, started, agent)
            tap_ms = asyncio.run(first_tap(setup))
            rss_mb = psutil.Process(agent.pid).memory_info().rss / 2**20
        finally:
            code, stop_s = tl.stop_agent(agent)
    if code not in (0, -signal.SIGTERM):
        raise SystemExit(f"the agent stopped with exit code {code}; log: {setup.log_path}")
    return {"ready_s": ready_s, "first_tap_ms": tap_ms, "rss_mb": rss_mb, "stop_s": stop_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--members", type=int, default=100_000)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if not 1 <= args.starts <= 50:
        p.error("--starts must be 1..50")
    console = Console(width=max(100, shutil.get_terminal_size((120, 40)).columns))
    root = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        setup_args = tl.parse_args(["--members", str(args.members), "--devices", str(args.devices)])
        setup = tl.build(root, setup_args)
        import_s, said = tl.import_members(setup)
        console.print(f"members imported in {import_s:.1f} s: {said}", highlight=False)
        runs = [one_start(setup, root / "notify.sock") for _ in range(args.starts)]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"start-up with {args.members:,} members, {args.devices} devices (spawn -> READY=1)")
    for column in ("start", "ready s", "first tap ms", "RSS MB", "stop s"):
        table.add_column(column, justify="right")
    for n, run in enumerate(runs, start=1):
        note = " (first)" if n == 1 else ""
        table.add_row(
            f"{n}{note}", f"{run['ready_s']:.2f}", f"{run['first_tap_ms']:.1f}", f"{run['rss_mb']:.1f}",
            f"{run['stop_s']:.2f}",
        )  # fmt: skip
    console.print(table)
    ready = [r["ready_s"] for r in runs]
    rss = max(r["rss_mb"] for r in runs)
    ok = max(ready) <= BUDGET_READY_S and rss < BUDGET_RSS_MB
    console.print(
        f"budget ready <= {BUDGET_READY_S:.0f} s: max {max(ready):.2f} s, median {statistics.median(ready):.2f} s; "
        f"RSS < {BUDGET_RSS_MB:.0f} MB: {rss:.1f} MB  {'[green]PASS[/]' if ok else '[red]FAIL[/]'}"
    )
    summary = {
        "bench": "startup",
        "members": args.members,
        "starts": args.starts,
        "ready_s_median": round(statistics.median(ready), 3),
        "ready_s_max": round(max(ready), 3),
        "rss_mb": round(rss, 1),
        "first_tap_ms_median": round(statistics.median(r["first_tap_ms"] for r in runs), 2),
        "stop_s_max": round(max(r["stop_s"] for r in runs), 2),
    }
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.pop("WATCHDOG_USEC", None)
    sys.exit(main())
