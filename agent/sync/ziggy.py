"""Ziggy, the access-control vendor (DESIGN 2.2): check-in, checkout and consumption, one call per event.

Ziggy names its own sessions, and its id comes only with the check-in's answer: it is stored
(`ziggy_sessions`) and every later call of that session carries it. The outbox keeps a session's events in
order, so a checkout is never tried before its check-in was answered. Every call has an `Idempotency-Key` (the
event id). Ziggy may forget keys after a day, so a check-in first tried more than a day ago first asks
`sessions/active` whether Ziggy already has it, rather than creating it twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from ..config import ZiggySection
from ..logs import get_logger
from ..store.db import Database
from .delivery import OutboxEvent, Permanent, Result, Transient, Unauthorized, Verdict, judge, network_error

log = get_logger("agent.sync.ziggy")

KEY_MEMORY_MS = 24 * 3600 * 1000
TIMEOUT = httpx.Timeout(5.0)  # the reference document's timeout for Ziggy


class Wait(Exception):
    """This event cannot go yet; retried later without counting against Ziggy's health."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The member's own sessions, then their events, then each one's Ziggy row: CROSS JOIN pins that order. Left to
# the planner, SQLite walked Ziggy's delivery rows by primary key from the first one ever up to this event, once
# per check-in: 2.4 ms after 10,000 sessions, 17 ms after 70,000, on the reader connection every tap shares.
_EARLIER_PENDING = (
    "SELECT e.seq FROM sessions s CROSS JOIN events e ON e.session_id = s.session_id"
    " CROSS JOIN deliveries d ON d.destination = 'ziggy' AND d.seq = e.seq"
    " WHERE s.member_id = ? AND s.session_id != ? AND e.seq < ? AND d.state = 'pending' LIMIT 1"
)


class ZiggyDestination:
    name = "ziggy"
    batch_size = 1

    def __init__(
        self,
        section: ZiggySection,
        api_key: str,
        db: Database,
        client: httpx.AsyncClient | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._base = section.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "X-Client-Id": section.client_id}
        self._db = db
        self._client = client or httpx.AsyncClient()
        self._wall_ms = wall_ms

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self, method: str, path: str, body: Any = None, key: str | None = None, params: dict[str, str] | None = None
    ) -> Any:
        headers = dict(self._headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            response = await self._client.request(
                method, self._base + path, json=body, params=params, headers=headers, timeout=TIMEOUT
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a redirect to a bad Location
            raise network_error(exc) from exc
        try:
            return judge(response)
        except Unauthorized as exc:
            # An API key does not renew itself: count it as a failure of the whole destination (the breaker
            # opens) until the operator fixes the secrets file.
            raise Transient(f"Ziggy refused the API key: {exc}") from exc

    async def send(self, events: list[OutboxEvent]) -> list[Result]:
        out = []
        for event in events:
            try:
                await self._deliver(event)
            except Wait as exc:
                out.append(Result(event.seq, Verdict.RETRY, exc.reason))
            except Permanent as exc:
                out.append(Result(event.seq, Verdict.DEAD, exc.reason))
            except (KeyError, TypeError, ValueError) as exc:  # an event without what Ziggy needs: never retried
                out.append(Result(event.seq, Verdict.DEAD, f"malformed {event.type} event: {exc!r}"))
            else:
                out.append(Result(event.seq, Verdict.DELIVERED))
        return out

    async def _deliver(self, event: OutboxEvent) -> None:
        data = event.data
        if event.type == "session.started":
            await self._checkin(event)
        elif event.type == "session.ended":
            ziggy_id = await self._ziggy_session(event)
            try:
                await self._call("POST", "/access/checkout", {"session_id": ziggy_id}, key=event.event_id)
            except Permanent as exc:
                if exc.status != 409:  # 409: already checked out there (a retry that had acted)
                    raise
        elif event.type == "consumption.recorded":
            voided = await self._db.fetchone(
                "SELECT voided_at FROM consumption WHERE line_id = ? AND voided_at IS NOT NULL", (data["line_id"],)
            )
            if voided is not None:  # taken back at the bar before Ziggy heard of it: nothing to send
                log.info("ziggy_line_voided_not_sent", line_id=data["line_id"], seq=event.seq)
                return
            ziggy_id = await self._ziggy_session(event)
            body = {
                "session_id": ziggy_id,
                "item_id": data["item_id"],
                "item_name": data["item_name"],
                "quantity": data["quantity"],
                "unit_price": data["unit_price"],
                "total_price": data["total_price"],
            }
            await self._call("POST", "/consumption/record", body, key=event.event_id)
        else:
            raise Permanent(f"Ziggy does not take {event.type} events")

    async def _checkin(self, event: OutboxEvent) -> None:
        data = event.data
        # Ziggy holds one active session per member, and the outbox keeps order per session only: a member's
        # next check-in waits until Ziggy has been told their previous session ended (else Ziggy would refuse
        # it, or a stale retry would adopt the previous session as its own).
        earlier = await self._db.fetchone(_EARLIER_PENDING, (data["member_id"], event.session_id, event.seq))
        if earlier is not None:
            raise Wait(f"waiting for Ziggy to hear of {data['member_id']}'s previous session (event {earlier[0]})")
        # A first attempt stamped after now: the wall clock went back since (the outbox moves the stamps of the
        # rows it reschedules, not of those already due), by an unknown amount. Asking costs one call; a key
        # Ziggy forgot, a second session.
        first = event.first_attempt_at
        stale = first is not None and not 0 <= self._wall_ms() - first <= KEY_MEMORY_MS
        if stale:
            known = await self._active_for(data["member_id"], data["court_id"], event.session_id)
            if known is not None:
                await self._remember(event, known, None)
                return
        body = {"user_id": data["member_id"], "court_id": data["court_id"], "timestamp": data["started_at"]}
        try:
            answer = await self._call("POST", "/access/checkin", body, key=event.event_id)
        except Permanent as exc:
            if exc.status != 409:
                raise
            # Ziggy already has this member checked in: adopt that session if it is on the same court.
            known = await self._active_for(data["member_id"], data["court_id"], event.session_id)
            if known is None:
                raise
            await self._remember(event, known, None)
            return
        if not isinstance(answer, dict) or not isinstance(answer.get("session_id"), str):
            raise Transient("Ziggy's check-in answer has no session_id")
        await self._remember(event, answer["session_id"], answer.get("checked_in_at"))

    async def _active_for(self, member_id: str, court_id: str, ours: str | None) -> str | None:
        answer = await self._call("GET", "/access/sessions/active", params={"user_id": member_id})
        sessions = (
            answer if isinstance(answer, list) else answer.get("sessions", []) if isinstance(answer, dict) else []
        )
        for s in sessions:
            if isinstance(s, dict) and s.get("user_id") == member_id and _court_of(s) == court_id:
                session_id = s.get("session_id")
                if not isinstance(session_id, str):
                    return None
                taken = await self._db.fetchone(
                    "SELECT session_id FROM ziggy_sessions WHERE ziggy_session_id = ?", (session_id,)
                )
                # a Ziggy session already matched to another of our sessions is never adopted a second time
                return session_id if taken is None or taken[0] == ours else None
        return None

    async def _remember(self, event: OutboxEvent, ziggy_id: str, checked_in_at: Any) -> None:
        # One write of the store's group commit, not a transaction held across awaits: taps queue behind it.
        row = (event.session_id, ziggy_id, checked_in_at if isinstance(checked_in_at, str) else None)
        await self._db.write_quietly(
            "recording Ziggy's session id",
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO ziggy_sessions (session_id, ziggy_session_id, checked_in_at) VALUES (?, ?, ?)",
                row,
            ),
        )

    async def _ziggy_session(self, event: OutboxEvent) -> str:
        row = await self._db.fetchone(
            "SELECT ziggy_session_id FROM ziggy_sessions WHERE session_id = ?", (event.session_id,)
        )
        if row is None:
            # The outbox sends a session's events in order, so the check-in was dead-lettered: nothing to attach to.
            raise Permanent(f"no Ziggy session for {event.session_id}: its check-in never reached Ziggy")
        return str(row[0])


def _court_of(session: dict[str, Any]) -> str | None:
    court = session.get("court_id")
    if court is None and isinstance(session.get("court"), dict):
        court = session["court"].get("id")
    return court if isinstance(court, str) else None
