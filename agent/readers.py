"""Readers and button boxes attached to the box (`[[readers]]`), hosted in-process.

Each gets its firmware_bridges adapter and a `Bridge` whose link is the dispatcher itself: a card read enters
the decision queue exactly as an `rfid/{id}/scan` from the LAN does (same validation, rate limit, decision and
answer), and the answer comes back as the reader's granted/denied feedback. An adapter that fails (a bug, not a
link problem, which adapters handle themselves) is logged and restarted after a pause: one broken reader never
takes the others or the agent down.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from typing import Protocol

from pydantic import SecretStr

from firmware_bridges.bridge import Bridge, Link, Listener, Role
from firmware_bridges.device import ButtonPress, CardRead, DeviceEvent, Fault
from firmware_bridges.registry import ReaderSpec, build_all

from .config import ReaderConfig
from .logs import OnceLogger, get_logger

log = get_logger("agent.readers")

RESTART_PAUSE_S = 5.0


def reader_spec(reader: ReaderConfig, key: str | None = None) -> ReaderSpec:
    return ReaderSpec(
        name=reader.id,
        kind=reader.kind,
        port=reader.port,
        path=reader.path,
        baud=reader.baud,
        format=reader.format,
        address=reader.address,
        key=key,
        install_mode=reader.install_mode,
        feedback=reader.feedback,
    )


class _Dispatcher(Protocol):
    async def publish_local(self, topic: str, payload: bytes) -> None: ...

    def listen(self, topic: str, listener: Listener) -> None: ...


class DispatcherLink:
    """The in-process link: messages go straight into the dispatcher, answers come straight back."""

    def __init__(self, dispatcher: _Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def publish(self, topic: str, payload: bytes) -> None:
        await self._dispatcher.publish_local(topic, payload)

    def listen(self, topic: str, listener: Listener) -> None:
        self._dispatcher.listen(topic, listener)


def _key(keys: Mapping[str, SecretStr], reader_id: str) -> str | None:
    secret = keys.get(reader_id)
    return secret.get_secret_value() if secret is not None else None


def _card_hash(card_id: str) -> str:
    return hashlib.sha256(card_id.encode()).hexdigest()[:12]  # logs never carry card ids


class AttachedReaders:
    def __init__(self, readers: list[ReaderConfig], link: Link, keys: Mapping[str, SecretStr] | None = None) -> None:
        self._readers = readers
        keys = keys or {}
        self._adapters = build_all([reader_spec(r, _key(keys, r.id)) for r in readers])
        self._link = link
        self._once = OnceLogger(log)
        self.bridges: dict[str, Bridge] = {}

    def _logger(self, reader: ReaderConfig) -> Callable[[DeviceEvent], None]:
        def on_event(event: DeviceEvent) -> None:
            if isinstance(event, CardRead):
                log.debug("reader_card_read", reader=reader.id, card=_card_hash(event.card_id), format=event.format)
            elif isinstance(event, ButtonPress):
                log.debug("reader_button_press", reader=reader.id, button=event.button, long=event.long)
            elif isinstance(event, Fault):
                key = f"{reader.id}:{event.reason[:40]}"
                self._once.warning("reader_fault", key, reader=reader.id, reason=event.reason)
            else:
                log.info(
                    "reader_status",
                    reader=reader.id,
                    status=type(event).__name__.lower(),
                    detail=getattr(event, "detail", ""),
                )

        return on_event

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for reader in self._readers:
                tg.create_task(self._supervise(reader), name=f"reader-{reader.id}")

    async def _supervise(self, reader: ReaderConfig) -> None:
        role = Role("button" if reader.kind == "buttonbox" else "reader", reader.id, reader.court)
        adapter = self._adapters[reader.id]
        if isinstance(adapter, ValueError):
            log.error("reader_not_started", reader=reader.id, error=str(adapter))
            return
        bridge = Bridge(adapter, role, self._link, on_event=self._logger(reader))
        self.bridges[reader.id] = bridge
        while True:
            try:
                log.info("reader_started", reader=reader.id, kind=reader.kind, court=reader.court)
                await bridge.run()
            except Exception:
                log.exception("reader_crashed", reader=reader.id, restart_in_s=RESTART_PAUSE_S)
            await asyncio.sleep(RESTART_PAUSE_S)
