"""Device presence through the running agent: connects, power loss (keepalive), wills, heartbeats, and the
retained agent/presence/{device} topic the tablets read."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiomqtt
import pytest

from tests.conftest import PASSWORDS, Premises
from tests.mqtt_wire import WireClient


async def presence_of(client: aiomqtt.Client, device_id: str, state: str, within: float) -> dict[str, Any]:
    """The next agent/presence/{device_id} message whose state is `state`."""
    async with asyncio.timeout(within):
        async for message in client.messages:
            if message.topic.value == f"agent/presence/{device_id}":
                assert isinstance(message.payload, bytes | bytearray)
                doc: dict[str, Any] = json.loads(message.payload)
                if doc["state"] == state:
                    return doc
    raise AssertionError("message stream ended")


@pytest.mark.embedded_only  # connections are seen by the embedded broker only
async def test_tablets_see_every_device_offline_until_it_connects(premises: Premises) -> None:
    async with premises.client("desk") as desk:
        await desk.subscribe("agent/presence/#", qos=1)
        doc = await presence_of(desk, "r2", "offline", within=5)
        assert doc == {
            "device_id": "r2",
            "kind": "reader",
            "court": "c2",
            "state": "offline",
            "since": None,
            "last_seen": None,
            "how": "never_seen",
        }
        async with premises.reader("r2"):
            online = await presence_of(desk, "r2", "online", within=5)
            assert online["how"] == "connected"
        gone = await presence_of(desk, "r2", "offline", within=5)
        assert gone["how"] == "disconnect"  # it said goodbye


@pytest.mark.embedded_only
async def test_a_reader_that_loses_power_is_offline_within_one_and_a_half_keepalives(premises: Premises) -> None:
    """A raw client stops sending anything (no PINGREQ): the broker drops it, the agent shows it offline, and
    the reader's will is delivered to whoever listens."""
    async with premises.client("desk") as desk:
        await desk.subscribe("agent/presence/r1", qos=1)
        reader = await WireClient.open(
            premises.host, premises.port, client_id="r1", username="r1", password=PASSWORDS["r1"], keepalive=2
        )
        try:
            assert reader.connack.return_code == 0
            await presence_of(desk, "r1", "online", within=5)
            silent_from = time.monotonic()
            doc = await presence_of(desk, "r1", "offline", within=6)
            elapsed = time.monotonic() - silent_from
        finally:
            reader.abort()
    assert doc["how"] == "keepalive"
    assert 2.0 <= elapsed <= 3.0 + 0.5  # 1.5 x keepalive of 2 s, plus the coalescing and delivery
    state = premises.agent.presence.get("r1")
    assert state is not None
    assert not state.online


async def test_heartbeats_carry_battery_and_version_to_the_presence_topic(premises: Premises) -> None:
    async with premises.client("desk") as desk, premises.tablet("t1") as tablet:
        await desk.subscribe("agent/presence/t1", qos=1)
        await tablet.heartbeat(battery=37, app_version="2.4.1")
        async with asyncio.timeout(5):
            while True:
                doc = await presence_of(desk, "t1", "online", within=5)
                if doc.get("battery") == 37:
                    break
        assert doc["app_version"] == "2.4.1"
    assert premises.metric("heartbeats_total", kind="tablet") == 1


async def test_bad_status_payloads_are_counted_and_change_nothing(premises: Premises) -> None:
    async with premises.client("r1") as reader:
        await reader.publish("rfid/r1/status", b"{not json", qos=1)
        await reader.publish("rfid/r1/status", b'{"state": "sleeping"}', qos=1)
        for _ in range(100):
            if premises.metric("messages_rejected_total", kind="status", reason="invalid_field") >= 1:
                break
            await asyncio.sleep(0.02)
    assert premises.metric("messages_rejected_total", kind="status", reason="bad_json") == 1
    assert premises.metric("messages_rejected_total", kind="status", reason="invalid_field") == 1
    state = premises.agent.presence.get("r1")
    assert state is not None
    assert state.info == {}
