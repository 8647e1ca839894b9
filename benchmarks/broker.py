"""Embedded broker vs mosquitto: premises-load latency and CPU, and saturated throughput, in one run.

    .venv/bin/python benchmarks/broker.py [--duration 20] [--devices 100] [--rate 5] [--tablets 10]
                                          [--repeat 1] [--only embedded|mosquitto] [--saturate-seconds 5]

Both brokers get the same device accounts, passwords and access lists (authentication and ACL on both), listen on
loopback only, and run in a process of their own, so that the CPU time measured is the broker's alone:

* embedded: this script re-invoked with `--serve-embedded`, which builds `BrokerSection` and `DeviceDirectory`
  (argon2 hashes, `rules_for` access lists) as the agent does, configures logging as `club-agent run` does and
  malloc as `Agent.run` does (`limit_malloc_growth`), and serves `EmbeddedBroker` on the agent's own event loop
  (`agent.loop.run_async`: uvloop) until SIGTERM. Only the broker runs in it: in the agent the dispatcher and the
  decisions share this event loop, here the "agent" is an outside client.
* mosquitto: Debian's `/usr/sbin/mosquitto -c` with a generated conf: a loopback listener, `password_file`
  (`mosquitto_passwd -U`), `acl_file` from `agent.lan.auth.rules_for` (publish -> `topic write`, subscribe ->
  `topic read`, user agent -> `topic readwrite #`), no anonymous clients, no persistence, and two settings away
  from the defaults: `set_tcp_nodelay true` (asyncio, so amqtt, sets TCP_NODELAY on every socket; without it
  mosquitto's replies wait for the clients' delayed ACKs, +40 ms) and `max_queued_messages 0` (2.0.11 drops QoS 1
  messages to a subscriber fed by several pipelining publishers long before its queue limit; the saturation
  clients bound what is queued anyway).

Premises load (per broker, `--warmup` s not counted, then `--duration` s measured):
* `--devices` accounts: 60% readers, 20% buttons, 20% tablets (at least `--tablets`), over 10 courts. Every device
  publishes `--rate` msg/s at QoS 1 on a fixed schedule (open loop, random phase): readers `rfid/{id}/scan`,
  buttons `button/{id}/status`, tablets `tablet/{id}/status` heartbeats.
* One "agent" client (user agent) subscribes to those topics at QoS 1 and answers every scan with
  `rfid/{id}/response` (QoS 1) and every `--state-every`-th scan with `court/{c}/state` (QoS 1, retained), which
  `--tablets` tablets subscribed to `court/+/state` receive (fan-out). By default every scan (30 scans/s a court:
  about what the agent's 20 ms coalescing of court state lets through), so with the defaults 1,100 msg/s are
  published and 3,800 delivered, 3,000 of them the fan-out.
* Every payload carries `time.perf_counter_ns()` at publish (CLOCK_MONOTONIC on Linux, shared by every process of
  the host). Latency is publish -> receipt at the subscribing client, for every delivered message of the three
  paths (device -> agent, agent -> reader, agent -> tablets), counted when its publish time falls in the measured
  window. After the window the devices stop and each client drains until it has been quiet for a while; every
  message published in the window must then have arrived (QoS 1), once per subscriber; duplicates are reported.
* The clients are paho-mqtt clients driven by one selector loop per process (paho's external-loop API, TCP_NODELAY
  set on every socket), the devices spread over `--workers` processes plus one process for the agent client. How
  late each scheduled publish went out (generator lag) and the generators' CPU are reported: a busy generator
  shows there, not as broker latency.
* Broker CPU: user + system time of the broker process over the measured window / wall time, % of one core.

Saturated throughput (per broker, QoS 0 and 1): `--saturate-publishers` publisher processes (reader accounts)
publish `rfid/{id}/scan` to one subscriber process (user agent, `rfid/+/scan` at the same QoS, PUBACKs batched per
read), each publisher keeping `--inflight` messages between itself and the subscriber (and, at QoS 1, at most that
many unacknowledged): the subscriber posts how many it has received from each publisher on a shared memory page and
a publisher refills its window from it. So the brokers run flat out without queueing (or dropping) without bound,
and what is measured is what a broker can sustain end to end: messages received by the subscriber per second over
`--saturate-seconds` after 1 s of warm-up (a publisher whose window has not moved for 0.5 s counts it as dropped
and goes on; drops are reported). These clients speak MQTT 3.1.1 over raw sockets with pre-built packets and
count whole reads with slices, a few microseconds a read: a paho subscriber reads one packet per call and would
cap mosquitto near its own speed. ratio = embedded / mosquitto at QoS 1.

Caveats: on a 2-core machine the generators compete with the broker for CPU (mosquitto and the subscriber each want
most of a core at saturation); the table shows the broker's, the generators' and the whole machine's CPU so that
a generator bottleneck or a noisy neighbour is visible. Brokers run one after the other in each round (mosquitto
first); `--repeat N` runs N rounds and reports medians (the ratio: the median of each round's ratio).

Prints a table, budget verdicts, then as the very last line of stdout one JSON object. Exit code 0 even when a budget
is missed (this is a measurement); 2 when a broker or a client failed, 3 when QoS 1 messages were lost.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import heapq
import json
import math
import mmap
import os
import random
import secrets
import select
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

HOST = "127.0.0.1"
AGENT_USER = "agent"  # agent.config.AGENT_USERNAME
MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "mosquitto_passwd"
BROKERS = ("mosquitto", "embedded")
COURTS = tuple(f"c{n}" for n in range(1, 11))
BUDGET_P99_MS = 20.0
BUDGET_CPU_PCT = 15.0
BUDGET_RATIO = 0.35
# Payload sizes (bytes), about those of the agent's JSON messages.
SCAN_BYTES = 96
STATUS_BYTES = 128
REPLY_BYTES = 160
STATE_BYTES = 512
SAT_PAYLOAD_BYTES = 64
KEEPALIVE_S = 60
START_TIMEOUT_S = 20.0  # broker up and accepting
READY_TIMEOUT_S = 120.0  # every client connected and subscribed (the embedded broker verifies argon2 one at a time)
QUIET_S = 2.0  # a premises client stops draining after this long without a message
DRAIN_MAX_S = 10.0  # and at the latest this long after the window
SAT_WARMUP_S = 1.0
STALL_NS = 500_000_000  # a saturation publisher whose window has not moved for this long counts it as dropped
SEND_TIMEOUT_S = 5.0  # a saturation client's blocking writes and reads
RING = 4096  # pre-built packets per saturation publisher (more than --inflight)
POLL_S = 0.001  # how often a saturation publisher with a full window looks at the subscriber's counts
SETTLE_MAX_S = 10.0  # waiting for the broker to go idle between phases
SETTLE_CPU_PCT = 10.0
STOP_TIMEOUT_S = 10.0
SERVE_MAX_S = 3600.0  # the embedded broker process ends by itself after this long, whatever happens
PR_SET_PDEATHSIG = 1
GEN_BUSY_PCT = 90.0  # a client process above this share of a core may be setting the pace
GEN_LAG_MS = 5.0  # scheduled publishes this late (p99) mean busy premises clients
NOISE_PCT = 25.0  # CPU of other processes worth a warning
CLASSES = ("up", "reply", "state")  # device -> agent, agent -> reader, agent -> tablets
CLASS_NAMES = {"up": "device -> agent", "reply": "agent -> reader", "state": "agent -> tablets"}


def now_ns() -> int:
    return time.perf_counter_ns()


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so that no broker or client outlives a killed run.

    Also the `preexec_fn` of every child (mosquitto included): the orchestrator runs no threads when it forks, and
    `CDLL(None)` needs no library search in the child.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# -- accounts ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    id: str
    kind: str  # reader | button | tablet
    court: str | None
    password: str
    fanout: bool = False  # a tablet subscribed to court/+/state

    @property
    def topic(self) -> str:
        """What the device publishes at --rate."""
        if self.kind == "reader":
            return f"rfid/{self.id}/scan"
        return f"{self.kind}/{self.id}/status"

    @property
    def subscriptions(self) -> list[str]:
        if self.kind == "reader":
            return [f"rfid/{self.id}/response"]
        return ["court/+/state"] if self.fanout else []


def make_accounts(devices: int, tablets: int) -> list[Account]:
    n_tablets = max(tablets, round(0.2 * devices))
    n_buttons = min(round(0.2 * devices), devices - n_tablets - 1)
    n_readers = devices - n_tablets - n_buttons
    out = [
        Account(f"r{n}", "reader", COURTS[(n - 1) % len(COURTS)], secrets.token_urlsafe(18))
        for n in range(1, n_readers + 1)
    ]
    out += [
        Account(f"b{n}", "button", COURTS[(n - 1) % len(COURTS)], secrets.token_urlsafe(18))
        for n in range(1, n_buttons + 1)
    ]
    # Fan-out tablets serve every court (no court: they may subscribe court/+/#); the others only beat.
    out += [
        Account(
            f"t{n}",
            "tablet",
            None if n <= tablets else COURTS[(n - 1) % len(COURTS)],
            secrets.token_urlsafe(18),
            n <= tablets,
        )
        for n in range(1, n_tablets + 1)
    ]
    return out


@dataclass(frozen=True)
class Setup:
    root: Path
    accounts: list[Account]
    agent_password: str
    devices_json: Path  # accounts with argon2 hashes, for --serve-embedded
    mosquitto_conf: Path
    mosquitto_port: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def device_config(account: Account, password_hash: str | None = None) -> Any:
    from agent.config import DeviceConfig

    return DeviceConfig(id=account.id, kind=account.kind, court=account.court, password_hash=password_hash)


def build(root: Path, args: argparse.Namespace) -> Setup:
    from agent.lan.auth import hash_password, rules_for

    accounts = make_accounts(args.devices, args.tablets)
    agent_password = secrets.token_urlsafe(24)
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:  # argon2 releases the GIL
        hashes = list(pool.map(hash_password, [a.password for a in accounts]))
    devices_json = root / "devices.json"
    devices_json.write_text(
        json.dumps(
            {
                "agent_password": agent_password,
                "devices": [
                    {"id": a.id, "kind": a.kind, "court": a.court, "password_hash": h}
                    for a, h in zip(accounts, hashes, strict=True)
                ],
            }
        ),
        encoding="utf-8",
    )
    # mosquitto: the same accounts and the same access lists.
    passwd = root / "mosquitto.passwd"
    passwd.write_text(
        "".join(f"{a.id}:{a.password}\n" for a in accounts) + f"{AGENT_USER}:{agent_password}\n", encoding="utf-8"
    )
    done = subprocess.run(
        [MOSQUITTO_PASSWD, "-U", str(passwd)], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"mosquitto_passwd -U failed (exit {done.returncode}): {done.stderr.strip()}")
    acl_lines = [f"user {AGENT_USER}", "topic readwrite #", ""]
    for account in accounts:
        rules = rules_for(device_config(account))
        acl_lines.append(f"user {account.id}")
        acl_lines += [f"topic write {t}" for t in rules.publish]
        acl_lines += [f"topic read {t}" for t in rules.subscribe]
        acl_lines.append("")
    acl = root / "mosquitto.acl"
    acl.write_text("\n".join(acl_lines), encoding="utf-8")
    port = free_port()
    conf_lines = [
        "# Generated by benchmarks/broker.py",
        f"listener {port} {HOST}",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        "persistence false",
        # The saturation clients keep a bounded window in flight, so the queue cannot grow without bound; without
        # this mosquitto 2.0.11 drops QoS 1 messages to a subscriber fed by several pipelining publishers even
        # with a few hundred queued (its inflight quota accounting, reworked in 2.0.13).
        "max_queued_messages 0",
        # asyncio (so amqtt) sets TCP_NODELAY on every socket; mosquitto only when asked, and Nagle with the
        # clients' delayed ACKs would add up to 40 ms to its replies: that is a setting, not the broker's speed.
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if os.geteuid() == 0:
        conf_lines.append("user root")  # as root mosquitto would switch to user mosquitto, who cannot read the files
    conf = root / "mosquitto.conf"
    conf.write_text("\n".join(conf_lines) + "\n", encoding="utf-8")
    return Setup(root, accounts, agent_password, devices_json, conf, port)


# -- child processes ---------------------------------------------------------------------------------------------


class Child:
    """A child process with line-oriented stdout read without threads; stderr goes to a log file."""

    registry: ClassVar[list[Child]] = []  # every child of the run, for clean-up

    def __init__(self, name: str, cmd: list[str], log_path: Path, stdin: bool = True) -> None:
        self.name, self.log_path = name, log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=Path(__file__).resolve().parent.parent,
                preexec_fn=die_with_parent,
            )
        self._buf = b""
        Child.registry.append(self)
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_line(self, deadline: float) -> str | None:
        """The next stdout line, or None at EOF or when the monotonic deadline passes."""
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def send(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def cpu(self) -> float:
        try:
            t = self.ps.cpu_times()
        except psutil.Error:
            return float("nan")
        return float(t.user + t.system)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, then SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(ValueError):
            Child.registry.remove(self)
        return int(self.proc.returncode)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def stop_all() -> None:
    for child in list(reversed(Child.registry)):
        with contextlib.suppress(Exception):
            child.stop(3.0)


def self_command(*extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra]


class BenchError(Exception):
    """A broker or a client failed: the run cannot produce figures."""


def wait_port(port: int, child: Child, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{child.name} did not accept connections on {port} within {START_TIMEOUT_S:g} s")


def start_broker(name: str, setup: Setup) -> tuple[Child, int]:
    deadline = time.monotonic() + START_TIMEOUT_S
    log = setup.root / f"{name}.log"
    if name == "mosquitto":
        child = Child(name, [MOSQUITTO, "-c", str(setup.mosquitto_conf)], log, stdin=False)
        wait_port(setup.mosquitto_port, child, deadline)
        return child, setup.mosquitto_port
    child = Child(name, self_command("--serve-embedded", str(setup.devices_json)), log, stdin=False)
    line = child.read_line(deadline)
    if line is None or not line.startswith("READY "):
        child.stop(3.0)
        raise BenchError(f"the embedded broker did not start ({line!r}):\n{child.log_tail()}")
    port = int(line.split()[1])
    wait_port(port, child, deadline)
    return child, port


def settle(broker: Child) -> None:
    """Wait (bounded) until the broker has worked off any backlog of the previous phase."""
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline and broker.alive():
        before, t0 = broker.cpu(), time.monotonic()
        time.sleep(0.25)
        busy = 100.0 * (broker.cpu() - before) / (time.monotonic() - t0)
        if busy < SETTLE_CPU_PCT:
            return


def sleep_until_ns(t_ns: int) -> None:
    for _ in range(100_000):  # bounded; each pass sleeps up to 0.2 s
        left = (t_ns - now_ns()) / 1e9
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


@dataclass
class CpuSample:
    children: dict[str, float]
    machine_busy: float
    machine_steal: float

    @staticmethod
    def take(children: dict[str, Child]) -> CpuSample:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        steal = getattr(t, "steal", 0.0)
        total = sum(t)
        return CpuSample({k: c.cpu() for k, c in children.items()}, total - idle - steal, steal)


def cpu_pct(before: CpuSample, after: CpuSample, name: str, wall_s: float) -> float:
    return 100.0 * (after.children[name] - before.children[name]) / wall_s


def start_workers(specs: dict[str, dict[str, Any]], root: Path) -> dict[str, Child]:
    """Spawn one worker per spec (in order), waiting for each READY so that, e.g., the agent subscribes first."""
    workers: dict[str, Child] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    for name, spec in specs.items():
        path = root / f"{name}.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        workers[name] = Child(name, self_command("--worker", str(path)), root / f"{name}.log")
        if spec.get("wait_ready"):
            expect_ready(workers[name], deadline)
    for name, child in workers.items():
        if not specs[name].get("wait_ready"):
            expect_ready(child, deadline)
    return workers


def expect_ready(child: Child, deadline: float) -> None:
    line = child.read_line(deadline)
    if line != "READY":
        raise BenchError(f"{child.name} not ready: {line!r}\n{child.log_tail()}")


def collect(workers: dict[str, Child], deadline: float) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, child in workers.items():
        line = child.read_line(deadline)
        if line is None or not line.startswith("RESULT "):
            raise BenchError(f"{name} gave no result ({line!r}):\n{child.log_tail()}")
        results[name] = json.loads(line[len("RESULT ") :])
        child.stop(5.0)
    return results


# -- premises load: the orchestrator side ------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def split(items: Sequence[Account], parts: int) -> list[list[Account]]:
    return [list(items[i::parts]) for i in range(parts)]


def measure_window(
    broker: Child, workers: dict[str, Child], lead_s: float, warmup_s: float, seconds: float, what: str, drain_s: float
) -> tuple[CpuSample, CpuSample, float, dict[str, dict[str, Any]]]:
    """Start the workers' schedule, sample CPU around the measured window, then collect their results."""
    start = now_ns() + int(lead_s * 1e9)
    w0 = start + int(warmup_s * 1e9)
    w1 = w0 + int(seconds * 1e9)
    schedule = json.dumps({"start_ns": start, "w0_ns": w0, "w1_ns": w1})
    for child in workers.values():
        child.send(schedule)
    watched = {"broker": broker, **workers}
    sleep_until_ns(w0)
    before = CpuSample.take(watched)
    sleep_until_ns(w1)
    after = CpuSample.take(watched)
    if not broker.alive():
        raise BenchError(f"{broker.name} died during {what}:\n{broker.log_tail()}")
    return before, after, (w1 - w0) / 1e9, collect(workers, time.monotonic() + drain_s)


def run_premises(setup: Setup, broker: Child, port: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    fanout = [a for a in setup.accounts if a.fanout]
    readers = {a.id: a.court for a in setup.accounts if a.kind == "reader"}
    common = {"role": "premises", "host": HOST, "port": port, "rate": args.rate, "qos": 1}
    specs: dict[str, dict[str, Any]] = {
        "agent": {
            **common,
            "agent": {"password": setup.agent_password, "readers": readers, "state_every": args.state_every},
            "devices": [],
            "wait_ready": True,
            "seed": seed,
        }
    }
    for n, group in enumerate(split(setup.accounts, args.workers)):
        specs[f"devices{n + 1}"] = {
            **common,
            "agent": None,
            "devices": [
                {"id": a.id, "password": a.password, "topic": a.topic, "subs": a.subscriptions, "kind": a.kind}
                for a in group
            ],
            "seed": seed * 100 + n,
        }
    workers = start_workers(specs, setup.root)
    before, after, wall, results = measure_window(
        broker, workers, 0.3, args.warmup, args.duration, "the premises load", DRAIN_MAX_S + 20.0
    )

    lat: dict[str, list[int]] = {c: [] for c in CLASSES}
    sent: Counter[str] = Counter()
    received: Counter[str] = Counter()
    dups = 0
    rtt: list[int] = []
    lag: list[int] = []
    errors: list[str] = []
    unacked = 0
    for name, r in results.items():
        for c in CLASSES:
            lat[c] += r["lat"][c]
        sent.update(r["sent"])
        received.update(r["received"])
        dups += sum(r["dups"].values())
        rtt += r["rtt"]
        lag += r["lag"]
        unacked += r["unacked"]
        errors += [f"{name}: {e}" for e in r["errors"]]
    expected = {"up": sent["up"], "reply": sent["reply"], "state": sent["state"] * len(fanout)}
    every = sorted(v for c in CLASSES for v in lat[c])
    for c in CLASSES:
        lat[c].sort()
    rtt.sort()
    lag.sort()
    gen_cpu = {name: cpu_pct(before, after, name, wall) for name in workers}
    out: dict[str, Any] = {
        "p50_ms": percentile(every, 0.50) / 1000,
        "p99_ms": percentile(every, 0.99) / 1000,
        "max_ms": (every[-1] if every else float("nan")) / 1000,
        "path_p99_ms": {c: percentile(lat[c], 0.99) / 1000 for c in CLASSES},
        "path_p50_ms": {c: percentile(lat[c], 0.50) / 1000 for c in CLASSES},
        "rtt_p50_ms": percentile(rtt, 0.50) / 1000,
        "rtt_p99_ms": percentile(rtt, 0.99) / 1000,
        "cpu_pct": cpu_pct(before, after, "broker", wall),
        "expected": sum(expected.values()),
        "delivered": sum(received[c] for c in CLASSES),
        "lost": sum(max(0, expected[c] - received[c]) for c in CLASSES),
        "by_path": {c: [received[c], expected[c]] for c in CLASSES},
        "dups": dups,
        "unacked": unacked,
        "published_per_s": (sent["up"] + sent["reply"] + sent["state"]) / wall,
        "delivered_per_s": sum(received[c] for c in CLASSES) / wall,
        "gen_cpu_pct": sum(gen_cpu.values()),
        "gen_cpu_max_pct": max(gen_cpu.values()),
        "agent_client_cpu_pct": gen_cpu["agent"],
        "gen_lag_p99_ms": percentile(lag, 0.99) / 1000,
        "gen_lag_max_ms": (lag[-1] if lag else float("nan")) / 1000,
        "machine_pct": 100.0 * (after.machine_busy - before.machine_busy) / wall,
        "steal_pct": 100.0 * (after.machine_steal - before.machine_steal) / wall,
        "errors": errors,
    }
    # Other processes' CPU (a noisy neighbour). The machine's figure comes from tick sampling and the processes'
    # from their precise run time, so with a light bursty load it can come out a little below their sum: 0 then.
    out["other_pct"] = max(0.0, out["machine_pct"] - out["cpu_pct"] - out["gen_cpu_pct"])
    return out


# -- saturated throughput: the orchestrator side -----------------------------------------------------------------


def run_saturation(setup: Setup, broker: Child, port: int, args: argparse.Namespace, qos: int) -> dict[str, Any]:
    readers = [a for a in setup.accounts if a.kind == "reader"][: args.saturate_publishers]
    counts = setup.root / "saturate-counts.bin"
    counts.write_bytes(bytes(8 * len(readers)))
    common = {
        "role": "saturate",
        "host": HOST,
        "port": port,
        "qos": qos,
        "inflight": args.inflight,
        "counts": str(counts),
        "publishers": len(readers),
    }
    specs: dict[str, dict[str, Any]] = {
        "sub": {
            **common,
            "mode": "sub",
            "user": AGENT_USER,
            "password": setup.agent_password,
            "client_id": "agent-saturate",
            "topic": "rfid/+/scan",
            "wait_ready": True,
        }
    }
    for n, a in enumerate(readers):
        specs[f"pub{n + 1}"] = {
            **common,
            "mode": "pub",
            "user": a.id,
            "password": a.password,
            "client_id": f"{a.id}-saturate",
            "topic": a.topic,
            "index": n,
        }
    workers = start_workers(specs, setup.root)
    before, after, wall, results = measure_window(
        broker, workers, 0.2, SAT_WARMUP_S, args.saturate_seconds, "the saturation test", 20.0
    )
    errors = [f"{name}: {e}" for name, r in results.items() for e in r["errors"]]
    pubs = [name for name in workers if name != "sub"]
    return {
        "msgs_per_s": results["sub"]["window"] / wall,
        "accepted_per_s": sum(results[p]["window"] for p in pubs) / wall,
        "dropped": sum(results[p]["dropped"] for p in pubs),
        "broker_cpu_pct": cpu_pct(before, after, "broker", wall),
        "sub_cpu_pct": cpu_pct(before, after, "sub", wall),
        "pub_cpu_pct": sum(cpu_pct(before, after, p, wall) for p in pubs),
        "machine_pct": 100.0 * (after.machine_busy - before.machine_busy) / wall,
        "errors": errors,
    }


# -- workers: premises clients (paho, one selector loop per process) ---------------------------------------------


def payload(ts: int, seq: int, origin: int, size: int) -> bytes:
    head = b"%d %d %d " % (ts, seq, origin)
    return head + b"x" * max(0, size - len(head))


def parse_payload(data: bytes | bytearray) -> tuple[int, int, int]:
    ts, seq, origin, _ = data.split(b" ", 3)
    return int(ts), int(seq), int(origin)


class PahoLoop:
    """Drives many paho clients from one thread through paho's external event loop callbacks."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write

    def _open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho leaves Nagle on: +40 ms per reply
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _no_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, client)

    def poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(max(0.0, timeout)):
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if client.want_write():
                client.loop_write()


@dataclass
class Sim:
    """One premises client: a device, or the agent."""

    id: str
    client: mqtt.Client
    topic: str | None  # published at the rate (devices)
    size: int
    subs: list[str]
    connected: bool = False
    pending: set[int] = field(default_factory=set)
    seq: int = 0


class PremisesWorker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.loop = PahoLoop()
        self.w0 = self.w1 = 0
        self.sims: list[Sim] = []
        self.lat: dict[str, list[int]] = {c: [] for c in CLASSES}
        self.rtt: list[int] = []
        self.lag: list[int] = []
        self.seen: set[tuple[str, str, int]] = set()
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.dups: Counter[str] = Counter()
        self.published = self.acked = 0
        self.errors: list[str] = []
        self.closing = False
        self.last_rx = 0
        agent = spec.get("agent")
        self.readers: dict[str, str] = agent["readers"] if agent else {}
        self.state_every = int(agent["state_every"]) if agent else 0
        self.scans = 0
        if agent:
            subs = ["rfid/+/scan", "button/+/status", "tablet/+/status"]
            self.sims.append(self._sim(AGENT_USER, "agent-bench", agent["password"], None, 0, subs))
        for d in spec["devices"]:
            size = SCAN_BYTES if d["kind"] == "reader" else STATUS_BYTES
            self.sims.append(self._sim(d["id"], d["id"], d["password"], d["topic"], size, d["subs"]))

    def _sim(self, user: str, client_id: str, password: str, topic: str | None, size: int, subs: list[str]) -> Sim:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        client.username_pw_set(user, password)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        sim = Sim(client_id, client, topic, size, subs)
        client.user_data_set(sim)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_agent_message if user == AGENT_USER else self._on_device_message
        self.loop.attach(client)
        return sim

    # paho callbacks

    def _on_connect(self, client: mqtt.Client, sim: Sim, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.errors.append(f"{sim.id}: connect refused: {rc}")
            return
        sim.connected = True
        for topic in sim.subs:
            result, mid = client.subscribe(topic, qos=1)
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                self.errors.append(f"{sim.id}: subscribe {topic}: {result}")
            else:
                sim.pending.add(mid)

    def _on_subscribe(self, client: mqtt.Client, sim: Sim, mid: int, codes: Any, props: Any) -> None:
        sim.pending.discard(mid)
        if any(code.is_failure for code in codes):
            self.errors.append(f"{sim.id}: subscription refused: {codes}")

    def _on_publish(self, client: mqtt.Client, sim: Sim, mid: int, rc: Any, props: Any) -> None:
        self.acked += 1

    def _on_disconnect(self, client: mqtt.Client, sim: Sim, flags: Any, rc: Any, props: Any) -> None:
        sim.connected = False
        if not self.closing:
            self.errors.append(f"{sim.id}: disconnected: {rc}")

    def _record(self, cls: str, sim: Sim, topic: str, data: bytes | bytearray) -> tuple[int, int]:
        now = now_ns()
        self.last_rx = now
        ts, seq, origin = parse_payload(data)
        if self.w0 <= ts < self.w1:
            key = (sim.id, topic, seq)
            if key in self.seen:
                self.dups[cls] += 1
            else:
                self.seen.add(key)
                self.received[cls] += 1
                self.lat[cls].append((now - ts) // 1000)
        return ts, origin

    def _on_device_message(self, client: mqtt.Client, sim: Sim, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith("rfid/"):
            now = now_ns()
            _, origin = self._record("reply", sim, msg.topic, msg.payload)
            if self.w0 <= origin < self.w1:
                self.rtt.append((now - origin) // 1000)  # scan published -> its reply received
        else:
            self._record("state", sim, msg.topic, msg.payload)

    def _on_agent_message(self, client: mqtt.Client, sim: Sim, msg: mqtt.MQTTMessage) -> None:
        ts, _ = self._record("up", sim, msg.topic, msg.payload)
        parts = msg.topic.split("/")
        if parts[0] != "rfid":
            return
        self._publish(sim, f"rfid/{parts[1]}/response", "reply", REPLY_BYTES, origin=ts)
        self.scans += 1
        court = self.readers.get(parts[1])
        if court is not None and self.state_every and self.scans % self.state_every == 0:
            self._publish(sim, f"court/{court}/state", "state", STATE_BYTES, retain=True)

    def _publish(self, sim: Sim, topic: str, cls: str, size: int, origin: int = 0, retain: bool = False) -> int:
        sim.seq += 1
        ts = now_ns()
        info = sim.client.publish(topic, payload(ts, sim.seq, origin, size), qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.errors.append(f"{sim.id}: publish {topic}: {info.rc}")
        self.published += 1
        if self.w0 <= ts < self.w1:
            self.sent[cls] += 1
        return ts

    # phases

    def connect(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for sim in self.sims:
            try:
                sim.client.connect(self.spec["host"], self.spec["port"], KEEPALIVE_S)
            except OSError as exc:
                self.errors.append(f"{sim.id}: connect: {exc}")
                return False
        while time.monotonic() < deadline and not self.errors:
            if all(s.connected and not s.pending for s in self.sims):
                return True
            self.loop.poll(0.05)
        if not self.errors:
            waiting = [s.id for s in self.sims if not s.connected or s.pending]
            self.errors.append(f"not connected and subscribed after {READY_TIMEOUT_S:g} s: {waiting[:5]}")
        return False

    def run(self, start: int, w0: int, w1: int) -> None:
        self.w0, self.w1 = w0, w1
        rng = random.Random(self.spec["seed"])
        period = int(1e9 / self.spec["rate"]) if self.spec["rate"] > 0 else 0
        heap: list[tuple[int, int]] = []
        if period:
            heap = [(start + int(rng.random() * period), i) for i, s in enumerate(self.sims) if s.topic]
            heapq.heapify(heap)
        cls = "up"
        last_misc = time.monotonic()
        hard_end = w1 + int((DRAIN_MAX_S + 5) * 1e9)
        for _ in range(100_000_000):  # bounded; ends by the clock below
            now = now_ns()
            while heap and heap[0][0] <= now and heap[0][0] < w1:
                due, i = heapq.heappop(heap)
                sim = self.sims[i]
                assert sim.topic is not None
                ts = self._publish(sim, sim.topic, cls, sim.size)
                sim.client.loop_write()  # out now, not at the next select
                if w0 <= ts < w1:
                    self.lag.append((ts - due) // 1000)
                heapq.heappush(heap, (due + period, i))
            if now >= w1:
                quiet = now - max(self.last_rx, w1) >= QUIET_S * 1e9
                if (quiet and self.acked >= self.published) or now >= w1 + DRAIN_MAX_S * 1e9:
                    break
            if now >= hard_end:
                break
            timeout = 0.05
            if heap and heap[0][0] < w1:
                timeout = min(timeout, (heap[0][0] - now) / 1e9)
            self.loop.poll(timeout)
            if time.monotonic() - last_misc >= 1.0:
                last_misc = time.monotonic()
                for s in self.sims:
                    s.client.loop_misc()

    def close(self) -> None:
        self.closing = True
        for s in self.sims:
            s.client.disconnect()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(s.connected for s in self.sims):
            self.loop.poll(0.02)

    def result(self) -> dict[str, Any]:
        return {
            "lat": self.lat,
            "rtt": self.rtt,
            "lag": self.lag,
            "sent": dict(self.sent),
            "received": dict(self.received),
            "dups": dict(self.dups),
            "unacked": self.published - self.acked,
            "errors": self.errors[:20],
        }


def premises_worker(spec: dict[str, Any]) -> int:
    worker = PremisesWorker(spec)
    if not worker.connect():
        print("ERROR " + "; ".join(worker.errors[:5]), flush=True)
        return 2
    print("READY", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 2
    schedule = json.loads(line)
    worker.run(schedule["start_ns"], schedule["w0_ns"], schedule["w1_ns"])
    worker.close()
    print("RESULT " + json.dumps(worker.result()), flush=True)
    return 0


# -- workers: saturation clients (MQTT 3.1.1 over raw sockets) ---------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the broker")
        data += chunk
    return data


def raw_connect(spec: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection((spec["host"], spec["port"]), timeout=READY_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = _str("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + KEEPALIVE_S.to_bytes(2, "big")
    body += _str(spec["client_id"]) + _str(spec["user"]) + _str(spec["password"])
    sock.sendall(_packet(0x10, body))
    connack = _recv_exact(sock, 4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"CONNACK {connack.hex()}")
    if spec["mode"] == "sub":
        sock.sendall(_packet(0x82, (1).to_bytes(2, "big") + _str(spec["topic"]) + bytes([spec["qos"]])))
        suback = _recv_exact(sock, 5)
        if suback[0] != 0x90 or suback[4] >= 0x80:
            raise ConnectionError(f"SUBACK {suback.hex()}")
    return sock


def scan_packets(buf: bytearray, ack_qos1: bool, per_publisher: list[int] | None) -> tuple[int, int, int, bytes]:
    """Whole packets at the start of buf: (PUBLISH count, PUBACK count, bytes consumed, PUBACKs to send).

    With `per_publisher`, each PUBLISH also counts for the publisher named by its payload's first byte.
    """
    pos, end, publishes, pubacks = 0, len(buf), 0, 0
    acks = bytearray()
    while end - pos >= 2:
        first = buf[pos]
        length, i, shift = 0, pos + 1, 0
        complete = False
        while i < end and shift <= 21:
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            shift += 7
            if not byte & 0x80:
                complete = True
                break
        if not complete or i + length > end:
            break
        kind = first & 0xF0
        if kind == 0x30:
            publishes += 1
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            qos1 = (first >> 1) & 3 == 1
            if ack_qos1 and qos1:
                acks += b"\x40\x02" + buf[topic_end : topic_end + 2]
            if per_publisher is not None:
                per_publisher[buf[topic_end + 2 if qos1 else topic_end]] += 1
        elif kind == 0x40:
            pubacks += 1
        pos = i + length
    return publishes, pubacks, pos, bytes(acks)


def open_counts(path: Path, slots: int) -> mmap.mmap:
    """The shared board where the subscriber posts how many messages of each publisher it has received."""
    with path.open("r+b") as f:
        return mmap.mmap(f.fileno(), 8 * slots)


def saturate_sub(sock: socket.socket, spec: dict[str, Any], w0: int, w1: int) -> dict[str, Any]:
    slots = spec["publishers"]
    board = open_counts(Path(spec["counts"]), slots)
    per_publisher = [0] * 256
    layout = f"<{slots}Q"
    sock.settimeout(SEND_TIMEOUT_S)
    buf = bytearray()
    window = total = 0
    errors: list[str] = []
    while now_ns() < w1:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if not readable:
            continue
        data = sock.recv(1 << 18)
        if not data:
            errors.append("closed by the broker")
            break
        t = now_ns()
        buf += data
        fast = fast_publishes(buf, per_publisher, slots, spec["qos"] == 1)
        if fast is None:
            n, _, used, acks = scan_packets(buf, spec["qos"] == 1, per_publisher)
        else:
            n, used, acks = fast
        del buf[:used]
        if acks:
            sock.sendall(acks)
        struct.pack_into(layout, board, 0, *per_publisher[:slots])
        total += n
        if w0 <= t < w1:
            window += n
    board.close()
    return {"window": window, "total": total, "errors": errors}


def fast_publishes(
    buf: bytearray, per_publisher: list[int], slots: int, ack_qos1: bool
) -> tuple[int, int, bytes] | None:
    """A run of same-size PUBLISH packets at the start of buf (the saturation case), counted with slices.

    Returns (count, bytes consumed, PUBACKs to send), or None when the run does not fit (then scan_packets).
    """
    if len(buf) < 4 or buf[0] & 0xF0 != 0x30 or buf[1] & 0x80:
        return None
    size = 2 + buf[1]
    n = len(buf) // size
    end = n * size
    for offset in range(4):  # fixed header and topic length alike in every packet of the run
        if buf[offset:end:size].count(buf[offset]) != n:
            return None
    qos1 = (buf[0] >> 1) & 3 == 1
    pid_at = 4 + (buf[2] << 8 | buf[3])
    owners = buf[pid_at + (2 if qos1 else 0) : end : size]
    for i in range(slots):
        per_publisher[i] += owners.count(i)
    acks = b""
    if ack_qos1 and qos1:
        out = bytearray(4 * n)
        out[0::4] = b"\x40" * n
        out[1::4] = b"\x02" * n
        out[2::4] = buf[pid_at:end:size]
        out[3::4] = buf[pid_at + 1 : end : size]
        acks = bytes(out)
    return n, end, acks


def count_pubacks(buf: bytearray) -> tuple[int, int]:
    """(PUBACKs, bytes consumed) at the start of buf; a publisher receives nothing else."""
    n = len(buf) // 4
    if n and len(buf) % 4 == 0 and buf[0::4].count(0x40) == n and buf[1::4].count(2) == n:
        return n, len(buf)
    _, acked, used, _ = scan_packets(buf, False, None)
    return acked, used


def saturate_pub(sock: socket.socket, spec: dict[str, Any], start: int, w0: int, w1: int) -> dict[str, Any]:
    """Keep `inflight` messages between this publisher and the subscriber (and, at QoS 1, unacknowledged).

    The packets come from a pre-built ring of RING packets (packet ids 1..RING at QoS 1, reused only long after
    their PUBACK), so that a batch is one slice and one write.
    """
    qos, window_size, me = spec["qos"], spec["inflight"], spec["index"]
    board = open_counts(Path(spec["counts"]), spec["publishers"])
    topic = _str(spec["topic"])
    body = bytes([me]) + b"p" * (SAT_PAYLOAD_BYTES - 1)
    if qos:
        prefix = bytes([0x32]) + _varint(len(topic) + 2 + len(body)) + topic
        ring = memoryview(b"".join(prefix + pid.to_bytes(2, "big") + body for pid in range(1, RING + 1)))
    else:
        ring = memoryview(_packet(0x30, topic + body) * RING)
    size = len(ring) // RING
    at = 0
    min_batch = max(1, window_size // 4)  # a quarter of the window at a time: fewer, larger writes
    if qos:  # wake for a quarter window of PUBACKs, not for each one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4 * min_batch)
    errors: list[str] = []
    sent = acked = lost = window = stalls = 0
    buf = bytearray()
    sock.settimeout(SEND_TIMEOUT_S)
    sleep_until_ns(start)
    last_seen, last_progress = 0, now_ns()
    while (t := now_ns()) < w1:
        seen = struct.unpack_from("<Q", board, 8 * me)[0]
        if seen != last_seen:
            last_seen, last_progress = seen, t
        elif sent - seen - lost >= window_size and t - last_progress > STALL_NS:
            lost, last_progress = sent - seen, t  # dropped by the broker: give up on those, go on
            stalls += 1
        room = window_size - (sent - seen - lost)
        if qos:
            room = min(room, window_size - (sent - acked))
        if room >= min_batch:
            left = room
            while left:
                k = min(left, RING - at)
                sock.sendall(ring[at * size : (at + k) * size])
                at, left = (at + k) % RING, left - k
            sent += room
            if w0 <= t < w1:
                window += room
        readable, _, _ = select.select([sock], [], [], POLL_S)
        if readable:
            data = sock.recv(1 << 16)
            if not data:
                errors.append("closed by the broker")
                break
            buf += data
            n, used = count_pubacks(buf)
            del buf[:used]
            acked += n
    board.close()
    return {"window": window, "total": sent, "errors": errors, "dropped": lost, "stalls": stalls}


def saturate_worker(spec: dict[str, Any]) -> int:
    try:
        sock = raw_connect(spec)
    except (OSError, ConnectionError) as exc:
        print(f"ERROR {exc}", flush=True)
        return 2
    print("READY", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 2
    s = json.loads(line)
    try:
        if spec["mode"] == "sub":
            result = saturate_sub(sock, spec, s["w0_ns"], s["w1_ns"])
        else:
            result = saturate_pub(sock, spec, s["start_ns"], s["w0_ns"], s["w1_ns"])
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT (only after whole packets: a failed write may leave half of one)
    except OSError as exc:
        result = {"window": 0, "total": 0, "dropped": 0, "errors": [f"{type(exc).__name__}: {exc}"]}
    sock.close()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def worker_main(path: Path) -> int:
    die_with_parent()
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec["role"] == "premises":
        return premises_worker(spec)
    return saturate_worker(spec)


# -- the embedded broker process ---------------------------------------------------------------------------------


def serve_embedded(path: Path) -> int:
    import asyncio

    from agent.app import limit_malloc_growth
    from agent.config import BrokerSection, DeviceConfig
    from agent.lan.auth import DeviceDirectory
    from agent.lan.broker import EmbeddedBroker
    from agent.logs import configure
    from agent.loop import run_async

    die_with_parent()
    data = json.loads(path.read_text(encoding="utf-8"))
    devices = [DeviceConfig(**d) for d in data["devices"]]
    configure(level="info")  # as `club-agent run`: amqtt's own logging at CRITICAL
    limit_malloc_growth()  # as Agent.run does before starting the broker

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        directory = DeviceDirectory(devices, agent_password=data["agent_password"])
        try:
            # No per-device publish limit: the saturation phase publishes flat out from reader accounts, and
            # mosquitto, the peer, has none (the premises load stays far below the default 20/s anyway).
            async with EmbeddedBroker(BrokerSection(host=HOST, port=0, publish_rate_per_s=0), directory) as broker:
                print(f"READY {broker.port}", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SERVE_MAX_S)
        finally:
            directory.close()

    run_async(main())  # the agent's own loop (uvloop)
    return 0


# -- rounds and report -------------------------------------------------------------------------------------------


def run_broker(name: str, setup: Setup, args: argparse.Namespace, seed: int, console: Console) -> dict[str, Any]:
    broker, port = start_broker(name, setup)
    try:
        console.print(f"[dim]{name} on {HOST}:{port} (pid {broker.pid}): premises load...[/]")
        premises = run_premises(setup, broker, port, args, seed)
        out: dict[str, Any] = {"premises": premises}
        for qos in (0, 1):
            settle(broker)
            console.print(f"[dim]{name}: saturated throughput at QoS {qos}...[/]")
            out[f"sat{qos}"] = run_saturation(setup, broker, port, args, qos)
        if not broker.alive():
            raise BenchError(f"{name} exited during the run:\n{broker.log_tail()}")
        code = broker.stop()
        if code not in (0, -signal.SIGTERM):
            out["premises"]["errors"].append(f"{name} exited with {code} on SIGTERM: {broker.log_tail(3)}")
        return out
    finally:
        broker.stop()  # a no-op once stopped


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one broker; counts are summed."""
    p = [r["premises"] for r in rounds]

    def med(key: str, src: list[dict[str, Any]] = p) -> float:
        return median([r[key] for r in src])

    s0, s1 = [r["sat0"] for r in rounds], [r["sat1"] for r in rounds]
    return {
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "max_ms": med("max_ms"),
        "cpu_pct": med("cpu_pct"),
        "path_p50_ms": {c: median([r["path_p50_ms"][c] for r in p]) for c in CLASSES},
        "path_p99_ms": {c: median([r["path_p99_ms"][c] for r in p]) for c in CLASSES},
        "rtt_p50_ms": med("rtt_p50_ms"),
        "rtt_p99_ms": med("rtt_p99_ms"),
        "delivered": sum(r["delivered"] for r in p),
        "expected": sum(r["expected"] for r in p),
        "lost": sum(r["lost"] for r in p),
        "dups": sum(r["dups"] for r in p),
        "unacked": sum(r["unacked"] for r in p),
        "by_path": {c: [sum(r["by_path"][c][0] for r in p), sum(r["by_path"][c][1] for r in p)] for c in CLASSES},
        "published_per_s": med("published_per_s"),
        "delivered_per_s": med("delivered_per_s"),
        "gen_cpu_pct": med("gen_cpu_pct"),
        "gen_cpu_max_pct": med("gen_cpu_max_pct"),
        "agent_client_cpu_pct": med("agent_client_cpu_pct"),
        "gen_lag_p99_ms": med("gen_lag_p99_ms"),
        "gen_lag_max_ms": med("gen_lag_max_ms"),
        "machine_pct": med("machine_pct"),
        "steal_pct": med("steal_pct"),
        "other_pct": med("other_pct"),
        "sat_qos0": med("msgs_per_s", s0),
        "sat_qos1": med("msgs_per_s", s1),
        "sat_accepted_qos0": med("accepted_per_s", s0),
        "sat_accepted_qos1": med("accepted_per_s", s1),
        "sat_dropped_qos0": sum(r["dropped"] for r in s0),
        "sat_dropped_qos1": sum(r["dropped"] for r in s1),
        "sat_broker_cpu_qos0": med("broker_cpu_pct", s0),
        "sat_broker_cpu_qos1": med("broker_cpu_pct", s1),
        "sat_gen_cpu_qos0": median([r["sub_cpu_pct"] + r["pub_cpu_pct"] for r in s0]),
        "sat_gen_cpu_qos1": median([r["sub_cpu_pct"] + r["pub_cpu_pct"] for r in s1]),
        "sat_sub_cpu_qos0": med("sub_cpu_pct", s0),
        "sat_sub_cpu_qos1": med("sub_cpu_pct", s1),
        "sat_machine_qos0": med("machine_pct", s0),
        "sat_machine_qos1": med("machine_pct", s1),
        "p99_ms_rounds": [round(r["p99_ms"], 3) for r in p],
        "sat_qos1_rounds": [round(r["msgs_per_s"]) for r in s1],
        "sat_qos0_rounds": [round(r["msgs_per_s"]) for r in s0],
        "errors": [e for r in rounds for part in ("premises", "sat0", "sat1") for e in r[part]["errors"]],
    }


def finite(obj: Any) -> Any:
    """NaN and infinities become null: the last line must be strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def fmt_rate(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:,.0f}"


def report(
    console: Console, args: argparse.Namespace, setup: Setup, results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    names = [n for n in BROKERS if n in results]
    kinds = Counter(a.kind for a in setup.accounts)
    fanout = sum(1 for a in setup.accounts if a.fanout)
    table = Table(
        title=(
            f"broker benchmark: {args.devices} devices ({kinds['reader']} readers, {kinds['button']} buttons, "
            f"{kinds['tablet']} tablets) x {args.rate:g} msg/s QoS 1, state fan-out to {fanout} tablets, "
            f"{args.duration:g} s x {args.repeat} round(s), medians"
        ),
    )
    table.add_column("", style="bold")
    for n in names:
        table.add_column(n, justify="right")

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        table.add_row(label, *(fn(results[n]) for n in names))

    row(
        "premises: latency p50 / p99 / max (ms)",
        lambda r: f"{fmt_ms(r['p50_ms'])} / {fmt_ms(r['p99_ms'])} / {fmt_ms(r['max_ms'])}",
    )

    def path_cell(c: str, r: dict[str, Any]) -> str:
        return f"{fmt_ms(r['path_p50_ms'][c])} / {fmt_ms(r['path_p99_ms'][c])}"

    for c in CLASSES:
        row(f"  {CLASS_NAMES[c]} p50 / p99", functools.partial(path_cell, c))
    row("  scan -> reply round trip p50 / p99", lambda r: f"{fmt_ms(r['rtt_p50_ms'])} / {fmt_ms(r['rtt_p99_ms'])}")
    row("premises: broker CPU (% of one core)", lambda r: f"{r['cpu_pct']:.1f}")
    row("premises: delivered / expected (in window)", lambda r: f"{r['delivered']:,} / {r['expected']:,}")
    row("  lost / duplicates / unacked", lambda r: f"{r['lost']} / {r['dups']} / {r['unacked']}")
    row("  msg/s published -> delivered", lambda r: f"{r['published_per_s']:,.0f} -> {r['delivered_per_s']:,.0f}")
    row(
        f"  generators CPU: {args.workers + 1} procs (busiest; agent)",
        lambda r: f"{r['gen_cpu_pct']:.1f} % ({r['gen_cpu_max_pct']:.1f}; {r['agent_client_cpu_pct']:.1f})",
    )
    row("  generator lag p99 / max (ms)", lambda r: f"{fmt_ms(r['gen_lag_p99_ms'])} / {fmt_ms(r['gen_lag_max_ms'])}")
    row(
        "  machine busy, % of one core (not ours; steal)",
        lambda r: f"{r['machine_pct']:.0f} % ({r['other_pct']:.0f}; {r['steal_pct']:.0f})",
    )

    def sat_rate(q: int, r: dict[str, Any]) -> str:
        return fmt_rate(r[f"sat_qos{q}"])

    def sat_published(q: int, r: dict[str, Any]) -> str:
        return f"{fmt_rate(r[f'sat_accepted_qos{q}'])} ({r[f'sat_dropped_qos{q}']})"

    def sat_cpu(q: int, r: dict[str, Any]) -> str:
        return f"{r[f'sat_broker_cpu_qos{q}']:.0f} / {r[f'sat_gen_cpu_qos{q}']:.0f} ({r[f'sat_sub_cpu_qos{q}']:.0f})"

    def sat_machine(q: int, r: dict[str, Any]) -> str:
        return f"{r[f'sat_machine_qos{q}']:.0f} %"

    for qos in (0, 1):
        row(f"saturated QoS {qos}: delivered msg/s", functools.partial(sat_rate, qos))
        row("  published msg/s (dropped by the broker)", functools.partial(sat_published, qos))
        row("  CPU %: broker / clients (subscriber)", functools.partial(sat_cpu, qos))
        row("  machine busy (% of one core)", functools.partial(sat_machine, qos))
    console.print(table)

    # The ratio of each round (the two brokers ran minutes apart), then the median over the rounds.
    ratios: dict[int, list[float]] = {0: [], 1: []}
    if "embedded" in results and "mosquitto" in results:
        for q in (0, 1):
            pairs = zip(
                results["embedded"][f"sat_qos{q}_rounds"], results["mosquitto"][f"sat_qos{q}_rounds"], strict=True
            )
            ratios[q] = [e / m for e, m in pairs if m > 0]
    ratio = median(ratios[1]) if ratios[1] else None
    ratio0 = median(ratios[0]) if ratios[0] else None
    if ratio is not None and ratio0 is not None:
        console.print(
            f"saturated throughput ratio embedded / mosquitto: QoS 1 {ratio:.3f}, QoS 0 {ratio0:.3f}"
            + (f" (median of {len(ratios[1])} rounds)" if len(ratios[1]) > 1 else "")
        )
    for n in names:  # where the clients, not the broker, may have set the pace
        r = results[n]
        if r["gen_cpu_max_pct"] > GEN_BUSY_PCT or r["gen_lag_p99_ms"] > GEN_LAG_MS:
            console.print(
                f"{n}: premises clients were busy (busiest process {r['gen_cpu_max_pct']:.0f} % of a core, publish "
                f"lag p99 {r['gen_lag_p99_ms']:.1f} ms): latencies include client delay",
                style="yellow",
            )
        for q in (0, 1):
            if r[f"sat_sub_cpu_qos{q}"] > GEN_BUSY_PCT:
                console.print(
                    f"{n}: the QoS {q} subscriber used {r[f'sat_sub_cpu_qos{q}']:.0f} % of a core: that figure may be"
                    " bound by the client",
                    style="yellow",
                )
        if r["other_pct"] > NOISE_PCT:
            console.print(
                f"{n}: other processes used {r['other_pct']:.0f} % of a core during the premises load", style="yellow"
            )
    for n in names:
        for e in results[n]["errors"][:5]:
            console.print(f"{n}: {e}", style="red", markup=False, highlight=False)
    emb = results.get("embedded")
    if emb is not None:
        checks = [
            (f"embedded p99 < {BUDGET_P99_MS:g} ms", emb["p99_ms"] < BUDGET_P99_MS, f"{emb['p99_ms']:.2f} ms"),
            (f"embedded CPU < {BUDGET_CPU_PCT:g} %", emb["cpu_pct"] < BUDGET_CPU_PCT, f"{emb['cpu_pct']:.1f} %"),
        ]
        if ratio is not None:
            checks.append((f"ratio QoS 1 >= {BUDGET_RATIO:g}", ratio >= BUDGET_RATIO, f"{ratio:.3f}"))
        for label, passed, got in checks:
            console.print(f"budget {label:<28} {got:>10}  {'PASS' if passed else 'FAIL'}")

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        keep = (
            "p50_ms", "p99_ms", "max_ms", "cpu_pct", "rtt_p99_ms", "delivered", "expected", "lost", "dups",
            "delivered_per_s", "gen_cpu_pct", "gen_lag_p99_ms", "machine_pct", "sat_qos0", "sat_qos1",
            "other_pct", "sat_broker_cpu_qos1", "sat_gen_cpu_qos1", "sat_machine_qos1", "p99_ms_rounds",
            "sat_qos1_rounds",
        )  # fmt: skip
        return {k: (round(r[k], 3) if isinstance(r[k], float) else r[k]) for k in keep}

    summary: dict[str, Any] = {
        "bench": "broker",
        "p50_ms": round(emb["p50_ms"], 3) if emb else None,
        "p99_ms": round(emb["p99_ms"], 3) if emb else None,
        "cpu_pct": round(emb["cpu_pct"], 1) if emb else None,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "ratio_qos0": round(ratio0, 3) if ratio0 is not None else None,
        "ratio_rounds": [round(r, 3) for r in ratios[1]],
        "devices": args.devices,
        "rate": args.rate,
        "tablets": fanout,
        "duration_s": args.duration,
        "rounds": args.repeat,
    }
    for n in names:
        summary[n] = brief(results[n])
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds of premises load (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="premises load before measuring (default 3 s)")
    p.add_argument("--devices", type=int, default=100, help="device accounts and clients (default 100)")
    p.add_argument("--rate", type=float, default=5.0, help="messages per second per device (default 5)")
    p.add_argument("--tablets", type=int, default=10, help="tablets receiving the court state fan-out (default 10)")
    p.add_argument(
        "--state-every",
        type=int,
        default=1,
        help="the agent publishes court state every Nth scan (default 1; 0: never)",
    )
    p.add_argument("--workers", type=int, default=3, help="processes for the device clients (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="rounds, each running every broker once (default 1)")
    p.add_argument("--only", choices=BROKERS, help="run one broker only (no ratio)")
    p.add_argument("--saturate-seconds", type=float, default=5.0, help="measured seconds per QoS (default 5)")
    p.add_argument("--saturate-publishers", type=int, default=4, help="publisher processes (default 4)")
    p.add_argument(
        "--inflight", type=int, default=200, help="saturation: messages in flight per publisher (default 200)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for publish phases (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    p.add_argument("--serve-embedded", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0.5 <= args.duration <= 600:
        p.error("--duration must be 0.5..600")
    if not 0 <= args.warmup <= 60:
        p.error("--warmup must be 0..60")
    if not 10 <= args.devices <= 1000:
        p.error("--devices must be 10..1000")
    if not 0 < args.rate <= 100:
        p.error("--rate must be in (0, 100]")
    if not 1 <= args.tablets <= args.devices // 2:
        p.error("--tablets must be 1..devices/2")
    if not 0 <= args.state_every <= 1000:
        p.error("--state-every must be 0..1000")
    if not 1 <= args.workers <= 16:
        p.error("--workers must be 1..16")
    if not 1 <= args.repeat <= 20:
        p.error("--repeat must be 1..20")
    if not 1 <= args.saturate_seconds <= 120:
        p.error("--saturate-seconds must be 1..120")
    if not 1 <= args.saturate_publishers <= 16:
        p.error("--saturate-publishers must be 1..16")
    if not 1 <= args.inflight <= 1000:
        p.error("--inflight must be 1..1000")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.serve_embedded is not None:
        return serve_embedded(args.serve_embedded)
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        raise SystemExit("perf_counter is not CLOCK_MONOTONIC here: latencies across processes would be meaningless")
    signal.signal(signal.SIGTERM, _terminate)
    console = Console(width=max(120, shutil.get_terminal_size((120, 40)).columns))
    names = [args.only] if args.only else list(BROKERS)
    if "mosquitto" in names and not Path(MOSQUITTO).exists():
        raise SystemExit(f"{MOSQUITTO} not found (apt-get install mosquitto), or use --only embedded")
    root = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    started = time.monotonic()
    code = 0
    try:
        console.print(f"[dim]set-up in {root}: {args.devices} accounts, argon2 hashes, mosquitto files...[/]")
        setup = build(root, args)
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(args.repeat):
            for name in names:
                rounds[name].append(run_broker(name, setup, args, args.seed + r, console))
        results = {n: summarize(rs) for n, rs in rounds.items()}
        summary = report(console, args, setup, results)
        if any(r["lost"] or r["unacked"] for r in results.values()):
            console.print("[red]QoS 1 messages were lost or left unacknowledged[/]")
            code = 3
        elif any(r["errors"] for r in results.values()):
            code = 2
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}", highlight=False)
        summary = {
            "bench": "broker",
            "error": str(exc).splitlines()[0],
            "p50_ms": None,
            "p99_ms": None,
            "cpu_pct": None,
            "ratio": None,
        }
        code = 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        summary = {
            "bench": "broker",
            "error": "interrupted",
            "p50_ms": None,
            "p99_ms": None,
            "cpu_pct": None,
            "ratio": None,
        }
        code = 130
    finally:
        stop_all()
        if args.keep:
            console.print(f"[dim]kept {root}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    console.print(f"[dim]done in {summary['wall_s']:.0f} s[/]")
    sys.stdout.flush()
    print(json.dumps(finite(summary)))
    return code


if __name__ == "__main__":
    sys.exit(main())
