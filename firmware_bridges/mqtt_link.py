"""The standalone link: an adapter on another host speaks the MQTT contract to the agent's broker.

Publishes are QoS 1. While the broker is unreachable they wait in a small bounded queue (a press made during a
Wi-Fi drop is sent when the link is back; the agent de-duplicates on msg_id), the oldest dropped first when it
fills. Reconnects with capped, jittered backoff; a refused login waits longer, since retrying fast cannot fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable

import aiomqtt

Listener = Callable[[bytes], None]

QUEUE_MAX = 256
BACKOFF_MIN_S, BACKOFF_MAX_S, REFUSED_S = 0.5, 15.0, 30.0
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)  # a reply must not wait for a delayed ACK


class MqttLink:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        client_id: str,
        tls: ssl.SSLContext | None = None,
        on_state: Callable[[str], None] = lambda state: None,
    ) -> None:
        self._host, self._port, self._username, self._password = host, port, username, password
        self._client_id, self._tls = client_id, tls
        self._on_state = on_state
        self._listeners: dict[str, list[Listener]] = {}
        self._queue: deque[tuple[str, bytes]] = deque(maxlen=QUEUE_MAX)
        self._client: aiomqtt.Client | None = None
        self._wake = asyncio.Event()
        self.dropped = 0  # publishes lost because the queue was full during an outage
        self.connected = asyncio.Event()

    def listen(self, topic: str, listener: Listener) -> None:
        self._listeners.setdefault(topic, []).append(listener)

    async def publish(self, topic: str, payload: bytes) -> None:
        if len(self._queue) == QUEUE_MAX:
            self.dropped += 1
        self._queue.append((topic, payload))
        self._wake.set()

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            try:
                async with aiomqtt.Client(
                    self._host,
                    self._port,
                    username=self._username,
                    password=self._password,
                    identifier=self._client_id,
                    keepalive=30,
                    timeout=10,
                    tls_context=self._tls,
                    socket_options=NODELAY,
                ) as client:
                    for topic in self._listeners:
                        await client.subscribe(topic, qos=1)
                    self._client = client
                    self.connected.set()
                    self._on_state("connected")
                    backoff = BACKOFF_MIN_S
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._sender(client))
                        async for message in client.messages:
                            self._deliver(message)
            except aiomqtt.MqttCodeError as exc:
                self._down(f"refused: {exc}")
                await asyncio.sleep(REFUSED_S)
            except aiomqtt.MqttError as exc:
                self._down(str(exc))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _down(self, why: str) -> None:
        self._client = None
        self.connected.clear()
        self._on_state(f"disconnected: {why}")

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            while self._queue:
                topic, payload = self._queue[0]
                await client.publish(topic, payload, qos=1)
                with contextlib.suppress(IndexError):
                    self._queue.popleft()  # only once the broker has it: a cut connection re-sends it
            self._wake.clear()
            await self._wake.wait()

    def _deliver(self, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        for listener in self._listeners.get(message.topic.value, ()):
            listener(bytes(payload))
