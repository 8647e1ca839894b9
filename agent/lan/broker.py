"""The embedded MQTT broker: amqtt in the agent's own event loop, with the fixes of `amqtt_fixes`, our access
list, persistence in data_dir/broker.db, and TCP, TLS and websocket listeners."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..config import BrokerSection
from ..errors import BrokerStartError
from ..logs import get_logger
from .amqtt_fixes import AgentBroker, BrokerHooks
from .auth import DeviceDirectory
from .broker_state import BrokerState

log = get_logger("agent.lan.broker")

# A persistent session nobody resumes for this long is dropped (a device renamed or replaced).
SESSION_EXPIRY_S = 7 * 24 * 3600


class NoHooks:
    def client_connected(self, session: Any) -> None:
        pass

    def client_disconnected(self, session: Any, how: str) -> None:
        pass

    def rejected(self, reason: str, client: str) -> None:
        pass

    def throttled(self, client: str) -> None:
        pass


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class EmbeddedBroker:
    """`async with EmbeddedBroker(section, directory) as broker:`; `broker.port` is the bound TCP port."""

    def __init__(
        self,
        section: BrokerSection,
        directory: DeviceDirectory,
        state_path: Path | None = None,
        hooks: BrokerHooks | None = None,
    ) -> None:
        self._section = section
        self._state_path = state_path
        self._directory = directory
        self._hooks = hooks or NoHooks()
        self._broker: AgentBroker | None = None
        self._state = _State.NEW

    def _amqtt_config(self) -> dict[str, Any]:
        s = self._section
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{s.host}:{s.port}"}}
        if s.ws_port:
            listeners["ws"] = {"type": "ws", "bind": f"{s.host}:{s.ws_port}"}
        if s.tls_port:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{s.host}:{s.tls_port}",
                "ssl": True,
                "certfile": str(s.tls_cert),
                "keyfile": str(s.tls_key),
            }
        return {
            "listeners": listeners,
            "timeout_disconnect_delay": 0,
            "session_expiry_interval": SESSION_EXPIRY_S,
            # No amqtt plugins at all (no anonymous plugin, $SYS publisher or packet logger): authentication
            # and the access list are called directly by AgentBroker.
            "plugins": {},
        }

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"EmbeddedBroker is {self._state.value}; create a new one to start again")
        try:
            state = BrokerState(self._state_path, self._directory) if self._state_path is not None else None
            self._broker = AgentBroker(
                self._amqtt_config(),
                self._directory,
                self._hooks,
                max_packet_bytes=self._section.max_packet_bytes,
                max_queued_messages=self._section.max_queued_messages,
                publish_rate_per_s=self._section.publish_rate_per_s,
                publish_burst=self._section.publish_burst,
                state=state,
            )
            await self._broker.start()
        except Exception as exc:  # amqtt wraps bind errors in BrokerError with the OSError as cause
            cause = exc.__cause__ or exc
            raise BrokerStartError(
                f"embedded broker could not start on {self._section.host}:{self._section.port}: {cause}"
            ) from exc
        self._state = _State.RUNNING
        log.info(
            "broker_started",
            host=self._section.host,
            port=self.port,
            ws_port=self.ws_port,
            tls_port=self.tls_port,
            persistent=self._state_path is not None,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._state = _State.STOPPED
        if self._broker is not None:
            broker, self._broker = self._broker, None
            # amqtt logs a traceback for every client it cuts at shutdown; that is expected here.
            amqtt_log = logging.getLogger("amqtt")
            level = amqtt_log.level
            amqtt_log.setLevel(logging.CRITICAL)
            try:
                await broker.shutdown()
            finally:
                amqtt_log.setLevel(level)

    def _bound_port(self, listener: str) -> int:
        if self._broker is None:
            raise RuntimeError("broker is not running")
        server = self._broker._servers[listener].instance
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        return self._bound_port("default")

    @property
    def ws_port(self) -> int | None:
        return self._bound_port("ws") if self._section.ws_port else None

    @property
    def tls_port(self) -> int | None:
        return self._bound_port("tls") if self._section.tls_port else None

    @property
    def client_count(self) -> int:
        if self._broker is None:
            return 0
        return sum(1 for _ in self._broker.connected_sessions())
