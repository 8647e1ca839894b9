"""The oracle: everything the sandbox accepted or was made to fail, in arrival order.

Tests and demos assert on this log instead of trusting the client's own account of what it sent: "each event
arrived exactly once", "the check-in acted once although the client saw a garbage answer and retried".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

Kind = Literal["call", "event"]


class ReceivedLog:
    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._entries)

    def add(self, kind: Kind, at: str, **fields: Any) -> dict[str, Any]:
        entry = {"n": len(self._entries) + 1, "kind": kind, "at": at, **fields}
        self._entries.append(entry)
        return entry

    def select(self, *, kind: str | None = None, after: int = 0, route: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self._entries[max(after, 0) :]
            if (kind is None or e["kind"] == kind) and (route is None or e.get("route") == route)
        ]
