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
