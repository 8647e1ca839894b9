"""A pytest plugin that puts stock amqtt 0.12.1 where the embedded broker's fixes are, to show what they fix.

    .venv/bin/pytest -p tests.stock_amqtt tests/integration/test_broker_conformance.py -k embedded

runs the conformance tests against plain `amqtt.broker.Broker` with the same devices, passwords and access list
(plugged in the way amqtt expects, as auth and topic plugins). Each gap listed in agent/lan/amqtt_fixes.py then
fails its test: keepalive and will, redelivery on reconnect, the offline queue's RETAIN flag, the anonymous
persistent session, QoS downgrade, overlapping subscriptions, the two oversized-packet cases, and persistence
across a restart. It is never loaded by `make test`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

import tests.brokers
from agent.lan.auth import DeviceDirectory
from agent.lan.broker import EmbeddedBroker


class StockAuth(BaseAuthPlugin):  # type: ignore[misc]
    @dataclass
    class Config:
        directory: Any = None

    async def authenticate(self, *, session: Any) -> bool | None:
        directory: DeviceDirectory = self.config.directory
        will = session.will_topic if session.will_flag else None
        ok = await directory.authenticate(session.username, session.password, session.client_id, will)
        if ok and session.username is None:
            session.is_anonymous = True
        return ok


class StockAcl(BaseTopicPlugin):  # type: ignore[misc]
    @dataclass
    class Config:
        directory: Any = None

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        directory: DeviceDirectory = self.config.directory
        if topic is None or session is None:
            return False
        if action == Action.RECEIVE:
            return True
        if action == Action.PUBLISH:
            return directory.may_publish(session.username, topic)
        return directory.may_subscribe(session.username, topic)


class StockBroker(EmbeddedBroker):
    """The EmbeddedBroker, same listeners, over plain amqtt; persistence and hooks do not exist there."""

    async def __aenter__(self) -> Self:
        plugin = {"directory": self._directory}
        config = self._amqtt_config()
        config["plugins"] = {"tests.stock_amqtt.StockAuth": plugin, "tests.stock_amqtt.StockAcl": plugin}
        self._broker = Broker(config)
        await self._broker.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        broker, self._broker = self._broker, None
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        if broker is not None:
            await broker.shutdown()


tests.brokers.EmbeddedBroker = StockBroker  # type: ignore[attr-defined]
