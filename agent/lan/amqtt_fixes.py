"""amqtt 0.12.1, made into a broker the devices can rely on.

amqtt embeds in our event loop, but measured against MQTT 3.1.1 its broker has gaps that hurt a club directly.
Each is closed here, in one subclass of its `Broker` and one of its protocol handler, pinned to the version below
(pyproject.toml pins it too). Every fix has a real-client test in tests/integration/test_broker_conformance.py
that fails without it, and the same tests pass against Debian's mosquitto.

- keepalive was not enforced, so a reader that lost power stayed "connected" and its will was never published
  (MQTT-3.1.2-24; upstream #308): `AgentHandler.handle_read_timeout`, and the session's keepalive x 1.5;
- unacknowledged QoS 1/2 deliveries were dropped from the session when the connection closed, so they were never
  redelivered on reconnect (MQTT-4.4.0-1; upstream #401): `AgentHandler`'s outgoing flows and `_retry_deliveries`;
- clients admitted anonymously never kept a persistent session (MQTT-3.1.2-4/5; upstream #391):
  `_run_broadcast`, `_session_monitor`;
- a QoS 0 publish reached a QoS 1 subscriber at QoS 1, and overlapping subscriptions got one copy per filter
  (MQTT-3.3.5-1, section 4.3): `_handle_message_delivery`, `_targets`;
- messages queued for an offline session arrived with RETAIN=1 (MQTT-3.3.1-9): `_publish_session_queue`;
- there was no maximum packet size, so a 200 MB length prefix was read into memory: `PacketSizeGuard`;
- retained messages and sessions vanished at restart: `broker_state.BrokerState`.

Found while fixing those, and fixed as well:
- an unauthenticated CONNECT with a device's client id wiped (clean session) or rewrote (will, credentials) that
  device's live session before the password was checked; sessions are now resolved after authentication;
- on reconnect, retained messages for every filter of every client were sent to the reconnecting client, past
  its ACL; retained messages are sent only on a new subscription (MQTT-3.3.1-6);
- a session taken over by a new connection was marked disconnected when the old connection ended;
- an invalid PUBLISH topic left a half-dead connection (no will, socket open); it now closes the connection;
- delivery tasks were kept in a FIFO that only shrank from the head, so one slow client grew it without bound.

The hot path also skips amqtt's per-message plugin dispatch (a task per ACL check and per event): the access
list is a dictionary lookup in `DeviceDirectory`, called directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
    WriterAdapter,
)
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.constants import QOS_0, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, ApplicationMessage, Session
from amqtt.utils import gen_client_id

from ..logs import OnceLogger, get_logger
from .auth import DeviceDirectory
from .topics import matches

AMQTT_VERSION = "0.12.1"

log = get_logger("agent.lan.broker")
_amqtt_log = logging.getLogger("amqtt.broker")

# A connected client that has not acknowledged a QoS 1/2 delivery after this long is treated as gone: its
# connection is closed and the message stays in the session, to be redelivered when it reconnects (4.4).
ACK_TIMEOUT_S = 30.0
KEEPALIVE_GRACE = 1.5  # MQTT-3.1.2-24: disconnect after 1.5 x the client's keepalive without a packet
_MATCH_CACHE_LIMIT = 4096


class PacketTooLarge(MQTTError):  # type: ignore[misc]  # amqtt ships no type information
    pass


class BrokerHooks(Protocol):
    """What the rest of the agent hears from the broker (presence, metrics, persistence)."""

    def client_connected(self, session: Session) -> None: ...

    def client_disconnected(self, session: Session, how: str) -> None: ...

    def rejected(self, reason: str, client: str) -> None: ...


class PacketSizeGuard(ReaderAdapter):  # type: ignore[misc]
    """Follows the MQTT framing of everything read and refuses a packet larger than `limit` as soon as its
    length prefix is complete, before reading (or buffering) any of its body."""

    __slots__ = ("_abort", "_inner", "_length", "_limit", "_multiplier", "_remaining", "_state")

    _HEADER, _LENGTH, _BODY = 0, 1, 2

    def __init__(self, inner: ReaderAdapter, limit: int, abort: Callable[[int], None]) -> None:
        self._inner = inner
        self._limit = limit
        self._abort = abort
        self._state = self._HEADER
        self._length = 0
        self._multiplier = 1
        self._remaining = 0

    async def read(self, n: int = -1) -> bytes:
        data: bytes = await self._inner.read(n)
        if self._state == self._BODY:
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._state = self._HEADER
            return data
        for byte in data:  # header bytes arrive one at a time
            if self._state == self._HEADER:
                self._state, self._length, self._multiplier = self._LENGTH, 0, 1
                continue
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            if byte & 0x80:
                continue
            # 1 byte of type and flags, the length prefix itself, and the body
            size = 1 + _varint_size(self._length) + self._length
            if size > self._limit:
                self._abort(size)
                raise PacketTooLarge(f"packet of {size} bytes exceeds the broker's limit of {self._limit}")
            self._state = self._BODY if self._length else self._HEADER
            self._remaining = self._length
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


def _varint_size(value: int) -> int:
    return 1 if value < 128 else 2 if value < 16384 else 3 if value < 2097152 else 4


class Deliveries:
    """Delivery tasks of one broker. amqtt kept them in a FIFO trimmed only from its head, so one client that
    never acknowledges grew it without bound; a set forgets each task when it finishes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("broker_delivery_failed", error=repr(task.exception()))

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)


class AgentHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler with keepalive enforced and in-flight state kept until acknowledged."""

    def __init__(self, plugins_manager: Any, deliveries: Deliveries, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(plugins_manager, loop=loop)
        self._deliveries = deliveries
        self.closing = False
        self.closed_by: str | None = None  # "keepalive", "too_large", "protocol": why the broker closed it

    def abort(self, why: str) -> None:
        """Drop the network connection now; the reader loop then ends the session as a network failure."""
        if self.closed_by is None:
            self.closed_by = why
        transport = _transport(self.writer)
        if transport is not None:
            transport.abort()

    def handle_read_timeout(self) -> None:
        # amqtt's handler only logs here (upstream #308). MQTT-3.1.2-24: no packet within 1.5 x keepalive
        # means the network failed: close it, which publishes the will.
        self.abort("keepalive")

    async def stop(self) -> None:
        self.closing = True
        await super().stop()

    async def _retry_deliveries(self) -> None:
        """MQTT-4.4.0-1: resend what the client never acknowledged, with its original packet id, in order.

        amqtt awaits every retry (up to 10 s each) before the session starts; here they are sent in order
        and acknowledged whenever the client gets to it."""
        session = self.session
        for message in [*session.inflight_in.values(), *session.inflight_out.values()]:
            self._deliveries.spawn(self._handle_message_flow(message))

    async def _handle_qos1_message_flow(self, message: Any) -> None:
        if message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(message)
            return
        session = self.session
        session.inflight_out[message.packet_id] = message
        packet = message.build_publish_packet(dup=message.publish_packet is not None)
        message.publish_packet = packet
        ack = await self._send_and_wait(packet, self._puback_waiters, message.packet_id)
        if ack is not None:
            message.puback_packet = ack
            session.inflight_out.pop(message.packet_id, None)

    async def _handle_qos2_message_flow(self, message: Any) -> None:
        if message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(message)
            return
        session = self.session
        session.inflight_out[message.packet_id] = message
        if message.pubrec_packet is None:
            packet = message.build_publish_packet(dup=message.publish_packet is not None)
            message.publish_packet = packet
            rec = await self._send_and_wait(packet, self._pubrec_waiters, message.packet_id)
            if rec is None:
                return
            message.pubrec_packet = rec
        message.pubrel_packet = PubrelPacket.build(message.packet_id)
        comp = await self._send_and_wait(message.pubrel_packet, self._pubcomp_waiters, message.packet_id)
        if comp is not None:
            message.pubcomp_packet = comp
            session.inflight_out.pop(message.packet_id, None)

    async def _send_and_wait(
        self, packet: Any, waiters: dict[int, asyncio.Future[Any]], packet_id: int
    ) -> PubackPacket | PubrecPacket | PubcompPacket | None:
        """Send and wait for the acknowledgement; None when the connection ended first (the message then
        stays in the session's in-flight set for redelivery). amqtt dropped it from the session instead."""
        if self.closing:
            return None
        waiter: asyncio.Future[Any] = self._loop.create_future()
        waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            if self.closing:
                return None
            return await asyncio.wait_for(waiter, ACK_TIMEOUT_S)
        except TimeoutError:
            self.abort("ack_timeout")
            return None
        except asyncio.CancelledError:
            if waiter.cancelled() and not _cancelling():
                return None  # the connection closed: stop() cancels the waiters
            raise
        except Exception:
            return None
        finally:
            if waiters.get(packet_id) is waiter:
                del waiters[packet_id]


def _cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _transport(writer: WriterAdapter | None) -> asyncio.WriteTransport | None:
    if isinstance(writer, StreamWriterAdapter):
        return writer._writer.transport  # type: ignore[no-any-return]
    if isinstance(writer, WebSocketsWriter):
        return writer._protocol.transport  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True, slots=True)
class _Target:
    session: Session
    qos: int


class AgentBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with the fixes listed in the module docstring."""

    def __init__(
        self,
        config: dict[str, Any],
        directory: DeviceDirectory,
        hooks: BrokerHooks,
        *,
        max_packet_bytes: int,
        max_queued_messages: int,
        state: Any | None = None,  # BrokerState, or None for no persistence
    ) -> None:
        super().__init__(config)
        self._directory = directory
        self._hooks = hooks
        self._max_packet = max_packet_bytes
        self._max_queued = max_queued_messages
        self._state = state
        self._match_cache: dict[str, list[_Target]] = {}
        self.deliveries = Deliveries()
        self._once = OnceLogger(log)

    # -- start and stop: persistence -------------------------------------------------------------------------

    async def _start_listeners(self) -> None:
        if self._state is not None:
            await self._state.restore(self)
        await super()._start_listeners()

    async def shutdown(self) -> None:
        if self._state is not None:
            await self._state.save_all(self)
        self.deliveries.cancel_all()
        await super().shutdown()

    # -- connections -----------------------------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        guarded = PacketSizeGuard(StreamReaderAdapter(reader), self._max_packet, self._too_large(writer.transport))
        await self._client_connected(listener_name, guarded, StreamWriterAdapter(writer))

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        guarded = PacketSizeGuard(WebSocketsReader(websocket), self._max_packet, self._too_large(websocket.transport))
        await self._client_connected(listener_name, guarded, WebSocketsWriter(websocket))

    def _too_large(self, transport: asyncio.WriteTransport) -> Callable[[int], None]:
        def abort(size: int) -> None:
            peer = transport.get_extra_info("peername")
            self._once.warning("mqtt_packet_too_large", str(peer), peer=str(peer), size=size, limit=self._max_packet)
            self._hooks.rejected("too_large", str(peer))
            transport.abort()

        return abort

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Read and check the CONNECT only. amqtt also resolved the session here, before the password was
        checked; that now happens in `_handle_client_session`, after authentication."""
        try:
            _, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, MQTTError, NoDataError) as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"{remote_address}:{remote_port}: no valid CONNECT: {exc}") from exc
        if not incoming.client_id:
            incoming.client_id = gen_client_id()
        return AgentHandler(self.plugins_manager, self.deliveries, self._loop), incoming

    async def _authenticate(self, session: Session, _listener: Any) -> bool:
        ok = await self._directory.authenticate(
            session.username, session.password, session.client_id, session.will_topic if session.will_flag else None
        )
        session.is_anonymous = ok and session.username is None
        return ok

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        incoming: Session,
        handler: AgentHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        if not await self._authenticate(incoming, None):
            handler.attach(incoming, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        session = await self._resume_or_replace(incoming)
        handler.attach(session, reader, writer)
        # MQTT-3.1.2-24: amqtt's reader loop times out after session.keep_alive seconds without a packet.
        handler.keepalive_timeout = None  # the write-side timer is unused by a broker
        keepalive = incoming.keep_alive
        session.keep_alive = keepalive * KEEPALIVE_GRACE if keepalive > 0 else 0
        session.transitions.connect()
        self._sessions[session.client_id] = (session, handler)
        await handler.mqtt_connack_authorize(True)
        self._hooks.client_connected(session)
        await handler.start()
        self._publish_session_queue(session, handler)
        # No retained messages here: MQTT-3.3.1-6 sends them on a new subscription only. (amqtt sent the
        # retained messages of every client's filters to whoever reconnected.)
        await self._client_message_loop(session, handler)

    async def _resume_or_replace(self, incoming: Session) -> Session:
        """MQTT-3.1.2-4/6 and 3.1.4-2: reuse or discard the stored session; close a connection holding it."""
        client_id = incoming.client_id
        existing, old_handler = self._sessions.get(client_id, (None, None))
        if old_handler is not None and existing is not None and existing.transitions.is_connected():
            old_handler.abort("taken_over")
            await old_handler.stop()
        if incoming.clean_session or existing is None:
            if existing is not None:
                await self._delete_session(client_id)
            incoming.parent = 0
            if self._state is not None:
                self._state.touch(incoming)
            return incoming
        # CleanSession=0 with a stored session: take the new connection's will, keepalive and credentials.
        for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "username", "password"):
            setattr(existing, attr, getattr(incoming, attr))
        existing.keep_alive = incoming.keep_alive
        existing.clean_session = False
        existing.is_anonymous = incoming.is_anonymous
        existing.remote_address, existing.remote_port = incoming.remote_address, incoming.remote_port
        existing.ssl_object = incoming.ssl_object
        existing.parent = 1
        if existing.transitions.is_connected():
            existing.transitions.disconnect()
        return existing

    async def _handle_disconnect(self, session: Session, handler: Any, disconnect_waiter: Any) -> None:
        current = self._sessions.get(session.client_id, (None, None))[1]
        if current is not handler or handler.closed_by == "taken_over":
            # Taken over by a newer connection of the same client: the session lives on there.
            await self._stop_handler(handler)
            return
        result = disconnect_waiter.result()
        clean = isinstance(result, DisconnectPacket)
        if not clean and session.will_flag:
            # MQTT-3.1.2-8: the network failed or the broker closed it; publish the will.
            await self._broadcast_message(session, session.will_topic, session.will_message, session.will_qos)
            if session.will_retain:
                await self.retain_message(session, session.will_topic, session.will_message, session.will_qos)
        await self._stop_handler(handler)
        session.transitions.disconnect()
        how = "disconnect" if clean else (getattr(handler, "closed_by", None) or "network")
        self._hooks.client_disconnected(session, how)
        if self._state is not None:
            self._state.touch(session)

    async def _session_monitor(self) -> None:
        """amqtt dropped disconnected anonymous sessions even with CleanSession=0 (MQTT-3.1.2-4, upstream #391)."""
        expiry = self.config.session_expiry_interval
        while True:
            now = time.time()
            expired = [
                client_id
                for client_id, (session, _) in self._sessions.items()
                if session.transitions.state == "disconnected"
                and (
                    session.clean_session
                    or (expiry is not None and (session.last_disconnect_time or now) < now - expiry)
                )
            ]
            for client_id in expired:
                session = self._sessions[client_id][0]
                await self._cleanup_session(client_id)
                if self._state is not None:
                    self._state.touch(session)
            await asyncio.sleep(1)

    # -- messages in -----------------------------------------------------------------------------------------

    async def _handle_message_delivery(self, session: Session, handler: Any, wait_deliver: Any) -> bool:
        message: ApplicationMessage | None = wait_deliver.result()
        if message is None:
            return True
        topic = message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # MQTT-4.7.3-1, 3.3.2-2, 4.7.2-1: a protocol violation closes the connection (amqtt broke out of the
            # message loop and left the socket open and the will unpublished).
            self._once.warning("mqtt_bad_topic", session.client_id, client=session.client_id, topic=topic)
            self._hooks.rejected("bad_topic", session.client_id)
            handler.abort("protocol")
            return True
        if not self._directory.may_publish(session.username, topic):
            return True
        # MQTT-3.3.5-1 / 4.3: deliver at min(publish QoS, subscription QoS); amqtt used the subscription's.
        await self._broadcast_message(session, topic, message.data, message.qos or QOS_0)
        packet = message.publish_packet
        if packet is not None and packet.retain_flag:
            await self.retain_message(session, topic, message.data, message.qos)
        return True

    async def retain_message(
        self, source_session: Session | None, topic_name: str | None, data: bytes | bytearray | None, qos: Any = None
    ) -> None:
        if topic_name is None:
            return
        if data:
            self._retained_messages[topic_name] = RetainedApplicationMessage(source_session, topic_name, data, qos)
        else:
            self._retained_messages.pop(topic_name, None)  # MQTT-3.3.1-10: an empty retained payload clears it
        if self._state is not None:
            self._state.retained_changed(topic_name)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if action == Action.PUBLISH:
            return self._directory.may_publish(session.username, topic)
        if action == Action.SUBSCRIBE:
            return self._directory.may_subscribe(session.username, topic)
        return True  # what a client receives was checked when it subscribed

    # -- subscriptions ---------------------------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        granted: int = await super().add_subscription((topic_filter, min(qos, QOS_2)), session)
        if granted != 0x80:
            # a repeated SUBSCRIBE replaces the QoS of the existing subscription (MQTT-3.8.4-3)
            subs = self._subscriptions[topic_filter]
            for i, (existing, _) in enumerate(subs):
                if existing.client_id == session.client_id:
                    subs[i] = (existing, granted)
        self._match_cache.clear()
        if self._state is not None:
            self._state.touch(session)
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        if deleted:
            self._match_cache.clear()
            if not self._subscriptions.get(a_filter, True):
                del self._subscriptions[a_filter]
            if self._state is not None:
                self._state.touch(session)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._subscriptions):
            self._del_subscription(topic_filter, session)

    def _targets(self, topic: str) -> list[_Target]:
        """Each subscribed session once, at the highest QoS of its matching filters (MQTT-3.3.5-1)."""
        targets = self._match_cache.get(topic)
        if targets is not None:
            return targets
        best: dict[str, _Target] = {}
        for topic_filter, subscriptions in self._subscriptions.items():
            if not _filter_matches(topic, topic_filter):
                continue
            for session, qos in subscriptions:
                seen = best.get(session.client_id)
                if seen is None or qos > seen.qos:
                    best[session.client_id] = _Target(session, qos)
        targets = list(best.values())
        if len(self._match_cache) >= _MATCH_CACHE_LIMIT:
            self._match_cache.clear()
        self._match_cache[topic] = targets
        return targets

    # -- messages out ----------------------------------------------------------------------------------------

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        data: bytes = broadcast["data"]
        source: Session | None = broadcast["session"]
        published_qos: int = broadcast.get("qos", QOS_0)
        for target in self._targets(topic):
            session = target.session
            qos = min(published_qos, target.qos)
            if session.transitions.state == "connected":
                handler = self._sessions.get(session.client_id, (None, None))[1]
                if handler is not None:
                    self.deliveries.spawn(handler.mqtt_publish(topic, data, qos, retain=False))
            elif not session.clean_session and qos > QOS_0:
                # MQTT-3.1.2-5: store QoS 1/2 for a disconnected persistent session, anonymous or not.
                self._enqueue(session, RetainedApplicationMessage(source, topic, data, qos))

    def _enqueue(self, session: Session, message: RetainedApplicationMessage) -> None:
        queue = session.retained_messages
        if queue.qsize() >= self._max_queued:
            self._once.warning(
                "mqtt_queue_full",
                session.client_id,
                client=session.client_id,
                limit=self._max_queued,
                topic=message.topic,
            )
            self._hooks.rejected("queue_full", session.client_id)
            return
        queue.put_nowait(message)
        if self._state is not None:
            self._state.touch(session)

    def _publish_session_queue(self, session: Session, handler: AgentHandler) -> None:
        """Deliver what was stored while the session was offline, in order, with RETAIN=0 (MQTT-3.3.1-9;
        amqtt set RETAIN=1 and blocked the session until every one was acknowledged)."""
        queue = session.retained_messages
        while not queue.empty():
            queued = queue.get_nowait()
            self.deliveries.spawn(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))
        if self._state is not None:
            self._state.touch(session)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._sessions.get(session.client_id, (None, None))[1]
        if handler is None:
            return
        for topic, retained in list(self._retained_messages.items()):
            if _filter_matches(topic, topic_filter):
                stored_qos = retained.qos if retained.qos is not None else qos
                self.deliveries.spawn(handler.mqtt_publish(topic, retained.data, min(qos, stored_qos), retain=True))

    # -- introspection ---------------------------------------------------------------------------------------

    def connected_sessions(self) -> Iterable[Session]:
        return (s for s, _ in self._sessions.values() if s.transitions.is_connected())


def _filter_matches(topic: str, topic_filter: str) -> bool:
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False  # MQTT-4.7.2-1
    return matches(topic, topic_filter)
