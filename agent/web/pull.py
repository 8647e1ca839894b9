"""The pull feed over HTTP (DESIGN 2.4), for the club cloud only.

    GET  /api/v1/sync/changes?after={seq}&limit={n}   events with seq > after, in seq order
    POST /api/v1/sync/ack  {"upto": seq}               the cloud holds everything up to seq

Authentication is `Authorization: Bearer <cloud_pull_token>` (secrets file), compared in constant time; no
other token reads the feed. Without the secret the feed answers 503 `pull_feed_not_configured`. Errors are
JSON `{"error": code, "detail": text}` with a stable code.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..metrics import Metrics
from ..store.db import Database
from ..sync import feed

_INT = re.compile(r"[0-9]{1,18}")  # below 2**63: SQLite's integers
_NO_STORE = {"Cache-Control": "no-store"}


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers={**_NO_STORE, **(headers or {})})


class PullFeedApi:
    def __init__(self, db: Database, token: str | None, metrics: Metrics, now_ms: Callable[[], int]) -> None:
        self._db = db
        self._token = token.encode() if token is not None else None
        self._metrics = metrics
        self._now_ms = now_ms

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/sync/changes", self.changes, allow_head=False),
            web.post("/api/v1/sync/ack", self.ack),
        ]

    def _refused(self, request: web.Request) -> web.Response | None:
        """The answer for a caller who may not read the feed; None for the cloud."""
        if self._token is None:
            return error(
                503,
                "pull_feed_not_configured",
                "the pull feed is off: set cloud_pull_token in the agent's secrets file",
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return error(
                401,
                "missing_token",
                "send Authorization: Bearer <cloud_pull_token>",
                {"WWW-Authenticate": 'Bearer realm="club-agent"'},
            )
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token):
            return error(
                401,
                "invalid_token",
                "the bearer token is not this agent's cloud_pull_token",
                {"WWW-Authenticate": 'Bearer realm="club-agent", error="invalid_token"'},
            )
        return None

    async def changes(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            after = _int_param(request, "after", 0, 0, None)
            limit = _int_param(request, "limit", feed.DEFAULT_LIMIT, 1, feed.MAX_LIMIT)
        except _BadParam as exc:
            return error(400, "invalid_parameter", str(exc))
        state = await feed.state(self._db)
        newest = state.newest_seq
        if after > newest:
            return error(
                409,
                "after_beyond_newest",
                f"after={after} is beyond this log's newest seq {newest}: the cursor is not from this agent's "
                f"event log (was its store replaced?); start again from the acknowledged seq or 0",
            )
        page = await feed.page(self._db, after, limit)
        self._metrics.pull_feed_events.inc(page.count)
        self._metrics.pull_feed_acked.set(state.acked_upto)
        head = (
            f'{{"after":{after},"next_after":{page.next_after},"has_more":{"true" if page.has_more else "false"},'
            f'"count":{page.count},"newest_seq":{max(newest, page.next_after)},"acked_upto":{state.acked_upto},'
            f'"events":'
        )
        response = web.Response(
            body=head.encode() + page.events_json + b"}", content_type="application/json", headers=_NO_STORE
        )
        response.enable_compression()  # when the cloud accepts it: event JSON shrinks about tenfold
        return response

    async def ack(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body: Any = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "invalid_body", 'expected a JSON object {"upto": seq}')
        upto = body.get("upto") if isinstance(body, dict) else None
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            return error(400, "invalid_body", 'expected {"upto": seq} with seq a non-negative integer')
        outcome = await feed.ack(self._db, upto, self._now_ms())
        if outcome.beyond_newest:
            return error(
                409,
                "ack_beyond_newest",
                f"upto={upto} is beyond this log's newest seq {outcome.newest_seq}: acknowledge only seqs "
                f"the feed served (nothing was recorded)",
            )
        self._metrics.pull_feed_acked.set(outcome.acked_upto)
        return web.json_response(
            {"acked_upto": outcome.acked_upto, "changed": outcome.changed, "newest_seq": outcome.newest_seq},
            headers=_NO_STORE,
        )


class _BadParam(ValueError):
    pass


def _int_param(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise _BadParam(f"{name} is given {len(values)} times; give it once")
    raw = values[0]
    shown = raw if len(raw) <= 24 else raw[:24] + "..."
    expected = f"an integer {low}-{high}" if high is not None else f"a non-negative integer (a seq, {low} or more)"
    if not _INT.fullmatch(raw):
        raise _BadParam(f"{name}={shown!r}: expected {expected}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise _BadParam(f"{name}={value}: expected {expected}")
    return value
