"""The embedded broker's authentication and access list, exercised with real MQTT clients."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from agent.lan import topics
from tests.conftest import PASSWORDS, Premises

# The embedded broker's own access control; mosquitto's (from export-mosquitto) is in test_mosquitto_export.
pytestmark = pytest.mark.embedded_only


def _granted(result: object) -> list[int]:
    """aiomqtt returns paho reason codes (MQTT 3.1.1: granted QoS, or 128 for failure)."""
    assert isinstance(result, tuple | list)
    return [int(getattr(code, "value", code)) for code in result]


@pytest.mark.parametrize(
    ("username", "password"),
    [(None, None), ("r1", "wrong-password"), ("nobody", "whatever"), ("agent", "guess")],
    ids=["anonymous", "wrong-password", "unknown-user", "agent-account"],
)
async def test_connect_is_refused(premises: Premises, username: str | None, password: str | None) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with aiomqtt.Client(premises.host, premises.port, username=username, password=password, timeout=5):
            pass
    assert premises.metric("messages_rejected_total", kind="acl_connect", reason="denied") == 1


async def test_anonymous_is_allowed_only_when_configured(premises_factory: object) -> None:
    premises = await premises_factory(broker={"allow_anonymous": True})  # type: ignore[operator]
    async with aiomqtt.Client(premises.host, premises.port, timeout=5) as anonymous:
        assert _granted(await anonymous.subscribe("court/+/state", qos=1)) == [1]


@pytest.mark.parametrize(
    ("username", "topic_filter", "allowed"),
    [
        ("r1", "rfid/r1/response", True),
        ("r1", "rfid/r2/response", False),
        ("r1", "rfid/+/response", False),
        ("r1", "#", False),
        ("r1", "agent/status", True),
        ("b1", "court/c1/button/ack", True),
        ("b1", "court/c2/button/ack", False),
        ("t1", "court/c1/#", True),
        ("t1", "court/c1/state", True),
        ("t1", "court/+/state", False),
        ("t1", "tablet/t1/response", True),
        ("t1", "tablet/desk/response", False),
        ("desk", "court/+/state", True),
        ("desk", "court/#", False),  # would also match the bare topic "court", outside court/+/#
        ("d1", "court/c2/#", True),
        ("d1", "court/c1/state", False),
    ],
)
async def test_subscribe_acl(premises: Premises, username: str, topic_filter: str, allowed: bool) -> None:
    async with premises.client(username, identifier=f"{username}-acl") as client:
        granted = _granted(await client.subscribe(topic_filter, qos=1))
    assert granted == ([1] if allowed else [0x80])


async def test_will_topic_outside_the_access_list_is_refused(premises: Premises) -> None:
    # The broker publishes wills without an ACL check: a reader must not plant a scan for another reader.
    will = aiomqtt.Will("rfid/r2/scan", b'{"card_id": "04B0B0B0B0"}', qos=1)
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with aiomqtt.Client(
            premises.host, premises.port, username="r1", password=PASSWORDS["r1"], will=will, timeout=5
        ):
            pass
    own = aiomqtt.Will("rfid/r1/status", b'{"state": "offline"}', qos=1, retain=True)
    async with aiomqtt.Client(
        premises.host, premises.port, username="r1", password=PASSWORDS["r1"], will=own, identifier="r1", timeout=5
    ):
        pass


async def test_a_device_cannot_take_over_another_devices_session(premises: Premises) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with aiomqtt.Client(
            premises.host, premises.port, username="r2", password=PASSWORDS["r2"], identifier="r1", timeout=5
        ):
            pass


async def test_reader_receives_only_its_own_responses(premises: Premises) -> None:
    async with premises.reader("r1") as r1, premises.client("r2", identifier="r2-spy") as spy:
        assert _granted(await spy.subscribe("rfid/r2/response", qos=1)) == [1]
        await r1.tap("04B0B0B0B0")
        with pytest.raises(TimeoutError):
            await _first_message(spy, within=0.5)


async def _first_message(client: aiomqtt.Client, within: float) -> str:
    async with asyncio.timeout(within):
        async for message in client.messages:
            return message.topic.value
    return ""


def test_agent_subscriptions_are_all_routable() -> None:
    for topic_filter in topics.SUBSCRIPTIONS:
        concrete = topic_filter.replace("+", "x")
        assert topics.route(concrete) is not None
