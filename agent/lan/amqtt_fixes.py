"""amqtt 0.12.1, made into a broker the devices can rely on.

amqtt embeds in our event loop, but measured against MQTT 3.1.1 its broker has gaps that hurt a club directly.
Each is closed here, in one subclass of its `Broker` and one of its protocol handler, pinned to the version below
(pyproject.toml pins it too). Every fix has a real-client test in tests/integration/test_broker_conformance.py
that fails without it, and the same tests pass against Debian's mosquitto.

- keepalive was not enforced, so a reader that lost power stayed "connected" and its will was never published
  (MQTT-3.1.2-24; upstream #308): `AgentHandler._tick`, with the session's keepalive x 1.5;
- unacknowledged QoS 1/2 deliveries were dropped from the session when the connection closed, so they were never
  redelivered on reconnect (MQTT-4.4.0-1; upstream #401): `AgentHandler.deliver`, the QoS 2 flow and
  `_retry_deliveries`;
- clients admitted anonymously never kept a persistent session (MQTT-3.1.2-4/5; upstream #391):
  `AgentBroker._fan_out`, `_session_monitor`;
- a QoS 0 publish reached a QoS 1 subscriber at QoS 1, and overlapping subscriptions got one copy per filter
  (MQTT-3.3.5-1, section 4.3): `AgentBroker._fan_out`, `_targets`;
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
- delivery tasks were kept in a FIFO that only shrank from the head, so one slow client grew it without bound;
- a client that sent DISCONNECT right after CONNECT could have its will published (a race in the waiter);
- the websocket writer lost what was written while a frame was being sent.

Added: a per-device inbound rate limit with TCP backpressure, as EMQX's `messages_rate` (broker.publish_rate_per_s),
so that a flooding device slows itself down instead of the broker and the agent: `PublishBucket`,
`AgentHandler._hold`; tested in tests/integration/test_broker_rate_limit.py (mosquitto has no such limit).

Speed (benchmarks/broker.py): amqtt made a task per packet received, a wait_for per read, a task and a future per
delivery, a task per ACL check and per plugin event, and passed each message through two queues. Here the TCP
transport hands bytes to a parser that handles PUBLISH, PUBACK and PINGREQ inline, routing is a synchronous
function (the access list is a dictionary lookup in `DeviceDirectory`), a delivery is a write, and what one turn
of the event loop writes to a client leaves in one send (`Cork`). The premises load went from 55 % to about 13 %
of a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

from amqtt.adapters import (
    BufferReader,
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
    WriterAdapter,
)
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, ApplicationMessage, OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from ..config import AGENT_USERNAME
from ..logs import OnceLogger, get_logger
from .auth import DeviceDirectory
from .broker_state import BrokerState
from .topics import matches

AMQTT_VERSION = "0.12.1"

log = get_logger("agent.lan.broker")
_amqtt_log = logging.getLogger("amqtt.broker")

# A connected client that has not acknowledged a QoS 1/2 delivery after this long is treated as gone: its
# connection is closed and the message stays in the session, to be redelivered when it reconnects (4.4).
ACK_TIMEOUT_S = 30.0
WATCHDOG_S = 5.0
MAX_WRITE_BUFFER = 1 << 20  # bytes queued to one client before it is cut as a reader that reads nothing
KEEPALIVE_GRACE = 1.5  # MQTT-3.1.2-24: disconnect after 1.5 x the client's keepalive without a packet
# While a rate-limited device's publishes wait, the broker reads on until this much of it is buffered (and answers
# the PUBACKs and PINGREQs in it), then leaves the rest in the socket: TCP then slows the device itself.
THROTTLE_BUFFER = 16 * 1024
_TIMER_SLACK_S = 0.001  # a timer may fire a hair early: wake just after the token is there
_MATCH_CACHE_LIMIT = 4096


class PacketTooLarge(MQTTError):  # type: ignore[misc]  # amqtt ships no type information
    pass


Route = Callable[["AgentHandler", str, bytes, int, bool], None]  # (handler, topic, payload, qos, retain)
Throttled = Callable[["AgentHandler", bool], None]  # (handler, first publish held in this episode)


class BrokerHooks(Protocol):
    """What the rest of the agent hears from the broker (presence, metrics, persistence)."""

    def client_connected(self, session: Session) -> None: ...

    def client_disconnected(self, session: Session, how: str) -> None: ...

    def rejected(self, reason: str, client: str) -> None: ...


@runtime_checkable
class ThrottleHooks(Protocol):
    """Optional beside `BrokerHooks`: a PUBLISH from `client` had to wait for its device's rate limit."""

    def throttled(self, client: str) -> None: ...


class PublishBucket:
    """A token bucket for one device's PUBLISH packets: `rate` a second sustained, `burst` at once."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> float:
        """Take a token and return 0.0, or take nothing and return how long until there is one."""
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate + _TIMER_SLACK_S


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


class Cork:
    """Connections with bytes queued in this turn of the event loop; flushed together at the end of the turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handlers: list[AgentHandler] = []

    def add(self, handler: AgentHandler) -> None:
        if not self._handlers:
            self._loop.call_soon(self._flush)
        self._handlers.append(handler)

    def _flush(self) -> None:
        handlers, self._handlers = self._handlers, []
        for handler in handlers:
            handler.flush()


class Deliveries:
    """The few tasks a broker still starts (QoS 2 flows, redeliveries, websocket flushes). amqtt kept a task per
    delivery in a FIFO trimmed only from its head, so one client that never acknowledged grew it without bound."""

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


class AgentHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler with keepalive enforced and in-flight state kept until acknowledged."""

    _disconnect_waiter: asyncio.Future[DisconnectPacket | None] | None

    def __init__(
        self,
        plugins_manager: Any,
        deliveries: Deliveries,
        loop: asyncio.AbstractEventLoop,
        route: Route,
        max_packet: int,
        corked: Cork,
        on_throttled: Throttled,
    ) -> None:
        super().__init__(plugins_manager, loop=loop)
        self._pending: list[bytes] = []
        self._corked = corked
        self._rx = bytearray()
        self._slow: asyncio.Queue[tuple[int, int, int, bytes] | _Violation | None] = asyncio.Queue()
        self._deliveries = deliveries
        self._route = route
        self._max_packet = max_packet
        self.closing = False
        self.closed_by: str | None = None  # "keepalive", "too_large", "protocol": why the broker closed it
        self._rx_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ack_first: int | None = None
        self._ack_since = 0.0
        self._flushing = False
        # The device's inbound rate limit (see `_hold`); None: not limited (the agent's own clients).
        self.bucket: PublishBucket | None = None
        self._on_throttled = on_throttled
        self._release_at: asyncio.TimerHandle | None = None  # TCP: when the publish at the head of _rx may go
        self._throttled_since: float | None = None  # start of this throttle episode
        self._held = 0  # publishes that had to wait in this episode
        self._waiting = False  # the publish now waiting has been counted
        self._paused_at: float | None = None  # since when the broker has not been reading this client
        self._ahead = 0  # the PUBACKs and PINGREQs of _rx[:_ahead] have been handled (see `_look_ahead`)
        self._eof_pending = False  # the client half-closed behind publishes that still wait

    # -- the hot path (see the module docstring) --------------------------------------------------------------
    #
    # Received bytes are parsed where they arrive (`_feed` on TCP, `_pull_mode` on websockets); PUBLISH at
    # QoS 0/1, PUBACK and PINGREQ are handled there and then, a delivery is queued bytes (QoS 1 in-flight state
    # in the session until the PUBACK), and QoS 2 and the rarer packets go, in order, to amqtt's own handlers.

    async def _reader_loop(self) -> None:
        session = self.session
        assert self._reader_ready is not None
        inner = self.reader._inner if isinstance(self.reader, PacketSizeGuard) else self.reader
        self._rx_at = self._loop.time()
        self._tick()
        self._reader_ready.set()
        try:
            protocol = _push_protocol(self.writer)
            if protocol is not None and isinstance(inner, StreamReaderAdapter):
                await self._push_mode(protocol, inner._reader)
            else:
                await self._pull_mode(_exact(inner))
        except _Violation as exc:
            _amqtt_log.info("closing %s: %s", session.client_id, exc)
            if self.closed_by is None:
                self.closed_by = "protocol"
        except (asyncio.IncompleteReadError, ConnectionError, NoDataError, asyncio.CancelledError):
            pass
        finally:
            self._cancel_timers()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _push_mode(self, protocol: PushProtocol, stream: asyncio.StreamReader) -> None:
        """TCP: the transport hands each chunk to `_feed`, which handles every complete packet in it at once;
        only the rare packets that need amqtt's coroutines come back here, in order, through `_slow`."""
        buffered: bytearray = stream._buffer  # type: ignore[attr-defined]  # what arrived with the CONNECT
        self._rx = bytearray(buffered)
        buffered.clear()
        protocol.push, protocol.push_eof = self._feed, self._eof
        self._parse()
        self._flow()
        if stream.at_eof():
            self._eof()
        while True:
            item = await self._slow.get()
            if item is None:
                return
            if isinstance(item, _Violation):
                raise item
            await self._other(*item)

    def _feed(self, data: bytes) -> None:
        self._rx += data
        self._rx_at = self._loop.time()
        try:
            if self._release_at is None:
                self._parse()
            else:
                self._look_ahead()
            if self._release_at is not None or self._paused_at is not None:
                self._flow()
        except _Violation as exc:
            self._violated(exc)

    def _violated(self, exc: _Violation) -> None:
        self._rx.clear()
        self._slow.put_nowait(exc)
        self.abort("protocol")

    def _eof(self) -> None:
        transport = _transport(self.writer)
        if self._release_at is not None and transport is not None and not transport.is_closing():
            # Half-closed behind publishes that wait for the rate limit: they were sent before the FIN, and the
            # connection can still carry their PUBACKs. The end comes when they are taken (`_unthrottled`).
            self._eof_pending = True
            return
        self._slow.put_nowait(None)

    def _parse(self) -> None:
        buf, pos, end = self._rx, 0, len(self._rx)
        bucket = self.bucket
        now = self._loop.time() if bucket is not None else 0.0
        while (frame := _frame(buf, pos)) is not None:
            i, length = frame
            self._check_size(length)
            if end - i < length:
                break
            first = buf[pos]
            if bucket is not None and first >> 4 == 3:
                wait = bucket.take(now)
                if wait:
                    del buf[:pos]
                    self._ahead = max(0, self._ahead - pos)
                    self._hold(wait)
                    return
                self._waiting = False
            pos = i + length
            self._dispatch(first, bytes(buf[i:pos]))
        del buf[:pos]
        if self._throttled_since is not None:
            self._unthrottled()

    # -- the inbound rate limit --------------------------------------------------------------------------------
    #
    # A device over its bucket (broker.publish_rate_per_s) is not cut and loses nothing: its next PUBLISH, and
    # everything after it, waits in _rx until the bucket has a token (`_release`), so its PUBACKs come late and a
    # QoS 1 client, bounded by its window, slows down. The broker reads on, answering PUBACKs and PINGREQs
    # (`_look_ahead`), until THROTTLE_BUFFER bytes wait; then it stops reading the socket and TCP pushes back on
    # a client that does not wait for PUBACKs (QoS 0). The time its bytes wait on the broker counts against
    # neither its keepalive nor its acknowledgements (`_tick`).

    def _hold(self, wait: float) -> None:
        """The publish at the head of _rx waits `wait` s for the device's bucket."""
        self._note_held()
        self._release_at = self._loop.call_later(wait, self._release)
        self._look_ahead()

    def _note_held(self) -> None:
        if self._waiting:
            return  # the same publish again (the bucket was shared, or the timer early)
        self._waiting = True
        first = self._throttled_since is None
        if first:
            self._throttled_since, self._held = self._loop.time(), 0
        self._held += 1
        self._on_throttled(self, first)

    def _release(self) -> None:
        self._release_at = None
        if self.closing:
            return
        try:
            self._parse()
            self._flow()
        except _Violation as exc:
            self._violated(exc)

    def _unthrottled(self) -> None:
        """The episode is over: every publish the device sent has been taken."""
        now = self._loop.time()
        since = self._throttled_since if self._throttled_since is not None else now
        log.debug(
            "mqtt_client_throttle_ended", client=self.session.client_id, seconds=round(now - since, 3), held=self._held
        )
        self._throttled_since = None
        self._rx_at = now  # its keepalive counts from here
        self._ahead = 0
        if self._eof_pending:
            self._eof_pending = False
            self._slow.put_nowait(None)

    def _look_ahead(self) -> None:
        """Handle the PUBACKs and PINGREQs behind the waiting publish now: they are not rate-limited, and a client
        must neither be cut for acknowledging late nor miss its PINGRESP. Everything else keeps its order."""
        buf, pos = self._rx, self._ahead
        while (frame := _frame(buf, pos)) is not None:
            start, length = frame
            self._check_size(length)
            end = start + length
            if end > len(buf):
                break
            first = buf[pos]
            if first >> 4 in (4, 12):  # PUBACK, PINGREQ
                self._dispatch(first, bytes(buf[start:end]))
                del buf[pos:end]
            else:
                pos = end
        self._ahead = pos

    def _flow(self) -> None:
        """Read this client while less than THROTTLE_BUFFER of it waits; past that, leave it in the socket."""
        hold = self._release_at is not None and len(self._rx) >= THROTTLE_BUFFER
        if hold == (self._paused_at is not None):
            return
        transport = _read_transport(self.writer)
        if transport is None or transport.is_closing():
            return
        if hold:
            transport.pause_reading()
            self._paused_at = self._loop.time()
        else:
            transport.resume_reading()
            self._unpaused()

    def _unpaused(self) -> None:
        """Reading again: the time the broker did not read counts against neither keepalive nor acknowledgement."""
        if self._paused_at is None:
            return
        now = self._loop.time()
        self._ack_since += now - self._paused_at
        self._rx_at = now
        self._paused_at = None

    async def _take_token(self, bucket: PublishBucket) -> None:
        """Websockets: wait for the device's bucket before taking the publish just read. Nothing is read while
        it waits, so the websocket's own flow control pushes back on the client."""
        wait = bucket.take(self._loop.time())
        if not wait:
            if self._throttled_since is not None:
                self._unthrottled()
            return
        self._note_held()
        while wait:
            self._paused_at = self._loop.time()
            try:
                await asyncio.sleep(wait)
            finally:
                self._unpaused()
            wait = bucket.take(self._loop.time())
        self._waiting = False

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._release_at):
            if handle is not None:
                handle.cancel()
        self._release_at = None

    async def _pull_mode(self, read: Callable[[int], Any]) -> None:
        """Websockets (and anything else): read packet by packet."""
        while True:
            head = await read(2)
            first, byte = head[0], head[1]
            length, shift = byte & 0x7F, 7
            while byte & 0x80:
                if shift > 21:
                    raise _Violation("malformed remaining length")
                byte = (await read(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
            self._check_size(length)
            body = await read(length) if length else b""
            self._rx_at = self._loop.time()
            if self.bucket is not None and first >> 4 == 3:
                await self._take_token(self.bucket)
            self._dispatch(first, body)
            while not self._slow.empty():
                item = self._slow.get_nowait()
                if item is not None and not isinstance(item, _Violation):
                    await self._other(*item)

    def _check_size(self, length: int) -> None:
        if 1 + _varint_size(length) + length > self._max_packet:
            self.closed_by = "too_large"
            raise _Violation(f"packet of {length} bytes exceeds the broker's limit of {self._max_packet}")

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:
            self._publish(first, body)
        elif kind == 4:  # PUBACK: the delivery is done (MQTT-4.3.2)
            self.session.inflight_out.pop(int.from_bytes(body[:2]), None)
        elif kind == 12:
            self._write(b"\xd0\x00")  # PINGRESP
        else:
            self._slow.put_nowait((kind, first & 0x0F, len(body), body))

    def _publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        end = 2 + int.from_bytes(body[:2])
        try:
            topic = body[2:end].decode()
        except UnicodeDecodeError:
            raise _Violation("topic is not UTF-8") from None  # MQTT-1.5.3-1
        if qos == 0:
            self._route(self, topic, body[end:], 0, bool(first & 0x01))
        elif qos == 1:
            packet_id = body[end : end + 2]
            self._write(b"\x40\x02" + packet_id)  # PUBACK before routing: the message is ours now
            self._route(self, topic, body[end + 2 :], 1, bool(first & 0x01))
        elif qos == 2:
            self._deliveries.spawn(self._slow_publish(first, body))
        else:
            raise _Violation("QoS 3")  # MQTT-3.3.1-4

    async def _slow_publish(self, first: int, body: bytes) -> None:
        fixed = MQTTFixedHeader(3, first & 0x0F, len(body))
        await self.handle_publish(await PublishPacket.from_stream(BufferReader(body), fixed_header=fixed))

    async def _other(self, kind: int, flags: int, length: int, body: bytes) -> None:
        handlers = {
            8: self.handle_subscribe,
            10: self.handle_unsubscribe,
            5: self.handle_pubrec,
            6: self.handle_pubrel,
            7: self.handle_pubcomp,
            14: self.handle_disconnect,
        }
        handle = handlers.get(kind)
        if handle is None:  # a second CONNECT, a server-only packet or a reserved type
            raise _Violation(f"packet type {kind} is not allowed from a client here")
        fixed = MQTTFixedHeader(kind, flags, length)
        try:
            packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
        except (MQTTError, NoDataError, ValueError, IndexError) as exc:
            raise _Violation(f"malformed packet of type {kind}: {exc}") from exc
        await handle(packet)

    def deliver(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Queue a PUBLISH for this turn's send (no task, no await). At QoS 1 it stays in the session's in-flight
        set until the client's PUBACK, so a connection lost meanwhile redelivers it on reconnect."""
        if qos == 2:
            self._deliveries.spawn(self.mqtt_publish(topic, payload, 2, retain))
            return
        session = self.session
        if session is None:
            return
        flags = 0x30 | (0x01 if retain else 0)
        if qos:
            packet_id = session.next_packet_id
            session.inflight_out[packet_id] = OutgoingApplicationMessage(packet_id, topic, 1, payload, retain)
            self._write(_publish_bytes(flags | 0x02, topic, packet_id, payload))
        else:
            self._write(_publish_bytes(flags, topic, None, payload))

    def _write(self, data: bytes) -> None:
        """Queue bytes for the client; everything queued in one turn of the event loop leaves in one send.

        A send is most of what a message costs the broker (on loopback the kernel's receive path runs in the
        sender's call), and a turn often has several packets for one client: PUBACKs and deliveries."""
        if self.closing or self.writer is None:
            return
        if self._pending:
            self._pending.append(data)
            return
        self._pending.append(data)
        self._corked.add(self)

    def flush(self) -> None:
        """Send what `_write` queued (called once per turn of the event loop by the broker)."""
        pending, self._pending = self._pending, []
        writer = self.writer
        if self.closing or writer is None or not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        if isinstance(writer, StreamWriterAdapter):
            transport = writer._writer.transport
            if transport.is_closing():
                return
            transport.write(data)
            if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                # A client that reads nothing (a tablet on a dying link) must not hold the broker's memory.
                self.abort("slow_reader")
            return
        writer.write(data)
        if not self._flushing:
            self._flushing = True
            self._deliveries.spawn(self._flush())

    async def _flush(self) -> None:
        try:
            await self.writer.drain()  # websockets: one frame for everything written meanwhile
        except Exception:
            self.abort("network")
        finally:
            self._flushing = False

    def _tick(self) -> None:
        """Keepalive (MQTT-3.1.2-24) and acknowledgement watchdog: one timer per connection."""
        if self.closing:
            return
        now = self._loop.time()
        keepalive = self.session.keep_alive
        if self._throttled_since is not None:
            self._rx_at = now  # its packets wait on the broker's rate limit: the client is not silent
        if keepalive and now - self._rx_at >= keepalive:
            self.handle_read_timeout()
            return
        if self._paused_at is None:  # while the broker does not read, a PUBACK cannot arrive (`_unpaused`)
            first = next(iter(self.session.inflight_out), None)
            if first is None or first != self._ack_first:
                self._ack_first, self._ack_since = first, now
            elif now - self._ack_since >= ACK_TIMEOUT_S:
                # Connected but not acknowledging: treat it as gone; the message is redelivered when it is back.
                self.abort("ack_timeout")
                return
        delay = min(WATCHDOG_S, self._rx_at + keepalive - now) if keepalive else WATCHDOG_S
        self._timer = self._loop.call_later(max(delay, 0.01), self._tick)

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

    async def start(self) -> None:
        # amqtt created the disconnect waiter after the reader started and dropped it once a DISCONNECT was
        # handled, so a client that sent DISCONNECT right after CONNECT had its will published.
        if self._disconnect_waiter is None:
            self._disconnect_waiter = self._loop.create_future()
        await ProtocolHandler.start(self)

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(disconnect)  # and kept: wait_disconnect() may be called after this

    async def wait_disconnect(self) -> DisconnectPacket | None:
        if self._disconnect_waiter is None:
            self._disconnect_waiter = self._loop.create_future()
        result: DisconnectPacket | None = await self._disconnect_waiter
        return result

    async def stop(self) -> None:
        self.closing = True
        self._cancel_timers()
        await super().stop()

    async def _retry_deliveries(self) -> None:
        """MQTT-4.4.0-1: resend what the client never acknowledged, with its original packet id and DUP=1,
        in order. (amqtt awaited every retry, up to 10 s each, before the session started.)"""
        session = self.session
        for message in list(session.inflight_in.values()):
            self._deliveries.spawn(self._handle_message_flow(message))
        for packet_id, message in list(session.inflight_out.items()):
            if message.qos == 1:
                flags = 0x3A | (0x01 if message.retain else 0)
                self._write(_publish_bytes(flags, message.topic, packet_id, bytes(message.data)))
            else:
                self._deliveries.spawn(self._handle_message_flow(message))

    async def mqtt_publish(
        self, topic: str, data: bytes | bytearray, qos: int | None, retain: bool, ack_timeout: int | None = None
    ) -> Any:
        """amqtt's entry point for a delivery: QoS 0/1 take the synchronous path, QoS 2 amqtt's flow."""
        if qos == 2:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        self.deliver(topic, bytes(data), qos or 0, retain)
        return None

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
    ) -> PubrecPacket | PubcompPacket | None:
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


class PushProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, which can hand received bytes straight to a callback instead of a StreamReader
    (amqtt reads the CONNECT through the StreamReader; the session then switches to `push`)."""

    push: Callable[[bytes], None] | None = None
    push_eof: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.push is not None:
            self.push(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.push_eof is not None:
            self.push_eof()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.push_eof is not None:
            self.push_eof()
        super().connection_lost(exc)


def _read_transport(writer: WriterAdapter | None) -> asyncio.ReadTransport | None:
    """A TCP (or TLS) client's transport, to pause and resume reading; uvloop's transports only quack like it."""
    if isinstance(writer, StreamWriterAdapter):
        return cast(asyncio.ReadTransport, writer._writer.transport)
    return None


def _push_protocol(writer: WriterAdapter | None) -> PushProtocol | None:
    if isinstance(writer, StreamWriterAdapter):
        protocol = getattr(writer._writer, "_protocol", None)
        if isinstance(protocol, PushProtocol):
            return protocol
    return None


class _Violation(Exception):
    """A client broke the protocol: its connection is closed (and its will published)."""


def _frame(buf: bytearray, pos: int) -> tuple[int, int] | None:
    """(where its body starts, its length) for the packet at `pos`; None while its length prefix is incomplete
    (the body may be incomplete still)."""
    end = len(buf)
    if end - pos < 2:
        return None
    byte = buf[pos + 1]
    length, shift, i = byte & 0x7F, 7, pos + 2
    while byte & 0x80:
        if i >= end:
            return None
        if shift > 21:
            raise _Violation("malformed remaining length")
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        i += 1
    return i, length


def _exact(reader: ReaderAdapter) -> Callable[[int], Any]:
    async def read(n: int) -> bytes:
        data: bytes = await reader.read(n)
        if len(data) < n:
            raise asyncio.IncompleteReadError(data, n)
        return data

    return read


def _publish_bytes(flags: int, topic: str, packet_id: int | None, payload: bytes) -> bytes:
    name = topic.encode()
    length = 2 + len(name) + (2 if packet_id is not None else 0) + len(payload)
    head = bytearray((flags,))
    while True:
        byte, length = length & 0x7F, length >> 7
        head.append(byte | 0x80 if length else byte)
        if not length:
            break
    head += len(name).to_bytes(2)
    head += name
    if packet_id is not None:
        head += packet_id.to_bytes(2)
    return bytes(head) + payload


class SafeWebSocketsWriter(WebSocketsWriter):  # type: ignore[misc]
    """amqtt's drain() sent the buffer and then replaced it, losing what was written during the send."""

    _stream: io.BytesIO

    async def drain(self) -> None:
        data = self._stream.getvalue()
        self._stream = io.BytesIO()
        if data:
            await self._protocol.send(data)


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
        publish_rate_per_s: float = 0.0,  # per device; 0: no limit
        publish_burst: int = 1,
        state: BrokerState | None = None,  # None: nothing survives a restart
    ) -> None:
        super().__init__(config)
        self._directory = directory
        self._hooks = hooks
        self._throttle_hook = hooks.throttled if isinstance(hooks, ThrottleHooks) else None
        self._publish_rate = publish_rate_per_s
        self._publish_burst = publish_burst
        self._buckets: dict[str, PublishBucket] = {}  # by device account: one per configured device at most
        self._max_packet = max_packet_bytes
        self._max_queued = max_queued_messages
        self._state = state
        self._match_cache: dict[str, list[_Target]] = {}
        self.deliveries = Deliveries()
        self._cork = Cork(self._loop)
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

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        loop = asyncio.get_running_loop()
        connected = functools.partial(self.stream_connected, listener_name=listener_name)

        def protocol() -> PushProtocol:
            return PushProtocol(asyncio.StreamReader(loop=loop), connected, loop=loop)

        return await loop.create_server(protocol, address, port, reuse_address=True, ssl=ssl_context)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        guarded = PacketSizeGuard(StreamReaderAdapter(reader), self._max_packet, self._too_large(writer.transport))
        await self._client_connected(listener_name, guarded, StreamWriterAdapter(writer))

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        guarded = PacketSizeGuard(WebSocketsReader(websocket), self._max_packet, self._too_large(websocket.transport))
        await self._client_connected(listener_name, guarded, SafeWebSocketsWriter(websocket))

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
        handler = AgentHandler(
            self.plugins_manager, self.deliveries, self._loop, self.route, self._max_packet, self._cork, self._throttled
        )
        return handler, incoming

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
        handler.bucket = self._bucket_for(session)
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

    # -- the inbound rate limit -------------------------------------------------------------------------------

    def _bucket_for(self, session: Session) -> PublishBucket | None:
        """A device's bucket is its account's: shared by its connections and kept across its reconnects, so a
        device can neither multiply its rate by connecting twice nor refill its burst by reconnecting. The
        agent's own clients (the dispatcher) are not limited: they answer every device."""
        if self._publish_rate <= 0 or session.username == AGENT_USERNAME:
            return None
        now = self._loop.time()
        if session.username is None:  # anonymous (broker.allow_anonymous): nothing to key on but the connection
            return PublishBucket(self._publish_rate, self._publish_burst, now)
        bucket = self._buckets.get(session.username)
        if bucket is None:  # authenticated: a configured device, so the dictionary stays as small as the list
            bucket = self._buckets[session.username] = PublishBucket(self._publish_rate, self._publish_burst, now)
        return bucket

    def _throttled(self, handler: AgentHandler, first: bool) -> None:
        """A publish of `handler`'s client waits for its bucket: logged once an episode, counted each time."""
        client = handler.session.client_id
        if first:
            self._once.warning(
                "mqtt_client_throttled",
                client,
                client=client,
                username=handler.session.username,
                rate_per_s=self._publish_rate,
                burst=self._publish_burst,
            )
        if self._throttle_hook is not None:
            self._throttle_hook(client)

    # -- messages in -----------------------------------------------------------------------------------------

    def route(self, handler: AgentHandler, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A PUBLISH from a client, synchronously: check, fan out, retain."""
        session = handler.session
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # MQTT-4.7.3-1, 3.3.2-2, 4.7.2-1: a protocol violation closes the connection (amqtt broke out of the
            # message loop and left the socket open and the will unpublished).
            self._once.warning("mqtt_bad_topic", session.client_id, client=session.client_id, topic=topic)
            self._hooks.rejected("bad_topic", session.client_id)
            handler.abort("protocol")
            return
        if not self._directory.may_publish(session.username, topic):
            return
        self._fan_out(session, topic, payload, qos)
        if retain:
            self._retain(session, topic, payload, qos)

    def _fan_out(self, source: Session | None, topic: str, payload: bytes, published_qos: int) -> None:
        """MQTT-3.3.5-1 / 4.3: each subscriber once, at min(publish QoS, its highest matching subscription's).
        amqtt used the subscription's QoS, and sent one copy per matching filter."""
        sessions = self._sessions
        for target in self._targets(topic):
            session = target.session
            qos = published_qos if published_qos < target.qos else target.qos
            if session.transitions.state == "connected":
                handler = sessions.get(session.client_id, (None, None))[1]
                if handler is not None:
                    handler.deliver(topic, payload, qos)
            elif not session.clean_session and qos > QOS_0:
                # MQTT-3.1.2-5: store QoS 1/2 for a disconnected persistent session, anonymous or not.
                self._enqueue(session, RetainedApplicationMessage(source, topic, payload, qos))

    async def _handle_message_delivery(self, session: Session, handler: Any, wait_deliver: Any) -> bool:
        """What amqtt's own flows deliver: QoS 2 publishes, once their PUBREL arrived."""
        message: ApplicationMessage | None = wait_deliver.result()
        if message is not None:
            packet = message.publish_packet
            retain = packet is not None and bool(packet.retain_flag)
            self.route(handler, message.topic, bytes(message.data), message.qos or QOS_0, retain)
        return True

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | bytearray | None, force_qos: Any = None
    ) -> None:
        """Wills and internal messages: straight to the subscribers, no queue in between."""
        if topic and data is not None:
            self._fan_out(session, topic, bytes(data), force_qos or QOS_0)

    async def retain_message(
        self, source_session: Session | None, topic_name: str | None, data: bytes | bytearray | None, qos: Any = None
    ) -> None:
        if topic_name is not None:
            self._retain(source_session, topic_name, bytes(data or b""), qos or QOS_0)

    def _retain(self, source: Session | None, topic: str, payload: bytes, qos: int) -> None:
        if payload:
            self._retained_messages[topic] = RetainedApplicationMessage(source, topic, payload, qos)
        else:
            self._retained_messages.pop(topic, None)  # MQTT-3.3.1-10: an empty retained payload clears it
        if self._state is not None:
            self._state.retained_changed(topic)

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
            handler.deliver(queued.topic, bytes(queued.data), queued.qos or QOS_0)
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
                handler.deliver(topic, bytes(retained.data), min(qos, stored_qos), retain=True)

    # -- introspection ---------------------------------------------------------------------------------------

    def connected_sessions(self) -> Iterable[Session]:
        return (s for s, _ in self._sessions.values() if s.transitions.is_connected())


def _filter_matches(topic: str, topic_filter: str) -> bool:
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False  # MQTT-4.7.2-1
    return matches(topic, topic_filter)
