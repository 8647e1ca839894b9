"""The embedded MQTT broker: amqtt in the agent's own event loop, with our plugins and nothing implicit."""

from __future__ import annotations

import enum
import logging
from types import TracebackType
from typing import Any, Self

from amqtt.broker import Broker

from ..config import BrokerSection
from ..errors import BrokerStartError
from ..logs import get_logger
from .auth import DeviceDirectory

log = get_logger("agent.lan.broker")

# amqtt 0.12.1 is pinned in pyproject.toml: the private attributes read below are checked by the broker tests.
AMQTT_VERSION = "0.12.1"


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class EmbeddedBroker:
    """`async with EmbeddedBroker(section, directory) as broker:`; `broker.port` is the bound TCP port."""

    def __init__(self, section: BrokerSection, directory: DeviceDirectory) -> None:
        self._section = section
        self._directory = directory
        self._broker: Broker | None = None
        self._state = _State.NEW

    def _amqtt_config(self) -> dict[str, Any]:
        s = self._section
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{s.host}:{s.port}"}}
        if s.ws_port:
            listeners["ws"] = {"type": "ws", "bind": f"{s.host}:{s.ws_port}"}
        plugin_config = {"directory": self._directory}
        return {
            "listeners": listeners,
            "timeout_disconnect_delay": 0,
            # Explicit plugins only: no anonymous plugin, no $SYS publisher, no packet logger.
            "plugins": {
                "agent.lan.auth.DeviceAuthPlugin": plugin_config,
                "agent.lan.auth.DeviceAclPlugin": plugin_config,
            },
        }

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"EmbeddedBroker is {self._state.value}; create a new one to start again")
        try:
            self._broker = Broker(self._amqtt_config())
            await self._broker.start()
        except Exception as exc:  # amqtt wraps bind errors in BrokerError with the OSError as cause
            cause = exc.__cause__ or exc
            raise BrokerStartError(
                f"embedded broker could not start on {self._section.host}:{self._section.port}: {cause}"
            ) from exc
        self._state = _State.RUNNING
        log.info("broker_started", host=self._section.host, port=self.port, ws_port=self.ws_port)
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
    def client_count(self) -> int:
        if self._broker is None:
            return 0
        return sum(1 for session, _ in self._broker.sessions.values() if session.transitions.is_connected())
