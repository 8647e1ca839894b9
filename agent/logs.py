"""structlog setup: JSON lines for the journal, a readable console otherwise.

One processor redacts secrets and hashes card ids; call sites never have to remember. Repeated device errors
go through `OnceLogger`: warning the first time a key is seen, debug after that, with bounded memory, so a
flapping reader cannot flood the journal of an SD card.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_MARKERS = ("password", "secret", "token", "api_key", "apikey", "authorization")
_CARD_KEYS = frozenset({"card", "card_id"})


def card_hash(card_id: str) -> str:
    """A short stable pseudonym for a card id: enough to correlate log lines, useless to clone a card."""
    return "card:" + hashlib.sha256(card_id.encode()).hexdigest()[:10]


def _redact_value(key: str, value: Any) -> Any:
    lowered = key.lower()
    if any(marker in lowered for marker in _SECRET_MARKERS):
        return "[redacted]"
    if lowered in _CARD_KEYS and isinstance(value, str):
        return card_hash(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    return value


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key != "event":
            event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog and route the stdlib loggers of our libraries through it."""
    if json is None:
        # systemd sets JOURNAL_STREAM when stderr goes to the journal: JSON there, and wherever no one reads a TTY
        json = bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # amqtt logs every connection at info and some client errors at error; ours say it better. httpx logs every
    # request at info: under load, 80 journal lines a second that the integration metrics already count.
    for noisy in ("amqtt", "transitions", "websockets", "aiosqlite", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.CRITICAL if noisy == "amqtt" else logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class OnceLogger:
    """Warn once per key, then log at debug; remembers at most `capacity` keys (least recent forgotten)."""

    def __init__(self, logger: Any, capacity: int = 1024) -> None:
        self._log = logger
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._capacity = capacity

    def warning(self, event: str, key: str, **fields: Any) -> None:
        k = (event, key)
        count = self._seen.pop(k, 0) + 1
        self._seen[k] = count
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        if count == 1:
            self._log.warning(event, **fields, note="further repeats of this are logged at debug")
        else:
            self._log.debug(event, repeat=count, **fields)

    def seen(self, event: str, key: str) -> int:
        return self._seen.get((event, key), 0)
