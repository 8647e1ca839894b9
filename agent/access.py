"""The access service: a tap, a tablet command or a button press becomes a durable decision and a reply.

Transport-neutral: the MQTT dispatcher, the firmware bridges and the local API all call these methods. Each
decision, its session change, its ledger entry and its events (with one delivery row per destination) commit
in one transaction before the reply exists, so a device is never told about something that could be lost.
The transactions' bodies are plain functions run on the store's thread (`Database.write`): one hop per request,
and requests arriving together share one commit.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from .clock import Clock
from .config import Config, DeviceConfig
from .domain.decide import decide
from .domain.messages import Language, bar_message, denial_message, message
from .domain.model import Action, Court, Decision, Direction, Instant, Now, OpenSession, Policy, Reason
from .domain.sessions import duration_minutes, highlight_window, overdue
from .errors import StoreError
from .lan.payloads import ConsumptionItem
from .logs import OnceLogger, get_logger
from .metrics import Metrics
from .store import repo
from .store.db import Database
from .store.repo import NewEvent, Stamp, iso, new_id

log = get_logger("agent.access")
T = TypeVar("T")
MAX_PLAYERS_SHOWN = 16  # a court screen lists this many players; player_count has the total
ANSWER_MEMORY = 4096  # recent (device, msg_id) answers kept in memory in front of the table
ANSWER_RETENTION = timedelta(days=2)


def _session_of(conn: sqlite3.Connection, session_id: str | None, card_id: str | None) -> sqlite3.Row | None:
    """The session named, or the card holder's open one; None if there is neither."""
    if session_id is not None:
        return repo.session_by_id(conn, session_id)
    if card_id is not None:
        found = repo.lookup(conn, card_id=card_id)
        if found.state.open_session is not None:
            return repo.session_by_id(conn, found.state.open_session.session_id)
    return None


def money(cents: int) -> float:
    """A decimal amount for the wire (JSON numbers): 1250 -> 12.5."""
    return cents / 100


LAST_TRUSTED_KEY = "last_trusted_ms"


@dataclass(slots=True)
class Outcome:
    """What happened and what to tell the device; `courts` lists courts whose state changed."""

    response: dict[str, Any]
    decision: Decision | None = None
    first_name: str | None = None
    replayed: bool = False
    courts: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class _Recent:
    mono_ns: int
    response: dict[str, Any]


class AccessService:
    def __init__(self, db: Database, config: Config, clock: Clock, boot_id: str, metrics: Metrics) -> None:
        self._db = db
        self._config = config
        self._clock = clock
        self._boot_id = boot_id
        self._metrics = metrics
        self._language = Language(config.agent.language)
        self._policy: Policy = config.domain_policy()
        self.courts: Mapping[str, Court] = config.domain_courts()
        self._devices: dict[str, DeviceConfig] = {d.id: d for d in config.all_devices}
        self._camera_courts = frozenset(c.court for c in config.cameras)  # their highlights become clips
        self.on_clip_wanted: Callable[[], None] = lambda: None  # a highlight on a camera court was recorded
        self._destinations = config.destinations
        self._debounce_ns = int(config.policy.debounce_s * 1e9)
        self._default_max = timedelta(minutes=config.policy.session_max_minutes)
        self._answers: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._recent: dict[tuple[str, str], _Recent] = {}
        self._last_trusted: datetime | None = None
        self._unsynced = False  # this boot has events stamped before the clock synced, not yet corrected
        self._once = OnceLogger(log)

    async def start(self) -> None:
        # before the first decision: each enabled destination's cursor over the event log (see the outbox)
        await self._db.write("enabling destinations", repo.enable_destinations, self._destinations)
        raw = await self._db.read(repo.get_kv, LAST_TRUSTED_KEY)
        self._last_trusted = repo.from_ms(int(raw)) if raw else None
        # a restart of the agent within the same boot keeps the monotonic clock: its stamps can still be fixed
        found = await self._db.fetchone(
            "SELECT 1 FROM events WHERE boot_id = ? AND clock_synced = 0 LIMIT 1", (self._boot_id,)
        )
        self._unsynced = found is not None
        await self.record_trusted_time()

    def device(self, device_id: str) -> DeviceConfig | None:
        return self._devices.get(device_id)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _stamp(self) -> Stamp:
        stamp = Stamp(self._clock.wall(), self._clock.monotonic_ns(), self._boot_id, self._clock.synced())
        if not stamp.clock_synced:
            self._unsynced = True
        return stamp

    def _correct_clock(self, conn: sqlite3.Connection, stamp: Stamp) -> int:
        """Once the clock is synced, re-stamp this boot's earlier unsynced events (in the caller's transaction,
        before anything is decided against the corrected session times) and tell the cloud which changed.
        Returns how many were corrected."""
        corrections = repo.correct_unsynced(conn, self._boot_id, stamp.wall, stamp.mono_ns)
        for start in range(0, len(corrections), repo.CORRECTIONS_PER_EVENT):
            chunk = corrections[start : start + repo.CORRECTIONS_PER_EVENT]
            event = NewEvent("clock.corrected", {"boot_id": self._boot_id, "corrections": chunk})
            repo.append_events(conn, stamp, [event])
        return len(corrections)

    def _clock_corrected(self, count: int) -> None:
        """After the correcting transaction committed."""
        self._unsynced = False
        if count:
            log.info("clock_corrected", events=count, boot_id=self._boot_id)
            self._metrics.clock_corrections.inc(count)

    def _now(self, stamp: Stamp) -> Now:
        return Now(
            wall=stamp.wall,
            trusted=stamp.clock_synced,
            last_trusted=self._last_trusted,
            instant=Instant(stamp.mono_ns, stamp.boot_id),
        )

    def _remember(self, device_id: str, msg_id: str | None, response: dict[str, Any]) -> None:
        if msg_id is None:
            return
        self._answers[(device_id, msg_id)] = response
        if len(self._answers) > ANSWER_MEMORY:
            self._answers.popitem(last=False)

    def _replay(self, device_id: str, msg_id: str | None) -> dict[str, Any] | None:
        if msg_id is None:
            return None
        return self._answers.get((device_id, msg_id))

    def denial(self, reason: Reason, msg_id: str | None) -> dict[str, Any]:
        """A reply for a request refused before any decision (bad payload, unknown reader, flood)."""
        return {
            "msg_id": msg_id,
            "status": "denied",
            "action": Action.NONE.value,
            "reason": reason.value,
            "message": denial_message(reason, self._language),
            "color": "red",
        }

    def _reply(
        self, decision: Decision, first_name: str | None, msg_id: str | None, session_id: str | None
    ) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "msg_id": msg_id,
            "status": "granted" if decision.granted else "denied",
            "action": decision.action.value,
            "reason": decision.reason.value,
            "message": message(decision, first_name, self._language),
            "color": "green" if decision.granted else "red",
        }
        if decision.member_id is not None:
            reply["member_id"] = decision.member_id
        if session_id is not None:
            reply["session_id"] = session_id
        if decision.credits_after is not None:
            reply["credits_left"] = decision.credits_after
        return reply

    # -- taps --------------------------------------------------------------------------------------------------

    async def scan(self, reader_id: str, card_id: str, msg_id: str | None) -> Outcome:
        """A card read at a reader (MQTT or a directly attached bridge)."""
        reader = self._devices.get(reader_id)
        if reader is not None and reader.kind == "reader" and reader.pos is not None:
            return await self.bar_tap(reader_id, reader.pos, card_id, msg_id)
        if reader is None or reader.kind != "reader" or reader.court is None or reader.court not in self.courts:
            self._metrics.scans.labels(reader_id, "denied", Reason.UNKNOWN_READER.value).inc()
            self._once.warning("scan_from_unknown_reader", reader_id, reader=reader_id)
            return Outcome(self.denial(Reason.UNKNOWN_READER, msg_id))
        return await self._decide_tap(
            device_id=reader_id,
            court=self.courts[reader.court],
            direction=reader.direction,
            msg_id=msg_id,
            card_id=card_id,
        )

    async def bar_tap(self, reader_id: str, pos_id: str, card_id: str, msg_id: str | None) -> Outcome:
        """A card at a bar reader names whose order the bar's tablets take next: the holder's open session. It
        decides and records nothing (the order does, when confirmed); `pos` and the session go to the pages."""
        found = await self._db.read(repo.lookup, card_id=card_id)
        session = found.state.open_session if found.member is not None else None
        first_name = found.member.first_name if found.member is not None else None
        if session is None:
            reason = Reason.UNKNOWN_CARD if found.member is None else Reason.NO_OPEN_SESSION
            reply: dict[str, Any] = {
                **self.denial(reason, msg_id),
                "message": bar_message(None, False, self._language),
            }
        else:
            reply = {
                "msg_id": msg_id,
                "status": "granted",
                "action": Action.NONE.value,
                "reason": Reason.OK.value,
                "message": bar_message(first_name, True, self._language),
                "color": "green",
                "member_id": session.member_id,
                "first_name": first_name,
                "session_id": session.session_id,
                "court_id": session.court_id,
            }
        self._metrics.scans.labels(reader_id, reply["status"], reply["reason"]).inc()
        return Outcome({**reply, "pos": pos_id})

    async def tablet_checkin(
        self,
        tablet_id: str,
        court_id: str,
        msg_id: str | None,
        *,
        card_id: str | None = None,
        member_code: str | None = None,
    ) -> Outcome:
        court = self.courts.get(court_id)
        if court is None:
            return Outcome(self.denial(Reason.INVALID_REQUEST, msg_id))
        return await self._decide_tap(
            device_id=tablet_id,
            court=court,
            direction=Direction.IN,
            msg_id=msg_id,
            card_id=card_id,
            member_code=member_code,
        )

    async def _exactly_once(
        self,
        device_id: str,
        msg_id: str | None,
        what: str,
        body: Callable[[sqlite3.Connection, Stamp], Outcome],
        unavailable: dict[str, Any],
    ) -> Outcome:
        """Run `body` in one transaction unless this (device, msg_id) was answered before, and store its answer
        in the same transaction, so a repeated message is answered again and never acted on twice."""
        replay = self._replay(device_id, msg_id)
        if replay is None:
            # Stamped here, on the loop, in arrival order: writes commit in the order they were queued, so
            # event seq and wall time agree.
            stamp = self._stamp()
            correct = stamp.clock_synced and self._unsynced

            def record(conn: sqlite3.Connection) -> tuple[dict[str, Any] | None, Outcome | None, int]:
                prior = repo.answered(conn, device_id, msg_id) if msg_id is not None else None
                if prior is not None:
                    return prior, None, 0
                corrected = self._correct_clock(conn, stamp) if correct else 0
                outcome = body(conn, stamp)
                if msg_id is not None:
                    repo.remember_answer(conn, device_id, msg_id, outcome.response, stamp.wall)
                return None, outcome, corrected

            try:
                replay, fresh, corrected = await self._db.write(f"recording a {what}", record)
            except StoreError as exc:
                self._metrics.store_errors.labels(what).inc()
                self._once.warning("not_recorded", what, what=what, error=str(exc))
                return Outcome(unavailable)
            if correct:
                self._clock_corrected(corrected)
        if replay is not None:
            self._metrics.replayed.labels("msg_id").inc()
            outcome = Outcome(replay, replayed=True)
        else:
            assert fresh is not None
            outcome = fresh
        self._remember(device_id, msg_id, outcome.response)
        return outcome

    async def _decide_tap(
        self,
        *,
        device_id: str,
        court: Court,
        direction: Direction,
        msg_id: str | None,
        card_id: str | None = None,
        member_code: str | None = None,
    ) -> Outcome:
        started = time.perf_counter()
        credential = card_id if card_id is not None else f"code:{member_code}"
        recent = self._recent.get((device_id, credential))
        mono = self._clock.monotonic_ns()
        if recent is not None and mono - recent.mono_ns < self._debounce_ns and self._replay(device_id, msg_id) is None:
            self._metrics.replayed.labels("debounce").inc()
            return Outcome({**recent.response, "msg_id": msg_id}, replayed=True)

        def body(conn: sqlite3.Connection, stamp: Stamp) -> Outcome:
            found = repo.lookup(conn, card_id=card_id, member_code=member_code)
            decision = decide(found.member, court, direction, self._now(stamp), found.state, found.cache, self._policy)
            first_name = found.member.first_name if found.member else None
            open_session = found.state.open_session
            session_id = self._apply(
                conn,
                stamp,
                decision,
                device_id=device_id,
                court=court,
                card_id=card_id,
                msg_id=msg_id,
                started_at=open_session.started_at if open_session else None,
            )
            changed = frozenset({court.court_id}) if decision.action is not Action.NONE else frozenset()
            response = self._reply(decision, first_name, msg_id, session_id)
            return Outcome(response, decision=decision, first_name=first_name, courts=changed)

        outcome = await self._exactly_once(device_id, msg_id, "decision", body, self.denial(Reason.UNAVAILABLE, msg_id))
        decision = outcome.decision
        if decision is not None:
            self._metrics.decision_seconds.observe(time.perf_counter() - started)
            if decision.action is Action.CHECKIN:
                self._metrics.sessions.labels("opened", "tap").inc()
            elif decision.action is Action.CHECKOUT:
                self._metrics.sessions.labels("closed", "tap").inc()
        if not outcome.replayed:
            reason = decision.reason.value if decision else Reason.UNAVAILABLE.value
            self._metrics.scans.labels(device_id, outcome.response["status"], reason).inc()
        if decision is not None:  # only a recorded decision is repeated; "unavailable" is retried at once
            self._recent[(device_id, credential)] = _Recent(mono, outcome.response)
            if len(self._recent) > 1024:
                horizon = mono - self._debounce_ns
                self._recent = {k: v for k, v in self._recent.items() if v.mono_ns >= horizon}
        return outcome

    def _apply(
        self,
        conn: sqlite3.Connection,
        stamp: Stamp,
        decision: Decision,
        *,
        device_id: str,
        court: Court,
        card_id: str | None,
        msg_id: str | None,
        started_at: datetime | None,
    ) -> str | None:
        """Write the decision's effects and events; returns the session it opened or closed."""
        session_id = decision.session_id
        if decision.action is Action.CHECKIN:
            session_id = new_id()
            assert decision.member_id is not None
            repo.open_session(
                conn,
                session_id=session_id,
                member_id=decision.member_id,
                court_id=court.court_id,
                card_id=card_id,
                opened_by=device_id,
                started_at=stamp.wall,
                list_version=decision.list_version,
            )
        elif decision.action is Action.CHECKOUT:
            assert session_id is not None
            repo.close_session(conn, session_id, stamp.wall, "tap")
        events = [
            NewEvent(
                "access.decided",
                {
                    "device_id": device_id,
                    "court_id": court.court_id,
                    "card_id": card_id,
                    "result": "granted" if decision.granted else "denied",
                    "action": decision.action.value,
                    "reason": decision.reason.value,
                    "member_id": decision.member_id,
                    "list_version": decision.list_version,
                    "msg_id": msg_id,
                    "session_id": session_id,
                },
                session_id=session_id,
                device_id=device_id,
            )
        ]
        if decision.action is Action.CHECKIN:
            events.append(
                NewEvent(
                    "session.started",
                    {
                        "session_id": session_id,
                        "member_id": decision.member_id,
                        "court_id": court.court_id,
                        "card_id": card_id,
                        "device_id": device_id,
                        "started_at": iso(stamp.wall),
                        "credits_spent": decision.cost,
                        "list_version": decision.list_version,
                    },
                    session_id=session_id,
                    device_id=device_id,
                )
            )
        elif decision.action is Action.CHECKOUT and started_at is not None:
            events.append(
                self._ended_event(
                    session_id, decision.member_id, court.court_id, started_at, stamp.wall, "tap", device_id
                )
            )
        written = repo.append_events(conn, stamp, events)
        if decision.action is Action.CHECKIN and decision.cost:
            assert decision.member_id is not None
            assert session_id is not None
            repo.spend_credits(conn, decision.member_id, decision.cost, session_id, written[-1][1], stamp.wall)
        return session_id

    @staticmethod
    def _ended_event(
        session_id: str | None,
        member_id: str | None,
        court_id: str,
        started_at: datetime,
        ended_at: datetime,
        reason: str,
        device_id: str | None,
    ) -> NewEvent:
        return NewEvent(
            "session.ended",
            {
                "session_id": session_id,
                "member_id": member_id,
                "court_id": court_id,
                "started_at": iso(started_at),
                "ended_at": iso(ended_at),
                "duration_minutes": duration_minutes(started_at, ended_at),
                "end_reason": reason,
            },
            session_id=session_id,
            device_id=device_id,
        )

    # -- tablet checkout ---------------------------------------------------------------------------------------

    async def tablet_checkout(
        self,
        tablet_id: str,
        court_id: str,
        msg_id: str | None,
        *,
        session_id: str | None = None,
        card_id: str | None = None,
    ) -> Outcome:
        """An explicit checkout from a court tablet: no toggle rules, only "is there such a session here"."""

        def body(conn: sqlite3.Connection, stamp: Stamp) -> Outcome:
            row = _session_of(conn, session_id, card_id)
            if row is None or row["ended_at"] is not None or row["court_id"] != court_id:
                return Outcome(self.denial(Reason.NO_OPEN_SESSION, msg_id))
            started_at = repo.from_ms(row["started_at"])
            repo.close_session(conn, row["session_id"], stamp.wall, "tablet")
            ended = self._ended_event(
                row["session_id"], row["member_id"], court_id, started_at, stamp.wall, "tablet", tablet_id
            )
            repo.append_events(conn, stamp, [ended])
            response = {
                "msg_id": msg_id,
                "status": "ok",
                "action": "checkout",
                "session_id": row["session_id"],
                "member_id": row["member_id"],
                "duration_minutes": duration_minutes(started_at, stamp.wall),
            }
            return Outcome(response, courts=frozenset({court_id}))

        outcome = await self._exactly_once(tablet_id, msg_id, "checkout", body, self.denial(Reason.UNAVAILABLE, msg_id))
        if outcome.courts and not outcome.replayed:
            self._metrics.sessions.labels("closed", "tablet").inc()
        return outcome

    # -- bar consumption ---------------------------------------------------------------------------------------

    async def consumption(
        self,
        pos_id: str,
        request_id: str,
        items: Sequence[ConsumptionItem],
        *,
        session_id: str | None = None,
        card_id: str | None = None,
    ) -> Outcome:
        """A bar order against the player's open session: its lines and one consumption.recorded event per
        line (Ziggy records one item per call) commit together; the same request_id is answered, never
        recorded, again."""

        def body(conn: sqlite3.Connection, stamp: Stamp) -> Outcome:
            row = _session_of(conn, session_id, card_id)
            if row is None or row["ended_at"] is not None:
                return Outcome({**self.denial(Reason.NO_OPEN_SESSION, request_id), "request_id": request_id})
            lines = [
                repo.ConsumptionLine(new_id(), n, item.item_id, item.name, item.quantity, item.unit_cents)
                for n, item in enumerate(items, start=1)
            ]
            repo.insert_consumption(conn, request_id=request_id, pos_id=pos_id, session=row, lines=lines, at=stamp.wall)
            events = [
                NewEvent(
                    "consumption.recorded",
                    {
                        "line_id": line.line_id,
                        "request_id": request_id,
                        "line_no": line.line_no,
                        "session_id": row["session_id"],
                        "member_id": row["member_id"],
                        "court_id": row["court_id"],
                        "item_id": line.item_id,
                        "item_name": line.item_name,
                        "quantity": line.quantity,
                        "unit_price": money(line.unit_cents),
                        "total_price": money(line.total_cents),
                        "pos_id": pos_id,
                    },
                    session_id=row["session_id"],
                    device_id=pos_id,
                )
                for line in lines
            ]
            repo.append_events(conn, stamp, events)
            total = sum(line.total_cents for line in lines)
            response = {
                "msg_id": request_id,
                "request_id": request_id,
                "status": "ok",
                "session_id": row["session_id"],
                "member_id": row["member_id"],
                "lines": len(lines),
                "total": money(total),
                "session_total": money(repo.session_consumption_cents(conn, row["session_id"])),
            }
            return Outcome(response, courts=frozenset({row["court_id"]}))

        unavailable = {**self.denial(Reason.UNAVAILABLE, request_id), "request_id": request_id}
        outcome = await self._exactly_once(pos_id, request_id, "consumption", body, unavailable)
        if not outcome.replayed:
            self._metrics.consumption.labels(str(outcome.response["status"])).inc()
        return outcome

    async def void_consumption(self, by: str, request_id: str, line_id: str, reason: str) -> Outcome:
        """Take back a bar line recorded by mistake, within `policy.void_grace_s` of its recording: the line is
        marked (it stays, with the reason and who), leaves the session's total, and the cloud hears of it. Ziggy
        has no call to take a line back: one it has not been sent yet is not sent. Voiding twice is a no-op."""
        grace_ms = int(self._config.policy.void_grace_s * 1000)

        def answer(status: str, **fields: Any) -> dict[str, Any]:
            return {"msg_id": request_id, "request_id": request_id, "status": status, "line_id": line_id, **fields}

        def body(conn: sqlite3.Connection, stamp: Stamp) -> Outcome:
            line = repo.consumption_line(conn, line_id)
            if line is None:
                return Outcome(answer("invalid", reason="unknown_line"))
            total = money(repo.session_consumption_cents(conn, line["session_id"]))
            if line["voided_at"] is not None:
                return Outcome(answer("ok", session_id=line["session_id"], session_total=total, already=True))
            if repo.to_ms(stamp.wall) - int(line["recorded_at"]) > grace_ms:
                return Outcome(
                    answer(
                        "denied",
                        reason="void_too_late",
                        detail=f"a line can be voided for {grace_ms // 1000} s after it is recorded",
                    )
                )
            repo.void_consumption(conn, line_id, at=stamp.wall, reason=reason, by=by)
            voided = NewEvent(
                "consumption.voided",
                {
                    "line_id": line_id,
                    "request_id": line["request_id"],
                    "session_id": line["session_id"],
                    "member_id": line["member_id"],
                    "court_id": line["court_id"],
                    "item_id": line["item_id"],
                    "quantity": line["quantity"],
                    "total_price": money(line["total_cents"]),
                    "reason": reason,
                    "voided_by": by,
                },
                session_id=line["session_id"],
                device_id=by,
            )
            repo.append_events(conn, stamp, [voided])
            total = money(repo.session_consumption_cents(conn, line["session_id"]))
            return Outcome(
                answer("ok", session_id=line["session_id"], session_total=total), courts=frozenset({line["court_id"]})
            )

        unavailable = {**self.denial(Reason.UNAVAILABLE, request_id), "request_id": request_id}
        return await self._exactly_once(by, request_id, "consumption void", body, unavailable)

    # -- highlight button --------------------------------------------------------------------------------------

    async def button(self, court_id: str, button_id: str, msg_id: str | None, kind: str = "short") -> Outcome:
        """A highlight press: recorded even without a session (the cloud may still cut it from its stream)."""

        def body(conn: sqlite3.Connection, stamp: Stamp) -> Outcome:
            sessions = repo.open_sessions(conn, court_id)
            # Padel has four players; the highlight belongs to the court's earliest open session.
            session_id = sessions[0].session_id if sessions else None
            start, duration = highlight_window(stamp.wall, sessions[0].started_at if sessions else None)
            highlight_id = new_id()
            repo.insert_highlight(
                conn,
                highlight_id=highlight_id,
                court_id=court_id,
                session_id=session_id,
                button_id=button_id,
                pressed_at=stamp.wall,
                start_at=start,
                duration_ms=int(duration.total_seconds() * 1000),
                kind=kind,
                clip_state="pending" if court_id in self._camera_courts else "none",
            )
            created = NewEvent(
                "highlight.created",
                {
                    "highlight_id": highlight_id,
                    "court_id": court_id,
                    "session_id": session_id,
                    "session_ids": [s.session_id for s in sessions],
                    "button_id": button_id,
                    "kind": kind,
                    "pressed_at": iso(stamp.wall),
                    "start_at": iso(start),
                    "duration_s": duration.total_seconds(),
                    "triggered_by": "button",
                },
                session_id=session_id,
                device_id=button_id,
            )
            repo.append_events(conn, stamp, [created])
            response = {
                "msg_id": msg_id,
                "status": "ok" if session_id else "no_session",
                "highlight_id": highlight_id,
                "start_at": iso(start),
                "duration_s": duration.total_seconds(),
            }
            return Outcome(response, courts=frozenset({court_id}))

        unavailable = {"msg_id": msg_id, "status": "error", "reason": Reason.UNAVAILABLE.value}
        outcome = await self._exactly_once(button_id, msg_id, "highlight", body, unavailable)
        if not outcome.replayed:
            self._metrics.highlights.labels(str(outcome.response["status"])).inc()
            if court_id in self._camera_courts and "highlight_id" in outcome.response:
                self.on_clip_wanted()
        return outcome

    async def clip_unavailable(self, highlight_id: str, state: str, reason: str, detail: str) -> bool:
        """A highlight on a camera court gets no clip from us (`state` missed, failed or evicted; `reason`
        no_footage, cut_failed, refused or evicted): recorded with the event that tells the cloud to cut its own.
        False if the highlight had already left the state this would change."""

        def body(conn: sqlite3.Connection, stamp: Stamp) -> bool:
            row = conn.execute(
                "SELECT court_id, session_id, clip_state FROM highlights WHERE highlight_id = ?", (highlight_id,)
            ).fetchone()
            if row is None or row["clip_state"] in ("none", "missed", "failed", "evicted"):
                return False
            conn.execute(
                "UPDATE highlights SET clip_state = ?, clip_error = ?, clip_path = NULL WHERE highlight_id = ?",
                (state, detail[:500], highlight_id),
            )
            event = NewEvent(
                "highlight.clip_unavailable",
                {
                    "highlight_id": highlight_id,
                    "court_id": row["court_id"],
                    "session_id": row["session_id"],
                    "reason": reason,
                    "detail": detail[:500],
                },
                session_id=row["session_id"],
            )
            repo.append_events(conn, stamp, [event])
            return True

        return await self._db.write("recording a clip that will not come", self._stamped(body))

    def _stamped(self, body: Callable[[sqlite3.Connection, Stamp], T]) -> Callable[[sqlite3.Connection], T]:
        stamp = self._stamp()
        return lambda conn: body(conn, stamp)

    # -- housekeeping ------------------------------------------------------------------------------------------

    async def sweep(self) -> frozenset[str]:
        """Close sessions nobody closed, forget old answers, note trusted time. Returns changed courts."""
        await self.record_trusted_time()  # first: a clock that just synced corrects the sessions' start times
        stamp = self._stamp()
        opened = await self._db.read(repo.open_sessions)
        late = overdue(
            (OpenSession(s.session_id, s.member_id, s.court_id, s.started_at, s.started) for s in opened),
            self.courts,
            self._now(stamp),
            self._default_max,
        )
        changed = set()
        for session in late:
            if await self._db.write("closing an overdue session", self._close_overdue, session, stamp):
                changed.add(session.court_id)
                self._metrics.sessions.labels("closed", Reason.AUTO_TIMEOUT.value).inc()
                log.info("session_auto_closed", session_id=session.session_id, court=session.court_id)
        await self._db.write("pruning answered requests", repo.forget_answers_before, stamp.wall - ANSWER_RETENTION)
        return frozenset(changed)

    def _close_overdue(self, conn: sqlite3.Connection, session: OpenSession, stamp: Stamp) -> bool:
        if not repo.close_session(conn, session.session_id, stamp.wall, Reason.AUTO_TIMEOUT.value):
            return False  # closed by a tap meanwhile
        ended = self._ended_event(
            session.session_id,
            session.member_id,
            session.court_id,
            session.started_at,
            stamp.wall,
            Reason.AUTO_TIMEOUT.value,
            None,
        )
        repo.append_events(conn, stamp, [ended])
        return True

    async def record_trusted_time(self) -> None:
        """Remember the latest synced wall time, so a reboot without RTC can judge dates (policy last_known),
        and correct this boot's unsynced stamps once the clock has synced."""
        stamp = self._stamp()
        if not stamp.clock_synced:
            return
        wall = stamp.wall
        newer = self._last_trusted is None or wall > self._last_trusted
        correct = self._unsynced
        if not newer and not correct:
            return

        def record(conn: sqlite3.Connection) -> int:
            corrected = self._correct_clock(conn, stamp) if correct else 0
            if newer:
                repo.set_kv(conn, LAST_TRUSTED_KEY, str(repo.to_ms(wall)))
            return corrected

        corrected = await self._db.write("recording trusted time", record)
        if correct:
            self._clock_corrected(corrected)
        if newer:
            self._last_trusted = wall

    async def court_state(self, court_id: str) -> dict[str, Any]:
        """The retained picture of one court for its tablets and displays."""

        def read(conn: sqlite3.Connection) -> tuple[list[repo.SessionView], int, dict[str, int]]:
            sessions = repo.open_sessions(conn, court_id)
            since = sessions[0].started_at if sessions else None
            spent = {s.session_id: repo.session_consumption_cents(conn, s.session_id) for s in sessions}
            return sessions, repo.highlight_count(conn, court_id, since) if since else 0, spent

        sessions, count, spent = await self._db.read(read)
        court = self.courts[court_id]
        return {
            "court_id": court_id,
            "name": court.name,
            "occupied": bool(sessions),
            "player_count": len(sessions),
            "players": [
                {
                    "session_id": s.session_id,
                    "member_id": s.member_id,
                    "first_name": s.first_name,
                    "started_at": iso(s.started_at),
                    "credits_left": s.credits_left,
                    "consumption_total": money(spent.get(s.session_id, 0)),
                }
                for s in sessions[:MAX_PLAYERS_SHOWN]
            ],
            "highlight_count": count,
            "updated_at": iso(self._clock.wall()),
        }
