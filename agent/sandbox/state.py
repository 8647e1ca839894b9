"""The sandbox's whole state in one object, so `POST /_sandbox/reset` is one call and handlers read it fresh.

Handlers hold the `Sandbox`, never its parts: a reset swaps the parts, and a handler that captured the old inbox
would keep de-duplicating against a cloud that no longer exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from .claim import Claims
from .clock import SandboxClock
from .events import Event, EventInbox
from .faults import FaultPlan
from .idempotency import IdempotencyStore
from .members import Entry, MemberFeed, seeded_members
from .options import MAX_EVENTS_PER_BATCH, SandboxOptions
from .received import ReceivedLog
from .tokens import TokenIssuer
from .tus import ClipStore
from .ziggy import Ziggy

# Per-request notes: the fault drawn for it, and its entry in the received log (one per call).
FAULT = web.RequestKey("sandbox.fault", str)
CALL = web.RequestKey("sandbox.call", dict[str, Any])


class Sandbox:
    def __init__(self, options: SandboxOptions, clock: SandboxClock | None = None) -> None:
        self.options = options
        self.clock = clock or SandboxClock()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # told of each received-log entry once complete
        # Generated once: a reset of a 100,000-member sandbox copies this instead of generating again.
        self._seeded: list[tuple[str, Entry]] = seeded_members(options.members, options.seed)
        self.clips = ClipStore(options.clips_dir, options.clip_max_bytes)
        self.reset()

    def reset(self) -> None:
        """Back to the state at start: seeded members (new cursor epoch), no sessions, no tokens, no clips, start
        faults."""
        options = self.options
        self.clock.reset()
        self.log = ReceivedLog()
        self.faults = FaultPlan(options.faults, options.seed if options.fault_seed is None else options.fault_seed)
        self.tokens = TokenIssuer(options.token_ttl_s)
        self.idempotency = IdempotencyStore(options.idempotency_ttl_s)
        self.ziggy = Ziggy(dict(options.courts))
        self.feed = MemberFeed(self._seeded)
        self.inbox = EventInbox(MAX_EVENTS_PER_BATCH)
        self.claims = Claims(options.claim_tokens, self.clock.now())
        self.clips.close()  # a few clip files of a test or a demo: removed inline, the reset answers after
        self.clips = ClipStore(options.clips_dir, options.clip_max_bytes)

    def _notify(self, entry: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(entry)

    def record_call(self, request: web.Request, **fields: Any) -> dict[str, Any]:
        """Create or complete this request's entry in the received log."""
        entry = request.get(CALL)
        if entry is None:
            entry = self.log.add(
                "call",
                self.clock.iso(),
                route=request.match_info.route.name,
                method=request.method,
                path=request.path_qs,
                status=None,
                acted=False,
                fault=request.get(FAULT),
                idempotency_key=request.headers.get("Idempotency-Key"),
                replayed=False,
                error=None,
                effect=None,
            )
            request[CALL] = entry
        entry.update(fields)
        return entry

    def finish(self, request: web.Request) -> None:
        """Tell listeners about this request's call entry, now that it is complete (faulted calls start early)."""
        entry = request.get(CALL)
        if entry is not None:
            self._notify(entry)

    def record_event(self, request: web.Request, device_id: str, event: Event) -> None:
        entry = self.log.add(
            "event",
            self.clock.iso(),
            device_id=device_id,
            event_id=event.event_id,
            seq=event.seq,
            type=event.type,
            session_id=event.session_id,
            occurred_at=event.occurred_at.isoformat(),
            clock_synced=event.clock_synced,
            data=event.data,
            fault=request.get(FAULT),
        )
        self._notify(entry)
