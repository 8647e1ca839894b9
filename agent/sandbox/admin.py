"""`/_sandbox/`: the oracle (received calls and events, clips) and the controls. Not part of any contract the agent
uses, and unauthenticated, which is why the server listens on loopback unless told otherwise.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from ..store.members import MemberRecord
from .claim import CLAIM_TTL_S
from .errors import ApiError
from .faults import parse_plan
from .tus import admin_listing
from .wire import explain, json_response, money, query, read_json

if TYPE_CHECKING:
    from .state import Sandbox

BODY_CAP = 256 * 1024 * 1024  # a whole 100,000-member list in one upsert
MAX_ADVANCE_S = 10 * 365 * 86_400
CONTRACTS = ("cloud.openapi.yaml", "ziggy.openapi.yaml")


def _members_change(sandbox: Sandbox, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not body or set(body) - {"upsert", "delete"}:
        raise ApiError(422, "invalid_body", 'expected {"upsert": [member, ...], "delete": [member_id, ...]}')
    upsert, delete = body.get("upsert", []), body.get("delete", [])
    if not isinstance(upsert, list) or not isinstance(delete, list):
        raise ApiError(422, "invalid_body", "upsert and delete are lists")
    if not all(isinstance(i, str) and i for i in delete):
        raise ApiError(422, "invalid_body", "delete: a list of member ids (strings)")
    records: list[MemberRecord] = []
    cards: dict[str, str] = {}
    for index, raw in enumerate(upsert):
        try:
            record = MemberRecord.model_validate(raw)
        except ValidationError as exc:
            raise ApiError(422, "invalid_body", explain(exc, prefix=f"upsert[{index}]")) from exc
        if record.deleted:
            raise ApiError(422, "invalid_body", f"upsert[{index}]: deleted=true; put the id in 'delete' instead")
        for card in record.cards:
            if cards.setdefault(card, record.member_id) != record.member_id:
                raise ApiError(422, "invalid_body", f"upsert[{index}]: card {card} is also given to {cards[card]}")
        records.append(record)
    ids = [r.member_id for r in records] + list(delete)
    if len(set(ids)) != len(ids):
        raise ApiError(422, "invalid_body", "a member id appears twice in one change")
    upserted = sandbox.feed.upsert(records)
    deleted, missing = sandbox.feed.delete(delete)
    return {"upserted": upserted, "deleted": deleted, "missing": missing, "members": len(sandbox.feed)}


def routes(sandbox: Sandbox) -> list[web.RouteDef]:
    async def health(request: web.Request) -> web.Response:
        query(request, frozenset())
        now = sandbox.clock.now()
        return json_response(
            {
                "status": "ok",
                "now": sandbox.clock.iso(now),
                "now_unix": now,
                "clock_offset_s": sandbox.clock.offset_s,
                "members": len(sandbox.feed),
                "sessions_active": len(sandbox.ziggy.active()),
                "events_accepted": len(sandbox.inbox),
                "clips_complete": len(sandbox.clips.complete()),
                "received": len(sandbox.log),
                "fault_rules": len(sandbox.faults),
                "tokens_live": sandbox.tokens.live(now),
            }
        )

    async def received(request: web.Request) -> web.Response:
        params = query(request, frozenset({"kind", "after", "route"}))
        kind = params.get("kind")
        if kind not in (None, "call", "event"):
            raise ApiError(400, "invalid_query", "kind is call or event")
        after = params.get("after", "0")
        if not after.isdigit():
            raise ApiError(400, "invalid_query", "after is an entry number (n) >= 0")
        entries = sandbox.log.select(kind=kind, after=int(after), route=params.get("route"))
        return json_response({"entries": entries, "count": len(entries), "total": len(sandbox.log)})

    async def clips(request: web.Request) -> web.Response:
        params = query(request, frozenset({"status", "highlight_id"}))
        return admin_listing(sandbox.clips, params.get("status"), params.get("highlight_id"))

    async def get_faults(request: web.Request) -> web.Response:
        query(request, frozenset())
        return json_response(sandbox.faults.describe())

    async def put_faults(request: web.Request) -> web.Response:
        try:
            rules, seed = parse_plan(await read_json(request, cap=1024 * 1024))
        except ValueError as exc:
            raise ApiError(422, "invalid_fault_plan", str(exc)) from exc
        sandbox.faults.replace(rules, seed)
        return json_response(sandbox.faults.describe())

    async def clock(request: web.Request) -> web.Response:
        body = await read_json(request, cap=4096)
        try:
            if not isinstance(body, dict) or set(body) != {"advance_s"}:
                raise ValueError("one key")
            seconds = float(money(body["advance_s"]))
        except ValueError as exc:
            raise ApiError(422, "invalid_body", 'expected {"advance_s": seconds}') from exc
        if not 0 <= seconds <= MAX_ADVANCE_S:
            raise ApiError(422, "invalid_body", f"advance_s must be 0..{MAX_ADVANCE_S} (time only moves forward)")
        now = sandbox.clock.advance(seconds)
        return json_response({"now": sandbox.clock.iso(now), "now_unix": now, "offset_s": sandbox.clock.offset_s})

    async def members(request: web.Request) -> web.Response:
        return json_response(_members_change(sandbox, await read_json(request, cap=BODY_CAP)))

    async def claim_token(request: web.Request) -> web.Response:
        body = await read_json(request, cap=4096)
        try:
            if not isinstance(body, dict) or not set(body) <= {"ttl_s"}:
                raise ValueError("keys")
            ttl = float(money(body.get("ttl_s", CLAIM_TTL_S)))
        except ValueError as exc:
            raise ApiError(422, "invalid_body", 'expected {"ttl_s": seconds} or {}') from exc
        if not 0 < ttl <= MAX_ADVANCE_S:
            raise ApiError(422, "invalid_body", f"ttl_s must be 0..{MAX_ADVANCE_S}")
        made = sandbox.claims.mint(sandbox.clock.now(), ttl)
        return json_response({"claim_token": made.token, "expires_at": sandbox.clock.iso(made.expires_at)})

    async def reset(request: web.Request) -> web.Response:
        query(request, frozenset())
        sandbox.reset()
        return json_response({"status": "reset", "members": len(sandbox.feed)})

    async def contract(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in CONTRACTS:
            raise ApiError(404, "not_found", f"contracts: {', '.join(CONTRACTS)}")
        text = resources.files("agent").joinpath("contracts", name).read_text(encoding="utf-8")
        return web.Response(text=text, content_type="application/yaml", charset="utf-8")

    return [
        web.get("/_sandbox/health", health, name="sandbox.health", allow_head=False),
        web.get("/_sandbox/received", received, name="sandbox.received", allow_head=False),
        web.get("/_sandbox/clips", clips, name="sandbox.clips", allow_head=False),
        web.get("/_sandbox/faults", get_faults, name="sandbox.faults.get", allow_head=False),
        web.put("/_sandbox/faults", put_faults, name="sandbox.faults.put"),
        web.post("/_sandbox/clock", clock, name="sandbox.clock"),
        web.post("/_sandbox/members", members, name="sandbox.members"),
        web.post("/_sandbox/reset", reset, name="sandbox.reset"),
        web.post("/_sandbox/claim-tokens", claim_token, name="sandbox.claim_tokens"),
        web.get("/_sandbox/contracts/{name}", contract, name="sandbox.contracts", allow_head=False),
    ]
