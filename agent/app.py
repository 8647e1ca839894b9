"""Composition root: builds every part and runs them in one TaskGroup until cancelled.

devices ──MQTT──▶ EmbeddedBroker (or the site's mosquitto) ──▶ Dispatcher ──▶ AccessService ──▶ Database
                  │ connects, disconnects                 ◀── replies, court state, presence ◀──┘
                  └──────────────▶ Presence ──▶ retained agent/presence/{device}
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import secrets
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
from aiohttp import web

from .access import AccessService
from .clock import Clock, SystemClock, TrustedClock, boot_id
from .config import AGENT_USERNAME, Config
from .domain.messages import Language
from .errors import ConfigError, StoreError
from .lan.auth import DeviceDirectory
from .lan.broker import EmbeddedBroker
from .lan.dispatcher import Dispatcher
from .lan.presence import Presence
from .logs import get_logger
from .loop import check_cancelled
from .media.pipeline import ClipPipeline
from .metrics import Metrics
from .notify import Notifier
from .readers import AttachedReaders, DispatcherLink
from .store.db import Database
from .sync import status
from .sync.clips import ClipUploader
from .sync.cloud import CloudDestination
from .sync.delivery import Destination
from .sync.members import MemberSync
from .sync.metered import metered_client
from .sync.outbox import Outbox
from .sync.retention import Retention
from .sync.ziggy import ZiggyDestination
from .web.api import LocalApi
from .web.health import IntegrationHealth
from .web.live import LiveHub
from .web.pull import PullFeedApi
from .web.server import make_app

log = get_logger("agent.app")
SWEEP_INTERVAL_S = 30.0
WATCHDOG_PROBE_S = 5.0  # each liveness probe's limit (at most a quarter of WatchdogSec)
OUTBOX_STALL_SLACK_S = 120.0  # beyond a worker's longest sleep (idle or breaker) plus one slow call
SHUTDOWN_TIMEOUT_S = 5.0  # requests still running when the agent stops get this long (pages are told to go first)
LOOP_TICK_S = 0.05  # the loop-lag probe's timer
LOOP_STALL_S = 0.1  # a lag longer than this is logged: every device waited that long for an answer
GAUGES_EVERY_S = 5.0  # store-backed gauges are re-read at most this often, however often /metrics is scraped
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_M_ARENA_MAX = -8


def limit_malloc_growth() -> None:
    """Stop glibc from keeping freed large blocks (argon2's 19 MiB per verify) in its heap arenas.

    glibc raises its mmap threshold after each large free, so later large blocks come from arenas that never
    shrink; fixing the threshold and the number of arenas keeps the agent's RSS flat on a 1 GB Pi.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        pass


class BrokerEvents:
    """What the embedded broker tells the rest of the agent: presence and rejections."""

    def __init__(self, presence: Presence, metrics: Metrics, clock: Clock) -> None:
        self._presence = presence
        self._metrics = metrics
        self._clock = clock

    def client_connected(self, session: Any) -> None:
        if session.username:
            self._presence.connected(session.username, self._clock.wall())

    def client_disconnected(self, session: Any, how: str) -> None:
        if session.username:
            self._presence.disconnected(session.username, how, self._clock.wall())

    def rejected(self, reason: str, client: str) -> None:
        self._metrics.rejected.labels("mqtt", reason).inc()

    def throttled(self, client: str) -> None:
        self._metrics.mqtt_throttled.inc()


class Agent:
    """`await Agent(config).run()` serves until cancelled; `ready` is set once devices can be answered."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or (TrustedClock() if config.agent.trust_clock else SystemClock())
        self.metrics = Metrics()
        self.presence = Presence(config.all_devices)
        for camera in config.cameras:
            self.presence.add(camera.id, "camera", camera.court)
        self.ready = asyncio.Event()
        self.broker: EmbeddedBroker | None = None
        self.broker_port: int | None = None
        self.ws_port: int | None = None
        self.api_port: int | None = None
        self.db: Database | None = None
        self.service: AccessService | None = None
        self.dispatcher: Dispatcher | None = None
        self.outbox: Outbox | None = None
        self._hub: LiveHub | None = None
        self.notifier = Notifier()
        self._gauges_at = float("-inf")
        self._clip_http: httpx.AsyncClient | None = None
        self.retention: Retention | None = None
        self.member_sync: MemberSync | None = None
        self.readers: AttachedReaders | None = None
        self.clips: ClipPipeline | None = None
        # The agent's own account on the embedded broker: a fresh random password each start, never written.
        self._agent_password = secrets.token_urlsafe(24)

    async def run(self) -> None:
        cfg = self.config
        limit_malloc_growth()
        async with contextlib.AsyncExitStack() as stack:
            db = await stack.enter_async_context(Database(cfg.db_path))
            if cfg.broker.mode == "external":
                await self._serve(db, None)
                return
            directory = DeviceDirectory(
                cfg.devices,
                agent_password=self._agent_password,
                allow_anonymous=cfg.broker.allow_anonymous,
                on_denied=lambda action, user: self.metrics.rejected.labels(f"acl_{action}", "denied").inc(),
            )
            stack.callback(directory.close)
            state_path = cfg.agent.data_dir / "broker.db" if cfg.broker.persist else None
            events = BrokerEvents(self.presence, self.metrics, self.clock)
            broker = await stack.enter_async_context(EmbeddedBroker(cfg.broker, directory, state_path, events))
            await self._serve(db, broker)

    def _broker_login(self) -> tuple[str, int, str, ssl.SSLContext | None]:
        """Where the agent's own MQTT client connects: its embedded broker, or the site's."""
        b = self.config.broker
        if b.mode == "embedded":
            return "127.0.0.1", self.broker_port or 0, self._agent_password, None
        password = self.config.secrets.broker_password
        if password is None:
            raise ConfigError(
                "broker.mode is external: the secrets file needs broker_password (the agent's account there)",
                key="secrets.broker_password",
            )
        tls = None
        if b.external_tls:
            tls = ssl.create_default_context(cafile=str(b.external_ca) if b.external_ca else None)
        return b.external_host, b.external_port, password.get_secret_value(), tls

    async def _serve(self, db: Database, broker: EmbeddedBroker | None) -> None:
        cfg = self.config
        self.db, self.broker = db, broker
        if broker is not None:
            self.broker_port, self.ws_port = broker.port, broker.ws_port
        host, port, password, tls = self._broker_login()
        service = AccessService(db, cfg, self.clock, boot_id(), self.metrics)
        await service.start()
        count = await db.fetchone("SELECT members FROM member_list WHERE id = 1")
        self.metrics.members_cached.set(count[0] if count else 0)
        dispatcher = Dispatcher(service, cfg, self.metrics, self.presence, self.clock)
        self.presence.on_change = dispatcher.presence_changed
        self.service, self.dispatcher = service, dispatcher
        self.readers = readers = (
            AttachedReaders(cfg.readers, DispatcherLink(dispatcher), cfg.secrets.osdp_keys) if cfg.readers else None
        )
        uploader = self._clip_uploader()
        if uploader is not None:
            await uploader.__aenter__()
        self.clips = clips = ClipPipeline(
            db, cfg, self.clock, service, self.metrics, uploader=uploader, on_camera=self._camera_presence
        )
        service.on_clip_wanted = clips.pressed
        runner = await self._start_web(db)
        sync = cfg.sync
        outbox = Outbox(
            db,
            self._destinations(db),
            replay_per_s=sync.replay_per_s,
            backoff_base_s=sync.backoff_base_s,
            backoff_cap_s=sync.backoff_cap_s,
            breaker_failures=sync.breaker_failures,
            breaker_open_s=sync.breaker_open_s,
            on_clock_step=self.metrics.outbox_clock_steps.inc,
        )
        db.on_commit.append(outbox.notify)
        self.outbox = outbox
        self.retention = retention = Retention(
            db,
            retention_s=sync.retention_days * 86400,
            require_ack=cfg.secrets.cloud_pull_token is not None,
            batch=sync.prune_batch,
            interval_s=sync.prune_interval_s,
            now_ms=self._now_ms,
            on_pruned=self.metrics.events_pruned.inc,
        )
        self.member_sync = member_sync = self._member_sync(db)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(dispatcher.run(host, port, AGENT_USERNAME, password, tls))
                tg.create_task(outbox.run())
                tg.create_task(retention.run())
                tg.create_task(self._sweeper(service, dispatcher))
                tg.create_task(self._announce_ready(dispatcher))
                tg.create_task(self._watchdog(db, dispatcher, outbox))
                tg.create_task(self._loop_lag())
                if readers is not None:
                    tg.create_task(readers.run())
                if member_sync is not None:
                    tg.create_task(member_sync.run_periodically())
                tg.create_task(clips.run())
        finally:
            if uploader is not None:
                await uploader.aclose()
            if self._clip_http is not None:
                await self._clip_http.aclose()
            if member_sync is not None:
                await member_sync.aclose()
            await dispatcher.announce_offline()
            self.notifier.send("STOPPING=1")
            if self._hub is not None:
                self._hub.close()
            if runner is not None:
                await runner.cleanup()
            self.notifier.close()
            log.info("agent_stopped")

    def _destinations(self, db: Database) -> list[Destination]:
        """The outbox's destinations; an enabled one without its secrets is reported and left undelivered
        (its rows wait, visible in `outbox status`), never silently dropped."""
        cfg, secrets = self.config, self.config.secrets
        out: list[Destination] = []
        if "ziggy" in cfg.destinations and cfg.ziggy is not None:
            if secrets.ziggy_api_key is None:
                log.error("destination_not_configured", destination="ziggy", missing="ziggy_api_key")
            else:
                out.append(
                    ZiggyDestination(
                        cfg.ziggy,
                        secrets.ziggy_api_key.get_secret_value(),
                        db,
                        client=metered_client(self.metrics, "ziggy", cfg.ziggy.base_url),
                    )
                )
        if "cloud" in cfg.destinations and cfg.cloud is not None:
            if secrets.cloud_client_secret is None or secrets.cloud_signing_secret is None:
                log.error(
                    "destination_not_configured",
                    destination="cloud",
                    missing="cloud_client_secret/cloud_signing_secret",
                )
            else:
                out.append(
                    CloudDestination(
                        cfg.cloud,
                        secrets.cloud_client_secret.get_secret_value(),
                        secrets.cloud_signing_secret.get_secret_value(),
                        cfg.agent.agent_id,
                        client=metered_client(self.metrics, "cloud", cfg.cloud.base_url),
                    )
                )
        return out

    def _member_sync(self, db: Database) -> MemberSync | None:
        """Periodic member sync, when the cloud destination is enabled with its secrets (else reported above)."""
        cfg = self.config
        if "cloud" not in cfg.destinations or cfg.secrets.cloud_client_secret is None:
            return None
        return MemberSync.from_config(cfg, db, wall=self.clock.wall, metrics=self.metrics)

    async def _start_web(self, db: Database) -> web.AppRunner | None:
        if not self.config.api.enabled:
            return None

        def readiness() -> dict[str, bool]:
            checks = {"agent_mqtt": bool(self.dispatcher and self.dispatcher.connected.is_set())}
            if self.broker is not None:
                checks["broker"] = self.broker.client_count > 0
            return checks

        token = self.config.secrets.cloud_pull_token
        pull = PullFeedApi(db, token.get_secret_value() if token else None, self.metrics, self._now_ms)
        health = IntegrationHealth(
            db,
            self.config.destinations,
            lambda: self.outbox.statuses() if self.outbox is not None else {},
            self._now_ms,
            feed_configured=token is not None,
            storage=self.clips.storage if self.clips is not None else lambda: None,
        )
        api = None
        if self.service is not None:
            hub = self._hub = LiveHub()
            if self.dispatcher is not None:
                devices = self.config.all_devices
                hub.attach(
                    self.dispatcher,
                    courts=self.service.courts,
                    readers=[(d.id, d.court) for d in devices if d.kind == "reader"],  # at a bar: court None
                    devices=[d.id for d in devices] + [c.id for c in self.config.cameras],
                )
            api = LocalApi(
                db,
                self.service,
                self.presence,
                self.config.api.clients,
                self.config.secrets.api_tokens,
                self.config.destinations,
                on_courts_changed=self.dispatcher.court_changed if self.dispatcher is not None else lambda c: None,
                hub=hub,
                catalogue=self.config.bar.items,
                language=Language(self.config.agent.language),
                storage=self.clips.storage if self.clips is not None else lambda: None,
            )
        app = make_app(self.metrics, readiness, pull=pull, health=health, api=api, refresh=self.refresh_gauges)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.config.api.host, self.config.api.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.api_port = int(sockets[0].getsockname()[1]) if sockets else self.config.api.port
        return runner

    async def _watchdog(self, db: Database, dispatcher: Dispatcher, outbox: Outbox) -> None:
        """WATCHDOG=1 every half WatchdogSec, only while the decision path, the broker and the outbox work."""
        interval = self.notifier.watchdog_s
        if interval is None:
            return
        period = interval / 2
        within = min(WATCHDOG_PROBE_S, period / 2)
        await self.ready.wait()
        withheld = False
        while True:
            check_cancelled()
            problems = await self._liveness(db, dispatcher, outbox, within)
            if problems:
                withheld = True
                log.error("watchdog_withheld", problems=problems, restart_within_s=interval)
                self.notifier.send(f"STATUS=unhealthy: {'; '.join(problems)}")
            else:
                if withheld:
                    log.info("watchdog_resumed")
                    self.notifier.send("STATUS=ready")
                    withheld = False
                self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(period)

    async def _loop_lag(self) -> None:
        """How late the loop runs a timer: one figure for everything that holds it (a long callback, the GIL
        held by another thread, the process descheduled), observed into event_loop_lag_seconds."""
        loop = asyncio.get_running_loop()
        while True:
            check_cancelled()
            at = loop.time()
            await asyncio.sleep(LOOP_TICK_S)
            lag = max(0.0, loop.time() - at - LOOP_TICK_S)
            self.metrics.loop_lag.observe(lag)
            if lag > LOOP_STALL_S:
                log.warning("event_loop_stalled", ms=round(lag * 1000))

    async def _liveness(self, db: Database, dispatcher: Dispatcher, outbox: Outbox, within: float) -> list[str]:
        async def store() -> str | None:
            try:
                async with asyncio.timeout(within):
                    await db.write_quietly("watchdog probe", lambda conn: None)
            except (TimeoutError, StoreError) as exc:
                return f"store writer: {type(exc).__name__} {exc}".strip()
            return None

        async def decisions() -> str | None:
            return None if await dispatcher.probe(within) else f"decision worker did not answer within {within} s"

        async def broker() -> str | None:
            if self.broker is None or self.broker_port is None:
                return None  # the site's mosquitto: not ours to watch
            try:
                async with asyncio.timeout(within):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
                writer.close()
                await writer.wait_closed()
            except (TimeoutError, OSError) as exc:
                return f"broker does not accept connections: {type(exc).__name__}"
            return None

        results = await asyncio.gather(store(), decisions(), broker())
        problems = [r for r in results if r is not None]
        problems += [f"outbox worker '{name}' stalled" for name in outbox.stalled(OUTBOX_STALL_SLACK_S)]
        return problems

    async def refresh_gauges(self) -> None:
        """The gauges that live in the store or in presence, sampled (at most every GAUGES_EVERY_S)."""
        now = asyncio.get_running_loop().time()
        if self.db is None or now - self._gauges_at < GAUGES_EVERY_S:
            return
        self._gauges_at = now
        db, m = self.db, self.metrics
        names = sorted(set(self.config.destinations) | set(await status.known_destinations(db)))
        now_ms = self._now_ms()
        for state in await status.destination_states(db, names):
            m.outbox_pending.labels(state.destination).set(state.pending)
            m.outbox_dead.labels(state.destination).set(state.dead)
            oldest = state.oldest_pending_ms
            m.outbox_oldest_age.labels(state.destination).set(0 if oldest is None else (now_ms - oldest) / 1000)
        online: dict[str, int] = {}
        known: dict[str, int] = {}
        for device in self.presence.snapshot():
            known[device.kind] = known.get(device.kind, 0) + 1
            online[device.kind] = online.get(device.kind, 0) + int(device.online)
        for kind, count in known.items():
            m.devices_known.labels(kind).set(count)
            m.devices_online.labels(kind).set(online[kind])
        row = await db.fetchone("SELECT synced_at FROM member_list WHERE id = 1")
        if row is not None and row[0] is not None:
            m.member_list_age.set(max(0.0, (now_ms - int(row[0])) / 1000))

    def _clip_uploader(self) -> ClipUploader | None:
        """Clips go to the cloud when it is enabled with its client secret; else they wait (and the budget
        still applies), reported like a destination without its secrets."""
        cfg = self.config
        secrets = cfg.secrets
        if (
            cfg.cloud is None
            or "cloud" not in cfg.destinations
            or secrets.cloud_client_secret is None
            or secrets.cloud_signing_secret is None
        ):
            if cfg.cameras:
                log.error("clip_upload_not_configured", missing="[cloud] with cloud_client_secret/cloud_signing_secret")
            return None
        # the uploader leaves a client it was given open: closed with the uploader in _serve
        self._clip_http = metered_client(self.metrics, "cloud", cfg.cloud.base_url)
        return ClipUploader(
            cfg.cloud,
            secrets.cloud_client_secret.get_secret_value(),
            secrets.cloud_signing_secret.get_secret_value(),
            client=self._clip_http,
        )

    def _camera_presence(self, camera_id: str, online: bool, reason: str) -> None:
        at = self.clock.wall()
        if online:
            self.presence.connected(camera_id, at)
        else:
            self.presence.disconnected(camera_id, reason[:80] or "stopped", at)

    def _now_ms(self) -> int:
        return int(self.clock.wall().timestamp() * 1000)

    async def _announce_ready(self, dispatcher: Dispatcher) -> None:
        await dispatcher.connected.wait()
        # What start-up made (modules, config, pools) lives as long as the agent: out of the cyclic collector's
        # reach, a full collection walks only what serving makes, and no longer stalls a tap for tens of ms.
        gc.collect()
        gc.freeze()
        self.ready.set()
        self.notifier.send("READY=1", f"STATUS=ready: {len(self.service.courts) if self.service else 0} courts")
        log.info(
            "agent_ready",
            broker=self.config.broker.mode,
            broker_port=self.broker_port,
            api_port=self.api_port,
            devices=len(self.config.devices),
            courts=len(self.config.courts),
        )

    async def _sweeper(self, service: AccessService, dispatcher: Dispatcher) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.presence.sweep(self.clock.wall())
            try:
                changed = await service.sweep()
            except StoreError as exc:  # a full or read-only disk must not stop the door
                self.metrics.store_errors.labels("sweep").inc()
                log.warning("sweep_failed", error=str(exc))
                continue
            for court_id in changed:
                dispatcher.court_changed(court_id)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    """Run `agent` in the background until the block ends; raises its start-up error if it fails to start."""
    task = asyncio.create_task(agent.run(), name="agent")
    ready = asyncio.create_task(agent.ready.wait())
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
        raise RuntimeError("agent stopped before it was ready")
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
