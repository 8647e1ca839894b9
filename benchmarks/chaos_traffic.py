"""The premises' load during a chaos run, and what every device was told: the oracle's first half.

Players (members of the club) tap in at a court's MQTT reader, order at the bar tablet, tap out at their reader
or at court 1's exit reader, and come back later, `workers` of them acting at once at about `rate` requests a
second all together (the crash rig's players, tests/e2e/crash_rig.py). Other players use the RDM6300 reader on
the pty at court 3's door. A highlight button on court 1 (the court with the camera) is pressed every few seconds.

A request that gets no answer (the agent killed, its broker gone, or just slow) is asked again with the same
msg_id until it is answered: the agent answers a repeat from its store, so what a device finally hears is what was
decided, and nothing is decided twice. An answer `unavailable` (the store could not record: nothing decided) or
`rate_limited` ends the request; the player tries again later with a new one.

Told, from the answers alone (never from the agent's own account): each granted check-in and check-out with its
session id, each ok order with its request id and lines (as `crash_rig.Told`, which `crash_rig.judge` reads), each
highlight id a button was given, and each serial tap the reader showed as granted (its feedback line names the
action: "Welcome" / "See you"). Every attempt is logged with its latency and the fault windows it overlapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chaos_devices import MqttLink, SerialLine
from chaos_timeline import Timeline

from tests.e2e.crash_rig import ITEMS, Told

REPLY_WITHIN_S = 5.0  # a door that has not answered in 5 s has refused the person in front of it
GIVE_UP_S = 90.0  # a request is repeated this long at most while the run goes on; the rest wait for the end
LATE_LINE_S = 20.0  # how long a serial reader keeps listening for a decision that came late
MAX_ORDERS_PER_SESSION = 3
ON_COURT_TARGET = 12
SERIAL_ON_COURT_TARGET = 4
UNDECIDED = frozenset({"unavailable", "rate_limited"})

ENTRY_READERS = {"r1": "c1", "r2": "c2"}
EXIT_READERS = {"c1": "rx"}
DESK = "desk"
BUTTON, BUTTON_COURT = "b1", "c1"
DOOR, DOOR_COURT = "door", "c3"

Kind = Literal["tap", "order", "press"]


@dataclass(slots=True)
class Player:
    member_id: str
    card: str
    session_id: str | None = None
    court: str | None = None
    reader: str | None = None
    orders: int = 0
    busy: bool = False
    played: bool = False
    uncertain: bool = False  # a serial tap whose answer never came: the store says where they are


@dataclass(slots=True)
class Request:
    kind: Kind
    device_id: str
    topic: str
    body: dict[str, Any]
    player: Player | None = None
    first_sent: float | None = None
    attempts: int = 0

    @property
    def msg_id(self) -> str:
        return str(self.body["msg_id"])


@dataclass(frozen=True, slots=True)
class Attempt:
    what: str  # tap, order, press, serial
    sent: float
    done: float
    outcome: str  # answered, unavailable, rate_limited, timeout, checkout_denied (a player on court refused)
    category: str | None  # None, or why no decision was expected: disk, restart, unplug
    label: str  # the fault windows it overlapped
    device_id: str = ""
    msg_id: str = ""  # the serial reader's: the card
    member_id: str = ""
    answer: str = ""  # status/action/reason session of the answer (the serial reader's: its line)

    def record(self, origin: float) -> dict[str, Any]:
        """One line of attempts.jsonl: what the devices heard, for a post-mortem against the store."""
        return {
            "at_s": round(self.sent - origin, 3),
            "latency_ms": round(self.latency_ms, 1),
            "what": self.what,
            "device": self.device_id,
            "msg_id": self.msg_id,
            "member": self.member_id,
            "outcome": self.outcome,
            "answer": self.answer,
            "faults": self.label,
            "excused": self.category,
        }

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1000


@dataclass
class SerialTold:
    card: str
    member_id: str
    action: str  # checkin / checkout


@dataclass
class Drift:
    """Answers the players did not expect (a session the agent ended by itself, for instance): the answer wins."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def note(self, what: str, detail: str) -> None:
        self.counts[what] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{what}: {detail}")


def _exit_court(reader: str) -> str | None:
    return next((court for court, r in EXIT_READERS.items() if r == reader), None)


def open_sessions(db: Path, member_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """member -> (session, court) of the open sessions, read-only from the agent's store; None if unreadable."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)) as conn:
            rows = conn.execute(
                "SELECT member_id, session_id, court_id FROM sessions WHERE ended_at IS NULL"
            ).fetchall()
    except sqlite3.Error:
        return None
    wanted = set(member_ids)
    return {m: (s, c) for m, s, c in rows if m in wanted}


class Traffic:
    def __init__(
        self,
        links: dict[str, MqttLink],
        serial: SerialLine,
        timeline: Timeline,
        mqtt_cards: list[tuple[str, str]],
        serial_cards: list[tuple[str, str]],
        rng: random.Random,
        *,
        rate_per_s: float,
        workers: int,
        press_every_s: tuple[float, float],
        serial_every_s: tuple[float, float],
        db: Path,
        agent_up: Callable[[], bool],
    ) -> None:
        self.links, self.serial, self.timeline, self.rng = links, serial, timeline, rng
        self.workers, self.think_s = workers, workers / rate_per_s
        self.press_every_s, self.serial_every_s = press_every_s, serial_every_s
        self.db, self.agent_up = db, agent_up
        self.arriving = [Player(m, c) for m, c in reversed(mqtt_cards)]  # a stack: pop() is the next newcomer
        self.left: list[Player] = []
        self.on_court: dict[str, Player] = {}
        self.serial_players = [Player(m, c) for m, c in serial_cards]
        self.told = Told()
        self.highlights: dict[str, str] = {}  # highlight_id -> ok / no_session
        self.serial_told: list[SerialTold] = []
        self.attempts: list[Attempt] = []
        self.answered: list[tuple[Request, dict[str, Any]]] = []
        self.pending: list[Request] = []  # not answered when the run stopped or the request gave up
        self.drift = Drift()
        self.requests = 0
        self.late_serial = 0
        self.reasked = 0
        self.answer_mismatches: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- running --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"chaos-player-{i}") for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._presser(), name="chaos-button"))
        self._tasks.append(asyncio.create_task(self._serial_worker(), name="chaos-serial"))

    async def stop(self) -> None:
        """Players finish what they are doing (each request's current attempt), then stop."""
        self._stop.set()
        if not self._tasks:
            return
        done, late = await asyncio.wait(self._tasks, timeout=REPLY_WITHIN_S + LATE_LINE_S + 10)
        for task in late:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
        if errors:
            raise errors[0]  # a bug in the driver: say so loudly

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(0.0, seconds))

    # -- one request, until answered ------------------------------------------------------------------------------

    def _outcome(self, payload: dict[str, Any] | None, request: Request) -> str:
        if payload is None:
            return "timeout"
        reason = payload.get("reason")
        if reason in UNDECIDED:
            return str(reason)
        player = request.player
        if (
            reason == "already_in_session"
            and request.kind == "tap"
            and player is not None
            and player.session_id is not None
            and player.court in (ENTRY_READERS.get(request.device_id), _exit_court(request.device_id))
        ):
            return "checkout_denied"  # on court, at that court's reader: the second tap is a checkout (grace 0)
        return "answered"

    def _log(self, what: str, sent: float, done: float, outcome: str, who: tuple[str, str, str], answer: str) -> None:
        self.attempts.append(Attempt(what, sent, done, outcome, None, "", *who, answer))

    def classify(self) -> None:
        """Judge every attempt against the fault windows as they finally stand (a restart's window only closes
        once the agent is back, after some attempts made during it have ended)."""
        out = []
        for a in self.attempts:
            bad = a.outcome in ("timeout", "unavailable")  # a checkout_denied is never excused: the agent decided
            category = self.timeline.category(a.sent, a.done, serial=a.what == "serial") if bad else None
            out.append(dataclasses.replace(a, category=category, label=self.timeline.label(a.sent, a.done)))
        self.attempts = out

    @staticmethod
    def _summary(payload: dict[str, Any] | None) -> str:
        if payload is None:
            return ""
        keys = ("status", "action", "reason", "session_id", "highlight_id")
        return " ".join(str(payload[k]) for k in keys if payload.get(k) not in (None, ""))

    async def ask(self, request: Request, *, until: float, stoppable: bool = True) -> dict[str, Any] | None:
        """Send `request` (again, same msg_id) until it is answered; None, unanswered, once `until` (monotonic)
        has passed or, when `stoppable`, the players are stopped."""
        link = self.links[request.device_id]
        unreachable: float | None = None  # since when the device has had no connection to the agent
        while True:
            if time.monotonic() > until or (stoppable and self._stop.is_set()):
                return None
            if not link.up.is_set():
                now = time.monotonic()
                unreachable = now if unreachable is None else unreachable
                if now - unreachable >= REPLY_WITHIN_S:  # as good as an attempt unanswered: the door stays shut
                    who = (request.device_id, request.msg_id, request.player.member_id if request.player else "")
                    self._log(request.kind, unreachable, now, "timeout", who, "no connection to the agent")
                    unreachable = now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.up.wait(), 0.5)
                continue
            unreachable = None
            sent = time.monotonic()
            if request.first_sent is None:
                request.first_sent = sent
            request.attempts += 1
            payload = await link.request(request.topic, request.body, REPLY_WITHIN_S)
            who = (request.device_id, request.msg_id, request.player.member_id if request.player else "")
            outcome = self._outcome(payload, request)
            self._log(request.kind, sent, time.monotonic(), outcome, who, self._summary(payload))
            if payload is not None:
                return payload
            await asyncio.sleep(0.2)

    def _deadline(self) -> float:
        return time.monotonic() + GIVE_UP_S

    # -- MQTT players ---------------------------------------------------------------------------------------------

    def _msg_id(self, prefix: str) -> str:
        self.requests += 1
        return f"{prefix}{self.requests:06d}"

    def _tap(self, reader: str, player: Player) -> Request:
        body = {"card_id": player.card, "msg_id": self._msg_id("t")}
        return Request("tap", reader, f"rfid/{reader}/scan", body, player)

    def next_request(self) -> Request | None:
        """A newcomer checks in (while the courts are below their target), or a player on court orders or leaves."""
        playing = [p for p in self.on_court.values() if not p.busy]
        arrivals = self.arriving or self.left
        arrive = bool(arrivals) and (len(self.on_court) < ON_COURT_TARGET or not playing)
        if not arrive and not playing:
            return None
        if arrive:
            player = self.left.pop(self.rng.randrange(len(self.left))) if not self.arriving else self.arriving.pop()
            return self._tap(self.rng.choice(sorted(ENTRY_READERS)), player)
        player = self.rng.choice(playing)
        if player.orders < MAX_ORDERS_PER_SESSION and self.rng.random() < 0.45:
            items = [
                {"item_id": item_id, "name": name, "quantity": self.rng.randint(1, 3), "unit_price": price}
                for item_id, name, price in self.rng.sample(ITEMS, self.rng.randint(1, 2))
            ]
            body = {"items": items, "msg_id": self._msg_id("o"), "card_id": player.card}
            return Request("order", DESK, f"pos/{DESK}/consumption", body, player)
        exit_reader = EXIT_READERS.get(player.court or "")
        own = player.reader or self.rng.choice(sorted(ENTRY_READERS))
        reader = exit_reader if exit_reader is not None and self.rng.random() < 0.5 else own
        return self._tap(reader, player)

    async def _worker(self) -> None:
        while not self._stop.is_set():
            request = self.next_request()
            if request is None:
                await self._pause(0.05)
                continue
            assert request.player is not None
            request.player.busy = True
            payload = await self.ask(request, until=self._deadline())
            if payload is None:
                self.pending.append(request)  # the player waits (busy) for the final repeat
                continue
            self.heard(request, payload)
            await self._pause(self.rng.expovariate(1 / self.think_s))

    def _place(self, player: Player) -> None:
        player.busy = False
        if player.session_id is not None:
            self.on_court[player.member_id] = player
            return
        self.on_court.pop(player.member_id, None)
        (self.left if player.played else self.arriving).append(player)

    def heard(self, request: Request, payload: dict[str, Any]) -> None:
        """A decision (or a refusal that decided nothing) for a player's tap or order."""
        player = request.player
        assert player is not None
        if payload.get("reason") in UNDECIDED:
            self._place(player)
            return
        self.answered.append((request, payload))
        try:
            if request.kind == "order":
                self._order_answer(request, player, payload)
            else:
                self._tap_answer(request, player, payload)
        finally:
            self._place(player)

    def _order_answer(self, request: Request, player: Player, payload: dict[str, Any]) -> None:
        session_id = payload.get("session_id")
        if payload.get("status") == "ok" and isinstance(session_id, str):
            self.told.orders[request.msg_id] = (session_id, len(request.body["items"]))
            if session_id != player.session_id:
                self.drift.note("order_on_other_session", f"{request.msg_id}: {session_id} vs {player.session_id}")
                player.session_id = session_id
            player.orders += 1
            return
        self.drift.note(f"order_{payload.get('reason')}", f"{request.msg_id} by {player.member_id}")
        if payload.get("reason") == "no_open_session":
            player.session_id = player.court = player.reader = None

    def _tap_answer(self, request: Request, player: Player, payload: dict[str, Any]) -> None:
        status, action, session_id = payload.get("status"), payload.get("action"), payload.get("session_id")
        if status == "granted" and action == "checkin" and isinstance(session_id, str):
            if player.session_id is not None:
                self.drift.note("checkin_while_in_session", f"{player.member_id}: {player.session_id} ended by itself")
            self.told.checkins[session_id] = request.msg_id
            court = ENTRY_READERS.get(request.device_id)
            player.session_id, player.court, player.reader, player.orders = session_id, court, request.device_id, 0
            player.played = True
        elif status == "granted" and action == "checkout" and isinstance(session_id, str):
            if session_id != player.session_id:
                self.drift.note("checkout_of_other_session", f"{player.member_id}: {session_id}")
            self.told.checkouts[session_id] = request.msg_id
            player.session_id = player.court = player.reader = None
        else:
            self.drift.note(f"tap_{payload.get('reason')}", f"{request.device_id}/{request.msg_id} {player.member_id}")
            if payload.get("reason") == "no_open_session":
                player.session_id = player.court = player.reader = None

    # -- the highlight button -------------------------------------------------------------------------------------

    async def _presser(self) -> None:
        while not self._stop.is_set():
            await self._pause(self.rng.uniform(*self.press_every_s))
            if self._stop.is_set():
                return
            body = {"button_id": BUTTON, "msg_id": self._msg_id("p"), "kind": "short"}
            request = Request("press", BUTTON, f"court/{BUTTON_COURT}/button/pressed", body)
            payload = await self.ask(request, until=self._deadline())
            if payload is None:
                self.pending.append(request)
            else:
                self.heard_press(request, payload)

    def heard_press(self, request: Request, payload: dict[str, Any]) -> None:
        highlight_id = payload.get("highlight_id")
        if payload.get("status") in ("ok", "no_session") and isinstance(highlight_id, str):
            self.highlights[highlight_id] = str(payload["status"])
            self.answered.append((request, payload))

    # -- the serial reader ----------------------------------------------------------------------------------------

    def _serial_pick(self) -> Player | None:
        free = [p for p in self.serial_players if not p.uncertain]
        inside = [p for p in free if p.session_id is not None]
        outside = [p for p in free if p.session_id is None]
        if outside and (len(inside) < SERIAL_ON_COURT_TARGET or not inside):
            return self.rng.choice(outside)
        return self.rng.choice(inside) if inside else None

    def _reconcile(self) -> None:
        """Players whose tap went unanswered: where the store says they are (only once it can be read)."""
        unsure = [p for p in self.serial_players if p.uncertain]
        if not unsure or not self.agent_up():
            return
        found = open_sessions(self.db, [p.member_id for p in unsure])
        if found is None:
            return
        for player in unsure:
            player.session_id, player.court = found.get(player.member_id, (None, None))
            player.uncertain = False

    async def _serial_worker(self) -> None:
        while not self._stop.is_set():
            await self._pause(self.rng.uniform(*self.serial_every_s))
            if self._stop.is_set():
                return
            self._reconcile()
            if not self.serial.plugged.is_set():
                continue  # nobody can tap a reader that is not there
            player = self._serial_pick()
            if player is None:
                continue
            self.late_serial += len(self.serial.stale())
            sent = time.monotonic()
            try:
                self.serial.present(player.card)
            except OSError:
                continue  # unplugged between the check and the tap
            decision, text = await self.serial.decision(REPLY_WITHIN_S)
            outcome = self._serial_outcome(decision, text)
            if outcome == "answered" and decision == "DENIED" and player.session_id is not None and "on court" in text:
                outcome = "checkout_denied"
            who = (DOOR, player.card, player.member_id)
            self._log("serial", sent, time.monotonic(), outcome, who, f"{decision or ''} {text}".strip())
            if decision is None:  # a late answer still counts for the player (it was already a refusal above)
                decision, text = await self.serial.decision(LATE_LINE_S)
                if decision is not None:
                    self.late_serial += 1
            self.serial_heard(player, decision, text)

    @staticmethod
    def _serial_outcome(decision: str | None, text: str) -> str:
        if decision is None:
            return "timeout"
        return "unavailable" if decision == "DENIED" and "unavailable" in text.lower() else "answered"

    def serial_heard(self, player: Player, decision: str | None, text: str) -> None:
        if decision is None:
            player.uncertain = True
            return
        if decision == "GRANTED" and text.startswith("Welcome"):
            self.serial_told.append(SerialTold(player.card, player.member_id, "checkin"))
            if player.session_id is not None:
                self.drift.note("serial_checkin_while_in_session", player.member_id)
            player.session_id, player.court = "(serial)", DOOR_COURT
        elif decision == "GRANTED" and text.startswith("See you"):
            self.serial_told.append(SerialTold(player.card, player.member_id, "checkout"))
            if player.session_id is None:
                self.drift.note("serial_checkout_while_outside", player.member_id)
            player.session_id = player.court = None
        elif "unavailable" not in text.lower():
            self.drift.note("serial_denied", f"{player.member_id}: {text}")
            player.uncertain = True  # the store knows better than a guess

    # -- after a restart, and at the end --------------------------------------------------------------------------

    async def reask(self, count: int) -> None:
        """Ask answered requests again: the stored answer must come back unchanged, after any number of kills."""
        for request, first in self.rng.sample(self.answered, min(count, len(self.answered))):
            again = await self.ask(request, until=time.monotonic() + 30, stoppable=False)
            self.reasked += 1
            if again != first:
                self.answer_mismatches.append(
                    f"{request.kind} {request.device_id}/{request.msg_id}: first {json.dumps(first, sort_keys=True)},"
                    f" asked again {json.dumps(again, sort_keys=True)}"
                )

    async def finish(self, within: float) -> int:
        """After `stop()`: repeat every unanswered request until it is answered (within `within` seconds in all);
        returns how many stayed unanswered."""
        until = time.monotonic() + within
        left: list[Request] = []
        for request in self.pending:
            payload = await self.ask(request, until=until, stoppable=False)
            if payload is None:
                left.append(request)
            elif request.kind == "press":
                self.heard_press(request, payload)
            else:
                self.heard(request, payload)
        self.pending = left
        self._reconcile()
        return len(left)
