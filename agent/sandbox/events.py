"""The club cloud's event inbox: `POST /edge/events`, signed batches answered event by event.

One bad event never fails its batch: it is rejected with a reason and the rest are judged on their own, which is
what lets the agent's outbox dead-letter exactly the poisoned item. Acceptance is remembered forever per
`(device_id, event_id)`, so an at-least-once sender still lands each event exactly once; a re-send whose content
differs from the first copy is still a duplicate, flagged so that a client bug shows.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError

from .errors import ApiError
from .signing import verify
from .tokens import require_bearer
from .wire import dumps, explain, instant, json_response, parse_json, read_body, text

if TYPE_CHECKING:
    from .state import Sandbox

BODY_CAP = 8 * 1024 * 1024
EVENT_TYPES = frozenset(
    {
        "access.decided",
        "session.started",
        "session.ended",
        "consumption.recorded",
        "consumption.voided",
        "highlight.created",
        "highlight.clip_unavailable",
        "clock.corrected",
    }
)
_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

DeviceId = Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=128)]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: Annotated[str, StringConstraints(pattern=_UUID)]
    seq: int = Field(ge=0)
    type: str
    occurred_at: Annotated[datetime, BeforeValidator(instant)]
    mono_ns: int = Field(ge=0)
    boot_id: Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=64)]
    clock_synced: bool
    session_id: Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=128)] | None = None
    data: dict[str, Any]


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    device_id: DeviceId
    events: list[Any]


def _fingerprint(event: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(json.loads(dumps(event)), sort_keys=True).encode()).hexdigest()


class EventInbox:
    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self._seen: dict[tuple[str, str], str] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def judge(self, device_id: str, raw: Any) -> tuple[dict[str, Any], Event | None]:
        """One event's result, and the event itself when it is accepted now (not before)."""
        event_id = raw.get("event_id") if isinstance(raw, dict) else None
        result: dict[str, Any] = {"event_id": event_id if isinstance(event_id, str) else None}
        if not isinstance(raw, dict):
            return {**result, "status": "rejected", "reason": "malformed", "detail": "an event is a JSON object"}, None
        kind = raw.get("type")
        if isinstance(kind, str) and kind not in EVENT_TYPES:
            detail = f"type '{kind}' is not one of {', '.join(sorted(EVENT_TYPES))}"
            return {**result, "status": "rejected", "reason": "unknown_type", "detail": detail}, None
        try:
            event = Event.model_validate(raw)
        except ValidationError as exc:
            return {**result, "status": "rejected", "reason": "malformed", "detail": explain(exc)}, None
        key = (device_id, event.event_id.lower())
        print_ = _fingerprint(raw)
        first = self._seen.get(key)
        if first is not None:
            if first != print_:
                detail = "already accepted with different content; the first copy stands"
                return {**result, "status": "duplicate", "reason": "conflicting_duplicate", "detail": detail}, None
            return {**result, "status": "duplicate"}, None
        self._seen[key] = print_
        return {**result, "status": "accepted"}, event


def routes(sandbox: Sandbox) -> list[web.RouteDef]:
    async def events(request: web.Request) -> web.Response:
        require_bearer(sandbox, request)
        raw = await read_body(request, cap=BODY_CAP)
        options = sandbox.options
        verify(
            options.signing_secret, request.headers, raw, now=sandbox.clock.now(), window_s=options.signature_window_s
        )
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_body", "expected a JSON object {device_id, events}")
        try:
            envelope = Envelope.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, "invalid_body", explain(exc)) from exc
        inbox = sandbox.inbox
        if len(envelope.events) > inbox.max_batch:
            raise ApiError(413, "batch_too_large", f"{len(envelope.events)} events; at most {inbox.max_batch} a batch")
        results = []
        for item in envelope.events:
            result, accepted = inbox.judge(envelope.device_id, item)
            results.append(result)
            if accepted is not None:
                sandbox.record_event(request, envelope.device_id, accepted)
        return json_response({"results": results})

    return [web.post("/edge/events", events, name="cloud.events")]
