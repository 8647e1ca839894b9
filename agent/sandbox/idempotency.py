"""Ziggy's idempotency keys: a repeated key with the same request replays the first answer and acts no more.

Only successful answers are stored (as Stripe does for requests that ran): a request refused with 409 acted on
nothing, so its retry is judged afresh. Keys are forgotten `ttl_s` of sandbox time after first use, which is how
the sandbox shows the agent's "older than a day: ask sessions/active first" rule is needed.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .wire import dumps

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Stored:
    fingerprint: str
    status: int
    body: str
    stored_at: float


def fingerprint(route: str, body: Any) -> str:
    """Canonical JSON, so key order and whitespace do not make a retry look like a different request."""
    canonical = json.dumps(json.loads(dumps(body)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise ApiError(400, "invalid_idempotency_key", f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII")
    return key


class IdempotencyStore:
    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._stored: OrderedDict[tuple[str, str], Stored] = OrderedDict()  # insertion order = age order

    def __len__(self) -> int:
        return len(self._stored)

    def _expire(self, now: float) -> None:
        while self._stored:
            key, first = next(iter(self._stored.items()))
            if now - first.stored_at < self._ttl:
                return
            del self._stored[key]

    def lookup(self, scope: str, key: str, print_: str, now: float) -> Stored | None:
        """The stored answer for a repeat; 422 if the key was used for a different request."""
        self._expire(now)
        found = self._stored.get((scope, key))
        if found is None:
            return None
        if found.fingerprint != print_:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request (route or body)",
            )
        return found

    def store(self, scope: str, key: str, print_: str, status: int, body: str, now: float) -> None:
        self._stored[(scope, key)] = Stored(print_, status, body, now)
