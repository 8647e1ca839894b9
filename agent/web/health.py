"""`GET /api/v1/health/integrations`: how each outbox destination is doing, in the reference document's words
(healthy / unhealthy, with latency) plus `degraded` for a destination that answers but leaves work behind.

Passive: it reports what the outbox workers saw on their real calls (latency timed around `send`, last call
failed or not, breaker) and what the store holds (pending, dead, oldest pending); it never calls a destination
itself. Unauthenticated like /readyz, for local staff and monitoring: it carries no secret, no card or member
data, and error texts cut to ERROR_CHARS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..store.db import Database
from ..sync import feed
from ..sync.outbox import WorkerStatus
from ..sync.status import DestinationState, Health, destination_states, judge, known_destinations, worst

CACHE_S = 1.0  # store counts are reused this long: a monitor polling every second costs one query round
ERROR_CHARS = 200
NOT_RUNNING = "enabled but not running: its secrets are missing (see the agent's log at start)"
DISABLED = "disabled in the config, with delivery rows still pending for it"


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class IntegrationHealth:
    def __init__(
        self,
        db: Database,
        configured: Sequence[str],
        workers: Callable[[], Mapping[str, WorkerStatus]],
        now_ms: Callable[[], int],
        *,
        feed_configured: bool,
        storage: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self._storage = storage
        self._db = db
        self._configured = tuple(configured)
        self._workers = workers
        self._now_ms = now_ms
        self._feed_configured = feed_configured
        self._cached: tuple[float, list[DestinationState], feed.FeedState] | None = None

    async def _store(self) -> tuple[list[DestinationState], feed.FeedState]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > CACHE_S:
            names = sorted(set(self._configured) | set(await known_destinations(self._db)))
            self._cached = (now, await destination_states(self._db, names), await feed.state(self._db))
        return self._cached[1], self._cached[2]

    async def snapshot(self) -> dict[str, Any]:
        states, feed_state = await self._store()
        workers = self._workers()
        now = self._now_ms()
        out: dict[str, Any] = {}
        for s in states:
            if s.destination not in self._configured and s.destination not in workers and not s.pending:
                continue  # a destination switched off, with nothing left waiting for it
            w = workers.get(s.destination)
            age = None if s.oldest_pending_ms is None else max(0.0, (now - s.oldest_pending_ms) / 1000)
            if w is None:
                why = NOT_RUNNING if s.destination in self._configured else DISABLED
                out[s.destination] = self._entry(s, age, why, None, running=False)
                continue
            # The worker's memory is fresher; the store's covers what happened before this start.
            last_error, last_error_ms = (
                (w.last_error, w.last_error_ms) if w.last_error else (s.last_error, s.last_error_ms)
            )
            out[s.destination] = {
                **self._entry(s, age, last_error, last_error_ms, running=True, worker=w),
                "latency_ms": _ms(w.last_latency_ms),
                "latency_median_ms": _ms(w.median_latency_ms),
                "consecutive_failures": w.consecutive_failures,
                "last_call_at": _iso(w.last_call_ms),
                "last_success_at": _iso(w.last_success_ms or s.last_success_ms),
            }
        overall = worst(Health(v["status"]) for v in out.values())
        return {
            "status": overall.value,
            "checked_at": _iso(now),
            "integrations": out,
            "storage": self._storage(),  # the one budget (media.budget_mb): level ok, warn, critical, over
            "pull_feed": {
                "configured": self._feed_configured,
                "acked_upto": feed_state.acked_upto,
                "acked_at": _iso(feed_state.acked_at_ms),
                "newest_seq": feed_state.newest_seq,
                "lag": feed_state.lag,
            },
        }

    @staticmethod
    def _entry(
        s: DestinationState,
        age: float | None,
        last_error: str | None,
        last_error_ms: int | None,
        *,
        running: bool,
        worker: WorkerStatus | None = None,
    ) -> dict[str, Any]:
        breaker = worker.breaker if worker is not None else None
        status = judge(
            running=running,
            breaker=breaker,
            last_call_ok=worker.last_call_ok if worker is not None else None,
            dead=s.dead,
            oldest_pending_age_s=age,
        )
        return {
            "status": status.value,
            "latency_ms": None,
            "latency_median_ms": None,
            "breaker": breaker,
            "consecutive_failures": None,
            "pending": s.pending,
            "dead": s.dead,
            "oldest_pending_age_s": None if age is None else round(age, 1),
            "last_call_at": None,
            "last_success_at": _iso(s.last_success_ms),
            "last_error": last_error[:ERROR_CHARS] if last_error else None,
            "last_error_at": _iso(last_error_ms),
        }

    async def view(self, _: web.Request) -> web.Response:
        return web.json_response(await self.snapshot(), headers={"Cache-Control": "no-store"})
