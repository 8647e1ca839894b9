"""The nouns of the premises: members, courts, readers, sessions, the policy and the decision."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

_CARD_SEPARATORS = re.compile(r"[\s:\-]")
_HEX = re.compile(r"[0-9A-Fa-f]+")
MAX_CARD_HEX = 32  # 128-bit UIDs are the longest any supported technology reports


class MemberStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Direction(StrEnum):
    """A reader either toggles (in) or only checks out (out)."""

    IN = "in"
    OUT = "out"


class Action(StrEnum):
    CHECKIN = "checkin"
    CHECKOUT = "checkout"
    NONE = "none"


class Reason(StrEnum):
    """Stable reason codes: they appear on the wire, in metrics and in the event log."""

    OK = "ok"
    UNKNOWN_CARD = "unknown_card"
    SUSPENDED = "suspended"
    EXPIRED = "expired"
    NO_CREDITS = "no_credits"
    OUTSIDE_HOURS = "outside_hours"
    COURT_NOT_ALLOWED = "court_not_allowed"
    ALREADY_IN_SESSION = "already_in_session"
    CACHE_TOO_OLD = "cache_too_old"
    ANTI_PASSBACK = "anti_passback"
    NO_OPEN_SESSION = "no_open_session"
    CLOCK_NOT_SYNCED = "clock_not_synced"
    # Not produced by decide(): the transport answers these before a decision is possible.
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_READER = "unknown_reader"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # the store could not record the decision: nothing is granted unrecorded
    AUTO_TIMEOUT = "auto_timeout"


class SecondTap(StrEnum):
    CHECKOUT = "checkout"
    DENY = "deny"


class UntrustedClock(StrEnum):
    """How validity dates are judged while the wall clock has not been synced since boot.

    last_known: judge against the latest trusted time ever seen (a Pi without RTC boots in the past);
    allow:      skip date checks (fail open);
    deny:       refuse members whose access depends on a date (fail closed).
    """

    LAST_KNOWN = "last_known"
    ALLOW = "allow"
    DENY = "deny"


def normalize_card_id(raw: str) -> str:
    """Upper-case hex without separators; raises ValueError on anything else."""
    card = _CARD_SEPARATORS.sub("", raw)
    if not card:
        raise ValueError("card id is empty")
    if len(card) > MAX_CARD_HEX:
        raise ValueError(f"card id longer than {MAX_CARD_HEX} hex digits")
    # Checked before upper-casing: some Unicode letters upper-case to hex digits ("\ufb00" -> "FF").
    if not _HEX.fullmatch(card):
        raise ValueError("card id must be hexadecimal")
    card = card.upper()
    if len(card) % 2:
        card = "0" + card
    return card


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days (ISO 1=Monday .. 7=Sunday) and a local time range; end <= start spans midnight."""

    days: frozenset[int]
    start: time
    end: time

    def contains(self, local: datetime) -> bool:
        weekday = local.isoweekday()
        t = local.time().replace(tzinfo=None)
        if self.start < self.end:
            return weekday in self.days and self.start <= t < self.end
        if self.start == self.end:  # "00:00-00:00": the whole day
            return weekday in self.days
        # Overnight: the window belongs to the day it starts on.
        previous = 7 if weekday == 1 else weekday - 1
        return (weekday in self.days and t >= self.start) or (previous in self.days and t < self.end)


def within(windows: tuple[TimeWindow, ...], local: datetime) -> bool:
    """No windows means no restriction."""
    return not windows or any(w.contains(local) for w in windows)


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    first_name: str
    status: MemberStatus
    credits: int | None = None  # last balance synced from the cloud; None when the plan has none
    requires_credit: bool = False
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    groups: frozenset[str] = frozenset()
    hours: tuple[TimeWindow, ...] = ()  # the member's plan hours


@dataclass(frozen=True, slots=True)
class Court:
    court_id: str
    name: str
    access_groups: frozenset[str] = frozenset()  # empty: open to every member
    hours: tuple[TimeWindow, ...] = ()  # opening hours; empty: always open
    max_session: timedelta = timedelta(minutes=180)


@dataclass(frozen=True, slots=True)
class Instant:
    """Monotonic time of a boot: elapsed time between two instants of one boot survives wall-clock steps."""

    mono_ns: int
    boot_id: str


@dataclass(frozen=True, slots=True)
class OpenSession:
    session_id: str
    member_id: str
    court_id: str
    started_at: datetime
    started: Instant | None = None  # when it opened, on the monotonic clock (None: unknown)


@dataclass(frozen=True, slots=True)
class MemberState:
    """What the store knows about a member beyond the synced record."""

    open_session: OpenSession | None = None
    last_checkin_at: datetime | None = None
    last_checkin: Instant | None = None  # `last_checkin_at` on the monotonic clock (None: unknown)
    pending_credits: int = 0  # sum of unconfirmed local ledger deltas (spending is negative)


@dataclass(frozen=True, slots=True)
class CacheInfo:
    version: int
    synced_at: datetime | None  # None: the list was never synced (only imported or empty)


@dataclass(frozen=True, slots=True)
class Now:
    wall: datetime  # timezone-aware UTC
    trusted: bool  # the clock was synced since boot
    last_trusted: datetime | None = None  # the latest trusted wall time ever recorded
    instant: Instant | None = None  # the same moment on the monotonic clock

    def since(self, wall: datetime, instant: Instant | None) -> timedelta:
        """Time elapsed since an earlier moment: monotonic within one boot, so an NTP step does not change it;
        wall-clock time across boots (the monotonic clock restarts with the box)."""
        if instant is not None and self.instant is not None and instant.boot_id == self.instant.boot_id:
            return timedelta(microseconds=(self.instant.mono_ns - instant.mono_ns) // 1000)
        return self.wall - wall


@dataclass(frozen=True, slots=True)
class Policy:
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("America/Sao_Paulo"))
    second_tap: SecondTap = SecondTap.CHECKOUT
    # A second tap this soon after check-in is a nervous double tap, not a checkout.
    second_tap_grace: timedelta = timedelta(seconds=60)
    anti_passback: timedelta = timedelta(seconds=0)
    max_cache_age: timedelta = timedelta(hours=36)
    untrusted_clock: UntrustedClock = UntrustedClock.LAST_KNOWN
    enforce_hours_untrusted: bool = False
    credits_per_checkin: int = 1


@dataclass(frozen=True, slots=True)
class Decision:
    granted: bool
    action: Action
    reason: Reason
    member_id: str | None
    list_version: int
    session_id: str | None = None  # the session closed by a checkout
    credits_after: int | None = None  # effective balance after this decision, when the plan counts credits
    cost: int = 0  # credits this decision spends (recorded in the ledger)
