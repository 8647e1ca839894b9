"""Body signatures of the agent->cloud calls: `X-Signature = hex(HMAC-SHA256(secret, f"{X-Timestamp}.{body}"))`.

The signature covers the raw bytes as sent, so the check runs before any parsing. Freshness is judged against
sandbox time: a Pi whose clock has not synced yet gets `stale_timestamp`, with the server's time in the detail
so the cause is visible.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from multidict import CIMultiDictProxy

from .clock import iso
from .errors import unauthorized

_TIMESTAMP = re.compile(r"\d{1,12}")
_HEX = re.compile(r"[0-9a-fA-F]{64}")


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: str, headers: CIMultiDictProxy[str], body: bytes, *, now: float, window_s: float) -> None:
    timestamp, signature = _headers(headers)
    check(sign(secret, timestamp, body), signature)
    fresh(timestamp, now=now, window_s=window_s)


class Streamed:
    """A signature checked on a body read in pieces (a tus chunk): headers and freshness first, before any byte
    is read; `update` with each piece; `check` at the end."""

    def __init__(self, secret: str, headers: CIMultiDictProxy[str], *, now: float, window_s: float) -> None:
        timestamp, self._signature = _headers(headers)
        fresh(timestamp, now=now, window_s=window_s)
        self._mac = hmac.new(secret.encode(), f"{timestamp}.".encode(), hashlib.sha256)

    def update(self, piece: bytes) -> None:
        self._mac.update(piece)

    def check(self) -> None:
        check(self._mac.hexdigest(), self._signature)


def _headers(headers: CIMultiDictProxy[str]) -> tuple[str, str]:
    timestamp = headers.get("X-Timestamp")
    signature = headers.get("X-Signature")
    if timestamp is None or signature is None:
        raise unauthorized("bad_signature", "missing X-Timestamp or X-Signature header")
    timestamp = timestamp.strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        raise unauthorized("bad_signature", "X-Timestamp must be unix seconds (an integer)")
    if not _HEX.fullmatch(signature.strip()):
        raise unauthorized("bad_signature", "X-Signature must be 64 hex digits of HMAC-SHA256")
    return timestamp, signature.strip().lower()


def check(expected: str, signature: str) -> None:
    if not hmac.compare_digest(expected, signature):
        raise unauthorized("bad_signature", "signature does not match HMAC-SHA256(secret, '{X-Timestamp}.{body}')")


def fresh(timestamp: str, *, now: float, window_s: float) -> None:
    skew = int(timestamp) - now
    if abs(skew) > window_s:
        raise unauthorized(
            "stale_timestamp",
            f"X-Timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} server time {iso(now)} "
            f"(window {window_s:.0f} s)",
        )
