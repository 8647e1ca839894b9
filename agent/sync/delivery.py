"""What a destination is given and what it answers, and how an HTTP answer is judged (DESIGN 2.2).

Network errors, timeouts, 408, 429 and 5xx are transient: retried with backoff (429's Retry-After honoured).
401 renews credentials once (inside the destination). Any other 4xx is permanent for that event: it goes to the
dead-letter state with the reason and never blocks the rest. A 2xx whose body cannot be read is transient: the
call may have acted, and the idempotency key (Ziggy) or the event id (cloud) makes the retry safe.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    seq: int
    event_id: str
    type: str
    occurred_at: int  # ms since the epoch, as stamped
    mono_ns: int
    boot_id: str
    clock_synced: bool
    session_id: str | None
    device_id: str | None
    data: dict[str, Any]
    attempts: int
    first_attempt_at: int | None  # ms

    def wire(self) -> dict[str, Any]:
        """The event as the cloud contract carries it."""
        return {
            "event_id": self.event_id,
            "seq": self.seq,
            "type": self.type,
            "occurred_at": datetime.fromtimestamp(self.occurred_at / 1000, UTC).isoformat(timespec="milliseconds"),
            "mono_ns": self.mono_ns,
            "boot_id": self.boot_id,
            "clock_synced": self.clock_synced,
            "session_id": self.session_id,
            "data": self.data,
        }


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Result:
    seq: int
    verdict: Verdict
    reason: str | None = None


class Transient(Exception):
    """The whole call failed in a way worth retrying (network, timeout, 408/429/5xx, unreadable answer)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Permanent(Exception):
    """The destination refused this request for good (4xx other than 401/408/429)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Unauthorized(Exception):
    """401: credentials to renew (once) before the call is retried."""


class Destination(Protocol):
    name: str
    batch_size: int

    async def send(self, events: list[OutboxEvent]) -> list[Result]:
        """Deliver `events` (in seq order, at most batch_size); raise Transient when the call as a whole failed."""
        ...

    async def aclose(self) -> None: ...


MAX_RETRY_AFTER_S = 86_400.0  # a longer Retry-After is capped: the delay must stay waitable and storable


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, within 0 .. MAX_RETRY_AFTER_S; None when absent or unusable (nan, inf, garbage).

    A date is on the server's clock: it is read against the answer's own `Date`, not against ours, which on a
    Pi without an RTC may be hours behind until NTP syncs (and would turn "in 30 s" into the one-day cap)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - _server_now(response)).total_seconds()
        except (TypeError, ValueError, OverflowError):  # OverflowError: a year past datetime's
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _server_now(response: httpx.Response) -> datetime:
    """When the server answered, by its `Date` header; by our clock when it sent none we can read."""
    stamp = response.headers.get("Date")
    if stamp is not None:
        try:
            when = parsedate_to_datetime(stamp)
        except (TypeError, ValueError, OverflowError):
            pass
        else:
            if when.tzinfo is not None:
                return when
    return datetime.now(UTC)


def judge(response: httpx.Response) -> dict[str, Any] | list[Any]:
    """The decoded JSON of a successful answer, or the exception that says what to do."""
    status = response.status_code
    if status == 401:
        raise Unauthorized(_brief(response))
    if status in (408, 429) or status >= 500:
        raise Transient(f"HTTP {status}: {_brief(response)}", retry_after(response))
    if status >= 400:
        raise Permanent(f"HTTP {status}: {_brief(response)}", status)
    try:
        body: dict[str, Any] | list[Any] = json.loads(response.content) if response.content else {}
    # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer too long to convert; RecursionError
    # a body nested deeper than the json module reads
    except (ValueError, RecursionError) as exc:
        raise Transient(f"HTTP {status} with an unreadable body ({exc.__class__.__name__})") from exc
    if not isinstance(body, dict | list):
        raise Transient(f"HTTP {status} with an unexpected body: {str(body)[:80]}")
    return body


def _brief(response: httpx.Response) -> str:
    try:
        doc = json.loads(response.content)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, an integer too long
        return response_text(response)[:160]
    if isinstance(doc, dict):
        return str(doc.get("detail") or doc.get("error") or doc)[:160]
    return str(doc)[:160]


def response_text(response: httpx.Response) -> str:
    """The answer's text; as UTF-8 when its charset cannot decode it."""
    try:
        return response.text
    # A charset naming a bytes-to-bytes codec (rot13, base64, hex, zlib) makes httpx raise TypeError or
    # AssertionError (LookupError and ValueError for the rest of what a codec may do): read it as UTF-8 then.
    except (TypeError, AssertionError, LookupError, ValueError):
        return response.content.decode("utf-8", "replace")


def network_error(exc: httpx.HTTPError | httpx.InvalidURL) -> Transient:
    return Transient(f"{exc.__class__.__name__}: {exc}"[:200])
