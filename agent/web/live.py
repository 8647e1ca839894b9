"""Live updates for the pages: server-sent events from what the agent publishes anyway.

The hub listens, in-process, on the messages the dispatcher publishes (court screens, reader answers, device
presence: `Dispatcher.listen`), so a page hears a tap as fast as the reader does, also while the broker link is
down, and nothing is decided twice to feed it. Each browser gets a bounded queue: a page that stops reading is
dropped (it reconnects by itself and starts from the current state) rather than growing the agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from ..lan import topics
from ..logs import get_logger

log = get_logger("agent.web.live")

QUEUE_MAX = 256  # events waiting for one page; beyond this the page is dropped
KEEPALIVE_S = 15.0  # a comment line now and then: proxies and tablets keep the connection open


class _Listener(Protocol):
    def listen(self, topic: str, listener: Callable[[bytes], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class LiveEvent:
    kind: str  # court, decision, device
    court_id: str | None
    data: dict[str, Any]

    def encode(self) -> bytes:
        return f"event: {self.kind}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n".encode()


@dataclass(eq=False)
class _Subscriber:
    courts: frozenset[str] | None  # None: every court
    devices: bool
    queue: asyncio.Queue[LiveEvent | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))

    def wants(self, event: LiveEvent) -> bool:
        if event.kind == "device":
            return self.devices
        return self.courts is None or event.court_id in self.courts


class LiveHub:
    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()

    def attach(
        self,
        source: _Listener,
        courts: Iterable[str],
        readers: Iterable[tuple[str, str | None]],
        devices: Iterable[str],
    ) -> None:
        """Listen on the court screens, the readers' answers ((reader id, court) pairs; a bar's reader has no
        court, and its answers carry `pos`) and devices' presence."""
        for court_id in courts:
            source.listen(topics.court_state(court_id), self._court(court_id))
        for reader_id, reader_court in readers:
            source.listen(topics.reader_response(reader_id), self._decision(reader_id, reader_court))
        for device_id in devices:
            source.listen(topics.presence(device_id), self._device)

    # The listeners run on the decision path (as the answer is published): with no page open they cost a check.

    def _court(self, court_id: str) -> Callable[[bytes], None]:
        def forward(payload: bytes) -> None:
            if self._subscribers:
                self.publish(LiveEvent("court", court_id, json.loads(payload)))

        return forward

    def _decision(self, reader_id: str, court_id: str | None) -> Callable[[bytes], None]:
        def forward(payload: bytes) -> None:
            if not self._subscribers:
                return
            answer = json.loads(payload)
            self.publish(LiveEvent("decision", court_id, {"reader_id": reader_id, "court_id": court_id, **answer}))

        return forward

    def _device(self, payload: bytes) -> None:
        if self._subscribers:
            self.publish(LiveEvent("device", None, json.loads(payload)))

    def publish(self, event: LiveEvent) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.wants(event):
                continue
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:  # a page that stopped reading: let it go, it reconnects
                self._subscribers.discard(subscriber)
                with contextlib.suppress(asyncio.QueueFull):
                    subscriber.queue.get_nowait()
                    subscriber.queue.put_nowait(None)

    def close(self) -> None:
        """End every page's stream (the agent is stopping): each browser reconnects by itself to the next agent,
        and the HTTP server's shutdown does not wait on streams that never end."""
        for subscriber in list(self._subscribers):
            self._subscribers.discard(subscriber)
            while True:
                try:
                    subscriber.queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    subscriber.queue.get_nowait()

    @property
    def pages(self) -> int:
        return len(self._subscribers)

    async def stream(
        self, request: web.Request, courts: frozenset[str] | None, devices: bool, snapshot: list[LiveEvent]
    ) -> web.StreamResponse:
        """Serve one page: the current state first, then every change, until the page goes away."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        subscriber = _Subscriber(courts, devices)
        self._subscribers.add(subscriber)
        try:
            await response.write(b"retry: 1000\n\n")  # the browser reconnects after a second when cut
            for event in snapshot:
                if subscriber.wants(event):
                    await response.write(event.encode())
            while True:
                try:
                    item = await asyncio.wait_for(subscriber.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                await response.write(item.encode())
        except ConnectionResetError:  # the page went away
            pass
        finally:
            self._subscribers.discard(subscriber)
        return response
