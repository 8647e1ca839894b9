"""Ziggy, the access-control vendor, as DESIGN 2.2 and the reference describe it: sessions and consumption.

Ziggy hands out its own session ids ("zg-1", "zg-2", ...), which the agent learns only from the check-in answer;
a checkout or consumption line that arrives with the agent's local id is a 404 here, as it would be there.
Rules that matter to the outbox: one active session per user (409), a closed session takes no checkout and no
consumption (409), a line's total must equal quantity x unit price to the cent (422).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Annotated, Any

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from .errors import ApiError, unauthorized
from .idempotency import check_key, fingerprint
from .wire import dumps, instant, json_response, json_text_response, money, query, read_json, text, validate

if TYPE_CHECKING:
    from .state import Sandbox

BODY_CAP = 64 * 1024
CENT = Decimal("0.01")

Name = Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=128)]
ItemName = Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=256)]
CourtId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
SessionId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Instant = Annotated[datetime, BeforeValidator(instant)]
Money = Annotated[Decimal, BeforeValidator(money), Field(ge=0, le=Decimal(10_000_000))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CheckinBody(_Body):
    user_id: Name
    court_id: CourtId
    timestamp: Instant


class CheckoutBody(_Body):
    session_id: SessionId
    timestamp: Instant | None = None  # when the player left; defaults to Ziggy's time of receipt


class ConsumptionBody(_Body):
    session_id: SessionId
    item_id: Name
    item_name: ItemName
    quantity: int = Field(gt=0, le=10_000)
    unit_price: Money
    total_price: Money


@dataclass(slots=True)
class Session:
    session_id: str
    user_id: str
    court_id: str
    court_name: str
    checked_in_at: datetime
    checked_out_at: datetime | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return sum((Decimal(line["total_price"]) for line in self.lines), Decimal(0))

    @property
    def duration_minutes(self) -> int | None:
        if self.checked_out_at is None:
            return None
        return max(0, int((self.checked_out_at - self.checked_in_at).total_seconds() // 60))

    def public(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "court_id": self.court_id,
            "court": {"id": self.court_id, "name": self.court_name},
            "status": "active" if self.checked_out_at is None else "closed",
            "checked_in_at": _iso(self.checked_in_at),
            "checked_out_at": None if self.checked_out_at is None else _iso(self.checked_out_at),
            "duration_minutes": self.duration_minutes,
            "consumption_total": self.total,
        }


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Ziggy:
    """Ziggy's state; each method is one call's effect and runs without awaiting, so it is atomic."""

    def __init__(self, courts: dict[str, str]) -> None:
        self._courts = courts
        self.sessions: dict[str, Session] = {}
        self._active_by_user: dict[str, str] = {}
        self._next_session = 1
        self._next_line = 1

    def active(self, user_id: str | None = None) -> list[Session]:
        ids = self._active_by_user.values() if user_id is None else [self._active_by_user.get(user_id)]
        return [self.sessions[i] for i in ids if i is not None]

    def session(self, session_id: str) -> Session:
        found = self.sessions.get(session_id)
        if found is None:
            raise ApiError(404, "session_not_found", f"no session '{session_id}' (Ziggy's own ids look like zg-1)")
        return found

    def checkin(self, body: CheckinBody) -> tuple[dict[str, Any], dict[str, Any]]:
        current = self._active_by_user.get(body.user_id)
        if current is not None:
            raise ApiError(
                409,
                "already_checked_in",
                f"user '{body.user_id}' already has active session {current}",
                extra={"session_id": current},
            )
        session = Session(
            session_id=f"zg-{self._next_session}",
            user_id=body.user_id,
            court_id=body.court_id,
            court_name=self._courts.get(body.court_id, f"Quadra {body.court_id}"),
            checked_in_at=body.timestamp.astimezone(UTC),
        )
        self._next_session += 1
        self.sessions[session.session_id] = session
        self._active_by_user[session.user_id] = session.session_id
        answer = {
            "session_id": session.session_id,
            "checked_in_at": _iso(session.checked_in_at),
            "court": {"id": session.court_id, "name": session.court_name},
        }
        return answer, {"session_id": session.session_id, "user_id": body.user_id, "court_id": body.court_id}

    def checkout(self, body: CheckoutBody, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
        session = self.session(body.session_id)
        if session.checked_out_at is not None:
            raise ApiError(409, "session_closed", f"session {session.session_id} was already checked out")
        out = now if body.timestamp is None else body.timestamp.astimezone(UTC)
        if body.timestamp is not None and out < session.checked_in_at:
            raise ApiError(
                422,
                "checkout_before_checkin",
                f"timestamp {_iso(out)} is before the check-in at {_iso(session.checked_in_at)}",
            )
        # Without a timestamp Ziggy uses its own clock, which may be behind a fast client's check-in stamp.
        session.checked_out_at = max(out, session.checked_in_at)
        del self._active_by_user[session.user_id]
        answer = {
            "session_id": session.session_id,
            "checked_out_at": _iso(session.checked_out_at),
            "duration_minutes": session.duration_minutes,
            "consumption_total": session.total,
        }
        return answer, dict(answer)

    def record(self, body: ConsumptionBody, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
        session = self.session(body.session_id)
        if session.checked_out_at is not None:
            raise ApiError(409, "session_closed", f"session {session.session_id} is closed: no more consumption")
        expected = (body.unit_price * body.quantity).quantize(CENT, ROUND_HALF_UP)
        if body.total_price.quantize(CENT, ROUND_HALF_UP) != expected:
            raise ApiError(
                422,
                "total_mismatch",
                f"total_price {body.total_price} != quantity {body.quantity} x unit_price {body.unit_price} "
                f"= {expected}",
            )
        line = {
            "id": f"zc-{self._next_line}",
            "session_id": session.session_id,
            "item_id": body.item_id,
            "item_name": body.item_name,
            "quantity": body.quantity,
            "unit_price": body.unit_price,
            "total_price": body.total_price,
            "recorded_at": _iso(now),
        }
        self._next_line += 1
        session.lines.append(line)
        effect = {k: line[k] for k in ("id", "session_id", "item_id", "quantity", "total_price")}
        return dict(line), effect


# -- routes -------------------------------------------------------------------------------------------------------


def authenticate(sandbox: Sandbox, request: web.Request) -> None:
    """Both the API key and the client id, as the reference's adapter sends them; either wrong is a 401."""
    options = sandbox.options
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("unauthorized", "missing 'Authorization: Bearer <api key>'")
    if not hmac.compare_digest(key.strip().encode(), options.ziggy_api_key.encode()):
        raise unauthorized("unauthorized", "invalid API key")
    client = request.headers.get("X-Client-Id")
    if client is None:
        raise unauthorized("unauthorized", "missing X-Client-Id header")
    if not hmac.compare_digest(client.encode(), options.ziggy_client_id.encode()):
        raise unauthorized("unauthorized", "unknown X-Client-Id")


Act = Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]


async def mutate(
    sandbox: Sandbox, request: web.Request, model: type[_Body], act: Act, *, status: int = 200
) -> web.Response:
    """One POST: authenticate, replay a known Idempotency-Key, validate, act, store the answer, log the effect."""
    route = request.match_info.route.name or ""
    try:
        authenticate(sandbox, request)
        body = await read_json(request, cap=BODY_CAP)
        key = request.headers.get("Idempotency-Key")
        now = sandbox.clock.now()
        request_print = ""
        if key is not None:
            check_key(key)
            request_print = fingerprint(route, body)
            stored = sandbox.idempotency.lookup(sandbox.options.ziggy_client_id, key, request_print, now)
            if stored is not None:
                sandbox.record_call(request, status=stored.status, acted=False, replayed=True)
                return json_text_response(stored.body, status=stored.status, headers={"Idempotent-Replayed": "true"})
        answer, effect = act(validate(model, body))
        answer_text = dumps(answer)
        if key is not None:
            sandbox.idempotency.store(sandbox.options.ziggy_client_id, key, request_print, status, answer_text, now)
    except ApiError as exc:
        sandbox.record_call(request, status=exc.status, acted=False, error=exc.code)
        raise
    sandbox.record_call(request, status=status, acted=True, effect=effect)
    return json_text_response(answer_text, status=status)


def _now(sandbox: Sandbox) -> datetime:
    return datetime.fromtimestamp(sandbox.clock.now(), UTC)


def routes(sandbox: Sandbox, prefix: str) -> list[web.RouteDef]:
    async def checkin(request: web.Request) -> web.Response:
        return await mutate(sandbox, request, CheckinBody, sandbox.ziggy.checkin)

    async def checkout(request: web.Request) -> web.Response:
        return await mutate(sandbox, request, CheckoutBody, lambda b: sandbox.ziggy.checkout(b, _now(sandbox)))

    async def record(request: web.Request) -> web.Response:
        return await mutate(
            sandbox, request, ConsumptionBody, lambda b: sandbox.ziggy.record(b, _now(sandbox)), status=201
        )

    async def active(request: web.Request) -> web.Response:
        authenticate(sandbox, request)
        params = query(request, frozenset({"user_id"}))
        user_id = params.get("user_id")
        if user_id is not None and not user_id:
            raise ApiError(400, "invalid_query", "user_id must not be empty")
        return json_response([s.public() for s in sandbox.ziggy.active(user_id)])

    async def session(request: web.Request) -> web.Response:
        authenticate(sandbox, request)
        query(request, frozenset())
        return json_response(sandbox.ziggy.session(request.match_info["session_id"]).public())

    async def lines(request: web.Request) -> web.Response:
        authenticate(sandbox, request)
        query(request, frozenset())
        return json_response(sandbox.ziggy.session(request.match_info["session_id"]).lines)

    return [
        web.post(f"{prefix}/access/checkin", checkin, name="ziggy.checkin"),
        web.post(f"{prefix}/access/checkout", checkout, name="ziggy.checkout"),
        web.get(f"{prefix}/access/sessions/active", active, name="ziggy.sessions.active", allow_head=False),
        web.get(f"{prefix}/access/sessions/{{session_id}}", session, name="ziggy.sessions.get", allow_head=False),
        web.post(f"{prefix}/consumption/record", record, name="ziggy.consumption.record"),
        web.get(f"{prefix}/consumption/{{session_id}}", lines, name="ziggy.consumption.list", allow_head=False),
    ]
