"""The member cache: records, import files (CSV, JSON) and atomic application.

A list is applied in one transaction and bumps the member-list version, so a decision never sees half a list
and always records which version it used.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..config import HoursConfig
from ..domain.model import MemberStatus, normalize_card_id
from ..errors import ImportFileError
from .db import Database
from .repo import to_ms

MAX_IMPORT_BYTES = 256 * 1024 * 1024
BATCH = 5000
MAX_CREDITS = 2**63 - 1  # SQLite's largest INTEGER: more cannot be stored, so such a record is refused


def _split_list(value: Any) -> Any:
    """CSV cells hold lists separated by ';' or '|'."""
    if isinstance(value, str):
        return [part.strip() for part in value.replace("|", ";").split(";") if part.strip()]
    return value


def _blank_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _date_or_instant(value: Any) -> Any:
    """'2026-03-31' is a whole day; '2026-03-31T00:00:00Z' is that instant (pydantic would read it as a date)."""
    value = _blank_to_none(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError("expected a date YYYY-MM-DD or an ISO 8601 date-time") from exc
    return value


class PlanRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    requires_credit: bool = False
    hours: list[HoursConfig] = Field(default_factory=list)


class MemberRecord(BaseModel):
    """One member as imported or synced. Unknown fields are ignored (the cloud may send more)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    member_id: str = Field(min_length=1, max_length=128)
    deleted: bool = False  # a tombstone: declared before first_name, whose check depends on it
    first_name: str = Field(default="", max_length=128, validate_default=True)
    last_name: str = Field(default="", max_length=128)
    member_code: Annotated[str | None, BeforeValidator(_blank_to_none)] = Field(default=None, max_length=64)
    status: MemberStatus = MemberStatus.ACTIVE
    cards: Annotated[list[str], BeforeValidator(_split_list)] = Field(default_factory=list)
    credits: Annotated[int | None, BeforeValidator(_blank_to_none)] = Field(default=None, ge=0, le=MAX_CREDITS)
    requires_credit: Annotated[bool | None, BeforeValidator(_blank_to_none)] = None
    valid_from: Annotated[datetime | date | None, BeforeValidator(_date_or_instant)] = None
    valid_until: Annotated[datetime | date | None, BeforeValidator(_date_or_instant)] = None
    groups: Annotated[list[str], BeforeValidator(_split_list)] = Field(default_factory=list)
    plan: PlanRecord | None = None

    @field_validator("cards")
    @classmethod
    def _cards(cls, cards: list[str]) -> list[str]:
        out = []
        for card in cards:
            try:
                out.append(normalize_card_id(card))
            except ValueError as exc:
                raise ValueError(f"card '{card}': {exc}") from exc
        return out

    @field_validator("first_name")
    @classmethod
    def _named(cls, name: str, info: ValidationInfo) -> str:
        if not name and not info.data.get("deleted"):
            raise ValueError("first_name is required (only a record with deleted=true may omit it)")
        return name

    def needs_credit(self) -> bool:
        if self.requires_credit is not None:
            return self.requires_credit
        return bool(self.plan and self.plan.requires_credit)

    def hours_json(self) -> str:
        hours = self.plan.hours if self.plan else []
        return json.dumps(
            [
                {"days": sorted(h.days), "from": h.from_.isoformat("minutes"), "to": h.to.isoformat("minutes")}
                for h in hours
            ]
        )


def _bound_ms(value: date | datetime | None, tz: ZoneInfo, *, end: bool) -> int | None:
    """A date means the whole day in club-local time: valid_until 2026-03-31 ends at midnight after it."""
    if value is None:
        return None
    if isinstance(value, datetime):
        ms = to_ms(value if value.tzinfo else value.replace(tzinfo=tz))
    elif end and value == date.max:
        return None  # "valid until 9999-12-31" means forever, and the day after it is past date.max
    else:
        day = value + timedelta(days=1) if end else value
        ms = to_ms(datetime.combine(day, time(0), tzinfo=tz))
    # Bounds past what the cache can read back (from_ms, years 1..9999 UTC) mean no bound at all at their open
    # side (an end after year 9999, a start before year 1) and are clamped at the other.
    if ms > _MAX_MS:
        return None if end else _MAX_MS
    if ms < _MIN_MS:
        return _MIN_MS if end else None
    return ms


_MAX_MS = to_ms(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
_MIN_MS = to_ms(datetime(1, 1, 2, tzinfo=UTC))


# -- reading files ---------------------------------------------------------------------------------------------


def _records_from_json(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFileError(f"not valid JSON: {exc.msg}", line=exc.lineno) from exc
    items = doc.get("members") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ImportFileError("expected a JSON list of members or an object with a 'members' list")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ImportFileError(f"member #{index + 1} is not an object")
        yield index + 1, item


def _records_from_csv(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "member_id" not in reader.fieldnames:
        raise ImportFileError("CSV needs a header row with at least member_id and first_name", line=1)
    for row in reader:
        if None in row:
            raise ImportFileError("more cells than header columns", line=reader.line_num)
        yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def read_member_file(path: Path, fmt: Literal["auto", "csv", "json"] = "auto") -> list[MemberRecord]:
    """Parse and validate a whole file; the first bad record stops the import with its line and field."""
    try:
        size = path.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise ImportFileError(f"file is {size} bytes, larger than the {MAX_IMPORT_BYTES} byte limit")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise ImportFileError(f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path}: not UTF-8 text") from exc
    if fmt == "auto":
        fmt = "json" if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{") else "csv"
    rows = _records_from_json(text) if fmt == "json" else _records_from_csv(text)
    records: list[MemberRecord] = []
    seen_ids: dict[str, int] = {}
    seen_cards: dict[str, tuple[int, str]] = {}
    seen_codes: dict[str, int] = {}
    for line, raw in rows:
        try:
            record = MemberRecord.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ImportFileError(
                f"{err['msg'].removeprefix('Value error, ')} (value {err.get('input')!r})", line=line, field=field
            ) from exc
        for field, value, seen in (
            ("member_id", record.member_id, seen_ids),
            ("member_code", record.member_code, seen_codes),
        ):
            if value is None:
                continue
            if value in seen:
                raise ImportFileError(
                    f"{field} '{value}' already appears on line {seen[value]}", line=line, field=field
                )
            seen[value] = line
        for card in record.cards:
            if card in seen_cards:
                other_line, other = seen_cards[card]
                raise ImportFileError(
                    f"card {card} is also given to member '{other}' on line {other_line}", line=line, field="cards"
                )
            seen_cards[card] = (line, record.member_id)
        records.append(record)
    return records


# -- applying --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyResult:
    version: int
    upserted: int
    deleted: int
    members: int


def _member_row(r: MemberRecord, tz: ZoneInfo, now_ms: int) -> tuple[Any, ...]:
    return (
        r.member_id,
        r.first_name,
        r.last_name,
        r.member_code,
        r.status.value,
        r.credits,
        int(r.needs_credit()),
        _bound_ms(r.valid_from, tz, end=False),
        _bound_ms(r.valid_until, tz, end=True),
        json.dumps(sorted(set(r.groups))),
        r.hours_json(),
        now_ms,
    )


async def apply_members(
    db: Database,
    records: Sequence[MemberRecord],
    *,
    tz: ZoneInfo,
    source: str,
    replace: bool = False,
    synced_at: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> ApplyResult:
    """Upsert (or replace the whole list with) `records` in one transaction and bump the list version.

    Records marked `deleted` are tombstones: the member and their cards go at once.
    """
    now_ms = to_ms(datetime.now(UTC))
    upserted = deleted = 0
    async with db.transaction(f"applying member list from {source}") as conn:
        if replace:
            await conn.execute("DELETE FROM cards")
            await conn.execute("DELETE FROM members")
        for start in range(0, len(records), BATCH):
            chunk = records[start : start + BATCH]
            gone = [(r.member_id,) for r in chunk if r.deleted]
            live = [r for r in chunk if not r.deleted]
            if gone:
                await conn.executemany("DELETE FROM members WHERE member_id = ?", gone)
                deleted += len(gone)
            if live:
                await conn.executemany("DELETE FROM cards WHERE member_id = ?", [(r.member_id,) for r in live])
                # Member codes move between members as the club reassigns them; the newest record wins.
                await conn.executemany(
                    "UPDATE members SET member_code = NULL WHERE member_code = ? AND member_id <> ?",
                    [(r.member_code, r.member_id) for r in live if r.member_code],
                )
                await conn.executemany(
                    "INSERT INTO members (member_id, first_name, last_name, member_code, status, credits,"
                    " requires_credit, valid_from, valid_until, groups_json, hours_json, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (member_id) DO UPDATE SET first_name = excluded.first_name,"
                    " last_name = excluded.last_name, member_code = excluded.member_code, status = excluded.status,"
                    " credits = excluded.credits, requires_credit = excluded.requires_credit,"
                    " valid_from = excluded.valid_from, valid_until = excluded.valid_until,"
                    " groups_json = excluded.groups_json, hours_json = excluded.hours_json,"
                    " updated_at = excluded.updated_at",
                    [_member_row(r, tz, now_ms) for r in live],
                )
                # A card re-issued to another member moves with the newest record.
                await conn.executemany(
                    "INSERT OR REPLACE INTO cards (card_id, member_id) VALUES (?, ?)",
                    [(card, r.member_id) for r in live for card in r.cards],
                )
                upserted += len(live)
            if progress is not None:
                progress(len(chunk))
        rows = list(await conn.execute_fetchall("SELECT COUNT(*) FROM members"))
        count = int(rows[0][0])
        await conn.execute(
            "UPDATE member_list SET version = version + 1, source = ?, members = ?,"
            " synced_at = COALESCE(?, synced_at) WHERE id = 1",
            (source, count, to_ms(synced_at) if synced_at else None),
        )
        rows = list(await conn.execute_fetchall("SELECT version FROM member_list WHERE id = 1"))
        version = int(rows[0][0])
    return ApplyResult(version=version, upserted=upserted, deleted=deleted, members=count)
