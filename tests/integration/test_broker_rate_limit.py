"""The embedded broker's per-device inbound rate limit (broker.publish_rate_per_s / publish_burst), with real
clients on loopback.

A device over its bucket is slowed, never cut and never loses a message: the broker takes its publishes as tokens
come, its PUBACKs come late, and past a small buffer the broker stops reading its socket (TCP backpressure). Other
clients, and the agent's own, are not slowed. mosquitto has no such limit, so these run against the embedded
broker only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pydantic
import pytest

from agent.config import AGENT_USERNAME, BrokerSection
from agent.lan.amqtt_fixes import THROTTLE_BUFFER, AgentHandler
from agent.lan.auth import DeviceDirectory
from agent.lan.broker import EmbeddedBroker
from tests.brokers import AGENT_PASSWORD, HOST, WS_PATH, device_configs, free_port
from tests.conftest import PASSWORDS
from tests.mqtt_wire import (
    DISCONNECT,
    PINGREQ,
    Pingresp,
    Puback,
    Publish,
    Will,
    WireClient,
    encode_publish,
)

WAIT = 5.0  # how long an expected packet may take
POLL_S = 0.02
UVLOOP_READ = 256 * 1024  # what one read of a transport may add to a paused client's buffer


class Recorder:
    """Broker hooks that remember what the broker told them (the agent's are in agent/app.py)."""

    def __init__(self) -> None:
        self.held: Counter[str] = Counter()  # client id -> publishes that waited for its bucket
        self.disconnected: list[tuple[str, str]] = []

    def client_connected(self, session: Any) -> None:
        pass

    def client_disconnected(self, session: Any, how: str) -> None:
        self.disconnected.append((session.client_id, how))

    def rejected(self, reason: str, client: str) -> None:
        pass

    def throttled(self, client: str) -> None:
        self.held[client] += 1


@dataclass
class Limited:
    broker: EmbeddedBroker
    hooks: Recorder

    @property
    def port(self) -> int:
        return self.broker.port

    def handler(self, client_id: str) -> AgentHandler:
        """The broker's live connection of `client_id` (to look at its throttle state)."""
        assert self.broker._broker is not None
        handler = self.broker._broker._sessions[client_id][1]
        assert isinstance(handler, AgentHandler)
        return handler


@contextlib.asynccontextmanager
async def limited_broker(tmp_path: Path, *, rate: float, burst: int) -> AsyncIterator[Limited]:
    section = BrokerSection(host=HOST, port=0, ws_port=free_port(), publish_rate_per_s=rate, publish_burst=burst)
    directory = DeviceDirectory(device_configs(tmp_path), agent_password=AGENT_PASSWORD)
    hooks = Recorder()
    try:
        async with EmbeddedBroker(section, directory, hooks=hooks) as broker:
            yield Limited(broker, hooks)
    finally:
        directory.close()


def client(port: int, username: str, identifier: str, **options: Any) -> aiomqtt.Client:
    password = AGENT_PASSWORD if username == AGENT_USERNAME else PASSWORDS[username]
    mqtt = aiomqtt.Client(
        HOST, port, username=username, password=password, identifier=identifier, timeout=WAIT, **options
    )
    mqtt.pending_calls_threshold = 1000  # a flood's window of publishes waiting is the point, not a warning
    return mqtt


def wire(
    port: int, username: str, client_id: str, **options: Any
) -> contextlib.AbstractAsyncContextManager[WireClient]:
    return WireClient.connect(
        HOST, port, client_id=client_id, username=username, password=PASSWORDS[username], **options
    )


@dataclass
class Flood:
    """A QoS 1 flood with `window` publishes in flight, each waiting for its PUBACK: as fast as the broker takes it."""

    sent: list[int] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)

    async def run(self, mqtt: aiomqtt.Client, topic: str, seconds: float, window: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        numbers = itertools.count()

        async def worker() -> None:
            while loop.time() < deadline:
                n = next(numbers)
                self.sent.append(n)
                await mqtt.publish(topic, str(n).encode(), qos=1, timeout=2 * WAIT)
                self.acked_at.append(loop.time())

        async with asyncio.TaskGroup() as tg:
            for _ in range(window):
                tg.create_task(worker())

    def accepted_by(self, moment: float) -> int:
        return sum(1 for t in self.acked_at if t <= moment)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"not within {WAIT} s: {what}")


def bound(rate: float, burst: int, seconds: float) -> float:
    """The most a bucket can let through in `seconds`, with 10 % and a few messages for timer slack."""
    return burst + rate * seconds * 1.1 + 3


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def test_a_flooding_device_is_slowed_to_its_rate_loses_nothing_and_others_keep_their_latency(
    tmp_path: Path,
) -> None:
    rate, burst, seconds = 50.0, 20, 2.0
    loop = asyncio.get_running_loop()
    async with (
        limited_broker(tmp_path, rate=rate, burst=burst) as broker,
        client(broker.port, AGENT_USERNAME, "agent-test") as agent,
        client(broker.port, "r1", "r1-flood") as flooder,
        client(broker.port, "r2", "r2") as r2,
    ):
        await agent.subscribe("rfid/+/scan", qos=1)
        await r2.subscribe("rfid/r2/response", qos=1)
        flooded: list[int] = []
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def serve() -> None:
            """The agent: records the flood, answers r2 (a tap's round trip)."""
            async for message in agent.messages:
                payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
                if message.topic.matches("rfid/r1/scan"):
                    flooded.append(int(payload))
                else:
                    await agent.publish("rfid/r2/response", payload, qos=1)

        async def listen() -> None:
            async for message in r2.messages:
                assert isinstance(message.payload, bytes | bytearray)
                await answers.put(bytes(message.payload))

        async def round_trips(until: float) -> list[float]:
            latencies: list[float] = []
            for k in itertools.count():
                started = loop.time()
                if started >= until:
                    break
                await r2.publish("rfid/r2/scan", f"rt{k}".encode(), qos=1)
                async with asyncio.timeout(WAIT):
                    while await answers.get() != f"rt{k}".encode():
                        pass
                latencies.append(loop.time() - started)
                await asyncio.sleep(max(0.0, started + 0.05 - loop.time()))
            return latencies

        async with asyncio.TaskGroup() as background:
            tasks = [background.create_task(serve()), background.create_task(listen())]
            flood = Flood()
            start = loop.time()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(flood.run(flooder, "rfid/r1/scan", seconds, window=32))
                taps = tg.create_task(round_trips(start + seconds))
            flood_end = start + seconds
            # the connection stayed open: one more publish is acknowledged
            await flooder.publish("rfid/r1/scan", str(len(flood.sent)).encode(), qos=1)
            await eventually(lambda: len(flooded) > len(flood.sent), "the agent received the whole flood")
            for task in tasks:
                task.cancel()

    accepted = flood.accepted_by(flood_end)
    assert rate * seconds * 0.5 <= accepted <= bound(rate, burst, seconds), f"{accepted} taken in {seconds} s"
    assert len(flood.acked_at) == len(flood.sent), "every publish of the flood was acknowledged once it stopped"
    assert flooded == list(range(len(flood.sent) + 1)), "each delivered once, in order"
    assert not [d for d in broker.hooks.disconnected if d[0] == "r1-flood" and d[1] != "disconnect"]
    latencies = taps.result()
    assert len(latencies) >= 10
    assert p99(latencies) < 0.2, f"r2's round trips during the flood: {sorted(latencies)[-3:]}"
    assert broker.hooks.held["r1-flood"] >= accepted - burst - 5
    assert set(broker.hooks.held) == {"r1-flood"}, "neither r2 nor the agent waited"


async def test_a_device_that_does_not_wait_for_pubacks_is_pushed_back_by_tcp(tmp_path: Path) -> None:
    """Pipelined QoS 1 at full speed, PUBACKs unread: past THROTTLE_BUFFER the broker stops reading it, so its own
    writes block and the broker's memory for it stays bounded. Losing the connection then (a reset, noticed at the
    next PUBACK the broker writes) ends the session as a network failure and leaves no timer behind."""
    rate, burst = 100.0, 10
    async with (
        limited_broker(tmp_path, rate=rate, burst=burst) as broker,
        client(broker.port, AGENT_USERNAME, "agent-test") as agent,
    ):
        await agent.subscribe("rfid/r1/scan", qos=0)
        received = 0

        async def count() -> None:
            nonlocal received
            async for _ in agent.messages:
                received += 1

        counter = asyncio.create_task(count())
        try:
            async with wire(broker.port, "r1", "r1-flood") as flooder:
                handler = broker.handler("r1-flood")
                loop = asyncio.get_running_loop()
                start, written, blocked, largest = loop.time(), 0, False, 0
                while loop.time() - start < 3.0:
                    batch = b"".join(
                        encode_publish("rfid/r1/scan", bytes(1000), qos=1, packet_id=flooder.packet_id())
                        for _ in range(16)
                    )
                    flooder.writer.write(batch)
                    written += len(batch)
                    largest = max(largest, len(handler._rx))
                    try:
                        await asyncio.wait_for(flooder.writer.drain(), 0.5)
                    except TimeoutError:
                        blocked = True
                        break
                elapsed = loop.time() - start
                assert blocked, f"{written} bytes written in {elapsed:.1f} s and the client was never pushed back"
                assert handler._paused_at is not None, "the broker stopped reading the client"
                assert largest < THROTTLE_BUFFER + UVLOOP_READ + len(batch)
                assert received <= bound(rate, burst, elapsed + 0.1)
                assert handler._release_at is not None
                sock = flooder.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                flooder.abort()  # a reset: what it had sent is gone
                await eventually(lambda: bool(broker.hooks.disconnected), "the broker saw the connection go")
            assert broker.hooks.disconnected == [("r1-flood", "network")]
            assert handler._release_at is None
            assert handler.closing
            # and the broker serves others as before
            async with wire(broker.port, "r2", "r2") as r2:
                await r2.publish("rfid/r2/scan", b"still serving", qos=1)
        finally:
            counter.cancel()


async def test_shutdown_while_a_client_is_throttled_leaves_no_timer(tmp_path: Path) -> None:
    async with (
        limited_broker(tmp_path, rate=1.0, burst=1) as broker,
        wire(broker.port, "r1", "r1-flood") as flooder,
    ):
        await flooder.send(encode_publish("rfid/r1/scan", bytes(1000), qos=0) * 40)
        handler = broker.handler("r1-flood")
        await eventually(lambda: handler._paused_at is not None, "the broker stopped reading the client")
        pending = handler._release_at
        assert pending is not None
        await broker.broker.__aexit__(None, None, None)
        assert pending.cancelled()
        assert handler._release_at is None
        assert await flooder.closed(within=WAIT)


async def test_a_throttled_client_with_a_short_keepalive_is_not_disconnected(tmp_path: Path) -> None:
    """30 publishes at once, then silence while their PUBACKs come at 10/s: ~2.8 s, past its 1.5 s keepalive grace.
    The wait is the broker's doing, not the client's silence. Once all are taken, keepalive applies again."""
    keepalive = 1
    async with (
        limited_broker(tmp_path, rate=10.0, burst=2) as broker,
        wire(broker.port, "r1", "r1", keepalive=keepalive, will=Will("rfid/r1/status", b"offline")) as r1,
    ):
        ids = [r1.packet_id() for _ in range(30)]
        await r1.send(b"".join(encode_publish("rfid/r1/scan", b"{}", qos=1, packet_id=i) for i in ids))
        acked: list[int] = []
        async with asyncio.timeout(4 * WAIT):
            while len(acked) < len(ids):
                packet = await r1.next_packet(WAIT)
                assert isinstance(packet, Puback), packet
                acked.append(packet.packet_id)
        assert acked == ids
        assert broker.hooks.disconnected == []
        assert await r1.closed(within=1.5 * keepalive + 1.5), "keepalive is enforced again after the throttle"
        await eventually(lambda: bool(broker.hooks.disconnected), "the broker ended the session")
    assert broker.hooks.disconnected == [("r1", "keepalive")]


async def test_pingreq_and_puback_are_answered_while_publishes_wait(tmp_path: Path) -> None:
    async with (
        limited_broker(tmp_path, rate=5.0, burst=1) as broker,
        client(broker.port, AGENT_USERNAME, "agent-test") as agent,
        wire(broker.port, "r1", "r1") as r1,
    ):
        assert await r1.subscribe([("rfid/r1/response", 1)]) == [1]
        ids = [r1.packet_id() for _ in range(8)]  # 1 at once, then one every 0.2 s: ~1.4 s
        await r1.send(b"".join(encode_publish("rfid/r1/scan", b"{}", qos=1, packet_id=i) for i in ids))
        await agent.publish("rfid/r1/response", b"granted", qos=1)
        acked: list[int] = []
        delivery = await r1._expect(lambda p: isinstance(p, Publish), WAIT)
        assert isinstance(delivery, Publish)
        assert delivery.qos == 1
        await r1.puback(delivery.packet_id)
        await r1.send(PINGREQ)
        await r1._expect(lambda p: isinstance(p, Pingresp), WAIT)
        acked += [p.packet_id for p in r1._pending if isinstance(p, Puback)]
        assert len(acked) < len(ids), "the PINGRESP came while publishes still waited"
        assert broker.handler("r1").session.inflight_out == {}, "the PUBACK behind them was handled"
        r1._pending.clear()
        async with asyncio.timeout(2 * WAIT):
            while len(acked) < len(ids):
                packet = await r1.next_packet(WAIT)
                assert isinstance(packet, Puback), packet
                acked.append(packet.packet_id)
        assert acked == ids


async def test_a_device_that_disconnects_behind_its_burst_loses_nothing(tmp_path: Path) -> None:
    """Publishes, DISCONNECT and FIN in one go: the publishes are taken at the rate, then the DISCONNECT (so the
    will is not published), then the connection closes."""
    async with (
        limited_broker(tmp_path, rate=40.0, burst=5) as broker,
        WireClient.connect(
            HOST, broker.port, client_id="agent-obs", username=AGENT_USERNAME, password=AGENT_PASSWORD
        ) as observer,
    ):
        assert await observer.subscribe([("court/c1/button/pressed", 0), ("button/b1/status", 0)]) == [0, 0]
        b1 = await WireClient.open(
            HOST, broker.port, client_id="b1", username="b1", password=PASSWORDS["b1"],
            will=Will("button/b1/status", b"offline"),
        )  # fmt: skip
        presses = b"".join(encode_publish("court/c1/button/pressed", str(n).encode(), qos=0) for n in range(40))
        b1.writer.write(presses + DISCONNECT)
        b1.writer.write_eof()
        try:
            assert await b1.closed(within=WAIT), "the broker closes it once the DISCONNECT is taken"
        finally:
            b1.abort()
        got = [(p.topic, p.payload) for p in await observer.drain(0.5) if isinstance(p, Publish)]
        assert got == [("court/c1/button/pressed", str(n).encode()) for n in range(40)], "all, in order, no will"
    assert ("b1", "disconnect") in broker.hooks.disconnected
    assert broker.hooks.held["b1"] >= 30


async def test_websocket_clients_are_throttled_too(tmp_path: Path) -> None:
    rate, burst, seconds = 40.0, 10, 1.5
    async with limited_broker(tmp_path, rate=rate, burst=burst) as broker:
        assert broker.broker.ws_port
        async with client(
            broker.broker.ws_port, "r1", "r1-ws", transport="websockets", websocket_path=WS_PATH
        ) as flooder:
            flood = Flood()
            start = asyncio.get_running_loop().time()
            await flood.run(flooder, "rfid/r1/scan", seconds, window=16)
            await flooder.publish("rfid/r1/scan", b"still open", qos=1)
        accepted = flood.accepted_by(start + seconds)
        assert rate * seconds * 0.5 <= accepted <= bound(rate, burst, seconds)
        assert len(flood.acked_at) == len(flood.sent)
        assert broker.hooks.held["r1-ws"] >= 1
        await eventually(lambda: bool(broker.hooks.disconnected), "the broker ended the session")
        assert broker.hooks.disconnected == [("r1-ws", "disconnect")], "the connection stayed open to the end"


async def test_a_device_keeps_its_bucket_across_reconnects(tmp_path: Path) -> None:
    """The bucket is the device's, not the connection's: reconnecting does not refill it."""
    loop = asyncio.get_running_loop()
    async with limited_broker(tmp_path, rate=5.0, burst=5) as broker:
        async with wire(broker.port, "r1", "r1") as r1:
            for _ in range(5):
                await r1.publish("rfid/r1/scan", b"{}", qos=1, within=0.5)
        async with wire(broker.port, "r1", "r1-again") as again:
            started = loop.time()
            await again.publish("rfid/r1/scan", b"{}", qos=1)
            assert loop.time() - started >= 0.05
        assert broker.hooks.held == Counter({"r1-again": 1})


async def test_the_agents_own_client_is_not_limited(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with (
        limited_broker(tmp_path, rate=5.0, burst=5) as broker,
        client(broker.port, AGENT_USERNAME, "agent-test") as agent,
    ):
        started = loop.time()
        await asyncio.gather(*(agent.publish("court/c1/state", b"{}", qos=1) for _ in range(300)))
        assert loop.time() - started < WAIT
        assert not broker.hooks.held


def test_the_limit_is_validated_and_on_by_default() -> None:
    section = BrokerSection()
    assert (section.publish_rate_per_s, section.publish_burst) == (20.0, 300)
    assert BrokerSection(publish_rate_per_s=0).publish_rate_per_s == 0  # 0: no limit
    for bad in ({"publish_rate_per_s": -1}, {"publish_burst": 0}, {"publish_rate_per_s": float("nan")}):
        with pytest.raises(pydantic.ValidationError):
            BrokerSection(**bad)
