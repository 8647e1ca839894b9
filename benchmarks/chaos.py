"""Chaos: the agent under premises load while faults hit it in random order; the sandbox cloud's log is the oracle.

    sudo .venv/bin/python benchmarks/chaos.py [--seed 1] [--duration 360] [--members 1000] [--workers 6]
                                              [--rate 12] [--outage-s 45] [--disk-mb 192] [--drain-s 150]
                                              [--keep DIR] [--only KIND,KIND...]

Root is needed: the agent's data dir is a small ext4 image the run loop-mounts itself. Everything else is on
loopback: the sandbox cloud (a subprocess, `club-agent sandbox`), the agent (a subprocess, `club-agent run`),
a simulated RTSP camera on court 1 (tests/cameras.py), and the devices in this process.

The premises (chaos_rig.py, chaos_traffic.py): 1,000 members synced from the sandbox; players tap in at MQTT
readers r1/r2, order at the bar tablet, tap out at their reader or court 1's exit reader, `--workers` at a time at
about `--rate` requests a second; other players use an RDM6300 reader on a pty (`[[readers]]`, court 3); a
highlight button on court 1, whose camera the agent records into clips.

The faults (chaos_faults.py): a seeded, shuffled deck of every kind, dealt one at a time, each held for a bounded
time then healed, until `--duration` has passed and at least one whole deck was dealt: SIGKILL and restart (three
per deck), a sandbox fault plan of each kind (500 503 429 401 timeout reset slow garbage cut), a long outage, a
full data disk, a read-only data disk (an ext4 error; healed by stop, e2fsck, start), the agent's wall clock
stepped forwards and backwards by minutes to hours (chaos_clock.py), the serial reader unplugged and replugged, one
device flooding the broker (a separate process). A request with no answer is repeated with its msg_id. The agent
is supervised as systemd does (Restart=on-failure after 5 s): an exit the run did not cause is a crash, recorded
with the exception that ended it. `--only kill,clock:+` deals just those faults, to reproduce one.

The end: every fault healed, the players stopped, their unanswered requests repeated until answered, the outbox
waited for until nothing is pending and no clip waits (`--drain-s`), the agent stopped with SIGTERM. Then the
oracle (chaos_oracle.py, on top of tests/e2e/crash_rig.judge): lost, duplicated, out of order, and refused
(decisions answered `unavailable`, unanswered in 5 s or with no connection to the agent, outside disk faults and the
run's own kills; and players on court refused their checkout at their court's reader, which with
second_tap_grace_s = 0 only a fault explains). During disk faults the refusals are counted apart as refused_disk,
expected above 0. What the devices heard and when each fault was in force are written to attempts.jsonl and
faults.jsonl beside the logs and a copy of the agent's store (kept when the run fails, or with --keep).

Prints a line per fault as it is dealt, then tables, the problems found, and as the very last line one JSON object
`{"lost": n, "duplicated": n, "out_of_order": n, "refused": n, ...}`. Exit 0 when those are 0, nothing crashed
and the agent stopped cleanly; 1 otherwise; 2 when the rig itself failed (the four are then null). Hard-bounded
to 20 minutes; every process and mount is cleaned up on any exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The rig's shared pieces live with the tests (tests/e2e/crash_rig.py, tests/cameras.py): make the repository
# importable when this file is run as a script (its own folder, benchmarks/, is already on the path).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import httpx
from chaos_clock import WallClock
from chaos_devices import MqttLink, SerialLine
from chaos_disk import DataDisk
from chaos_faults import Chaos, Holds, deck
from chaos_oracle import Figures, fault_rows, verdict
from chaos_rig import DEVICES, FLOOD_READER, FLOOD_TABLET, HOST, PLAYER_DEVICES, Agent, Layout, member_cards
from chaos_rig import write_config as write_agent_config
from chaos_timeline import Timeline
from chaos_traffic import Traffic
from rich.console import Console
from rich.table import Table

from tests.cameras import SYSTEM_PYTHON, SimulatedCamera
from tests.e2e.crash_rig import PENDING_PARAMS, PENDING_SQL, Child, club_agent_command, store_scalar, wait_http

HARD_LIMIT_S = 20 * 60
CLEANUP_MARGIN_S = 90.0  # kept for the drain's end, the oracle and the cleanup within the hard limit
SERIAL_SHARE = 0.1  # of the members: the players of the door's serial reader
WARMUP_S = 5.0
FINAL_REPEAT_S = 60.0
HTTP_TIMEOUT = httpx.Timeout(30.0)
CLIPS_WAITING_SQL = "SELECT COUNT(*) FROM highlights WHERE clip_state IN ('pending', 'ready')"


@dataclass
class Run:
    """What the run produced, for the report (filled as it goes: a failed run reports what it has)."""

    root: Path
    seed: int
    started: float = field(default_factory=time.monotonic)
    timeline: Timeline = field(default_factory=Timeline)
    traffic: Traffic | None = None
    chaos: Chaos | None = None
    agent: Agent | None = None
    figures: Figures | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    drained_s: float | None = None  # None: not drained within --drain-s
    pending_left: int = 0
    clips_waiting: int = 0
    unanswered_left: int = 0
    final_exit: int | None = None
    healed_at_end: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seed", type=int, default=1, help="seed of the fault deck, the holds and the players")
    p.add_argument("--duration", type=float, default=360.0, help="seconds of faults (at least one whole deck)")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--workers", type=int, default=6, help="MQTT players acting at once")
    p.add_argument("--rate", type=float, default=12.0, help="MQTT requests a second, all players together")
    p.add_argument("--outage-s", type=float, default=45.0, help="the long outage's length (about)")
    p.add_argument("--disk-mb", type=int, default=192, help="the data disk's size")
    p.add_argument("--drain-s", type=float, default=150.0, help="how long the outbox may take to drain at the end")
    p.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (logs, store)")
    p.add_argument(
        "--only",
        default=None,
        help="a deck of just these faults, comma-separated (kill, cloud:500, outage, disk_full, read_only, clock:+,"
        " clock:-, unplug, flood:scans, ...): to reproduce one",
    )
    args = p.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else None
    unknown = sorted(set(args.only or ()) - set(deck()))
    if unknown:
        p.error(f"--only: unknown fault(s) {', '.join(unknown)}; known: {', '.join(sorted(set(deck())))}")
    checks = (
        (10 <= args.duration <= 900, "--duration 10..900"),
        (100 <= args.members <= 100_000, "--members 100..100,000"),
        (1 <= args.workers <= 32, "--workers 1..32"),
        (0.5 <= args.rate <= 200, "--rate 0.5..200"),
        (10 <= args.outage_s <= 300, "--outage-s 10..300"),
        (64 <= args.disk_mb <= 4096, "--disk-mb 64..4096"),
        (10 <= args.drain_s <= 600, "--drain-s 10..600"),
    )
    for ok, what in checks:
        if not ok:
            p.error(what)
    return args


def preflight() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root: the data dir is an ext4 image this run mounts (run it with sudo)")
    problems += [f"missing {t}" for t in DataDisk.missing_tools()]
    if shutil.which("ffmpeg") is None:
        problems.append("missing ffmpeg (the camera): make test-deps")
    if not SYSTEM_PYTHON.exists():
        problems.append(f"missing {SYSTEM_PYTHON} with python3-gi (the camera's RTSP server): make test-deps")
    return problems


# -- the run -------------------------------------------------------------------------------------------------------


async def wait_scalar(db: Path, sql: str, params: tuple[Any, ...], want: int, within: float) -> tuple[bool, int]:
    deadline = time.monotonic() + within
    value = -1
    while True:
        with contextlib.suppress(sqlite3.Error):
            value = await store_scalar(db, sql, params)
            if value == want:
                return True, value
        if time.monotonic() > deadline:
            return False, value
        await asyncio.sleep(0.2)


async def premises(args: argparse.Namespace, run: Run, say: Any, stack: contextlib.AsyncExitStack) -> None:
    root, rng = run.root, random.Random(args.seed)
    layout = Layout.of(root)
    hard_until = run.started + HARD_LIMIT_S - CLEANUP_MARGIN_S - args.drain_s - FINAL_REPEAT_S

    disk = DataDisk(root / "disk.img", layout.mount, args.disk_mb)
    await asyncio.to_thread(disk.create)
    stack.callback(disk.close)  # last out: after the agent has stopped
    layout.data.mkdir(parents=True, exist_ok=True)
    layout.ring.mkdir(parents=True, exist_ok=True)
    clock = WallClock(root / "clock")
    if not await asyncio.to_thread(clock.build):
        run.notes.append(f"clock steps skipped: {clock.error}")
    stack.callback(clock.close)

    sandbox = Child("sandbox", [*club_agent_command(), "sandbox", "--port", str(layout.sandbox_port), "--members",
                                "0", "--seed", str(args.seed)], root / "sandbox.log", root)  # fmt: skip
    sandbox.start()
    stack.push_async_callback(_stop_child, sandbox)
    await wait_http(sandbox, f"{layout.sandbox_url}/_sandbox/health")
    cards = member_cards(args.members)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        upsert = [{"member_id": m, "first_name": f"P{m[-4:]}", "status": "active", "cards": [c]} for m, c in cards]
        (await http.post(f"{layout.sandbox_url}/_sandbox/members", json={"upsert": upsert})).raise_for_status()

    camera = SimulatedCamera(root / "camera", size="640x360", fps=10, gop=10, bitrate="400k", audio="none")
    await stack.enter_async_context(camera)
    await asyncio.to_thread(write_agent_config, layout, camera.url, max(64, args.disk_mb * 3 // 4))

    serial = SerialLine(layout.serial_link)
    serial.plug()
    stack.callback(serial.unplug)

    agent = run.agent = Agent(layout, club_agent_command(), clock.env(), run.timeline)
    stack.push_async_callback(_stop_agent, agent)
    ready = await agent.start()
    supervisor_stop = asyncio.Event()
    supervisor = asyncio.create_task(agent.supervise(supervisor_stop), name="agent-supervisor")

    async def stop_supervisor() -> None:
        supervisor_stop.set()
        await asyncio.gather(supervisor, return_exceptions=True)

    stack.push_async_callback(stop_supervisor)
    synced, count = await wait_scalar(layout.db, "SELECT members FROM member_list WHERE id = 1", (), args.members, 60)
    if not synced:
        raise RuntimeError(f"the agent's member sync brought {count} of {args.members} members within 60 s")
    say(f"agent ready in {ready:.2f} s, {args.members:,} members synced; data disk {args.disk_mb} MB ext4 at "
        f"{layout.mount}; camera {camera.url}; serial reader {layout.serial_link}")  # fmt: skip

    links = {d.id: MqttLink(HOST, layout.broker_port, d.id, d.password, d.reply_topic) for d in PLAYER_DEVICES}
    links_stop = asyncio.Event()
    link_tasks = [asyncio.create_task(link.run(links_stop), name=f"link-{i}") for i, link in links.items()]

    async def stop_links() -> None:
        links_stop.set()
        await asyncio.wait(link_tasks, timeout=15)
        for task in link_tasks:
            task.cancel()
        await asyncio.gather(*link_tasks, return_exceptions=True)

    stack.push_async_callback(stop_links)
    async with asyncio.timeout(60):
        await asyncio.gather(*(link.up.wait() for link in links.values()))

    serial_count = max(10, int(args.members * SERIAL_SHARE))
    traffic = run.traffic = Traffic(
        links,
        serial,
        run.timeline,
        cards[:-serial_count],
        cards[-serial_count:],
        random.Random(rng.random()),
        rate_per_s=args.rate,
        workers=args.workers,
        press_every_s=(5.0, 12.0),
        serial_every_s=(0.6, 1.5),
        db=layout.db,
        agent_up=lambda: agent.up,
    )
    traffic.start()
    stack.push_async_callback(traffic.stop)
    await asyncio.sleep(WARMUP_S)

    holds = Holds(outage=(args.outage_s * 0.9, args.outage_s * 1.1))
    chaos = run.chaos = Chaos(
        agent=agent,
        layout=layout,
        disk=disk,
        clock=clock,
        serial=serial,
        links=links,
        traffic=traffic,
        timeline=run.timeline,
        rng=random.Random(rng.random()),
        holds=holds,
        say=say,
        flood_devices={d.id: d for d in DEVICES if d.id in (FLOOD_READER, FLOOD_TABLET)},
        only=args.only,
    )
    stack.push_async_callback(chaos.aclose)
    stack.push_async_callback(chaos.heal_all)  # on any way out, before the agent is stopped
    if not clock.available:
        chaos.skip("clock")
    say(f"faults for {args.duration:g} s (seed {args.seed}):")
    await chaos.run(args.duration, hard_until)

    # The end: heal, stop the players, answer what is unanswered, drain, stop the agent.
    run.healed_at_end = await chaos.heal_all()
    if not agent.child.running:
        await agent.start()
        run.healed_at_end.append("agent started")
    await traffic.stop()
    run.unanswered_left = await traffic.finish(FINAL_REPEAT_S)
    began = time.monotonic()
    drained, run.pending_left = await wait_scalar(layout.db, PENDING_SQL, PENDING_PARAMS, 0, args.drain_s)
    left = max(5.0, args.drain_s - (time.monotonic() - began))
    _, run.clips_waiting = await wait_scalar(layout.db, CLIPS_WAITING_SQL, (), 0, left)
    run.drained_s = time.monotonic() - began if drained else None
    await stop_supervisor()
    run.final_exit = await agent.stop()
    await agent.reaped()
    store = root / "store"  # the store outlives the disk image (removed when the run passes)
    store.mkdir(exist_ok=True)
    for path in layout.data.glob("agent.db*"):
        shutil.copy2(path, store / path.name)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        answer = await http.get(f"{layout.sandbox_url}/_sandbox/received")
        answer.raise_for_status()
        run.received = answer.json()["entries"]
        answer = await http.get(f"{layout.sandbox_url}/_sandbox/clips")
        answer.raise_for_status()
        body = answer.json()
        clips = body.get("clips", body if isinstance(body, list) else [])
    traffic.classify()
    run.figures = await asyncio.to_thread(verdict, store / "agent.db", run.received, clips, traffic, run.timeline)
    await asyncio.to_thread(write_evidence, root, run, traffic)
    disk.keep_image = False


def write_evidence(root: Path, run: Run, traffic: Traffic) -> None:
    """What the devices heard (attempts.jsonl) and when each fault was in force (faults.jsonl), seconds from the
    first fault, for a post-mortem against store/agent.db and sandbox.log."""
    origin = run.timeline.windows[0].start if run.timeline.windows else run.started
    with (root / "attempts.jsonl").open("w", encoding="utf-8") as out:
        for attempt in traffic.attempts:
            out.write(json.dumps(attempt.record(origin)) + "\n")
    with (root / "faults.jsonl").open("w", encoding="utf-8") as out:
        for w in run.timeline.windows:
            ends = {"healed_s": w.healed, "end_s": w.end}
            times = {k: None if v is None else round(v - origin, 3) for k, v in ends.items()}
            out.write(json.dumps({"kind": w.kind, "detail": w.detail, "start_s": round(w.start - origin, 3), **times,
                                  "notes": {k: str(v) for k, v in w.notes.items()}}) + "\n")  # fmt: skip


async def _stop_child(child: Child) -> None:
    if child.proc is not None and child.running:
        with contextlib.suppress(TimeoutError):
            await child.stop(10)
    child.kill()


async def _stop_agent(agent: Agent) -> None:
    if agent.child.running:
        await agent.stop()
    await agent.reaped()


async def main_async(args: argparse.Namespace, run: Run, say: Any) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(HARD_LIMIT_S - CLEANUP_MARGIN_S):
            await premises(args, run, say, stack)


# -- the report ----------------------------------------------------------------------------------------------------


def report(run: Run, console: Console, error: str | None) -> dict[str, Any]:
    traffic, f, chaos = run.traffic, run.figures, run.chaos
    out: dict[str, Any] = {"lost": None, "duplicated": None, "out_of_order": None, "refused": None}  # not judged
    if traffic is not None:
        traffic.classify()  # (again: idempotent) when the run stopped before its end
    if traffic is not None:
        table = Table(title="faults (attempts: device requests overlapping the fault's window)")
        for col in ("fault", "applied", "seconds", "attempts", "refused", "excused", "p50 ms", "p99 ms", "notes"):
            table.add_column(col, overflow="fold")
        for row in fault_rows(run.timeline, traffic):
            table.add_row(row.kind, str(row.applied), f"{row.seconds:.0f}", str(row.attempts), str(row.refused),
                          str(row.excused), f"{row.p50_ms:.1f}", f"{row.p99_ms:.1f}", row.notes)  # fmt: skip
        console.print(table)
    if traffic is not None and f is not None:
        t, v = traffic.told, f.verdict
        acted = sum(1 for r in run.received if r.get("kind") == "call" and r.get("acted"))
        pressed = Counter(traffic.highlights.values())
        outcomes = ", ".join(
            f"{w} {o} {n}" for (w, o), n in sorted(Counter((a.what, a.outcome) for a in traffic.attempts).items())
        )
        highlights = f"{len(traffic.highlights)} ({pressed['ok']} / {pressed['no_session']})"
        runs = run.agent.runs if run.agent is not None else None
        starts = f"{len(runs.starts)} / {len(runs.orphans)}" if runs is not None else "-"
        summary = Table(title="told, stored, delivered")
        summary.add_column("what")
        summary.add_column("count", justify="right")
        rows = [
            ("check-ins told (MQTT readers)", len(t.checkins)),
            ("check-outs told (MQTT readers)", len(t.checkouts)),
            ("orders told (lines)", f"{len(t.orders)} ({t.lines})"),
            ("highlights told (ok / no_session)", highlights),
            ("serial taps told (granted)", len(traffic.serial_told)),
            ("requests / attempts", f"{traffic.requests} / {len(traffic.attempts)}"),
            ("attempts by device and outcome", outcomes),
            ("answers re-asked after restarts (changed)", f"{traffic.reasked} ({len(traffic.answer_mismatches)})"),
            ("events stored", v.events),
            ("events accepted by the cloud", v.cloud_events),
            ("Ziggy calls acted (session, consumption)", v.ziggy_calls),
            ("sandbox calls that acted (all routes)", acted),
            ("clips: store states / received by the cloud", f"{dict(f.clips)} / {f.clips_received}"),
            ("outbox drained after the faults", "no" if run.drained_s is None else f"{run.drained_s:.1f} s"),
            ("agent starts / processes left behind", starts),
            ("players' surprises (answer wins)", dict(traffic.drift.counts) or "none"),
        ]
        for what, value in rows:
            summary.add_row(what, str(value))
        console.print(summary)
        console.print(
            f"[bold]lost {f.lost.total()}[/] {dict(f.lost)}, [bold]duplicated {f.duplicated.total()}[/] "
            f"{dict(f.duplicated)}, [bold]out of order {f.out_of_order.total()}[/] {dict(f.out_of_order)}, "
            f"[bold]refused {f.refused.total()}[/] {dict(f.refused)} ({len(f.checkout_denied_players)} players"
            f" refused a checkout); refused during disk faults {f.refused_disk}, "
            f"unanswered during restarts {f.unanswered_restart} (repeated with their msg_id until answered), "
            f"unknown {v.unknown}, dead letters {v.dead.total()}, still pending {v.pending.total()}"
        )
        show_problems(console, f.problems)
        for example in traffic.drift.examples[:8]:
            console.print(f"  surprise: {example}", markup=False, highlight=False)
        out |= {
            "lost": f.lost.total(),
            "duplicated": f.duplicated.total(),
            "out_of_order": f.out_of_order.total(),
            "refused": f.refused.total(),
            "refused_disk": f.refused_disk,
            "unanswered_restart": f.unanswered_restart,
            "unanswered_unplug": f.unanswered_unplug,
            "rate_limited": f.rate_limited,
            "lost_by_place": dict(f.lost),
            "duplicated_by_place": dict(f.duplicated),
            "out_of_order_by_place": dict(f.out_of_order),
            "refused_by_device": dict(f.refused),
            "checkout_denied_players": len(f.checkout_denied_players),
            "unknown": v.unknown,
            "dead": v.dead.total(),
            "pending": v.pending.total(),
            "checkins_told": len(t.checkins),
            "checkouts_told": len(t.checkouts),
            "orders_told": len(t.orders),
            "lines_told": t.lines,
            "highlights_told": len(traffic.highlights),
            "serial_taps_told": len(traffic.serial_told),
            "events": v.events,
            "cloud_events": v.cloud_events,
            "ziggy_calls": v.ziggy_calls,
            "clips_received": f.clips_received,
            "answer_mismatches": len(traffic.answer_mismatches),
            "unanswered_at_end": run.unanswered_left,
            "drained_s": None if run.drained_s is None else round(run.drained_s, 1),
            "final_exit": run.final_exit,
        }
    if chaos is not None:
        out["faults"] = dict(Counter(chaos.applied))
        out["faults_skipped"] = chaos.skipped
    if run.agent is not None:
        out["agent_starts"] = len(run.agent.runs.starts)
        out["agent_crashes"] = len(run.agent.runs.crashes)
        out["agent_start_failures"] = len(run.agent.runs.start_failures)
        for line in run.agent.runs.crashes[:10]:
            console.print(f"  crash: {line}", markup=False, highlight=False)
        for line in sorted(set(run.agent.runs.start_failures))[:5]:
            console.print(
                f"  start failed (restarted 5 s later, as systemd does): {line}", markup=False, highlight=False
            )
        out["orphans"] = len(run.agent.runs.orphans)
        for line in run.agent.runs.orphans[:10]:
            console.print(f"  orphan: {line}", markup=False, highlight=False)
    for note in [*run.notes, *(f"healed at the end: {h}" for h in run.healed_at_end)]:
        console.print(f"  note: {note}", markup=False, highlight=False)
    out["seconds"] = round(time.monotonic() - run.started, 1)
    out["seed"] = run.seed
    if error is not None:
        out["error"] = error
    return out


def show_problems(console: Console, problems: list[str], each: int = 6) -> None:
    """The first few of each kind of problem (lost, duplicate, out of order, refused, pending, note), with counts."""
    by_kind: dict[str, list[str]] = {}
    for line in problems:  # "lost: ...", "refused: ...", "delivery cloud seq 7 is pending: ...": the first word
        by_kind.setdefault(line.split(maxsplit=1)[0].rstrip(":"), []).append(line)
    for kind, lines in by_kind.items():
        console.print(f"  {kind}: {len(lines)}", markup=False, highlight=False)
        for line in lines[:each]:
            console.print(f"    - {line}", markup=False, highlight=False)
        if len(lines) > each:
            console.print(f"    ... and {len(lines) - each} more (all of them: attempts.jsonl, store/)")


def failed(summary: dict[str, Any]) -> bool:
    keys = ("lost", "duplicated", "out_of_order", "refused", "unknown", "unanswered_at_end", "agent_crashes")
    return any(summary.get(k) for k in keys) or summary.get("final_exit") != 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=max(120, shutil.get_terminal_size((140, 40)).columns))
    problems = preflight()
    if problems:
        console.print("chaos cannot run here: " + "; ".join(problems), markup=False)
        print(json.dumps({"lost": None, "duplicated": None, "out_of_order": None, "refused": None,
                          "error": "; ".join(problems)}))  # fmt: skip
        return 2
    for name in ("mqtt", "asyncio"):  # every kill resets the devices' connections; aiomqtt would print each
        logging.getLogger(name).setLevel(logging.CRITICAL)
    root = args.keep or Path(tempfile.mkdtemp(prefix="club-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    run = Run(root=root.resolve(), seed=args.seed)
    console.print(f"chaos: seed {args.seed}, {args.duration:g} s of faults, {args.members:,} members, in {run.root}")

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    error: str | None = None
    try:
        asyncio.run(main_async(args, run, say))
    except (KeyboardInterrupt, asyncio.CancelledError):
        error = "interrupted"
    except Exception as exc:  # the rig failed: say where its logs are
        error = f"{exc.__class__.__name__}: {exc}"
        console.print(f"[red]the rig failed:[/] {error}", markup=True)
    summary = report(run, console, error)
    if error is not None or failed(summary):
        kept = ["agent.log", "sandbox.log", "attempts.jsonl", "faults.jsonl", "store/", "disk.img"]
        console.print(f"kept in {run.root}: {', '.join(k for k in kept if (run.root / k.rstrip('/')).exists())}")
    elif args.keep is None:
        shutil.rmtree(run.root, ignore_errors=True)
    sys.stdout.flush()
    print(json.dumps(summary))
    if error is not None:
        return 2
    return 1 if failed(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
