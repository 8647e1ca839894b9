"""The local REST API for court tablets, the bar and the front desk (`/api/v1/...`); the contract is
`agent/contracts/local.openapi.yaml`, served at `/api/v1/openapi.yaml`.

Callers are `[[api.clients]]` with a role; each one's bearer token is `api_tokens.<name>` in the secrets file.

- court: read its own courts and their sessions; check players in (card or member code) and out there; read
  those sessions' consumption and highlights.
- bar: read courts and sessions; record consumption against a session; read any session's consumption and
  highlights.
- desk: everything court and bar may, on every court; devices and their presence; the outbox.
- admin: the same as desk (room for operator-only calls).

Decisions go through the same `AccessService` calls as the MQTT tablets', with the caller's name as the device
and `request_id` as the message id: a retried request is answered again from the store, never decided twice.
Tokens are compared in constant time; an address that keeps failing is answered ever more slowly (up to
`MAX_PENALTY_S`) and logged once. Every body is validated; every error is JSON `{"error", "detail"}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from ..access import AccessService, Outcome
from ..config import ApiClient, CatalogueItem
from ..domain.messages import Language, denial_message
from ..domain.model import Reason
from ..lan.payloads import MAX_ID, CardId, ConsumptionItem
from ..lan.presence import Presence
from ..logs import OnceLogger, get_logger
from ..store import repo
from ..store.db import Database
from ..sync import status
from .live import LiveEvent, LiveHub

log = get_logger("agent.web.api")

RIGHTS: dict[str, frozenset[str]] = {
    "court": frozenset({"read", "checkin"}),
    "bar": frozenset({"read", "consume"}),
    "desk": frozenset({"read", "checkin", "consume", "devices", "outbox"}),
    "admin": frozenset({"read", "checkin", "consume", "devices", "outbox"}),
}
LIVE_PATH = "/api/v1/live"
OPEN_PATHS = ("/api/v1/openapi.yaml", "/api/v1/health/", "/api/v1/sync/")  # their own rules (or none)
FREE_FAILURES = 3  # failed authentications from one address before answers slow down
MAX_PENALTY_S = 5.0
FAILURE_MEMORY_S = 600.0
MAX_ADDRESSES = 1024
DENIED_SHOWN = 20  # refused taps listed on the front desk by default
MAX_DENIED_SHOWN = 200
REASONS = frozenset(r.value for r in Reason)

M = TypeVar("M", bound=BaseModel)
CLIENT = web.RequestKey("client", ApiClient)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    request_id: str = Field(min_length=1, max_length=MAX_ID)


class CheckinBody(_Body):
    card_id: CardId | None = None
    member_code: str | None = Field(default=None, min_length=1, max_length=MAX_ID)

    @model_validator(mode="after")
    def _one(self) -> CheckinBody:
        if (self.card_id is None) == (self.member_code is None):
            raise ValueError("give exactly one of card_id or member_code")
        return self


class CheckoutBody(_Body):
    session_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    card_id: CardId | None = None

    @model_validator(mode="after")
    def _one(self) -> CheckoutBody:
        if (self.session_id is None) == (self.card_id is None):
            raise ValueError("give exactly one of session_id or card_id")
        return self


class OrderBody(CheckoutBody):
    items: list[ConsumptionItem] = Field(min_length=1, max_length=50)


class VoidBody(_Body):
    reason: str = Field(min_length=1, max_length=200)


class _Failures:
    """Failed authentications per address, forgotten after FAILURE_MEMORY_S; bounded in size."""

    def __init__(self) -> None:
        self._by_address: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def penalty_s(self, address: str, now: float) -> float:
        count, last = self._by_address.get(address, (0, now))
        if now - last > FAILURE_MEMORY_S:
            count = 0
        return 0.0 if count < FREE_FAILURES else min(MAX_PENALTY_S, 0.25 * 2 ** (count - FREE_FAILURES))

    def failed(self, address: str, now: float) -> int:
        count, last = self._by_address.pop(address, (0, now))
        count = 1 if now - last > FAILURE_MEMORY_S else count + 1
        self._by_address[address] = (count, now)
        while len(self._by_address) > MAX_ADDRESSES:
            self._by_address.popitem(last=False)
        return count

    def succeeded(self, address: str) -> None:
        self._by_address.pop(address, None)


class LocalApi:
    def __init__(
        self,
        db: Database,
        service: AccessService,
        presence: Presence,
        clients: Sequence[ApiClient],
        tokens: Mapping[str, SecretStr],
        destinations: Sequence[str],
        on_courts_changed: Callable[[str], None] = lambda court_id: None,
        hub: LiveHub | None = None,
        catalogue: Sequence[CatalogueItem] = (),
        language: Language = Language.PT_BR,
        storage: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self._storage = storage
        self._language = language
        self._catalogue = [item.model_dump() for item in catalogue]
        self._hub = hub or LiveHub()
        self._db, self._service, self._presence = db, service, presence
        self._clients = [(c, tokens[c.name].get_secret_value().encode()) for c in clients if c.name in tokens]
        for c in clients:
            if c.name not in tokens:
                log.error("api_client_without_token", client=c.name, missing=f"api_tokens.{c.name}")
        self._destinations = list(destinations)
        self._courts_changed = on_courts_changed
        self._failures = _Failures()
        self._once = OnceLogger(log)

    # -- routing and authentication ------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/openapi.yaml", self.contract),
            web.get("/api/v1/courts", self.courts),
            web.get("/api/v1/courts/{court_id}", self.court),
            web.post("/api/v1/courts/{court_id}/checkin", self.checkin),
            web.post("/api/v1/courts/{court_id}/checkout", self.checkout),
            web.get("/api/v1/sessions", self.sessions),
            web.get("/api/v1/sessions/{session_id}/consumption", self.session_consumption),
            web.get("/api/v1/sessions/{session_id}/highlights", self.session_highlights),
            web.post("/api/v1/consumption", self.consume),
            web.post("/api/v1/consumption/{line_id}/void", self.void),
            web.get("/api/v1/devices", self.devices),
            web.get("/api/v1/outbox", self.outbox),
            web.get("/api/v1/decisions/denied", self.denied),
            web.get(LIVE_PATH, self.live),
            web.get("/api/v1/catalogue", self.catalogue),
        ]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not path.startswith("/api/v1/") or path.startswith(OPEN_PATHS):
            return await handler(request)
        address = request.remote or "?"
        now = time.monotonic()
        header = request.headers.get("Authorization", "")
        if not header and path == LIVE_PATH and "access_token" in request.query:
            # EventSource cannot send headers: the page's token comes as RFC 6750's query parameter (the
            # agent keeps no access log, so it is written nowhere)
            header = f"Bearer {request.query['access_token']}"
        client = self._who(header)
        if client is None:
            await asyncio.sleep(self._failures.penalty_s(address, now))  # before the answer: guessing is slow
            count = self._failures.failed(address, now)
            self._once.warning("api_auth_failed", address, address=address, failures=count, path=path)
            return error(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")
        self._failures.succeeded(address)
        request[CLIENT] = client
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own (405, 413...): JSON like every other answer
            if exc.status < 400:
                raise
            return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)

    def _who(self, header: str) -> ApiClient | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token.strip().encode()
        found = None
        for client, expected in self._clients:  # every token compared, in constant time each: no early exit
            if hmac.compare_digest(presented, expected):
                found = client
        return found

    @staticmethod
    def _client(request: web.Request) -> ApiClient:
        return request[CLIENT]

    def _may(self, request: web.Request, right: str, court_id: str | None = None) -> web.Response | None:
        """None when the caller may; else the refusal to send."""
        client = self._client(request)
        if right not in RIGHTS[client.role]:
            return error(403, "forbidden", f"role '{client.role}' may not {right}")
        if court_id is not None and client.role == "court" and court_id not in client.courts:
            return error(403, "forbidden", f"'{client.name}' does not serve court '{court_id}'")
        return None

    def _visible_courts(self, request: web.Request) -> list[str]:
        client = self._client(request)
        courts = list(self._service.courts)
        return [c for c in courts if c in client.courts] if client.role == "court" else courts

    async def _body(self, request: web.Request, model: type[M]) -> M | web.Response:
        if request.content_type != "application/json":
            return error(415, "unsupported_media_type", "send the body as application/json")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", "the body is larger than 64 KiB")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json reads
            return error(400, "invalid_json", "the body is not JSON")
        try:
            return model.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in first[:5])
            return error(422, "invalid_request", detail)

    # -- handlers ------------------------------------------------------------------------------------------

    async def contract(self, _: web.Request) -> web.Response:
        text = resources.files("agent").joinpath("contracts", "local.openapi.yaml").read_text(encoding="utf-8")
        return web.Response(text=text, content_type="application/yaml")

    async def courts(self, request: web.Request) -> web.Response:
        if (refused := self._may(request, "read")) is not None:
            return refused
        return web.json_response(
            {"courts": [await self._service.court_state(c) for c in self._visible_courts(request)]}
        )

    async def court(self, request: web.Request) -> web.Response:
        court_id = request.match_info["court_id"]
        if court_id not in self._service.courts:
            return error(404, "not_found", f"no court '{court_id}'")
        if (refused := self._may(request, "read", court_id)) is not None:
            return refused
        return web.json_response(await self._service.court_state(court_id))

    async def checkin(self, request: web.Request) -> web.Response:
        async def decide(who: str, court_id: str, body: CheckinBody) -> Outcome:
            return await self._service.tablet_checkin(
                who, court_id, body.request_id, card_id=body.card_id, member_code=body.member_code
            )

        return await self._on_court(request, CheckinBody, decide)

    async def checkout(self, request: web.Request) -> web.Response:
        async def decide(who: str, court_id: str, body: CheckoutBody) -> Outcome:
            return await self._service.tablet_checkout(
                who, court_id, body.request_id, session_id=body.session_id, card_id=body.card_id
            )

        return await self._on_court(request, CheckoutBody, decide)

    async def _on_court(
        self, request: web.Request, model: type[M], decide: Callable[[str, str, M], Awaitable[Outcome]]
    ) -> web.Response:
        """A decision on the court in the path, by a caller allowed to check players in and out there."""
        court_id = request.match_info["court_id"]
        if court_id not in self._service.courts:
            return error(404, "not_found", f"no court '{court_id}'")
        if (refused := self._may(request, "checkin", court_id)) is not None:
            return refused
        body = await self._body(request, model)
        if isinstance(body, web.Response):
            return body
        outcome = await decide(self._client(request).name, court_id, body)
        return self._answer(outcome.response, outcome.courts)

    async def consume(self, request: web.Request) -> web.Response:
        if (refused := self._may(request, "consume")) is not None:
            return refused
        body = await self._body(request, OrderBody)
        if isinstance(body, web.Response):
            return body
        outcome = await self._service.consumption(
            self._client(request).name, body.request_id, body.items, session_id=body.session_id, card_id=body.card_id
        )
        return self._answer(outcome.response, outcome.courts)

    async def void(self, request: web.Request) -> web.Response:
        if (refused := self._may(request, "consume")) is not None:
            return refused
        body = await self._body(request, VoidBody)
        if isinstance(body, web.Response):
            return body
        line_id = request.match_info["line_id"]
        outcome = await self._service.void_consumption(
            self._client(request).name, body.request_id, line_id, body.reason
        )
        reason = outcome.response.get("reason")
        if reason == "unknown_line":
            return error(404, "not_found", f"no consumption line '{line_id}'")
        if reason == "void_too_late":
            return error(409, "void_too_late", str(outcome.response.get("detail", "")))
        return self._answer(outcome.response, outcome.courts)

    def _answer(self, response: dict[str, Any], courts: frozenset[str]) -> web.Response:
        for court_id in courts:
            self._courts_changed(court_id)
        return web.json_response(response)

    async def sessions(self, request: web.Request) -> web.Response:
        if (refused := self._may(request, "read")) is not None:
            return refused
        wanted = request.query.get("court_id")
        visible = set(self._visible_courts(request))
        if wanted is not None and wanted not in visible:
            return error(403, "forbidden", f"court '{wanted}' is not one of this caller's")
        views = await self._db.read(repo.open_sessions, wanted)
        return web.json_response(
            {
                "sessions": [
                    {
                        "session_id": v.session_id,
                        "member_id": v.member_id,
                        "first_name": v.first_name,
                        "court_id": v.court_id,
                        "started_at": repo.iso(v.started_at),
                        "credits_left": v.credits_left,
                    }
                    for v in views
                    if v.court_id in visible
                ]
            }
        )

    async def _session_court(self, request: web.Request) -> str | web.Response:
        """The court of the session in the path, if the caller may read it."""
        if (refused := self._may(request, "read")) is not None:
            return refused
        session_id = request.match_info["session_id"]
        row = await self._db.read(repo.session_by_id, session_id)
        if row is None:
            return error(404, "not_found", f"no session '{session_id}'")
        court_id = str(row["court_id"])
        if (refused := self._may(request, "read", court_id)) is not None:
            return refused
        return court_id

    async def session_consumption(self, request: web.Request) -> web.Response:
        court = await self._session_court(request)
        if isinstance(court, web.Response):
            return court
        rows = await self._db.fetchall(
            "SELECT line_id, request_id, pos_id, line_no, item_id, item_name, quantity, unit_cents, total_cents,"
            " recorded_at, voided_at, void_reason FROM consumption WHERE session_id = ?"
            " ORDER BY recorded_at, request_id, line_no",
            (request.match_info["session_id"],),
        )
        lines = [
            {
                "line_id": r["line_id"],
                "request_id": r["request_id"],
                "pos_id": r["pos_id"],
                "line_no": r["line_no"],
                "item_id": r["item_id"],
                "item_name": r["item_name"],
                "quantity": r["quantity"],
                "unit_price": r["unit_cents"] / 100,
                "total_price": r["total_cents"] / 100,
                "recorded_at": repo.iso(repo.from_ms(r["recorded_at"])),
                "voided_at": repo.iso(repo.from_ms(r["voided_at"])) if r["voided_at"] is not None else None,
                "void_reason": r["void_reason"],
            }
            for r in rows
        ]
        total = sum(int(r["total_cents"]) for r in rows if r["voided_at"] is None) / 100
        return web.json_response({"session_id": request.match_info["session_id"], "lines": lines, "total": total})

    async def session_highlights(self, request: web.Request) -> web.Response:
        court = await self._session_court(request)
        if isinstance(court, web.Response):
            return court
        rows = await self._db.fetchall(
            "SELECT highlight_id, court_id, button_id, pressed_at, start_at, duration_ms, kind, clip_state"
            " FROM highlights WHERE session_id = ? ORDER BY pressed_at",
            (request.match_info["session_id"],),
        )
        return web.json_response(
            {
                "highlights": [
                    {
                        "highlight_id": r["highlight_id"],
                        "court_id": r["court_id"],
                        "button_id": r["button_id"],
                        "pressed_at": repo.iso(repo.from_ms(r["pressed_at"])),
                        "start_at": repo.iso(repo.from_ms(r["start_at"])),
                        "duration_s": r["duration_ms"] / 1000,
                        "kind": r["kind"],
                        "clip_state": r["clip_state"],
                    }
                    for r in rows
                ]
            }
        )

    async def devices(self, request: web.Request) -> web.Response:
        if (refused := self._may(request, "devices")) is not None:
            return refused
        return web.json_response({"devices": [s.to_json() for s in self._presence.snapshot()]})

    async def catalogue(self, request: web.Request) -> web.Response:
        """The bar's item grid, from the config's [[bar.items]]."""
        if (refused := self._may(request, "read")) is not None:
            return refused
        return web.json_response({"items": self._catalogue})

    async def live(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `court` (a court's screen), `decision` (a reader's answer on a court) and, for the
        desk, `device` (presence); the current state first."""
        if (refused := self._may(request, "read")) is not None:
            return refused
        client = self._client(request)
        courts = frozenset(self._visible_courts(request))
        devices = "devices" in RIGHTS[client.role]
        snapshot = [LiveEvent("court", c, await self._service.court_state(c)) for c in sorted(courts)]
        if devices:
            snapshot += [LiveEvent("device", None, s.to_json()) for s in self._presence.snapshot()]
        return await self._hub.stream(request, None if client.role != "court" else courts, devices, snapshot)

    async def denied(self, request: web.Request) -> web.Response:
        """The latest refused taps, newest first, with the reason and who it was (when the card is known)."""
        if (refused := self._may(request, "devices")) is not None:
            return refused
        raw = request.query.get("limit", str(DENIED_SHOWN))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_DENIED_SHOWN:
            return error(422, "invalid_request", f"limit: a whole number from 1 to {MAX_DENIED_SHOWN}")
        rows = await self._db.fetchall(
            "SELECT e.seq, e.occurred_at, e.data, m.first_name FROM events e"
            " LEFT JOIN members m ON m.member_id = json_extract(e.data, '$.member_id')"
            " WHERE e.type = 'access.decided' AND json_extract(e.data, '$.result') = 'denied'"
            " ORDER BY e.seq DESC LIMIT ?",
            (int(raw),),
        )
        taps = []
        for row in rows:
            data = json.loads(row["data"])
            card = data.get("card_id")
            taps.append(
                {
                    "seq": row["seq"],
                    "at": repo.iso(repo.from_ms(row["occurred_at"])),
                    "device_id": data.get("device_id"),
                    "court_id": data.get("court_id"),
                    "reason": data.get("reason"),
                    "message": denial_message(Reason(data["reason"]), self._language)
                    if data.get("reason") in REASONS
                    else data.get("reason"),
                    "member_id": data.get("member_id"),
                    "first_name": row["first_name"],
                    # enough for the desk to match a card in hand; the log keeps the whole id
                    "card_hint": f"…{card[-4:]}" if isinstance(card, str) and card else None,
                }
            )
        return web.json_response({"denied": taps})

    async def outbox(self, request: web.Request) -> web.Response:
        if (refused := self._may(request, "outbox")) is not None:
            return refused
        names = sorted(set(self._destinations) | set(await status.known_destinations(self._db)))
        states = await status.destination_states(self._db, names)
        members = await self._db.fetchone("SELECT version, synced_at, members FROM member_list WHERE id = 1")
        return web.json_response(
            {
                "storage": self._storage(),
                "member_list": {
                    "version": members["version"] if members else 0,
                    "members": members["members"] if members else 0,
                    "synced_at": repo.iso(repo.from_ms(members["synced_at"]))
                    if members and members["synced_at"] is not None
                    else None,
                },
                "destinations": [
                    {
                        "destination": s.destination,
                        "pending": s.pending,
                        "dead": s.dead,
                        "oldest_pending_at": repo.iso(repo.from_ms(s.oldest_pending_ms))
                        if s.oldest_pending_ms is not None
                        else None,
                        "last_success_at": repo.iso(repo.from_ms(s.last_success_ms))
                        if s.last_success_ms is not None
                        else None,
                        "last_error": s.last_error,
                        "breaker": s.breaker,
                    }
                    for s in states
                ],
            }
        )
