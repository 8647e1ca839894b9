"""Simulated LAN devices that speak the real MQTT contract: used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self

import aiomqtt

from .lan import topics

REPLY_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Reply:
    payload: dict[str, Any]
    latency_s: float


class SimDevice:
    """One device connection that sends requests and waits for the matching reply (by msg_id)."""

    def __init__(self, client: aiomqtt.Client, device_id: str, reply_topic: str) -> None:
        self.client = client
        self.device_id = device_id
        self.reply_topic = reply_topic
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        await self.client.subscribe(self.reply_topic, qos=1)
        self._listener = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._listener

    async def _listen(self) -> None:
        async for message in self.client.messages:
            try:
                payload = json.loads(
                    bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else str(message.payload)
                )
            except json.JSONDecodeError:
                continue
            if not isinstance(payload, dict):
                continue
            future = self._waiting.pop(str(payload.get("msg_id")), None)
            if future is not None and not future.done():
                future.set_result(payload)

    async def request(self, topic: str, body: dict[str, Any], reply_within: float = REPLY_TIMEOUT_S) -> Reply:
        msg_id = body.setdefault("msg_id", uuid.uuid4().hex[:16])
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        started = time.perf_counter()
        try:
            await self.client.publish(topic, json.dumps(body), qos=1)
            payload = await asyncio.wait_for(future, reply_within)
        finally:
            self._waiting.pop(msg_id, None)
        return Reply(payload, time.perf_counter() - started)


class SimReader(SimDevice):
    async def tap(self, card_id: str, msg_id: str | None = None, reply_within: float = REPLY_TIMEOUT_S) -> Reply:
        body: dict[str, Any] = {"card_id": card_id}
        if msg_id is not None:
            body["msg_id"] = msg_id
        return await self.request(f"rfid/{self.device_id}/scan", body, reply_within)


class SimButton(SimDevice):
    def __init__(self, client: aiomqtt.Client, device_id: str, court_id: str) -> None:
        super().__init__(client, device_id, topics.button_ack(court_id))
        self.court_id = court_id

    async def press(self, kind: str = "short", reply_within: float = REPLY_TIMEOUT_S) -> Reply:
        return await self.request(
            f"court/{self.court_id}/button/pressed", {"button_id": self.device_id, "kind": kind}, reply_within
        )


class SimTablet(SimDevice):
    async def checkin(
        self,
        court_id: str,
        *,
        member_code: str | None = None,
        card_id: str | None = None,
        reply_within: float = REPLY_TIMEOUT_S,
    ) -> Reply:
        body: dict[str, Any] = {"tablet_id": self.device_id}
        if member_code is not None:
            body["member_code"] = member_code
        if card_id is not None:
            body["card_id"] = card_id
        return await self.request(f"court/{court_id}/checkin", body, reply_within)

    async def checkout(self, court_id: str, session_id: str, reply_within: float = REPLY_TIMEOUT_S) -> Reply:
        return await self.request(
            f"court/{court_id}/checkout", {"tablet_id": self.device_id, "session_id": session_id}, reply_within
        )

    async def order(
        self,
        items: list[dict[str, Any]],
        *,
        card_id: str | None = None,
        session_id: str | None = None,
        request_id: str | None = None,
        reply_within: float = REPLY_TIMEOUT_S,
    ) -> Reply:
        """A bar order on pos/{this tablet}/consumption; items: item_id, name, quantity, unit_price."""
        body: dict[str, Any] = {"items": items}
        if request_id is not None:
            body["msg_id"] = request_id
        if card_id is not None:
            body["card_id"] = card_id
        if session_id is not None:
            body["session_id"] = session_id
        return await self.request(f"pos/{self.device_id}/consumption", body, reply_within)

    async def heartbeat(self, battery: int = 80, app_version: str = "1.0.0") -> None:
        await self.client.publish(
            f"tablet/{self.device_id}/status", json.dumps({"battery": battery, "app_version": app_version}), qos=0
        )


@asynccontextmanager
async def connect(
    host: str, port: int, username: str, password: str, *, keepalive: int = 30, identifier: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        keepalive=keepalive,
        identifier=identifier or username,
        timeout=10,
        socket_options=topics.NODELAY,
    ) as client:
        yield client


@asynccontextmanager
async def reader(host: str, port: int, reader_id: str, password: str) -> AsyncIterator[SimReader]:
    async with (
        connect(host, port, reader_id, password) as client,
        SimReader(client, reader_id, topics.reader_response(reader_id)) as device,
    ):
        yield device


@asynccontextmanager
async def button(host: str, port: int, button_id: str, court_id: str, password: str) -> AsyncIterator[SimButton]:
    async with connect(host, port, button_id, password) as client, SimButton(client, button_id, court_id) as device:
        yield device


@asynccontextmanager
async def tablet(host: str, port: int, tablet_id: str, password: str) -> AsyncIterator[SimTablet]:
    async with (
        connect(host, port, tablet_id, password) as client,
        SimTablet(client, tablet_id, topics.tablet_response(tablet_id)) as device,
    ):
        yield device
