"""The crash rig (issue 5): a real agent subprocess under steady taps and bar orders, SIGKILLed at random moments
and restarted, against the sandbox cloud in a subprocess of its own (it outlives every kill); then the oracle.

Shared by tests/e2e/test_crash_sync.py (a few cycles) and benchmarks/crash.py (100 by default).

One cycle: start `club-agent run` (sometimes SIGKILL it once more during start-up), wait for /readyz, connect
the devices, repeat every request left unanswered by the last kill with its own msg_id, ask a few answered ones
again (the answer must be identical), then let `workers` players at a time tap in at r1/r2, order at the desk
tablet and tap out (at their reader, or the out-reader rx of c1) until a random moment (seeded) where the agent
is SIGKILLed with requests in flight and deliveries under way. After the last cycle the agent runs once more
until its outbox has nothing pending, and stops with SIGTERM. The members come from the sandbox's member feed
(the agent's own sync, on the first start).

Players. Arrivals keep about `on_court` players in session; with `rejoin` (the default) players who left come
back for another session seconds later, so a member's next check-in is often decided while Ziggy has not yet
heard of their last check-out (Ziggy allows one active session per user: the rig found the outbox sending them
out of order, test_crash_sync.py keeps the reproduction). Without it each member plays one session.

The oracle is what the devices heard and what the sandbox received, never the agent's own account:
* told: every granted check-in and check-out a reader heard and every ok order the desk heard. Each must be in
  the agent's store (session.started / session.ended by session id, consumption.recorded lines by request id).
  A request whose answer was lost to a kill is not told until its repeat is answered; if the agent had committed
  it before the kill, the repeat gets the stored answer (counted: committed_unheard).
* delivered: every event in the store (told or not) reaches the cloud exactly once (by event id among the
  accepted entries of /_sandbox/received), and each session or consumption event acts on Ziggy exactly once (the
  acted call whose Idempotency-Key is the event id). Events that are one fact (a session's start or end, an
  order line, the decision of a (device, msg_id)) must not exist twice under different ids either.
* order: per session, the cloud received its events in seq order, and Ziggy's acted calls for it come in seq
  order (check-in, lines, check-out), all on the Ziggy session its own check-in created.

Results: lost, duplicates, out_of_order, misrouted, answer and state mismatches, with one line per problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import httpx

from agent import sim
from agent.lan.auth import hash_password
from agent.sandbox.options import AgentSettings, SandboxOptions
from agent.store import repo

HOST = "127.0.0.1"
COURTS = ("c1", "c2")
ENTRY_READERS = {"r1": "c1", "r2": "c2"}
OUT_READERS = {"c1": "rx"}  # a court's direction=out reader: check-out only
DESK = "desk"
ITEMS = (("agua", "Agua", 5.5), ("cerveja", "Cerveja", 12.0), ("isotonico", "Isotonico", 9.9))
MAX_ORDERS_PER_SESSION = 3

REPLY_WITHIN_S = 3.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
KILLED_EXIT_WAIT_S = 10.0
HTTP_TIMEOUT = httpx.Timeout(10.0)
POLL_S = 0.05
# Answers that record nothing: the request may be repeated (with its msg_id) and decided then.
UNDECIDED_REASONS = frozenset({"unavailable", "rate_limited"})
# Which destination acts on which event type (DESIGN 2.2/2.3), written here rather than read from the agent.
ZIGGY_TYPES = frozenset({"session.started", "session.ended", "consumption.recorded"})
ZIGGY_ROUTES = frozenset({"ziggy.checkin", "ziggy.checkout", "ziggy.consumption.record"})


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    kind: Literal["reader", "tablet"]
    court: str | None = None
    direction: Literal["in", "out"] = "in"

    @property
    def password(self) -> str:
        return f"pw-{self.id}-crash-0123456789"


DEVICES = (
    Device("r1", "reader", "c1"),
    Device("r2", "reader", "c2"),
    Device("rx", "reader", "c1", "out"),
    Device(DESK, "tablet"),
)


@dataclass(frozen=True, slots=True)
class CrashOptions:
    root: Path  # everything lives here: config, data, logs
    cycles: int = 8
    seed: int = 1
    members: int = 0  # the pool of players; 0: 24 with `rejoin`, else enough that nobody plays twice (100 a cycle)
    rejoin: bool = True  # players come back for another session (see the module docstring)
    on_court: int = 12  # players in session the traffic aims at
    # Requests a second, all players together (each waits an exponential think time, and for its answer): a
    # steady load well inside what the agent sustains. `benchmarks/crash.py --rate 1000` (players barely pause)
    # is the stress variant: more requests in flight at each kill, and a delivery backlog at every kill.
    rate_per_s: float = 40.0
    workers: int = 6  # players acting at once
    traffic_s: tuple[float, float] = (0.15, 1.2)  # when the kill lands, after the traffic starts
    early_kill_rate: float = 0.2  # share of kills within 0-0.15 s of the traffic (the restart's backlog in flight)
    # Share of kills that wait for a request to go out and land 0-4 ms later, inside its decision: paced players
    # spend most of their time thinking, so a kill at a random moment rarely finds a request in flight.
    in_flight_kill_rate: float = 0.5
    startup_kill_rate: float = 0.1  # share of cycles (after the first) killed once more during start-up
    reask: int = 3  # answered requests asked again after each restart
    cycle_timeout_s: float = 60.0
    drain_timeout_s: float = 60.0


# -- processes -----------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open until every port is chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def club_agent_command() -> list[str]:
    script = Path(sys.executable).parent / "club-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


class Child:
    """One subprocess, its output appended to a log file; `kill()` is safe to call at any time."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path) -> None:
        self.name, self.argv, self.log, self.cwd = name, argv, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")}  # no config overrides
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} (pid {self.proc.pid}) did not exit within {within:g} s")
            await asyncio.sleep(0.01)
        return code

    async def stop(self, within: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        assert self.proc is not None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait(within)
        except TimeoutError:
            self.kill()
            await self.wait(5)
            raise

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def wait_http(child: Child, url: str, within: float = START_TIMEOUT_S) -> float:
    """Poll `url` until it answers 200; returns the seconds waited. Fails at once if the process exits."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
        while True:
            if not child.running:
                raise RuntimeError(f"{child.name} exited during start-up:\n{child.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > within:
                raise TimeoutError(f"{child.name} not ready at {url} within {within:g} s:\n{child.tail()}")
            await asyncio.sleep(POLL_S)


# -- configuration -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path
    sandbox_port: int
    broker_port: int
    api_port: int

    @property
    def sandbox_url(self) -> str:
        return f"http://{HOST}:{self.sandbox_port}"

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def db(self) -> Path:
        return self.root / "data" / "agent.db"


def member_cards(count: int) -> list[tuple[str, str]]:
    """(member_id, card) for the rig's players: active, no credit plan, every court."""
    return [(f"m-crash-{n:03d}", f"CA{n:08X}") for n in range(1, count + 1)]


def write_config(layout: Layout) -> None:
    settings = AgentSettings.of(SandboxOptions(members=0), layout.sandbox_url)
    secrets = layout.root / "secrets.toml"
    secrets.write_text(settings.secrets_toml())
    secrets.chmod(0o600)
    lines = [
        "[agent]",
        f"data_dir = {json.dumps(str(layout.root / 'data'))}",
        'club_id = "club-crash"',
        'agent_id = "edge-crash"',
        "trust_clock = true",
        f"secrets_file = {json.dumps(str(secrets))}",
        "[broker]",
        f'host = "{HOST}"',
        f"port = {layout.broker_port}",
        "[api]",
        f'host = "{HOST}"',
        f"port = {layout.api_port}",
        # Players tap in and out within a second, many times over: no debounce, no second-tap grace, no rate limit.
        "[policy]",
        "debounce_s = 0",
        "second_tap_grace_s = 0",
        "scan_rate_per_s = 100",
        "scan_burst = 1000",
        # Short backoffs: a delivery cut by a kill is retried soon after the restart.
        "[sync]",
        "backoff_base_s = 0.05",
        "backoff_cap_s = 0.5",
        settings.config_toml(),
    ]
    for court in COURTS:
        lines += ["[[courts]]", f'id = "{court}"']
    for device in DEVICES:
        lines += ["[[devices]]", f'id = "{device.id}"', f'kind = "{device.kind}"']
        if device.court is not None:
            lines += [f'court = "{device.court}"', f'direction = "{device.direction}"']
        lines.append(f'password_hash = "{hash_password(device.password)}"')
    layout.config.write_text("\n".join(lines) + "\n")


# -- the devices' side ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Player:
    member_id: str
    card: str
    session_id: str | None = None
    court: str | None = None
    reader: str | None = None
    orders: int = 0
    played: bool = False  # had a session already
    busy: bool = False  # a request of theirs is in flight or unanswered


@dataclass(slots=True)
class Request:
    kind: Literal["tap", "order"]
    device_id: str
    msg_id: str
    player: Player
    items: list[dict[str, Any]] = field(default_factory=list)
    cycle: int = 0


@dataclass(slots=True)
class Told:
    """What the devices heard: the oracle's half that the agent cannot rewrite."""

    checkins: dict[str, str] = field(default_factory=dict)  # session_id -> msg_id
    checkouts: dict[str, str] = field(default_factory=dict)  # session_id -> msg_id
    orders: dict[str, tuple[str, int]] = field(default_factory=dict)  # request_id -> (session_id, lines)
    answers: dict[tuple[str, str], tuple[Request, dict[str, Any]]] = field(default_factory=dict)
    repeated: list[tuple[Request, int]] = field(default_factory=list)  # answered only on repeat; cycle of its kill
    answer_mismatches: list[str] = field(default_factory=list)
    state_mismatches: list[str] = field(default_factory=list)
    undecided: int = 0

    @property
    def lines(self) -> int:
        return sum(n for _, n in self.orders.values())


class Traffic:
    """The players, their devices' connections, and what they heard."""

    def __init__(
        self, cards: list[tuple[str, str]], rng: random.Random, *, rejoin: bool, on_court: int, think_s: float
    ) -> None:
        self.rng = rng
        self.rejoin, self.on_court_target, self.think_s = rejoin, on_court, think_s
        self.arriving = [Player(member_id, card) for member_id, card in reversed(cards)]  # a stack: pop() is next
        self.pool = len(cards)
        self.on_court: dict[str, Player] = {}  # by member id: players in session
        self.left: list[Player] = []  # played and left; they come back only with `rejoin`
        self.told = Told()
        self.devices: dict[str, Any] = {}
        self.unanswered: dict[str, Request] = {}  # by msg_id: in flight, or cut off by a kill
        self.sending = asyncio.Event()  # set as a request goes out
        self.requests = 0
        self.reasked = 0

    async def connect(self, stack: contextlib.AsyncExitStack, port: int) -> None:
        self.devices = {}
        for device in DEVICES:
            for attempt in range(20):  # the broker is up (readyz), but argon2 checks are queued one at a time
                try:
                    if device.kind == "reader":
                        cm: Any = sim.reader(HOST, port, device.id, device.password)
                    else:
                        cm = sim.tablet(HOST, port, device.id, device.password)
                    self.devices[device.id] = await stack.enter_async_context(cm)
                    break
                except aiomqtt.MqttError:
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.1)

    async def _send(self, request: Request, within: float = REPLY_WITHIN_S) -> dict[str, Any] | None:
        """The device's request; None when no answer came (the agent died, or the connection with it)."""
        device = self.devices[request.device_id]
        try:
            if request.kind == "tap":
                reply = await device.tap(request.player.card, msg_id=request.msg_id, reply_within=within)
            else:
                reply = await device.order(
                    request.items, card_id=request.player.card, request_id=request.msg_id, reply_within=within
                )
        except (TimeoutError, aiomqtt.MqttError):
            return None
        payload: dict[str, Any] = reply.payload
        return payload

    def _mismatch(self, request: Request, what: str, payload: dict[str, Any]) -> None:
        self.told.state_mismatches.append(
            f"{request.kind} {request.device_id}/{request.msg_id} by {request.player.member_id}: {what}; "
            f"answer {json.dumps(payload, sort_keys=True)}"
        )

    def heard(self, request: Request, payload: dict[str, Any]) -> bool:
        """Apply a decision to the players' state and the oracle; False if the answer decided nothing (the
        request may be asked again; the caller puts the player back)."""
        player, told = request.player, self.told
        if payload.get("reason") in UNDECIDED_REASONS:
            told.undecided += 1
            return False
        told.answers[(request.device_id, request.msg_id)] = (request, payload)
        try:
            self._apply(request, payload)
        finally:
            self._place(player)
        return True

    def _place(self, player: Player) -> None:
        """Where a player is after an answer: on court, gone, or (never decided) still arriving."""
        if player.session_id is not None:
            self.on_court[player.member_id] = player
            return
        self.on_court.pop(player.member_id, None)
        if player.played:
            self.left.append(player)
        else:
            self.arriving.append(player)

    def _apply(self, request: Request, payload: dict[str, Any]) -> None:
        player, told = request.player, self.told
        status, session_id = payload.get("status"), payload.get("session_id")
        if request.kind == "order":
            if status != "ok":
                self._mismatch(request, f"order refused, player in session {player.session_id}", payload)
                return
            if session_id != player.session_id:
                self._mismatch(request, f"order on session {session_id}, player in {player.session_id}", payload)
            told.orders[request.msg_id] = (str(session_id), len(request.items))
            player.orders += 1
            return
        action = payload.get("action")
        if status == "granted" and action == "checkin" and isinstance(session_id, str):
            if player.session_id is not None:
                self._mismatch(request, f"check-in while in session {player.session_id}", payload)
            told.checkins[session_id] = request.msg_id
            device = next(d for d in DEVICES if d.id == request.device_id)
            player.session_id, player.court, player.reader, player.orders = session_id, device.court, device.id, 0
            player.played = True
        elif status == "granted" and action == "checkout" and isinstance(session_id, str):
            if session_id != player.session_id:
                self._mismatch(request, f"check-out of {session_id}, player in {player.session_id}", payload)
            told.checkouts[session_id] = request.msg_id
            player.session_id = player.court = player.reader = None
        else:
            self._mismatch(request, f"unexpected answer, player in session {player.session_id}", payload)

    def next_request(self, cycle: int) -> Request | None:
        """A new player checks in (while the courts are below their target), or one on court orders or leaves."""
        playing = [p for p in self.on_court.values() if not p.busy]
        arrivals = self.arriving or (self.left if self.rejoin else [])
        arrive = arrivals and (len(self.on_court) < self.on_court_target or not playing)
        if not arrive and not playing:
            return None
        self.requests += 1
        msg_id = f"k{cycle:03d}-{self.requests:06d}"
        if arrive:
            player = arrivals.pop(self.rng.randrange(len(arrivals)) if arrivals is self.left else -1)
            return Request("tap", self.rng.choice(sorted(ENTRY_READERS)), msg_id, player, cycle=cycle)
        player = self.rng.choice(playing)
        if player.orders < MAX_ORDERS_PER_SESSION and self.rng.random() < 0.55:
            items = [
                {"item_id": item_id, "name": name, "quantity": self.rng.randint(1, 3), "unit_price": price}
                for item_id, name, price in self.rng.sample(ITEMS, self.rng.randint(1, 2))
            ]
            return Request("order", DESK, msg_id, player, items, cycle=cycle)
        assert player.court is not None
        assert player.reader is not None
        out = OUT_READERS.get(player.court)
        reader = out if out is not None and self.rng.random() < 0.5 else player.reader
        return Request("tap", reader, msg_id, player, cycle=cycle)

    async def worker(self, cycle: int, stop: asyncio.Event) -> None:
        """One player after another, until the kill. `stop` as well as cancellation: on 3.11, `asyncio.wait_for`
        (inside `SimDevice.request`) loses a cancellation that races with the reply's arrival."""
        while not stop.is_set():
            request = self.next_request(cycle)
            if request is None:
                await asyncio.sleep(0.01)
                continue
            request.player.busy = True
            self.unanswered[request.msg_id] = request
            self.sending.set()
            payload = await self._send(request)
            if payload is None:
                # The kill cut it off: the player waits for the repeat after the restart.
                await asyncio.sleep(0.05)
                continue
            del self.unanswered[request.msg_id]
            if not self.heard(request, payload):
                self._place(request.player)
            request.player.busy = False
            await asyncio.sleep(self.rng.expovariate(1 / self.think_s))

    async def repeat_unanswered(self, kill_cycle: int) -> int:
        """Ask every request the last kill left unanswered again, with its own msg_id; returns how many."""
        pending = sorted(self.unanswered.values(), key=lambda r: r.msg_id)
        for request in pending:
            for _ in range(5):
                payload = await self._send(request, within=10.0)
                if payload is not None and self.heard(request, payload):
                    break
            else:
                raise RuntimeError(f"{request.kind} {request.device_id}/{request.msg_id}: no decision on repeat")
            self.told.repeated.append((request, kill_cycle))
            del self.unanswered[request.msg_id]
            request.player.busy = False
        return len(pending)

    async def reask(self, count: int) -> None:
        """Ask answered requests again: the stored answer must come back unchanged, after any number of kills."""
        answered = list(self.told.answers.values())
        for request, first in self.rng.sample(answered, min(count, len(answered))):
            again = await self._send(request, within=10.0)
            self.reasked += 1
            if again != first:
                self.told.answer_mismatches.append(
                    f"{request.kind} {request.device_id}/{request.msg_id}: first {json.dumps(first, sort_keys=True)}"
                    f", asked again {json.dumps(again, sort_keys=True)}"
                )


# -- the store and the sandbox, read after the fact ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event_id: str
    type: str
    session_id: str | None
    device_id: str | None
    occurred_at: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Delivery:
    destination: str
    seq: int
    state: str
    attempts: int
    last_error: str | None


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)


def read_store(db: Path) -> tuple[list[StoredEvent], list[Delivery]]:
    with contextlib.closing(_read_only(db)) as conn:
        events = [
            StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))
            for r in conn.execute(
                "SELECT seq, event_id, type, session_id, device_id, occurred_at, data FROM events ORDER BY seq"
            )
        ]
        deliveries = [
            Delivery(*r)
            for r in conn.execute("SELECT destination, seq, state, attempts, last_error FROM deliveries ORDER BY seq")
        ]
    return events, deliveries


# What is left to deliver: delivery rows pending, and events routed to a destination that its worker has not
# queued yet (past its cursor).
_UNQUEUED = "(SELECT COUNT(*) FROM events WHERE seq > (SELECT upto FROM delivery_cursors WHERE destination = ?) AND {})"
PENDING_SQL = "SELECT (SELECT COUNT(*) FROM deliveries WHERE state = 'pending') + {} + {}".format(  # noqa: S608
    *(_UNQUEUED.format(repo.routed_to(d)[0]) for d in ("ziggy", "cloud"))  # constant SQL, parameters bound
)
PENDING_PARAMS = tuple(v for d in ("ziggy", "cloud") for v in (d, repo.routed_to(d)[1]))


def _scalar(db: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    with contextlib.closing(_read_only(db)) as conn:
        row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def store_scalar(db: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    return await asyncio.to_thread(_scalar, db, sql, params)


async def wait_store(
    db: Path, sql: str, want: Callable[[int], bool], within: float, what: str, params: tuple[Any, ...] = ()
) -> int:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(sqlite3.Error):  # the file may not exist yet, or be busy for a moment
            value = await store_scalar(db, sql, params)
            if want(value):
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within:g} s")
        await asyncio.sleep(POLL_S * 2)


# -- the oracle ----------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Counts by where they were found: the store ("store"), the cloud ("cloud"), Ziggy ("ziggy")."""

    lost: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    out_of_order: Counter[str] = field(default_factory=Counter)
    misrouted: int = 0  # Ziggy calls of a session acting on a Ziggy session its own check-in did not create
    unknown: int = 0  # received events or acted calls that no stored event accounts for
    dead: Counter[str] = field(default_factory=Counter)  # delivery rows dead-lettered, by destination
    pending: Counter[str] = field(default_factory=Counter)  # delivery rows still pending at the end
    problems: list[str] = field(default_factory=list)
    events: int = 0
    cloud_events: int = 0
    ziggy_calls: int = 0

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def failures(self, where: Iterable[str] = ("store", "cloud", "ziggy")) -> int:
        """Everything that went wrong at these places (misrouted and unknown calls belong to Ziggy and the cloud)."""
        places = set(where)
        counters = (self.lost, self.duplicates, self.out_of_order, self.dead, self.pending)
        count = sum(counter[place] for counter in counters for place in places)
        if "ziggy" in places:
            count += self.misrouted
        if places & {"cloud", "ziggy"}:
            count += self.unknown
        return count


def _delivery_state(d: Delivery | None) -> str:
    return f"delivery {d.state}, {d.attempts} attempts, last error {d.last_error!r}" if d else "no delivery row"


def judge(events: list[StoredEvent], deliveries: list[Delivery], received: list[dict[str, Any]], told: Told) -> Verdict:
    """Compare what the devices heard, what the store holds and what the sandbox received."""
    v = Verdict(events=len(events))
    by_id = {e.event_id: e for e in events}
    started = {e.session_id: e for e in events if e.type == "session.started"}
    ended = {e.session_id: e for e in events if e.type == "session.ended"}
    lines: dict[str, list[StoredEvent]] = defaultdict(list)
    for e in events:
        if e.type == "consumption.recorded" and e.data.get("pos_id") == DESK:
            lines[str(e.data.get("request_id"))].append(e)

    # 1. Everything a device was told is in the store.
    for session_id, msg_id in told.checkins.items():
        if session_id not in started:
            v.lost["store"] += 1
            v.problem(f"lost: check-in {msg_id} was granted (session {session_id}) but no session.started is stored")
    for session_id, msg_id in told.checkouts.items():
        if session_id not in ended:
            v.lost["store"] += 1
            v.problem(f"lost: check-out {msg_id} was granted (session {session_id}) but no session.ended is stored")
    for request_id, (session_id, count) in told.orders.items():
        found = [e for e in lines.get(request_id, []) if e.session_id == session_id]
        if len(found) < count:
            v.lost["store"] += count - len(found)
            v.problem(f"lost: order {request_id} was ok with {count} lines on {session_id}; {len(found)} are stored")

    # 2. One fact, one event: a repeated request or a replayed decision is never stored under a second id.
    facts: Counter[tuple[Any, ...]] = Counter()
    for e in events:
        if e.type in ("session.started", "session.ended"):
            facts[(e.type, e.session_id)] += 1
        elif e.type == "consumption.recorded":
            facts[(e.type, e.data.get("pos_id"), e.data.get("request_id"), e.data.get("line_no"))] += 1
        elif e.type == "access.decided" and e.data.get("msg_id") is not None:
            facts[(e.type, e.device_id, e.data.get("msg_id"))] += 1
    for fact, n in facts.items():
        if n > 1:
            v.duplicates["store"] += n - 1
            v.problem(f"duplicate: {fact} is stored {n} times under different event ids")

    # 3. The cloud: every stored event accepted exactly once, each session's events in seq order.
    state = {(d.destination, d.seq): d for d in deliveries}
    cloud = [r for r in received if r.get("kind") == "event"]
    v.cloud_events = len(cloud)
    copies = Counter(str(r["event_id"]).lower() for r in cloud)
    for e in events:
        n = copies.pop(e.event_id.lower(), 0)
        if n == 0:
            v.lost["cloud"] += 1
            v.problem(
                f"lost: {e.type} seq {e.seq} ({e.event_id}, session {e.session_id}) never reached the cloud: "
                f"{_delivery_state(state.get(('cloud', e.seq)))}"
            )
        elif n > 1:
            v.duplicates["cloud"] += n - 1
            v.problem(f"duplicate: the cloud accepted {e.type} {e.event_id} {n} times")
    for event_id, n in copies.items():
        v.unknown += n
        v.problem(f"unknown: the cloud accepted {event_id}, which the store never had")
    last_seq: dict[str, int] = {}
    for r in cloud:
        sid, seq = r.get("session_id"), int(r["seq"])
        if not isinstance(sid, str):
            continue
        if seq < last_seq.get(sid, -1):
            v.out_of_order["cloud"] += 1
            v.problem(f"out of order: the cloud got seq {seq} of session {sid} after seq {last_seq[sid]}")
        last_seq[sid] = max(seq, last_seq.get(sid, -1))

    # 4. Ziggy: each session or consumption event acted on once (Idempotency-Key = event id), in seq order per
    #    session, on the Ziggy session that the session's own check-in created.
    acted = [r for r in received if r.get("kind") == "call" and r.get("route") in ZIGGY_ROUTES and r.get("acted")]
    v.ziggy_calls = len(acted)
    calls_by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in acted:
        calls_by_key[str(r.get("idempotency_key"))].append(r)
    for e in events:
        if e.type not in ZIGGY_TYPES:
            continue
        calls = calls_by_key.pop(e.event_id, [])
        if not calls:
            v.lost["ziggy"] += 1
            v.problem(
                f"lost: {e.type} seq {e.seq} ({e.event_id}, session {e.session_id}) never acted on Ziggy: "
                f"{_delivery_state(state.get(('ziggy', e.seq)))}"
            )
        elif len(calls) > 1:
            v.duplicates["ziggy"] += len(calls) - 1
            v.problem(f"duplicate: Ziggy acted {len(calls)} times on {e.type} {e.event_id}")
    for key, calls in calls_by_key.items():
        v.unknown += len(calls)
        v.problem(f"unknown: Ziggy acted on {calls[0].get('route')} with key {key}; no stored event has that id")
    created: dict[str, str] = {}  # our session id -> the Ziggy session its check-in created
    for r in acted:
        ev = by_id.get(str(r.get("idempotency_key")))
        if ev is not None and ev.type == "session.started" and ev.session_id is not None:
            created[ev.session_id] = str((r.get("effect") or {}).get("session_id"))
    ziggy_last: dict[str, int] = {}
    for r in acted:
        ev = by_id.get(str(r.get("idempotency_key")))
        if ev is None or ev.session_id is None:
            continue
        if ev.seq < ziggy_last.get(ev.session_id, -1):
            v.out_of_order["ziggy"] += 1
            v.problem(
                f"out of order: Ziggy got {ev.type} seq {ev.seq} of {ev.session_id}"
                f" after seq {ziggy_last[ev.session_id]}"
            )
        ziggy_last[ev.session_id] = max(ev.seq, ziggy_last.get(ev.session_id, -1))
        zg = str((r.get("effect") or {}).get("session_id"))
        if ev.type != "session.started" and zg != created.get(ev.session_id):
            v.misrouted += 1
            v.problem(
                f"misrouted: {ev.type} seq {ev.seq} of {ev.session_id} acted on Ziggy session {zg}; "
                f"its own check-in created {created.get(ev.session_id)}"
            )

    for d in deliveries:
        if d.state == "dead":
            v.dead[d.destination] += 1
        elif d.state == "pending":
            v.pending[d.destination] += 1
        if d.state != "delivered":
            v.problem(f"delivery {d.destination} seq {d.seq} is {d.state}: {d.last_error!r}")
    return v


# -- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Cycle:
    n: int
    ready_s: float
    traffic_s: float
    seconds: float
    repeated: int
    told: int  # answers heard this cycle (taps and orders)
    pending_at_kill: int  # events not yet delivered when the agent died (rows pending, or not queued yet)
    startup_kill: bool


@dataclass
class Report:
    options: CrashOptions
    verdict: Verdict
    told: Told
    cycles: list[Cycle]
    seconds: float
    committed_unheard: int  # answers lost to a kill although the decision had committed (the repeat replayed it)
    requests: int
    reasked: int
    final_exit: int

    @property
    def failures(self) -> int:
        """Everything that went wrong, anywhere (the devices' answers included)."""
        t = self.told
        return self.verdict.failures() + len(t.answer_mismatches) + len(t.state_mismatches) + (self.final_exit != 0)

    def as_json(self) -> dict[str, Any]:
        v, t = self.verdict, self.told
        cycle_s = [c.seconds for c in self.cycles] or [0.0]
        return {
            "bench": "crash",
            "cycles": len(self.cycles),
            "lost": v.lost.total(),
            "duplicates": v.duplicates.total(),
            "out_of_order": v.out_of_order.total(),
            "misrouted": v.misrouted,
            "unknown": v.unknown,
            "dead": v.dead.total(),
            "pending": v.pending.total(),
            "lost_by_place": dict(sorted(v.lost.items())),
            "duplicates_by_place": dict(sorted(v.duplicates.items())),
            "out_of_order_by_place": dict(sorted(v.out_of_order.items())),
            "dead_by_destination": dict(sorted(v.dead.items())),
            "answer_mismatches": len(t.answer_mismatches),
            "state_mismatches": len(t.state_mismatches),
            "taps_told": len(t.checkins) + len(t.checkouts),
            "checkins_told": len(t.checkins),
            "checkouts_told": len(t.checkouts),
            "orders_told": len(t.orders),
            "lines_told": t.lines,
            "requests": self.requests,
            "repeated": len(t.repeated),
            "committed_unheard": self.committed_unheard,
            "reasked": self.reasked,
            "undecided": t.undecided,
            "events": v.events,
            "cloud_events": v.cloud_events,
            "ziggy_calls": v.ziggy_calls,
            "pending_at_kill": sum(c.pending_at_kill for c in self.cycles),
            "kills_with_backlog": sum(c.pending_at_kill > 0 for c in self.cycles),
            "startup_kills": sum(c.startup_kill for c in self.cycles),
            "seconds": round(self.seconds, 1),
            "cycle_s_median": round(statistics.median(cycle_s), 2),
            "cycle_s_max": round(max(cycle_s), 2),
            "ready_s_median": round(statistics.median([c.ready_s for c in self.cycles] or [0.0]), 2),
            "seed": self.options.seed,
            "players": "rejoin" if self.options.rejoin else "fresh",
        }

    def summary(self, problems: int = 30) -> str:
        j = self.as_json()
        lines = [
            f"{j['cycles']} kills in {j['seconds']} s (cycle median {j['cycle_s_median']} s, max {j['cycle_s_max']} s;"
            f" agent ready in {j['ready_s_median']} s median), seed {j['seed']}",
            f"told: {j['checkins_told']} check-ins, {j['checkouts_told']} check-outs, {j['orders_told']} orders"
            f" ({j['lines_told']} lines) of {j['requests']} requests; {j['repeated']} repeated after a kill"
            f" ({j['committed_unheard']} had committed unheard), {j['reasked']} asked again",
            f"store: {j['events']} events, {j['pending_at_kill']} deliveries pending at the kills"
            f" ({j['kills_with_backlog']} kills landed with deliveries pending);"
            f" cloud accepted {j['cloud_events']}, Ziggy acted {j['ziggy_calls']} times",
            f"lost {j['lost']} {j['lost_by_place']}, duplicates {j['duplicates']} {j['duplicates_by_place']},"
            f" out of order {j['out_of_order']} {j['out_of_order_by_place']},"
            f" misrouted {j['misrouted']}, unknown {j['unknown']}, dead {j['dead']} {j['dead_by_destination']},"
            f" pending {j['pending']},"
            f" answer mismatches {j['answer_mismatches']}, state mismatches {j['state_mismatches']},"
            f" final exit {self.final_exit}",
        ]
        shown = [*self.told.answer_mismatches, *self.told.state_mismatches, *self.verdict.problems]
        lines += [f"  - {p}" for p in shown[:problems]]
        if len(shown) > problems:
            lines.append(f"  ... and {len(shown) - problems} more")
        return "\n".join(lines)


def _committed_unheard(told: Told, events: Iterable[StoredEvent], kills_at_ms: dict[int, int]) -> int:
    """Repeated requests whose decision the store had committed before the kill that cut their answer off."""
    decided_at: dict[tuple[str, str], int] = {}
    for e in events:
        if e.type == "access.decided" and e.device_id is not None:
            decided_at.setdefault((e.device_id, str(e.data.get("msg_id"))), e.occurred_at)
        elif e.type == "consumption.recorded":
            decided_at.setdefault((str(e.data.get("pos_id")), str(e.data.get("request_id"))), e.occurred_at)
    count = 0
    for request, kill_cycle in told.repeated:
        at = decided_at.get((request.device_id, request.msg_id))
        if at is not None and kill_cycle in kills_at_ms and at <= kills_at_ms[kill_cycle]:
            count += 1
    return count


async def run_crash(options: CrashOptions, say: Callable[[str], None] = lambda _: None) -> Report:
    """The whole rig: sandbox, cycles of traffic and kills, the final drain, the oracle."""
    started = time.monotonic()
    rng = random.Random(options.seed)
    root = options.root
    root.mkdir(parents=True, exist_ok=True)
    sandbox_port, broker_port, api_port = free_ports(3)
    layout = Layout(root, sandbox_port, broker_port, api_port)
    await asyncio.to_thread(write_config, layout)  # argon2 hashes: off the loop
    cards = member_cards(options.members or (24 if options.rejoin else 100 * options.cycles))
    traffic = Traffic(
        cards, rng, rejoin=options.rejoin, on_court=options.on_court, think_s=options.workers / options.rate_per_s
    )
    sandbox = Child(
        "sandbox",
        [*club_agent_command(), "sandbox", "--port", str(sandbox_port), "--members", "0"],
        root / "sandbox.log",
        root,
    )
    agent = Child("agent", [*club_agent_command(), "run", "--config", str(layout.config)], root / "agent.log", root)
    ready_url = f"http://{HOST}:{api_port}/readyz"
    cycles: list[Cycle] = []
    kills_at_ms: dict[int, int] = {}
    try:
        sandbox.start()
        await wait_http(sandbox, f"{layout.sandbox_url}/_sandbox/health")
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            upsert = [
                {"member_id": m, "first_name": f"Player {m[-3:]}", "status": "active", "cards": [c]} for m, c in cards
            ]
            answer = await http.post(f"{layout.sandbox_url}/_sandbox/members", json={"upsert": upsert})
            answer.raise_for_status()

        for n in range(options.cycles):
            async with asyncio.timeout(options.cycle_timeout_s):
                cycle = await _cycle(n, options, rng, agent, ready_url, layout, traffic, kills_at_ms)
            cycles.append(cycle)
            say(
                f"cycle {n + 1:3d}/{options.cycles}: ready {cycle.ready_s:4.2f} s, traffic {cycle.traffic_s:4.2f} s,"
                f" {cycle.told:3d} answers, {cycle.repeated} repeated, {cycle.pending_at_kill:3d} deliveries pending"
                f" at the kill{' (also killed in start-up)' if cycle.startup_kill else ''}"
            )

        # The last run: repeat what the last kill cut off, then let the outbox drain, then a clean stop.
        async with asyncio.timeout(options.drain_timeout_s + START_TIMEOUT_S):
            agent.start()
            await wait_http(agent, ready_url)
            stack = contextlib.AsyncExitStack()
            try:
                await traffic.connect(stack, broker_port)
                await traffic.repeat_unanswered(options.cycles - 1)
                await traffic.reask(options.reask)
            finally:
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    await stack.aclose()
            drained = time.monotonic()
            try:
                await wait_store(
                    layout.db,
                    PENDING_SQL,
                    lambda n: n == 0,
                    options.drain_timeout_s,
                    "the outbox did not drain",
                    PENDING_PARAMS,
                )
                say(f"final run: outbox drained in {time.monotonic() - drained:.2f} s")
            except TimeoutError:  # judged all the same: the rows still pending are counted and listed
                say(f"final run: the outbox did not drain within {options.drain_timeout_s:g} s")
            final_exit = await agent.stop()
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            answer = await http.get(f"{layout.sandbox_url}/_sandbox/received")
            answer.raise_for_status()
            received: list[dict[str, Any]] = answer.json()["entries"]
    finally:
        agent.kill()
        sandbox.kill()
        with contextlib.suppress(TimeoutError, AssertionError):
            await agent.wait(KILLED_EXIT_WAIT_S)
        with contextlib.suppress(TimeoutError, AssertionError):
            await sandbox.wait(KILLED_EXIT_WAIT_S)

    events, deliveries = await asyncio.to_thread(read_store, layout.db)
    verdict = judge(events, deliveries, received, traffic.told)
    return Report(
        options=options,
        verdict=verdict,
        told=traffic.told,
        cycles=cycles,
        seconds=time.monotonic() - started,
        committed_unheard=_committed_unheard(traffic.told, events, kills_at_ms),
        requests=traffic.requests,
        reasked=traffic.reasked,
        final_exit=final_exit,
    )


async def _cycle(
    n: int,
    options: CrashOptions,
    rng: random.Random,
    agent: Child,
    ready_url: str,
    layout: Layout,
    traffic: Traffic,
    kills_at_ms: dict[int, int],
) -> Cycle:
    began = time.monotonic()
    agent.start()
    startup_kill = n > 0 and rng.random() < options.startup_kill_rate
    if startup_kill:  # SIGKILL during start-up too: migrations, quick_check, the outbox's first round
        await asyncio.sleep(rng.uniform(0.05, 1.0))
        agent.kill()
        await agent.wait(KILLED_EXIT_WAIT_S)
        agent.start()
    ready_s = await wait_http(agent, ready_url)
    if n == 0:  # the first start pulls the members from the sandbox
        await wait_store(
            layout.db,
            "SELECT members FROM member_list WHERE id = 1",
            lambda count: count == traffic.pool,
            START_TIMEOUT_S,
            "the member sync did not bring the rig's members",
        )
    told_before = len(traffic.told.answers)
    stack = contextlib.AsyncExitStack()
    try:
        await traffic.connect(stack, layout.broker_port)
        repeated = await traffic.repeat_unanswered(n - 1)
        await traffic.reask(options.reask)
        early = rng.random() < options.early_kill_rate
        delay = rng.uniform(0.0, options.traffic_s[0]) if early else rng.uniform(*options.traffic_s)
        traffic_began = time.monotonic()
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(traffic.worker(n, stop), name=f"crash-player-{i}") for i in range(options.workers)
        ]
        try:
            await asyncio.sleep(delay)
            if rng.random() < options.in_flight_kill_rate:
                traffic.sending.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await traffic.sending.wait()
                await asyncio.sleep(rng.uniform(0, 0.004))
            kills_at_ms[n] = int(time.time() * 1000)
            agent.kill()
        finally:
            stop.set()
            for task in workers:
                task.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
        traffic_s = time.monotonic() - traffic_began
        await agent.wait(KILLED_EXIT_WAIT_S)
        failed = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if failed:
            raise failed[0]
    finally:
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await stack.aclose()
    pending = await store_scalar(layout.db, PENDING_SQL, PENDING_PARAMS)
    return Cycle(
        n=n,
        ready_s=ready_s,
        traffic_s=traffic_s,
        seconds=time.monotonic() - began,
        repeated=repeated,
        told=len(traffic.told.answers) - told_before,
        pending_at_kill=pending,
        startup_kill=startup_kill,
    )
