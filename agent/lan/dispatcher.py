"""The agent's own MQTT client: receives device messages, feeds the access service, publishes replies.

Decisions run one at a time from a bounded queue (they serialise on the store anyway); heartbeats are handled
inline so they never wait behind an fsync. A flooding device is rate-limited per device before the queue, and
is told so at most once a second. Nothing malformed reaches the service; every rejection is counted and
logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from .. import __version__
from ..access import AccessService, Outcome
from ..clock import Clock
from ..config import Config
from ..domain.model import Reason
from ..errors import PayloadError
from ..logs import OnceLogger, get_logger
from ..loop import check_cancelled
from ..metrics import Metrics
from ..store.repo import iso
from . import payloads, topics
from .presence import DeviceState, Presence
from .topics import Kind

log = get_logger("agent.lan.dispatcher")

QUEUE_LIMIT = 1000
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
AUTH_BACKOFF_S = 60.0
KEEPALIVE_S = 30
# Court screens are refreshed at most this often: a burst of taps on one court becomes one retained update.
COURT_STATE_COALESCE_S = 0.02
MAX_IN_FLIGHT = 1000


class TokenBucket:
    """Per-key token buckets with a bounded number of keys."""

    def __init__(self, rate: float, burst: int, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_keys = max_keys

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.pop(next(iter(self._buckets)))
        return allowed


@dataclass(frozen=True, slots=True)
class Job:
    route: topics.Route
    payload: bytes
    reply: tuple[str, bytes, bool] | None = None  # (topic, payload, retain) to publish in order, instead of deciding
    probe: asyncio.Future[None] | None = None  # the watchdog's: answered when the worker reaches it


class Dispatcher:
    def __init__(
        self, service: AccessService, config: Config, metrics: Metrics, presence: Presence, clock: Clock
    ) -> None:
        self._service = service
        self._config = config
        self._metrics = metrics
        self._presence = presence
        self._clock = clock
        self._limit = config.broker.max_payload_bytes
        self._queue: asyncio.Queue[Job] = asyncio.Queue(QUEUE_LIMIT)
        self._buckets = TokenBucket(config.policy.scan_rate_per_s, config.policy.scan_burst)
        self._told_limited: dict[str, float] = {}
        self._once = OnceLogger(log)
        self._client: aiomqtt.Client | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._dirty_courts: set[str] = set()
        self._dirty_presence: dict[str, DeviceState] = {}
        self._courts_changed = asyncio.Event()
        self._local: dict[str, list[Callable[[bytes], None]]] = {}  # topic -> in-process listeners
        self.connected = asyncio.Event()

    # -- connection ------------------------------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {
                "state": state,
                "version": __version__,
                "agent_id": self._config.agent.agent_id,
                "at": iso(self._clock.wall()),
            }
        ).encode()

    async def run(self, host: str, port: int, username: str, password: str, tls: ssl.SSLContext | None = None) -> None:
        """Decide what arrives (over MQTT or from attached readers), and keep the MQTT connection up; returns only
        by cancellation. The decision worker outlives connections: an attached reader is answered while the
        broker connection is being re-established."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._worker())
            tg.create_task(self._court_publisher())  # local listeners (pages) hear court changes offline too
            tg.create_task(self._connect(host, port, username, password, tls))

    async def _connect(self, host: str, port: int, username: str, password: str, tls: ssl.SSLContext | None) -> None:
        """Connect, serve, reconnect with capped jittered backoff."""
        backoff = BACKOFF_MIN_S
        will = aiomqtt.Will(topics.AGENT_STATUS, self._status("offline"), qos=1, retain=True)
        while True:
            check_cancelled()
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    username=username,
                    password=password,
                    will=will,
                    keepalive=KEEPALIVE_S,
                    identifier=f"agent-{self._config.agent.agent_id}",
                    clean_session=False,
                    timeout=CONNECT_TIMEOUT_S,
                    max_queued_incoming_messages=QUEUE_LIMIT * 4,
                    socket_options=topics.NODELAY,
                    tls_context=tls,
                ) as client:
                    self._client = client
                    await self._serve(client)
            except aiomqtt.MqttCodeError as exc:
                wait = AUTH_BACKOFF_S if exc.rc in (4, 5, 134, 135) else backoff
                self._disconnected(f"refused: {exc}", wait)
                await asyncio.sleep(wait)
            except aiomqtt.MqttError as exc:
                self._disconnected(str(exc), backoff)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = BACKOFF_MIN_S

    def _disconnected(self, why: str, wait: float) -> None:
        self._client = None
        self.connected.clear()
        self._metrics.mqtt_connected.set(0)
        self._once.warning("mqtt_disconnected", why[:80], error=why, retry_in_s=round(wait, 1))

    async def _serve(self, client: aiomqtt.Client) -> None:
        await client.publish(topics.AGENT_STATUS, self._status("online"), qos=1, retain=True)
        await self.subscribe_all()
        for court_id in self._service.courts:
            await self.publish_court(court_id)
        for state in self._presence.snapshot():
            await self.publish(topics.presence(state.device_id), state.to_json(), retain=True)
        self.connected.set()
        self._metrics.mqtt_connected.set(1)
        log.info("mqtt_ready", subscriptions=len(topics.SUBSCRIPTIONS))
        try:
            async for message in client.messages:
                self._receive(message)
        finally:
            self.connected.clear()

    async def subscribe_all(self) -> None:
        """(Re)subscribe to every inbound topic; the broker then redelivers any stored retained messages."""
        if self._client is not None:
            for topic_filter in topics.SUBSCRIPTIONS:
                await self._client.subscribe(topic_filter, qos=1)

    async def announce_offline(self) -> None:
        """A clean stop says so itself; the will covers the unclean ones."""
        if self._client is not None:
            try:
                async with asyncio.timeout(2):
                    await self._client.publish(topics.AGENT_STATUS, self._status("offline"), qos=1, retain=True)
            except (aiomqtt.MqttError, TimeoutError):
                pass

    async def publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        await self._publish_raw(topic, _encode(payload), retain)

    async def _publish_raw(self, topic: str, data: bytes, retain: bool) -> None:
        for listener in self._local.get(topic, ()):
            try:
                listener(data)
            except Exception:  # an attached reader's bug must not stop the decisions
                log.exception("local_listener_failed", topic=topic)
        client = self._client
        if client is None:
            self._once.warning("publish_while_disconnected", topic.split("/")[0], topic=topic)
            return
        try:
            await client.publish(topic, data, qos=1, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            # The decision is already durable; a device that missed the reply repeats its msg_id and is
            # answered from the store.
            self._once.warning("publish_failed", topic.split("/")[0], topic=topic, error=str(exc))

    async def publish_court(self, court_id: str) -> None:
        await self.publish(topics.court_state(court_id), await self._service.court_state(court_id), retain=True)

    def court_changed(self, court_id: str) -> None:
        """Schedule a refresh of a court's retained state, off the decision path and coalesced."""
        self._dirty_courts.add(court_id)
        self._courts_changed.set()

    def presence_changed(self, state: DeviceState) -> None:
        """Schedule the retained agent/presence/{device} update, coalesced like the court screens."""
        self._dirty_presence[state.device_id] = state
        self._courts_changed.set()

    async def _court_publisher(self) -> None:
        while True:
            check_cancelled()
            await self._courts_changed.wait()
            await asyncio.sleep(COURT_STATE_COALESCE_S)
            self._courts_changed.clear()
            dirty, self._dirty_courts = self._dirty_courts, set()
            devices, self._dirty_presence = self._dirty_presence, {}
            for court_id in sorted(dirty):
                await self.publish_court(court_id)
            for device_id, state in sorted(devices.items()):
                await self.publish(topics.presence(device_id), state.to_json(), retain=True)

    async def _send(self, topic: str, payload: dict[str, Any]) -> None:
        """Hand a reply to the client without waiting for its PUBACK, so the worker can decide the next tap.

        paho queues packets in call order, so replies keep their order; the tasks are kept until done.
        """
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._publish_raw(topic, _encode(payload), False))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    # -- inbound ---------------------------------------------------------------------------------------------

    def _reject(self, kind: str, reason: str, key: str, detail: str) -> None:
        self._metrics.rejected.labels(kind, reason).inc()
        self._once.warning(
            "message_rejected", f"{kind}:{key}:{reason}", kind=kind, device=key, reason=reason, detail=detail
        )

    # -- attached readers (firmware_bridges.bridge.Link) ---------------------------------------------------

    async def publish_local(self, topic: str, payload: bytes) -> None:
        """A message from an attached reader: taken exactly as if it had arrived over MQTT."""
        self._accept(topic, payload, retain=False)

    def listen(self, topic: str, listener: Callable[[bytes], None]) -> None:
        """Hand every message the agent publishes on `topic` to `listener` as well (an attached reader's
        answers), before and whether or not it goes out over MQTT."""
        self._local.setdefault(topic, []).append(listener)

    def _receive(self, message: aiomqtt.Message) -> None:
        raw = message.payload if isinstance(message.payload, bytes | bytearray) else str(message.payload).encode()
        self._accept(message.topic.value, bytes(raw), message.retain)

    def _accept(self, topic: str, raw: bytes, retain: bool) -> None:
        route = topics.route(topic)
        if route is None:
            self._reject("unknown", "unknown_topic", topic, "not a topic the agent serves")
            return
        if route.kind is Kind.STATUS:
            self._device_status(route, raw)
            return
        if retain:
            # A stored retained command would be re-decided on every re-subscribe: never act on one, and clear it.
            self._reject(route.kind.value, "retained_command", route.device_or_court, topic)
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(Job(route, b"", reply=(topic, b"", True)))
            return
        now = time.perf_counter()
        key = f"{route.kind.value}:{route.device_or_court}"
        if not self._buckets.allow(key, now):
            self._rate_limited(route, raw, now)
            return
        try:
            self._queue.put_nowait(Job(route, raw))
        except asyncio.QueueFull:
            self._reject(route.kind.value, "queue_full", route.device_or_court, "decision queue is full")
            return
        self._metrics.queue_depth.set(self._queue.qsize())

    def _rate_limited(self, route: topics.Route, raw: bytes, now: float) -> None:
        self._reject(route.kind.value, "rate_limited", route.device_or_court, "too many messages")
        if route.kind is not Kind.SCAN:
            return
        reader = route.device_or_court
        if now - self._told_limited.get(reader, 0.0) >= 1.0:
            self._told_limited[reader] = now
            reply = self._service.denial(Reason.RATE_LIMITED, payloads.msg_id_of(raw, self._limit))
            # Queued behind the worker rather than a task of its own: a flood cannot multiply tasks.
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(Job(route, b"", reply=(topics.reader_response(reader), _encode(reply), False)))

    def _device_status(self, route: topics.Route, raw: bytes) -> None:
        device_id = route.device_or_court
        device = self._service.device(device_id)
        if device is None:
            self._reject("status", "unknown_device", device_id, "not a configured device")
            return
        if not raw:
            return  # a retained status being cleared
        try:
            status = payloads.decode_status(raw, self._limit)
        except PayloadError as exc:
            self._reject("status", exc.reason, device_id, exc.detail)
            return
        now = self._clock.wall()
        if status.state == "offline":
            self._presence.said_offline(device_id, now)
            return
        self._metrics.heartbeats.labels(device.kind).inc()
        self._presence.seen(
            device_id,
            now,
            how="heartbeat",
            battery=status.battery,
            app_version=status.app_version,
            charging=status.charging,
        )

    async def probe(self, within: float) -> bool:
        """Whether the decision worker takes a job from its queue within `within` s (agent/notify.py)."""
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Job(topics.Route(Kind.SCAN, "watchdog"), b"", probe=answered))
        except asyncio.QueueFull:  # a full queue is a stalled (or flooded) worker either way
            return False
        try:
            async with asyncio.timeout(within):
                await answered
        except TimeoutError:
            return False
        return True

    async def _worker(self) -> None:
        while True:
            check_cancelled()
            job = await self._queue.get()
            self._metrics.queue_depth.set(self._queue.qsize())
            try:
                await self._handle(job)
            except PayloadError as exc:
                self._reject(job.route.kind.value, exc.reason, job.route.device_or_court, exc.detail)

    async def _handle(self, job: Job) -> None:
        route, raw = job.route, job.payload
        if job.probe is not None:
            if not job.probe.done():
                job.probe.set_result(None)
            return
        if job.reply is not None:
            await self._publish_raw(*job.reply)
            return
        match route.kind:
            case Kind.SCAN:
                await self._scan(route.device_or_court, raw)
            case Kind.BUTTON:
                await self._button(route.device_or_court, raw)
            case Kind.CHECKIN | Kind.CHECKOUT:
                await self._tablet(route, raw)
            case Kind.CONSUMPTION:
                await self._consumption(route.device_or_court, raw)
            case _:
                raise AssertionError(route.kind)

    async def _finish(self, topic: str, outcome: Outcome) -> None:
        await self._send(topic, outcome.response)
        for court_id in outcome.courts:
            self.court_changed(court_id)

    async def _scan(self, reader_id: str, raw: bytes) -> None:
        reply_topic = topics.reader_response(reader_id)
        try:
            scan = payloads.decode(payloads.Scan, raw, self._limit)
        except PayloadError as exc:
            self._reject("scan", exc.reason, reader_id, exc.detail)
            self._metrics.scans.labels(reader_id, "denied", Reason.INVALID_REQUEST.value).inc()
            await self.publish(
                reply_topic, self._service.denial(Reason.INVALID_REQUEST, payloads.msg_id_of(raw, self._limit))
            )
            return
        self._presence.seen(reader_id, self._clock.wall())
        outcome = await self._service.scan(reader_id, scan.card_id, scan.msg_id)
        await self._finish(reply_topic, outcome)

    async def _button(self, court_id: str, raw: bytes) -> None:
        ack_topic = topics.button_ack(court_id)
        try:
            press = payloads.decode(payloads.ButtonPress, raw, self._limit)
        except PayloadError as exc:
            self._reject("button", exc.reason, court_id, exc.detail)
            await self.publish(
                ack_topic,
                {
                    "msg_id": payloads.msg_id_of(raw, self._limit),
                    "status": "invalid",
                    "reason": Reason.INVALID_REQUEST.value,
                    "detail": exc.detail,
                },
            )
            return
        device = self._service.device(press.button_id)
        if device is None or device.kind != "button" or device.court != court_id:
            self._reject("button", "unknown_button", press.button_id, f"not a button of court {court_id}")
            await self.publish(
                ack_topic,
                {"msg_id": press.msg_id, "status": "invalid", "reason": "unknown_button", "button_id": press.button_id},
            )
            return
        self._presence.seen(press.button_id, self._clock.wall())
        outcome = await self._service.button(court_id, press.button_id, press.msg_id, press.kind)
        await self._finish(ack_topic, outcome)

    async def _tablet(self, route: topics.Route, raw: bytes) -> None:
        court_id = route.device_or_court
        model: type[payloads.TabletCheckin] | type[payloads.TabletCheckout] = (
            payloads.TabletCheckin if route.kind is Kind.CHECKIN else payloads.TabletCheckout
        )
        try:
            request = payloads.decode(model, raw, self._limit)
        except PayloadError as exc:
            self._reject(route.kind.value, exc.reason, court_id, exc.detail)
            tablet_id = _field_of(raw, "tablet_id", self._limit)
            if tablet_id is not None and self._serves(tablet_id, court_id):
                await self.publish(
                    topics.tablet_response(tablet_id),
                    {
                        "msg_id": payloads.msg_id_of(raw, self._limit),
                        "status": "invalid",
                        "reason": Reason.INVALID_REQUEST.value,
                        "detail": exc.detail,
                    },
                )
            return
        if not self._serves(request.tablet_id, court_id):
            self._reject(
                route.kind.value, "unknown_tablet", request.tablet_id, f"not a tablet serving court {court_id}"
            )
            return
        if isinstance(request, payloads.TabletCheckin):
            outcome = await self._service.tablet_checkin(
                request.tablet_id, court_id, request.msg_id, card_id=request.card_id, member_code=request.member_code
            )
        else:
            outcome = await self._service.tablet_checkout(
                request.tablet_id, court_id, request.msg_id, session_id=request.session_id, card_id=request.card_id
            )
        await self._finish(topics.tablet_response(request.tablet_id), outcome)

    async def _consumption(self, pos_id: str, raw: bytes) -> None:
        """A bar tablet's order; the tablet is its own point of sale and hears back on tablet/{id}/response."""
        device = self._service.device(pos_id)
        if device is None or device.kind != "tablet":
            self._reject("consumption", "unknown_pos", pos_id, "not a configured tablet")
            return
        reply_topic = topics.tablet_response(pos_id)
        try:
            order = payloads.decode(payloads.Consumption, raw, self._limit)
        except PayloadError as exc:
            self._reject("consumption", exc.reason, pos_id, exc.detail)
            request_id = _field_of(raw, "request_id", self._limit) or payloads.msg_id_of(raw, self._limit)
            await self.publish(
                reply_topic,
                {
                    "msg_id": request_id,
                    "request_id": request_id,
                    "status": "invalid",
                    "reason": Reason.INVALID_REQUEST.value,
                    "detail": exc.detail,
                },
            )
            return
        self._presence.seen(pos_id, self._clock.wall())
        outcome = await self._service.consumption(
            pos_id, order.request_id, order.items, session_id=order.session_id, card_id=order.card_id
        )
        await self._finish(reply_topic, outcome)

    def _serves(self, tablet_id: str, court_id: str) -> bool:
        device = self._service.device(tablet_id)
        if device is None or device.kind != "tablet":
            return False
        served = device.served_courts
        return not served or court_id in served


def _field_of(raw: bytes, name: str, limit: int) -> str | None:
    """A short string field of a payload that failed validation, to address the reply; None if unusable."""
    try:
        doc = payloads.parse_json(raw, limit)
    except PayloadError:
        return None
    value = doc.get(name)
    return value if isinstance(value, str) and 0 < len(value) <= payloads.MAX_ID else None


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
