"""The chaos run's verdict: what the devices were told against the agent's store and the sandbox cloud's log.

The crash rig's oracle (tests/e2e/crash_rig.judge) does most of it: every check-in, check-out and order a device
was told is in the store; every stored event was accepted by the cloud exactly once and each session or
consumption event acted on Ziggy exactly once (Idempotency-Key = event id); per session, the cloud got its events
in seq order and Ziggy its calls in seq order, on the Ziggy session the session's own check-in created. Added here:
the highlight ids the button was given and the serial reader's granted taps must be in the store too, and every
copy the cloud accepted must carry what the store holds (a copy that differs would be a duplicate that
de-duplication hid: "accepted with different content").

The four figures: lost (told or stored, and not received where it belongs: counted where it went missing),
duplicated, out_of_order (including Ziggy calls misrouted to another session), refused (decisions answered
`unavailable` or never answered in time, outside the disk faults and the agent's restarts).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from chaos_timeline import Timeline
from chaos_traffic import DOOR, Traffic

from tests.e2e.crash_rig import StoredEvent, Verdict, judge, read_store

# What counts as a refusal: no decision (timeout, `unavailable`), or a player on court refused the checkout at their
# own court's reader (`already_in_session` with second_tap_grace_s = 0 cannot be a legitimate answer there).
REFUSALS = frozenset({"timeout", "unavailable", "checkout_denied"})


@dataclass
class Figures:
    verdict: Verdict
    lost: Counter[str] = field(default_factory=Counter)
    duplicated: Counter[str] = field(default_factory=Counter)
    out_of_order: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # by what was refused: tap, order, press, serial
    checkout_denied_players: set[str] = field(default_factory=set)  # members refused a checkout (any number of times)
    refused_disk: int = 0
    unanswered_restart: int = 0
    unanswered_unplug: int = 0
    rate_limited: int = 0
    problems: list[str] = field(default_factory=list)
    clips: Counter[str] = field(default_factory=Counter)  # the store's clip_state of camera-court highlights
    clips_received: int = 0

    def failures(self) -> int:
        v = self.verdict
        return (
            self.lost.total() + self.duplicated.total() + self.out_of_order.total() + self.refused.total() + v.unknown
        )


def _clip_states(db: Path) -> Counter[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return Counter(
            dict(conn.execute("SELECT clip_state, COUNT(*) FROM highlights WHERE clip_state != 'none' GROUP BY 1"))
        )


def _why_denied(device_id: str, msg_id: str, events: list[StoredEvent]) -> str:
    """For a checkout refused with already_in_session: the wall times of the check-in and of the refusal, as
    stamped in the store (a refusal stamped before its own session's check-in is a clock that went back)."""
    denied = next(
        (
            e
            for e in events
            if e.type == "access.decided" and e.device_id == device_id and e.data.get("msg_id") == msg_id
        ),
        None,
    )
    if denied is None:
        return ""
    member = denied.data.get("member_id")
    started = [e for e in events if e.type == "session.started" and e.data.get("member_id") == member]
    before = [e for e in started if e.seq < denied.seq]
    if not before:
        return ""
    elapsed = (denied.occurred_at - before[-1].occurred_at) / 1000
    return f"; its check-in (seq {before[-1].seq}) is stamped {elapsed:+.0f} s from this refusal (seq {denied.seq})"


def _pending_notes(db: Path) -> list[str]:
    """Why delivery rows are still pending: retries scheduled in the future (by the agent's wall clock when it
    scheduled them), and rows of the same sessions waiting behind those."""
    now = int(time.time() * 1000)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            rows = conn.execute(
                "SELECT destination, SUM(next_attempt_at > ?), SUM(next_attempt_at <= ?), MAX(next_attempt_at)"
                " FROM deliveries WHERE state = 'pending' GROUP BY destination",
                (now, now),
            ).fetchall()
    except sqlite3.Error:
        return []
    return [
        f"pending: {dest}: {ahead} rows not due until up to {(latest - now) / 60000:.0f} min from now"
        f" (the end of the run, real time), {due} due rows behind them or not yet sent"
        for dest, ahead, due, latest in rows
        if ahead
    ]


def _ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


def verdict(
    db: Path, received: list[dict[str, Any]], clips: list[dict[str, Any]], traffic: Traffic, timeline: Timeline
) -> Figures:
    events, deliveries = read_store(db)
    v = judge(events, deliveries, received, traffic.told)
    f = Figures(v)
    f.problems += [*traffic.answer_mismatches, *v.problems]
    f.lost.update(v.lost)
    f.duplicated.update(v.duplicates)
    f.out_of_order.update(v.out_of_order)
    if v.misrouted:
        f.out_of_order["ziggy_misrouted"] += v.misrouted
    if traffic.answer_mismatches:
        f.duplicated["answer_changed"] += len(traffic.answer_mismatches)  # a repeat was decided a second time

    # Highlights a button was told about: in the store (judge then follows them to the cloud).
    stored = {str(e.data.get("highlight_id")): e for e in events if e.type == "highlight.created"}
    for highlight_id, status in traffic.highlights.items():
        if highlight_id not in stored:
            f.lost["store"] += 1
            f.problems.append(f"lost: the button was told highlight {highlight_id} ({status}); none is stored")

    # The serial reader's granted taps: a stored access.decided of the door for each, by card and action.
    door: Counter[tuple[str, str]] = Counter()
    for e in events:
        if e.type == "access.decided" and e.device_id == DOOR and e.data.get("result") == "granted":
            door[(str(e.data.get("card_id")), str(e.data.get("action")))] += 1
    told_door = Counter((t.card, t.action) for t in traffic.serial_told)
    for (card, action), n in told_door.items():
        if door[(card, action)] < n:
            f.lost["store"] += n - door[(card, action)]
            shown = f"the door reader showed {n} granted {action}(s) for {card}"
            f.problems.append(f"lost: {shown}; {door[(card, action)]} stored")

    # Copies the cloud accepted carry what the store holds.
    by_id: dict[str, StoredEvent] = {e.event_id.lower(): e for e in events}
    restamped = 0
    for r in received:
        if r.get("kind") != "event":
            continue
        mine = by_id.get(str(r.get("event_id")).lower())
        if mine is None:
            continue
        same = (r.get("type"), int(r.get("seq", -1)), r.get("session_id")) == (mine.type, mine.seq, mine.session_id)
        if not same or json.dumps(r.get("data"), sort_keys=True) != json.dumps(mine.data, sort_keys=True):
            f.duplicated["cloud_content"] += 1
            f.problems.append(f"duplicate: the cloud's copy of {mine.type} {mine.event_id} differs from the store's")
        with contextlib.suppress(KeyError, TypeError, ValueError):
            restamped += abs(_ms(str(r["occurred_at"])) - mine.occurred_at) > 1
    if restamped:
        f.problems.append(f"note: {restamped} events were re-stamped after the cloud accepted them")

    # Refusals, from every attempt the devices made.
    for a in traffic.attempts:
        if a.outcome == "rate_limited":
            f.rate_limited += 1
        if a.outcome not in REFUSALS:
            continue
        if a.category == "disk":
            f.refused_disk += 1
        elif a.category == "restart":
            f.unanswered_restart += 1
        elif a.category == "unplug":
            f.unanswered_unplug += 1
        else:
            f.refused[a.what if a.outcome != "checkout_denied" else f"{a.what}_checkout_denied"] += 1
            if a.outcome == "checkout_denied":
                f.checkout_denied_players.add(a.member_id)
            at = a.sent - timeline.windows[0].start if timeline.windows else 0.0
            why = _why_denied(a.device_id, a.msg_id, events) if a.outcome == "checkout_denied" else ""
            f.problems.append(
                f"refused: {a.what} {a.device_id}/{a.msg_id} {a.outcome} ({a.answer}) after {a.latency_ms:.0f} ms"
                f" during {a.label} ({at:.1f} s into the faults){why}"
            )
    f.problems += _pending_notes(db)

    with contextlib.suppress(sqlite3.Error):
        f.clips = _clip_states(db)
    f.clips_received = sum(1 for c in clips if c.get("status") == "complete")
    return f


# -- the report ----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class FaultRow:
    kind: str
    applied: int
    seconds: float
    attempts: int
    refused: int
    excused: int  # no decision, but during a disk fault or a restart
    p50_ms: float
    p99_ms: float
    notes: str


def fault_rows(timeline: Timeline, traffic: Traffic) -> list[FaultRow]:
    by_kind: dict[str, list[Any]] = defaultdict(list)
    for w in timeline.windows:
        by_kind[w.kind].append(w)
    rows = []
    for kind in sorted(by_kind):
        windows = by_kind[kind]
        inside = [a for a in traffic.attempts if any(w.overlaps(a.sent, a.done) for w in windows)]
        answered = [a.latency_ms for a in inside if a.outcome == "answered"]
        bad = [a for a in inside if a.outcome in REFUSALS]
        notes: dict[str, list[str]] = defaultdict(list)
        for w in windows:
            for k, val in w.notes.items():
                notes[k].append(str(val))
            if kind == "clock":
                notes["step"].append(w.detail.split(",")[0])
        rows.append(
            FaultRow(
                kind=kind,
                applied=len(windows),
                seconds=sum(w.seconds for w in windows),
                attempts=len(inside),
                refused=sum(1 for a in bad if a.category is None),
                excused=sum(1 for a in bad if a.category is not None),
                p50_ms=statistics.median(answered) if answered else 0.0,
                p99_ms=percentile(answered, 0.99),
                notes="; ".join(f"{k} {', '.join(vs)}" for k, vs in notes.items())[:160],
            )
        )
    calm = [a for a in traffic.attempts if a.label == "calm"]
    calm_ok = [a.latency_ms for a in calm if a.outcome == "answered"]
    rows.append(
        FaultRow(
            "(no fault)",
            0,
            0.0,
            len(calm),
            sum(1 for a in calm if a.outcome in REFUSALS and a.category is None),
            0,
            statistics.median(calm_ok) if calm_ok else 0.0,
            percentile(calm_ok, 0.99),
            "",
        )
    )
    return rows
