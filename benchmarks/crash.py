"""Crash benchmark (issue 5): SIGKILL the agent at random moments under steady taps and bar orders, 100 times.

    .venv/bin/python benchmarks/crash.py [--cycles 100] [--seed 1] [--members 0] [--fresh] [--workers 6]
                                         [--rate 40] [--max-traffic-s 1.2] [--keep DIR]

The rig is tests/e2e/crash_rig.py, the same as tests/e2e/test_crash_sync.py runs for 8 cycles: the sandbox cloud
in a subprocess of its own (`club-agent sandbox --members 0`, it outlives every kill), the agent as a subprocess
(`club-agent run`) restarted after each SIGKILL, the devices on its embedded broker. Each cycle repeats what the
last kill left unanswered (same msg_id), asks a few answered requests again (the answer must not change), then
players tap in, order at the bar and tap out until the kill lands at a seeded random moment. After the last cycle
the agent runs once more until its outbox is drained, and stops with SIGTERM.

Then the oracle (what the devices heard against the store and the sandbox's /_sandbox/received): events lost that
a device was told about or that the store holds, duplicates after de-duplication keys (event id at the cloud,
Idempotency-Key at Ziggy, and one event per fact in the store), per-session order at both destinations.

Prints one line per cycle, a summary with every problem found, then as the very last line of stdout one JSON
object. Exit code 0 when nothing was lost, doubled or reordered; 1 otherwise; 2 when the rig itself failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The rig lives with the tests (it is shared with tests/e2e/test_crash_sync.py): make the repository importable
# when this file is run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.loop import run_async
from tests.e2e.crash_rig import CrashOptions, Report, run_crash


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=100, help="SIGKILLs (each followed by a restart)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the players' choices and the kill moments")
    parser.add_argument(
        "--members",
        type=int,
        default=0,
        help="pool of players (active members, no credit plan); 0: 24, or 100 a cycle with --fresh",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="each player plays one session (default: players come back)"
    )
    parser.add_argument("--workers", type=int, default=6, help="players acting at once")
    parser.add_argument("--rate", type=float, default=40.0, help="requests a second, all players together")
    parser.add_argument("--max-traffic-s", type=float, default=1.2, help="latest kill after the traffic starts")
    parser.add_argument("--cycle-timeout", type=float, default=60.0, help="seconds one cycle may take")
    parser.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (logs, store)")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.workers < 1 or 0 < args.members < args.workers:
        parser.error("need --cycles >= 1, --workers >= 1 and --members 0 or at least --workers")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.max_traffic_s <= 0.15:
        parser.error("--max-traffic-s must be above 0.15")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Every kill resets the devices' connections: paho and asyncio would print each one on stderr.
    for name in ("mqtt", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    root = args.keep or Path(tempfile.mkdtemp(prefix="club-crash-"))
    options = CrashOptions(
        root=root,
        cycles=args.cycles,
        seed=args.seed,
        members=args.members,
        rejoin=not args.fresh,
        workers=args.workers,
        rate_per_s=args.rate,
        traffic_s=(0.15, args.max_traffic_s),
        cycle_timeout_s=args.cycle_timeout,
    )
    players = "each player plays one session" if args.fresh else "players come back for more sessions"
    print(f"crash benchmark: {args.cycles} cycles, seed {args.seed}, {players}, in {root}", flush=True)
    report: Report | None = None
    try:
        report = run_async(run_crash(options, say=lambda line: print(line, flush=True)))
    except Exception as exc:  # the rig failed (timeout, a process that would not start): say where its logs are
        print(f"the rig failed: {exc.__class__.__name__}: {exc}\nlogs and store: {root}", file=sys.stderr)
        return 2
    finally:
        if args.keep is None and report is not None and report.failures == 0:
            shutil.rmtree(root, ignore_errors=True)
    print(report.summary(problems=100))
    if report.failures:
        print(f"logs and store kept in {root}")
    print(json.dumps(report.as_json()))
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
