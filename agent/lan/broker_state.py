"""Retained messages and persistent sessions of the embedded broker, kept in SQLite across restarts.

amqtt keeps both in memory only. Here every change marks a topic or a session dirty and a flusher writes the
dirty ones a moment later in one transaction (coalescing a burst of court-state updates into one write), and
everything is written at shutdown. A persistent session is stored with its subscriptions and the QoS 1/2
messages waiting for it (queued while offline, and unacknowledged in-flight ones, which are redelivered).
Sessions of devices no longer configured, and subscriptions the access list no longer allows, are dropped
when the state is loaded. A disk error is logged and retried; it never stops the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
from amqtt.broker import RetainedApplicationMessage

from ..logs import get_logger
from .auth import DeviceDirectory

log = get_logger("agent.lan.broker_state")

FLUSH_DELAY_S = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (
    topic   TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    username  TEXT
);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    filter    TEXT NOT NULL,
    qos       INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
);
CREATE TABLE IF NOT EXISTS queued (
    client_id TEXT NOT NULL,
    pos       INTEGER NOT NULL,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    qos       INTEGER NOT NULL,
    PRIMARY KEY (client_id, pos)
);
"""


class BrokerState:
    def __init__(self, path: Path, directory: DeviceDirectory) -> None:
        self._path = path
        self._directory = directory
        self._db: aiosqlite.Connection | None = None
        self._broker: Any = None
        self._dirty_sessions: set[str] = set()
        self._dirty_retained: set[str] = set()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # one write transaction at a time on the connection

    # -- marks (called by the broker on every change; cheap) ---------------------------------------------

    def touch(self, session: Any) -> None:
        if session.client_id:
            self._dirty_sessions.add(session.client_id)
            self._wake.set()

    def retained_changed(self, topic: str) -> None:
        self._dirty_retained.add(topic)
        self._wake.set()

    # -- load and save -------------------------------------------------------------------------------------

    async def restore(self, broker: Any) -> None:
        """Open the state file and load it into `broker` (before its listeners start)."""
        self._broker = broker
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self._path, isolation_level=None)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            await self._db.executescript(_SCHEMA)
            await self._load(broker)
        except sqlite3.DatabaseError as exc:
            # An unreadable state file costs the devices a re-subscribe, never the agent its start.
            log.error("broker_state_unreadable", path=str(self._path), error=str(exc))
            await self._reset()
        self._flusher = asyncio.create_task(self._flush_loop(), name="broker-state")

    async def _reset(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._db.close()
        aside = self._path.with_suffix(".unreadable")
        with contextlib.suppress(OSError):
            self._path.replace(aside)
        self._db = await aiosqlite.connect(self._path, isolation_level=None)
        await self._db.executescript(_SCHEMA)

    async def _load(self, broker: Any) -> None:
        assert self._db is not None
        retained = 0
        async with self._db.execute("SELECT topic, payload, qos FROM retained") as cur:
            async for topic, payload, qos in cur:
                broker._retained_messages[topic] = RetainedApplicationMessage(None, topic, bytes(payload), qos)
                retained += 1
        sessions: dict[str, Any] = {}
        dropped: list[str] = []
        async with self._db.execute("SELECT client_id, username FROM sessions") as cur:
            async for client_id, username in cur:
                if self._directory.rules(username) is None:
                    dropped.append(client_id)  # the device was removed from the config
                    continue
                handler, session = broker.create_offline_session(client_id)
                session.clean_session = False
                session.username = username
                session.is_anonymous = username is None
                broker._sessions[client_id] = (session, handler)
                sessions[client_id] = session
        async with self._db.execute("SELECT client_id, filter, qos FROM subscriptions") as cur:
            async for client_id, topic_filter, qos in cur:
                session = sessions.get(client_id)
                if session is None or not self._directory.allows_subscribe(session.username, topic_filter):
                    continue
                broker._subscriptions.setdefault(topic_filter, []).append((session, qos))
        queued = 0
        async with self._db.execute("SELECT client_id, topic, payload, qos FROM queued ORDER BY client_id, pos") as cur:
            async for client_id, topic, payload, qos in cur:
                session = sessions.get(client_id)
                if session is not None:
                    session.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, bytes(payload), qos))
                    queued += 1
        self._dirty_sessions.update(dropped)
        log.info("broker_state_loaded", retained=retained, sessions=len(sessions), queued=queued, dropped=len(dropped))

    async def save_all(self, broker: Any) -> None:
        """Write every persistent session and retained message; stops the flusher. Called at shutdown."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self._dirty_sessions.update(broker._sessions)
        self._dirty_retained.update(broker._retained_messages)
        await self._flush()
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_DELAY_S)
            self._wake.clear()
            # shielded: stopping the flusher mid-write must not leave its transaction open under save_all's
            await asyncio.shield(self._flush())
            if self._dirty_sessions or self._dirty_retained:  # the write failed: try again later
                await asyncio.sleep(5)
                self._wake.set()

    async def _flush(self) -> None:
        async with self._flushing:
            await self._flush_now()

    async def _flush_now(self) -> None:
        if self._db is None or self._broker is None or not (self._dirty_sessions or self._dirty_retained):
            return
        topics, self._dirty_retained = self._dirty_retained, set()
        clients, self._dirty_sessions = self._dirty_sessions, set()
        retained_rows, retained_gone = self._retained_rows(topics)
        session_rows, sub_rows, queue_rows = self._session_rows(clients)
        db = self._db
        try:
            await db.execute("BEGIN")
            await db.executemany("DELETE FROM retained WHERE topic = ?", [(t,) for t in retained_gone])
            await db.executemany("INSERT OR REPLACE INTO retained VALUES (?, ?, ?)", retained_rows)
            for table in ("sessions", "subscriptions", "queued"):
                await db.executemany(f"DELETE FROM {table} WHERE client_id = ?", [(c,) for c in clients])  # noqa: S608
            await db.executemany("INSERT INTO sessions VALUES (?, ?)", session_rows)
            await db.executemany("INSERT INTO subscriptions VALUES (?, ?, ?)", sub_rows)
            await db.executemany("INSERT INTO queued VALUES (?, ?, ?, ?, ?)", queue_rows)
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            self._dirty_retained |= topics
            self._dirty_sessions |= clients
            log.warning("broker_state_write_failed", error=str(exc))

    def _retained_rows(self, topics: set[str]) -> tuple[list[tuple[str, bytes, int]], list[str]]:
        rows, gone = [], []
        for topic in topics:
            message = self._broker._retained_messages.get(topic)
            if message is None:
                gone.append(topic)
            else:
                rows.append((topic, bytes(message.data), message.qos or 0))
        return rows, gone

    def _session_rows(self, clients: set[str]) -> tuple[list[Any], list[Any], list[Any]]:
        sessions, subs, queue = [], [], []
        persistent = {}
        for client_id in clients:
            session = self._broker._sessions.get(client_id, (None, None))[0]
            if session is None or session.clean_session is not False:
                continue
            persistent[client_id] = session
            sessions.append((client_id, session.username))
            pending = list(session.retained_messages._queue)  # amqtt's offline queue (an asyncio.Queue)
            if not session.transitions.is_connected():
                pending = list(session.inflight_out.values()) + pending  # redelivered first, then the queue
            queue += [
                (client_id, pos, m.topic, bytes(m.data), m.qos or 0)
                for pos, m in enumerate(pending)
                if m.qos  # only QoS 1/2 belong to the session (MQTT-3.1.2-5)
            ]
        if persistent:
            for topic_filter, entries in self._broker._subscriptions.items():
                for session, qos in entries:
                    if session.client_id in persistent:
                        subs.append((session.client_id, topic_filter, qos))
        return sessions, subs, queue
