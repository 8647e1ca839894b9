"""The agent's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop, whose transports cut the broker's CPU per message by about a third against
    asyncio's (benchmarks/broker.py); on asyncio's own loop where uvloop cannot be imported."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency; kept for platforms without a wheel
        return asyncio.run(main)
    return uvloop.run(main)


def check_cancelled() -> None:
    """Re-raise a cancellation that was swallowed on the way: Python 3.11's asyncio.wait_for (under aiomqtt's
    publish and subscribe) can lose a cancel that races with its own completion (CPython gh-86296), and a
    long-lived loop would then never stop. Call it at the head of every `while True` in a task."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
