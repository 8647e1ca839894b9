"""The club cloud (DESIGN 2.3): OAuth2 client-credentials tokens, signed bodies, event batches, member pages.

The token is cached and renewed before it expires (5 minutes before, or at half its life when it lives shorter);
a 401 renews it once and retries. Every body is signed: `X-Timestamp` and
`X-Signature = hex(HMAC-SHA256(secret, "{timestamp}.{body}"))`. Secrets never reach a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import httpx

from ..config import CloudSection
from ..logs import get_logger
from .delivery import OutboxEvent, Result, Transient, Unauthorized, Verdict, judge, network_error

log = get_logger("agent.sync.cloud")

RENEW_BEFORE_S = 300.0
DEFAULT_LIFETIME_S = 300.0  # a token's lifetime when the answer gives no usable expires_in
EVENTS_BATCH = 200
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


class TokenSource:
    """Client-credentials tokens from the cloud's Keycloak, cached until shortly before they expire."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        token_url: str,
        client_id: str,
        client_secret: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._url = token_url
        self._form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self, *, renew: bool = False) -> str:
        async with self._lock:
            if renew or self._token is None or self._clock() >= self._renew_at:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def _fetch(self) -> None:
        try:
            response = await self._client.post(self._url, data=self._form, timeout=TIMEOUT)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a redirect to a bad Location
            raise network_error(exc) from exc
        try:
            body = judge(response)
        except Unauthorized as exc:
            # Our own credentials are refused: retried (an operator may fix the secrets), but said loudly.
            raise Transient(f"token endpoint refused the client credentials: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise Transient("token endpoint answered without an access_token")
        if not body["access_token"].isascii():  # it goes in a header, which httpx encodes as ASCII
            raise Transient("token endpoint answered an unusable access_token")
        lifetime = _lifetime(body.get("expires_in"))
        self._token = body["access_token"]
        self._renew_at = self._clock() + max(lifetime - RENEW_BEFORE_S, lifetime / 2)


def _lifetime(value: Any) -> float:
    """expires_in in seconds: DEFAULT_LIFETIME_S unless it is a finite positive number (or such a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return DEFAULT_LIFETIME_S
    try:
        seconds = float(value)
    except (ValueError, OverflowError):  # "1h"; an integer too large for a float
        return DEFAULT_LIFETIME_S
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_LIFETIME_S


class CloudClient:
    """Calls to the club cloud with a bearer token (renewed once on 401) and, when there is a body, its
    signature. Shared by the event destination and member sync, so both speak to the cloud one way."""

    def __init__(
        self,
        section: CloudSection,
        client_secret: str,
        signing_secret: str,
        client: httpx.AsyncClient | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._base = section.base_url.rstrip("/")
        self._client = client or httpx.AsyncClient()
        self._tokens = TokenSource(self._client, section.token_url, section.client_id, client_secret)
        self._secret = signing_secret.encode()
        self._wall = wall

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        """The decoded answer; Transient, Permanent (delivery.judge) or a network error as Transient."""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        for attempt in (1, 2):
            token = await self._tokens.token(renew=attempt == 2)
            headers = {"Authorization": f"Bearer {token}"}
            if body is not None:
                stamp = int(self._wall())
                headers |= {
                    "Content-Type": "application/json",
                    "X-Timestamp": str(stamp),
                    "X-Signature": sign(self._secret, stamp, data),
                }
            try:
                response = await self._client.request(
                    method, self._base + path, content=data or None, params=params, headers=headers, timeout=TIMEOUT
                )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a redirect to a bad Location
                raise network_error(exc) from exc
            try:
                return judge(response)
            except Unauthorized as exc:
                if attempt == 2:
                    raise Transient(f"cloud refused a fresh token: {exc}") from exc
        raise AssertionError("unreachable")


class CloudDestination:
    """Delivers events to POST /edge/events in signed batches; per-event accept/duplicate/reject."""

    name = "cloud"
    batch_size = EVENTS_BATCH

    def __init__(
        self,
        section: CloudSection,
        client_secret: str,
        signing_secret: str,
        device_id: str,
        client: httpx.AsyncClient | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._cloud = CloudClient(section, client_secret, signing_secret, client, wall)
        self._device_id = device_id

    async def aclose(self) -> None:
        await self._cloud.aclose()

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        """A call to the cloud with a token (renewed once on 401) and, when there is a body, its signature."""
        return await self._cloud.request(method, path, body, params)

    async def send(self, events: list[OutboxEvent]) -> list[Result]:
        answer = await self.request(
            "POST", "/edge/events", {"device_id": self._device_id, "events": [e.wire() for e in events]}
        )
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            raise Transient("cloud answered /edge/events without results")
        # A result whose event_id is not a string answers for no event (which is retried), and cannot be a key.
        by_id = {r["event_id"]: r for r in results if isinstance(r, dict) and isinstance(r.get("event_id"), str)}
        out = []
        for event in events:
            r = by_id.get(event.event_id)
            status = r.get("status") if r else None
            if status in ("accepted", "duplicate"):
                out.append(Result(event.seq, Verdict.DELIVERED))
            elif status == "rejected":
                out.append(Result(event.seq, Verdict.DEAD, f"rejected by the cloud: {r.get('reason') if r else ''}"))
            else:
                out.append(Result(event.seq, Verdict.RETRY, "no answer for this event"))
        return out
