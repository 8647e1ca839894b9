"""MQTT 3.1.1 conformance of the brokers the agent runs on, with real clients over real sockets.

Every test runs against the embedded broker and against mosquitto (`[embedded]` / `[mosquitto]`); mosquitto is
the oracle: a test must pass against it, which proves the test, not the broker. The raw client
(tests.mqtt_wire) is used wherever flags matter (DUP, RETAIN, QoS, packet ids) or a client must misbehave.
Names and docstrings cite the normative statement (MQTT-x.y.z-n) of the OASIS MQTT 3.1.1 specification.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from agent.config import AGENT_USERNAME
from agent.lan import topics
from tests.brokers import AGENT_PASSWORD, WS_PATH, BrokerFactory, BrokerUnderTest
from tests.conftest import PASSWORDS
from tests.mqtt_wire import (
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    ConnectionClosed,
    ProtocolError,
    Publish,
    Will,
    WireClient,
    encode_remaining_length,
)

pytest_plugins = ("tests.brokers",)

STATE = "court/c1/state"  # the agent publishes it, tablet t1 (court c1) may subscribe to it
QUIET = 0.5  # how long "nothing more arrives" is watched
WAIT = 3.0  # how long an expected packet may take


@contextlib.asynccontextmanager
async def session(
    broker: BrokerUnderTest,
    username: str | None,
    client_id: str | None = None,
    *,
    clean_session: bool = True,
    keepalive: int = 60,
    will: Will | None = None,
) -> AsyncIterator[WireClient]:
    """A raw connection that the broker accepted; `username` None connects anonymously."""
    password = None if username is None else AGENT_PASSWORD if username == AGENT_USERNAME else PASSWORDS[username]
    async with WireClient.connect(
        broker.host,
        broker.port,
        client_id=client_id or username or "anonymous",
        username=username,
        password=password,
        clean_session=clean_session,
        keepalive=keepalive,
        will=will,
    ) as client:
        assert client.connack.return_code == ConnackCode.ACCEPTED, f"connect refused: {client.connack}"
        yield client


def agent(broker: BrokerUnderTest, client_id: str = "agent-pub") -> contextlib.AbstractAsyncContextManager[WireClient]:
    """The agent's account: may publish and subscribe anything."""
    return session(broker, AGENT_USERNAME, client_id)


async def receive(client: WireClient, count: int, within: float = WAIT, ack: bool = True) -> list[Publish]:
    """The next `count` PUBLISH packets, in order (each QoS 1 one acknowledged when `ack`)."""
    got: list[Publish] = []
    try:
        async with asyncio.timeout(within):
            while len(got) < count:
                packet = await client.next_packet(within)
                if isinstance(packet, Publish):
                    got.append(packet)
                    if ack and packet.qos:
                        await client.puback(packet.packet_id)
    except (TimeoutError, ConnectionClosed) as exc:
        raise AssertionError(f"{type(exc).__name__}: got {len(got)} of {count} PUBLISH in {within}s: {got}") from None
    return got


async def publishes(client: WireClient, quiet: float = QUIET) -> list[Publish]:
    """Every PUBLISH that arrives until the connection stays quiet for `quiet` s."""
    return [p for p in await client.drain(quiet) if isinstance(p, Publish)]


async def assert_still_serving(broker: BrokerUnderTest, observer: WireClient) -> None:
    """An existing connection still answers PINGREQ, and a new client's publish reaches it."""
    await observer.ping(within=WAIT)
    async with agent(broker, "agent-after") as publisher:
        await publisher.publish(STATE, b"still serving", qos=1)
    assert [p.payload for p in await receive(observer, 1)] == [b"still serving"]


# --- keepalive and will --------------------------------------------------------------------------------------


async def test_keepalive_expiry_cuts_the_client_and_publishes_its_will_mqtt_3_1_2_24(broker: BrokerUnderTest) -> None:
    """MQTT-3.1.2-24, MQTT-3.1.2-8: no packet within 1.5 x keepalive -> disconnect, and the will is published."""
    keepalive = 1
    # 1.5 x keepalive, a margin, and how coarsely the broker sweeps (mosquitto 2.0: every 5+ s; embedded: 0)
    bound = 1.5 * keepalive + 1.5 + broker.keepalive_check_interval
    async with agent(broker, "agent-obs") as observer:
        assert await observer.subscribe([("rfid/r1/status", 1)]) == [1]
        start = time.monotonic()
        async with session(broker, "r1", keepalive=keepalive, will=Will("rfid/r1/status", b"offline", qos=1)) as r1:
            assert await r1.closed(within=bound), f"the broker kept a silent client for {bound}s"
            will = await receive(observer, 1, within=max(0.1, bound - (time.monotonic() - start)))
            elapsed = time.monotonic() - start
    assert [(p.topic, p.payload, p.qos) for p in will] == [("rfid/r1/status", b"offline", 1)]
    assert keepalive <= elapsed <= bound, "a client may stay silent for one keepalive period"


async def test_disconnect_discards_the_will_mqtt_3_14_4_3(broker: BrokerUnderTest) -> None:
    """MQTT-3.14.4-3, MQTT-3.1.2-10: a client that sends DISCONNECT does not have its will published."""
    async with agent(broker, "agent-obs") as observer:
        assert await observer.subscribe([("rfid/r1/status", 1)]) == [1]
        async with session(broker, "r1", keepalive=1, will=Will("rfid/r1/status", b"offline", qos=1)):
            pass  # leaves with DISCONNECT
        assert await publishes(observer, quiet=1.0) == []


# --- sessions ------------------------------------------------------------------------------------------------


async def test_offline_messages_are_queued_for_a_persistent_session_mqtt_3_1_2_5(broker: BrokerUnderTest) -> None:
    """MQTT-3.1.2-4/-5, MQTT-3.2.2-2, MQTT-3.3.1-9: queued QoS 1 messages arrive in order, RETAIN=0, on resume."""
    async with session(broker, "t1", clean_session=False) as t1:
        assert await t1.subscribe([(STATE, 1)]) == [1]
    async with agent(broker) as publisher:
        for i in range(5):
            await publisher.publish(STATE, b"m%d" % i, qos=1)
    async with session(broker, "t1", clean_session=False) as t1:
        assert t1.connack == Connack(session_present=True, return_code=0)
        got = await receive(t1, 5)
    assert [p.payload for p in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [(p.qos, p.retain) for p in got] == [(1, False)] * 5


async def test_unacknowledged_publish_is_resent_with_dup_on_reconnect_mqtt_4_4_0_1(broker: BrokerUnderTest) -> None:
    """MQTT-4.4.0-1, MQTT-3.3.1-1: an unacked QoS 1 PUBLISH is resent on resume, same packet id, DUP=1, once."""
    async with session(broker, "t1", clean_session=False) as t1:
        assert await t1.subscribe([(STATE, 1)]) == [1]
        async with agent(broker) as publisher:
            await publisher.publish(STATE, b"once", qos=1)
        [first] = await receive(t1, 1, ack=False)
        t1.abort()  # network failure: no PUBACK, no DISCONNECT
    assert (first.qos, first.dup) == (1, False)
    async with session(broker, "t1", clean_session=False) as t1:
        assert t1.connack.session_present
        [again] = await receive(t1, 1, ack=False)
        assert (again.payload, again.packet_id, again.dup, again.qos) == (b"once", first.packet_id, True, 1)
        await t1.puback(again.packet_id)
        assert await publishes(t1) == []
    async with session(broker, "t1", clean_session=False) as t1:
        assert await publishes(t1) == [], "an acknowledged message was sent again"


async def test_anonymous_persistent_session_is_resumed_mqtt_3_1_2_4(broker_factory: BrokerFactory) -> None:
    """MQTT-3.1.2-4, MQTT-3.2.2-2: an anonymous client's persistent session keeps its subscription and queue."""
    broker = await broker_factory(allow_anonymous=True)
    async with session(broker, None, "anon-1", clean_session=False) as anonymous:
        assert await anonymous.subscribe([(STATE, 1)]) == [1]
    async with agent(broker) as publisher:
        await publisher.publish(STATE, b"while away", qos=1)
    async with session(broker, None, "anon-1", clean_session=False) as anonymous:
        assert anonymous.connack == Connack(session_present=True, return_code=0)
        assert [p.payload for p in await receive(anonymous, 1)] == [b"while away"]


async def test_session_and_retained_message_survive_a_restart_mqtt_4_1_0_1(broker: BrokerUnderTest) -> None:
    """MQTT-4.1.0-1, MQTT-3.1.2-5, MQTT-3.3.1-6: the session, its queue and the retained message outlive a restart."""
    async with agent(broker) as publisher:
        await publisher.publish(STATE, b"retained", qos=1, retain=True)
    async with session(broker, "t1", clean_session=False) as t1:
        assert await t1.subscribe([(STATE, 1)]) == [1]
        assert [(p.payload, p.retain) for p in await receive(t1, 1)] == [(b"retained", True)]
    async with agent(broker) as publisher:
        await publisher.publish(STATE, b"q1", qos=1)
        await publisher.publish(STATE, b"q2", qos=1)

    await broker.restart()

    async with session(broker, "t1", clean_session=False) as t1:
        assert t1.connack == Connack(session_present=True, return_code=0)
        assert [p.payload for p in await receive(t1, 2)] == [b"q1", b"q2"]
        async with session(broker, "t1", "t1-new") as newcomer:
            assert await newcomer.subscribe([(STATE, 1)]) == [1]
            assert [(p.payload, p.retain) for p in await receive(newcomer, 1)] == [(b"retained", True)]
        async with agent(broker) as publisher:
            await publisher.publish(STATE, b"after restart", qos=1)
        assert [p.payload for p in await receive(t1, 1)] == [b"after restart"]


# --- delivery ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subscribed", "published", "delivered"),
    [(1, 0, 0), (0, 1, 0), (1, 1, 1)],
    ids=["sub1-pub0", "sub0-pub1", "sub1-pub1"],
)
async def test_delivery_qos_is_the_minimum_of_publish_and_subscription_mqtt_3_8_4_6(
    broker: BrokerUnderTest, subscribed: int, published: int, delivered: int
) -> None:
    """MQTT-3.8.4-6: a message is delivered at min(published QoS, granted QoS)."""
    async with session(broker, "t1") as t1, agent(broker) as publisher:
        assert await t1.subscribe([(STATE, subscribed)]) == [subscribed]
        await publisher.publish(STATE, b"x", qos=published)
        [message] = await receive(t1, 1)
    assert message.qos == delivered
    assert (message.packet_id is not None) == (delivered > 0)


async def test_retain_flag_on_delivery_mqtt_3_3_1_8_and_9(broker: BrokerUnderTest) -> None:
    """MQTT-3.3.1-8/-9/-10/-11: RETAIN=0 to established subscriptions, RETAIN=1 to new ones; empty payload clears."""
    async with session(broker, "t1") as live, agent(broker) as publisher:
        assert await live.subscribe([(STATE, 1)]) == [1]
        await publisher.publish(STATE, b"on", qos=1, retain=True)
        assert [(p.payload, p.retain) for p in await receive(live, 1)] == [(b"on", False)]
        async with session(broker, "t1", "t1-late") as late:
            assert await late.subscribe([(STATE, 1)]) == [1]
            assert [(p.payload, p.retain) for p in await receive(late, 1)] == [(b"on", True)]
        await publisher.publish(STATE, b"", qos=1, retain=True)
        async with session(broker, "t1", "t1-later") as later:
            assert await later.subscribe([(STATE, 1)]) == [1]
            assert await publishes(later) == [], "an empty retained message must clear, not be stored"


async def test_overlapping_subscriptions_deliver_once_at_the_maximum_qos_mqtt_3_3_5_1(broker: BrokerUnderTest) -> None:
    """MQTT-3.3.5-1: with overlapping subscriptions the message comes at the highest matching QoS (one copy)."""
    async with session(broker, "t1") as t1, agent(broker) as publisher:
        assert await t1.subscribe([("court/c1/#", 0), (STATE, 1)]) == [0, 1]
        await publisher.publish(STATE, b"x", qos=1)
        got = await publishes(t1)
    # mosquitto sends a single copy at QoS 1 (the spec allows a copy per subscription; one is what clients expect)
    assert [(p.topic, p.qos) for p in got] == [(STATE, 1)]


# --- access --------------------------------------------------------------------------------------------------


async def test_subscribe_outside_the_access_list_is_refused_mqtt_3_8_4_5(broker: BrokerUnderTest) -> None:
    """MQTT-3.8.4-4/-5, MQTT-3.9.3: one SUBACK with a code per filter: granted QoS, or 0x80 where refused."""
    filters = [("rfid/r1/response", 1), ("rfid/r2/response", 1), ("#", 0), ("agent/status", 0)]
    async with session(broker, "r1") as r1:
        assert await r1.subscribe(filters) == [1, SUBACK_FAILURE, SUBACK_FAILURE, 0]


@pytest.mark.parametrize(
    ("username", "password"),
    [(None, None), ("r1", "wrong-password"), ("nobody", "whatever")],
    ids=["anonymous", "wrong-password", "unknown-user"],
)
async def test_refused_connect_mqtt_3_2_2_5(
    broker: BrokerUnderTest, username: str | None, password: str | None
) -> None:
    """MQTT-3.2.2-5: refused with CONNACK 5 (not authorized), then the connection is closed.

    mosquitto 2.0 answers 5 in all three cases (also for a wrong password, where 4 would be allowed too).
    """
    client = await WireClient.open(broker.host, broker.port, client_id="r1", username=username, password=password)
    try:
        assert client.connack == Connack(session_present=False, return_code=ConnackCode.NOT_AUTHORIZED)
        assert await client.closed(within=WAIT)
    finally:
        await client.disconnect()


# --- limits --------------------------------------------------------------------------------------------------


async def test_oversized_publish_disconnects_the_sender(broker_factory: BrokerFactory) -> None:
    """Broker limit (no 3.1.1 statement; mosquitto max_packet_size): a 4 KiB PUBLISH over 2 KiB is cut, not routed."""
    broker = await broker_factory(max_packet_bytes=2048)
    async with agent(broker, "agent-obs") as observer, agent(broker, "agent-big") as big:
        assert await observer.subscribe([(STATE, 1)]) == [1]
        await big.publish(STATE, b"x" * 4096)
        assert await big.closed(within=2.0), "the broker kept a client that sent an oversized packet"
        assert await publishes(observer) == []
        await assert_still_serving(broker, observer)


async def test_huge_remaining_length_is_cut_promptly(broker_factory: BrokerFactory) -> None:
    """Broker limit (MQTT 2.2.3 allows 268,435,455): a header claiming 200 MB is refused before the body arrives."""
    broker = await broker_factory(max_packet_bytes=2048)
    async with agent(broker, "agent-obs") as observer, agent(broker, "agent-liar") as liar:
        assert await observer.subscribe([(STATE, 1)]) == [1]
        await liar.send(b"\x30" + encode_remaining_length(200_000_000) + b"\x00\x0e" + STATE.encode())
        assert await liar.closed(within=2.0), "the broker waits for a 200 MB packet"
        await assert_still_serving(broker, observer)


# --- transports ----------------------------------------------------------------------------------------------


async def aiomqtt_round_trip(client: aiomqtt.Client) -> bytes:
    await client.subscribe(STATE, qos=1)
    await client.publish(STATE, b"round trip", qos=1)
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            return message.payload
    raise AssertionError("message stream ended")


async def test_tls_listener_round_trip(broker: BrokerUnderTest) -> None:
    """MQTT 4.2 / 5.4.9: MQTT over TLS on the TLS port, verified against the test CA."""
    assert broker.tls_port
    assert broker.ca_file
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    async with aiomqtt.Client(
        broker.host,
        broker.tls_port,
        username=AGENT_USERNAME,
        password=AGENT_PASSWORD,
        identifier="agent-tls",
        tls_context=context,
        socket_options=topics.NODELAY,
        timeout=5,
    ) as client:
        assert await aiomqtt_round_trip(client) == b"round trip"


async def test_plain_mqtt_to_the_tls_port_fails(broker: BrokerUnderTest) -> None:
    """MQTT 4.2: the TLS listener speaks only TLS; a plain CONNECT never gets a CONNACK."""
    assert broker.tls_port
    with pytest.raises((ConnectionClosed, ProtocolError, TimeoutError)):
        await WireClient.open(
            broker.host, broker.tls_port, client_id="agent-plain", username=AGENT_USERNAME, password=AGENT_PASSWORD
        )


async def test_websocket_listener_round_trip_mqtt_6_0_0_4(broker: BrokerUnderTest) -> None:
    """MQTT-6.0.0-1/-4: MQTT in binary WebSocket frames, subprotocol "mqtt", on the websocket port."""
    assert broker.ws_port
    async with aiomqtt.Client(
        broker.host,
        broker.ws_port,
        username=AGENT_USERNAME,
        password=AGENT_PASSWORD,
        identifier="agent-ws",
        transport="websockets",
        websocket_path=WS_PATH,
        timeout=5,
    ) as client:
        assert await aiomqtt_round_trip(client) == b"round trip"
