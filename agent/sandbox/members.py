"""The club cloud's member list as a delta feed: `GET /edge/members?cursor=&limit=`.

Every change (seeding, an admin upsert, a delete) takes the next sequence number and appends the member id to a
log, so log index i holds the change numbered i + 1. A page "after s" walks the log from index s and keeps the
entries that are still current (a member changed twice appears once, at its newest change); a deleted member is
a tombstone. The cursor is opaque to clients but is just (epoch, s): a reset starts a new epoch, and an old
cursor then answers 410 so the agent knows to resync from scratch.

Members are serialised to JSON once, when they change, so paging 100,000 members is string joining.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..store.members import MemberRecord
from .errors import ApiError
from .tokens import require_bearer
from .wire import dumps, json_text_response, query

if TYPE_CHECKING:
    from .state import Sandbox

DEFAULT_LIMIT = 1000
MAX_LIMIT = 5000

FIRST_NAMES = (
    "Ana", "Bruno", "Carla", "Diego", "Eva", "Fábio", "Gabriela", "Henrique", "Isabela", "João", "Larissa", "Lucas",
    "Mariana", "Marcos", "Natália", "Otávio", "Paula", "Rafael", "Sofia", "Thiago", "Vitória", "Yasmin", "Caio",
    "Beatriz", "Felipe", "Juliana", "Pedro", "Camila", "Gustavo", "Letícia",
)  # fmt: skip
LAST_NAMES = (
    "Silva", "Santos", "Oliveira", "Souza", "Rodrigues", "Ferreira", "Alves", "Pereira", "Lima", "Gomes", "Costa",
    "Ribeiro", "Martins", "Carvalho", "Almeida", "Lopes", "Soares", "Fernandes", "Vieira", "Barbosa", "Rocha", "Dias",
)  # fmt: skip
GROUPS = (("padel",), ("padel",), ("padel", "beach"), ("tennis",), ("padel", "tennis"), ("beach",))
OFF_PEAK = {"requires_credit": False, "hours": [{"days": [1, 2, 3, 4, 5], "from": "06:00", "to": "17:00"}]}


@dataclass(frozen=True, slots=True)
class Entry:
    """A member as the feed holds it: its change number, its JSON and what must stay unique across members."""

    seq: int
    json: str
    cards: tuple[str, ...]
    code: str | None


def _when(value: date | datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def wire_member(record: MemberRecord) -> dict[str, Any]:
    """The member as `MemberRecord` reads it back; hours as HH:MM, the only form the agent's parser takes."""
    plan = None
    if record.plan is not None:
        plan = {
            "requires_credit": record.plan.requires_credit,
            "hours": [
                {"days": sorted(h.days), "from": h.from_.strftime("%H:%M"), "to": h.to.strftime("%H:%M")}
                for h in record.plan.hours
            ],
        }
    return {
        "member_id": record.member_id,
        "first_name": record.first_name,
        "last_name": record.last_name,
        "member_code": record.member_code,
        "status": record.status.value,
        "cards": record.cards,
        "credits": record.credits,
        "requires_credit": record.requires_credit,
        "valid_from": _when(record.valid_from),
        "valid_until": _when(record.valid_until),
        "groups": record.groups,
        "plan": plan,
    }


def seeded_members(count: int, seed: int) -> list[tuple[str, Entry]]:
    """`count` deterministic members: the same seed gives the same names, cards and plans on every machine."""
    rng = random.Random(seed)
    cards_seen: set[str] = set()

    def card() -> str:
        while True:
            value = f"04{rng.getrandbits(48):012X}"  # 7-byte NXP UID, as MIFARE/NTAG cards carry
            if value not in cards_seen:
                cards_seen.add(value)
                return value

    out: list[tuple[str, Entry]] = []
    for i in range(1, count + 1):
        roll = rng.random()
        status, valid_until = ("active", "2027-12-31")
        if roll < 0.05:
            status = "suspended"
        elif roll < 0.10:
            status, valid_until = "expired", "2025-12-31"
        cards = [card()] if rng.random() >= 0.05 else [card(), card()]
        credit_plan = rng.random() < 0.3
        member_id, code = f"m-{i:06d}", str(100_000 + i)
        member: dict[str, Any] = {
            "member_id": member_id,
            "first_name": rng.choice(FIRST_NAMES),
            "last_name": rng.choice(LAST_NAMES),
            "member_code": code,
            "status": status,
            "cards": cards,
            "credits": rng.randint(0, 20) if credit_plan else None,
            "requires_credit": credit_plan,
            "valid_from": "2025-01-01",
            "valid_until": valid_until,
            "groups": list(rng.choice(GROUPS)),
            "plan": OFF_PEAK if rng.random() < 0.2 else None,
        }
        out.append((member_id, Entry(i, dumps(member), tuple(cards), code)))
    return out


class MemberFeed:
    def __init__(self, seeded: Sequence[tuple[str, Entry]]) -> None:
        self.epoch = secrets.token_hex(4)
        self._live: dict[str, Entry] = dict(seeded)
        self._dead: dict[str, int] = {}
        self._log: list[str] = [member_id for member_id, _ in seeded]
        self._cards = {card: member_id for member_id, entry in seeded for card in entry.cards}
        self._codes = {entry.code: member_id for member_id, entry in seeded if entry.code}

    def __len__(self) -> int:
        return len(self._live)

    @property
    def head(self) -> int:
        return len(self._log)

    def get(self, member_id: str) -> dict[str, Any] | None:
        entry = self._live.get(member_id)
        return None if entry is None else dict(json.loads(entry.json))

    def _next(self, member_id: str) -> int:
        self._log.append(member_id)
        return len(self._log)

    def _put(self, member: dict[str, Any]) -> None:
        member_id = member["member_id"]
        cards = tuple(member["cards"])
        code = member["member_code"]
        self._live[member_id] = Entry(self._next(member_id), dumps(member), cards, code)
        self._dead.pop(member_id, None)
        for card in cards:
            self._cards[card] = member_id
        if code:
            self._codes[code] = member_id

    def _release(self, member_id: str, entry: Entry) -> None:
        for card in entry.cards:
            if self._cards.get(card) == member_id:
                del self._cards[card]
        if entry.code and self._codes.get(entry.code) == member_id:
            del self._codes[entry.code]

    def _take_from(self, holder: str, card: str | None = None, code: str | None = None) -> None:
        """A card or member code re-issued to someone else leaves its old holder, who changes too."""
        member = self.get(holder)
        assert member is not None
        if card is not None:
            member["cards"] = [c for c in member["cards"] if c != card]
        if code is not None:
            member["member_code"] = None
        self._release(holder, self._live[holder])
        self._put(member)

    def upsert(self, records: Iterable[MemberRecord]) -> int:
        count = 0
        for record in records:
            member = wire_member(record)
            member_id = record.member_id
            old = self._live.get(member_id)
            if old is not None:
                self._release(member_id, old)
            for card in record.cards:
                holder = self._cards.get(card)
                if holder is not None and holder != member_id:
                    self._take_from(holder, card=card)
            code = record.member_code
            holder = self._codes.get(code) if code else None
            if holder is not None and holder != member_id:
                self._take_from(holder, code=code)
            self._put(member)
            count += 1
        return count

    def delete(self, member_ids: Iterable[str]) -> tuple[int, list[str]]:
        deleted, missing = 0, []
        for member_id in member_ids:
            entry = self._live.pop(member_id, None)
            if entry is None:
                missing.append(member_id)
                continue
            self._release(member_id, entry)
            self._dead[member_id] = self._next(member_id)
            deleted += 1
        return deleted, missing

    # -- paging ---------------------------------------------------------------------------------------------------

    def cursor(self, after: int) -> str:
        return base64.urlsafe_b64encode(f"v1:{self.epoch}:{after}".encode()).decode().rstrip("=")

    def parse_cursor(self, cursor: str) -> int:
        if not cursor:
            return 0
        try:
            version, epoch, after = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(":")
            seq = int(after)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, "invalid_cursor", "cursor is not one this feed issued") from exc
        if version != "v1" or seq < 0:
            raise ApiError(400, "invalid_cursor", "cursor is not one this feed issued")
        if epoch != self.epoch:
            raise ApiError(410, "cursor_expired", "the member list was rebuilt since this cursor: resync without one")
        if seq > self.head:
            raise ApiError(400, "invalid_cursor", "cursor is ahead of the feed")
        return seq

    def _current(self, index: int) -> tuple[str, bool] | None:
        """(member id, live) if the change at log `index` is still the member's newest, else None."""
        member_id = self._log[index]
        entry = self._live.get(member_id)
        if entry is not None:
            return (member_id, True) if entry.seq == index + 1 else None
        return (member_id, False) if self._dead.get(member_id) == index + 1 else None

    def page(self, after: int, limit: int) -> str:
        members: list[str] = []
        tombstones: list[str] = []
        index, head = after, self.head
        while index < head and len(members) + len(tombstones) < limit:
            current = self._current(index)
            index += 1
            if current is None:
                continue
            member_id, live = current
            if live:
                members.append(self._live[member_id].json)
            else:
                tombstones.append(member_id)
        has_more = any(self._current(i) is not None for i in range(index, head))
        next_cursor = self.cursor(index if has_more else head)
        return (
            f'{{"members":[{",".join(members)}],"tombstones":{dumps(tombstones)},'
            f'"next_cursor":"{next_cursor}","has_more":{"true" if has_more else "false"}}}'
        )


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, "invalid_query", f"limit must be an integer 1..{MAX_LIMIT}")
    return int(raw)


def routes(sandbox: Sandbox) -> list[web.RouteDef]:
    async def members(request: web.Request) -> web.Response:
        require_bearer(sandbox, request)
        params = query(request, frozenset({"cursor", "limit"}))
        limit = _limit(params.get("limit"))
        feed = sandbox.feed
        return json_text_response(feed.page(feed.parse_cursor(params.get("cursor", "")), limit))

    return [web.get("/edge/members", members, name="cloud.members", allow_head=False)]
