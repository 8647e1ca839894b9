"""Serial tap latency: RDM6300 readers on ptys beside MQTT readers, one agent subprocess, 100,000 members.

    .venv/bin/python benchmarks/serial_latency.py [--members 100000] [--taps 1000] [--serial-readers 4]
                                                  [--mqtt-readers 4] [--tap-hz 5] [--devices 100]

1. A temporary data dir: the agent's config (tap_latency.py's: 4 courts, loopback ports, argon2 device hashes)
   plus one `[[readers]] kind = "rdm6300"` per serial reader, its port the slave side of a pty (raw, as a USB
   serial line), `feedback = "line"`; 100,000 members with 10-hex-digit EM4100 cards, imported with the real CLI.
2. The agent runs as a subprocess (`python -m agent.cli run`); `--devices` tablets heartbeat at 1 Hz meanwhile.
3. Each serial reader writes whole RDM6300 frames (STX, 10 hex, XOR checksum, ETX) on its pty master, one
   presentation at a time at `--tap-hz`, as a card held to the reader: new players check in, players on court
   check out, ~5% unknown cards. Latency = the `os.write` of the frame's last byte -> the decision's feedback
   line (GRANTED/DENIED) read back on the master (the ACK line's time is reported too: the local chirp).
4. The peer, side by side in the same run and the same agent: `--mqtt-readers` readers tapping over MQTT
   (`rfid/{id}/scan` -> `rfid/{id}/response`, the path of tap_latency.py).

Budget (DESIGN 6): serial p99 <= 20 ms. Prints a table; the very last line of stdout is one JSON object
`{"bench": "serial_latency", "p50_ms": ..., "p99_ms": ...}` (and the peer's figures). Exit 1 over budget.
Loopback and ptys only; every loop bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tty
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import tap_latency as tl  # the agent set-up and MQTT tap loop are shared

from agent import sim
from firmware_bridges import rdm6300
from firmware_bridges.feedback import decode_line

BUDGET_P99_MS = 20.0
REPLY_TIMEOUT_S = 5.0


@dataclass
class SerialReader:
    id: str
    court: str
    master: int
    port: str
    buf: bytes = b""
    waiting: asyncio.Future[tuple[float, bytes]] | None = None  # (time, line) of the next feedback line
    lines: list[tuple[float, bytes]] = field(default_factory=list)
    last_card: str = ""  # kept across the warm-up and the measured taps
    last_at: float = 0.0


@dataclass
class Stats:
    decided_ms: list[float] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    missed: list[str] = field(default_factory=list)


def em4100_cards(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:  # bounded: 40-bit collisions are rare
        card = f"{rng.getrandbits(40):010X}"
        if card not in seen:
            seen.add(card)
            out.append(card)
    return out


def build(root: Path, args: argparse.Namespace) -> tuple[tl.Setup, list[SerialReader]]:
    rng = random.Random(args.seed)
    mqtt = [
        tl.Device(f"r{n}", "reader", tl.COURTS[(n - 1) % len(tl.COURTS)], secrets.token_urlsafe(18))
        for n in range(1, args.mqtt_readers + 1)
    ]
    tablets = [tl.Device(f"t{n:03d}", "tablet", None, secrets.token_urlsafe(18)) for n in range(1, args.devices + 1)]
    serial: list[SerialReader] = []
    for n in range(1, args.serial_readers + 1):
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        port = os.ttyname(slave)
        os.close(slave)  # the agent opens its own
        os.set_blocking(master, False)
        serial.append(SerialReader(f"door-{n}", tl.COURTS[(n - 1) % len(tl.COURTS)], master, port))
    broker_port, api_port = tl.free_ports(2)
    cards = em4100_cards(rng, args.members + max(100, args.members // 100))
    members, unknown = cards[: args.members], cards[args.members :]
    config_path, members_path = root / "agent.toml", root / "members.json"
    tl.write_config(config_path, root / "data", broker_port, api_port, mqtt + tablets)
    extra = []
    for r in serial:
        extra += [
            "[[readers]]",
            f"id = {tl.toml_str(r.id)}",
            'kind = "rdm6300"',
            f"port = {tl.toml_str(r.port)}",
            f"court = {tl.toml_str(r.court)}",
            'feedback = "line"',
            "",
        ]
    with config_path.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(extra))
    tl.write_members(members_path, members)
    setup = tl.Setup(
        root=root,
        config_path=config_path,
        members_path=members_path,
        log_path=root / "agent.log",
        broker_port=broker_port,
        api_port=api_port,
        readers=mqtt,
        tablets=tablets,
        cards=members,
        unknown_cards=unknown,
        tap_pool=members,
    )
    return setup, serial


def watch(reader: SerialReader) -> None:
    """Called by the loop when the pty has bytes: split into lines, stamp each on arrival."""
    now = time.perf_counter()
    with contextlib.suppress(BlockingIOError, OSError):
        reader.buf += os.read(reader.master, 4096)
    while b"\n" in reader.buf:
        line, _, reader.buf = reader.buf.partition(b"\n")
        if reader.waiting is not None and not reader.waiting.done():
            reader.waiting.set_result((now, line + b"\n"))
        else:
            reader.lines.append((now, line + b"\n"))


async def next_line(reader: SerialReader, within: float) -> tuple[float, bytes]:
    if reader.lines:
        return reader.lines.pop(0)
    reader.waiting = asyncio.get_running_loop().create_future()
    try:
        return await asyncio.wait_for(reader.waiting, within)
    finally:
        reader.waiting = None


async def serial_taps(
    reader: SerialReader,
    count: int,
    setup: tl.Setup,
    rng: random.Random,
    stats: Stats | None,
    tap_hz: float,
    occupancy: tl.Occupancy,
    deadline: float,
) -> None:
    period = 1.0 / tap_hz if tap_hz > 0 else 0.0
    next_at = time.monotonic() + rng.uniform(0, period)
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        on_court = set(occupancy.by_reader.get(reader.id, ()))
        card = occupancy.pick(reader.id, setup, rng)
        if card == reader.last_card:  # the agent keeps one read per presentation: lift the card 0.6 s first
            await asyncio.sleep(max(0.0, reader.last_at + 0.6 - time.monotonic()))
        if period:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + period, time.monotonic())
        reader.lines.clear()
        frame = rdm6300.encode(bytes.fromhex(card))
        os.write(reader.master, frame)
        sent = time.perf_counter()
        reader.last_card, reader.last_at = card, time.monotonic()
        got: list[bytes] = []
        try:
            ack_at, ack = await next_line(reader, REPLY_TIMEOUT_S)
            got.append(ack)
            done_at, line = await next_line(reader, REPLY_TIMEOUT_S)
        except TimeoutError:
            if stats is not None:
                stats.timeouts += 1
                stats.missed.append(f"{reader.id} card {card}: heard {got or 'nothing'}")
            continue
        answer = decode_line(line)
        if answer.granted and card not in on_court:  # a check-in (the feedback line does not say which)
            occupancy.record(reader.id, card, {"action": "checkin"})
        if stats is not None:
            stats.ack_ms.append((ack_at - sent) * 1000)
            stats.decided_ms.append((done_at - sent) * 1000)
            stats.outcomes["granted" if answer.granted else "denied"] += 1
        assert decode_line(ack).ack


def pct(values: list[float], q: float) -> float:
    return tl.percentile(sorted(values), q)


async def bench(setup: tl.Setup, serial: list[SerialReader], pid: int, args: argparse.Namespace) -> dict[str, object]:
    proc = psutil.Process(pid)
    rng = random.Random(args.seed + 1)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + tl.BENCH_TIMEOUT_S
    for r in serial:
        loop.add_reader(r.master, watch, r)
    hb_stop = asyncio.Event()
    hb_tasks: list[asyncio.Task[None]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            first = await tl.wait_for_agent(setup, proc, stack)
            mqtt = [first]
            for d in setup.readers[1:]:
                mqtt.append(await stack.enter_async_context(sim.reader(tl.HOST, setup.broker_port, d.id, d.password)))
            hb_stats = tl.HeartbeatStats()
            gate = asyncio.Semaphore(tl.CONNECT_CONCURRENCY)
            hb_tasks = [
                asyncio.create_task(
                    tl.heartbeat_device(setup, d, 1.0, gate, hb_stop, hb_stats, random.Random(rng.random()), deadline)
                )
                for d in setup.tablets
            ]
            occupancy = tl.Occupancy()
            serial_stats, mqtt_stats = Stats(), tl.TapStats()
            for warm in (True, False):  # warm-up first, not counted
                n = args.warmup if warm else args.taps
                await asyncio.gather(
                    *(
                        serial_taps(
                            r,
                            k,
                            setup,
                            random.Random(rng.random()),
                            None if warm else serial_stats,
                            args.tap_hz,
                            occupancy,
                            deadline,
                        )
                        for r, k in zip(serial, tl.split(n, len(serial)), strict=True)
                    ),
                    *(
                        tl.reader_taps(
                            r,
                            k,
                            setup,
                            random.Random(rng.random()),
                            None if warm else mqtt_stats,
                            deadline,
                            args.tap_hz,
                            occupancy,
                        )
                        for r, k in zip(mqtt, tl.split(n, len(mqtt)), strict=True)
                    ),
                )
            rss_mb = proc.memory_info().rss / 1e6
    finally:
        hb_stop.set()
        for task in hb_tasks:
            task.cancel()
        await asyncio.gather(*hb_tasks, return_exceptions=True)
        for r in serial:
            loop.remove_reader(r.master)
    return {"serial": serial_stats, "mqtt": mqtt_stats, "rss_mb": rss_mb, "heartbeats": hb_stats.sent}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--members", type=int, default=100_000)
    p.add_argument("--taps", type=int, default=1000, help="measured taps per path (serial, MQTT)")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--serial-readers", type=int, default=4)
    p.add_argument("--mqtt-readers", type=int, default=4)
    p.add_argument("--tap-hz", type=float, default=5.0, help="taps per second per reader")
    p.add_argument("--devices", type=int, default=100, help="tablets heartbeating at 1 Hz")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    for name, lo, hi in (
        ("members", 1, 2_000_000),
        ("taps", 1, 100_000),
        ("serial_readers", 1, 32),
        ("mqtt_readers", 1, 32),
        ("devices", 0, 999),
    ):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be {lo}..{hi}")
    console = Console(width=max(100, shutil.get_terminal_size((120, 40)).columns))
    root = Path(tempfile.mkdtemp(prefix="serial-bench-"))
    serial: list[SerialReader] = []
    try:
        console.print(f"[dim]set-up in {root}: {args.members:,} members, {args.serial_readers} ptys...[/]")
        setup, serial = build(root, args)
        import_s, _ = tl.import_members(setup)
        console.print(f"[dim]imported in {import_s:.2f} s; starting the agent...[/]")
        with setup.log_path.open("wb") as log:
            agent = tl.start_agent(setup, log)
            try:
                result = asyncio.run(bench(setup, serial, agent.pid, args))
            except BaseException:
                code, _ = tl.stop_agent(agent)
                console.print(f"[red]benchmark failed[/]; agent exit {code}; log tail:")
                console.print(tl.log_tail(setup.log_path), markup=False, highlight=False)
                raise
            code, _ = tl.stop_agent(agent)
    finally:
        for r in serial:
            with contextlib.suppress(OSError):
                os.close(r.master)
        shutil.rmtree(root, ignore_errors=True)
    s: Stats = result["serial"]  # type: ignore[assignment]
    m: tl.TapStats = result["mqtt"]  # type: ignore[assignment]
    table = Table(title=f"serial tap latency ({args.members:,} members, {args.devices} tablets at 1 Hz)")
    for col in ("path", "taps", "p50 ms", "p90 ms", "p99 ms", "max ms", "outcomes", "timeouts"):
        table.add_column(col)
    rows = [
        ("serial pty -> decision feedback line", s.decided_ms, dict(s.outcomes), s.timeouts),
        ("serial pty -> local ACK line", s.ack_ms, {}, 0),
        ("MQTT rfid/scan -> response (peer)", m.latencies_ms, dict(m.outcomes), m.timeouts),
    ]
    for name, values, outcomes, timeouts in rows:
        table.add_row(
            name,
            str(len(values)),
            *(f"{pct(values, q):.2f}" for q in (0.5, 0.9, 0.99)),
            f"{max(values):.2f}" if values else "-",
            ", ".join(f"{k} {v}" for k, v in outcomes.items()),
            str(timeouts),
        )
    console.print(table)
    for line in s.missed[:10]:
        console.print(f"[yellow]no answer within {REPLY_TIMEOUT_S:g} s: {line}[/]")
    p99 = pct(s.decided_ms, 0.99)
    ok = p99 <= BUDGET_P99_MS and code in (0, -signal.SIGTERM) and not s.timeouts
    console.print(
        f"budget serial p99 <= {BUDGET_P99_MS:g} ms: {'PASS' if ok else 'FAIL'}; agent RSS "
        f"{result['rss_mb']:.1f} MB; agent exit {code}"
    )
    summary = {
        "bench": "serial_latency",
        "p50_ms": round(pct(s.decided_ms, 0.5), 2),
        "p99_ms": round(p99, 2),
        "ack_p99_ms": round(pct(s.ack_ms, 0.99), 2),
        "taps": len(s.decided_ms),
        "timeouts": s.timeouts,
        "mqtt_p50_ms": round(pct(m.latencies_ms, 0.5), 2),
        "mqtt_p99_ms": round(pct(m.latencies_ms, 0.99), 2),
        "members": args.members,
        "median_ratio_serial_to_mqtt": round(statistics.median(s.decided_ms) / statistics.median(m.latencies_ms), 2)
        if s.decided_ms and m.latencies_ms
        else None,
    }
    sys.stdout.flush()
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
