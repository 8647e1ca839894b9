"""Which devices are online, fed by the messages they send (heartbeats, presses, scans)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(slots=True)
class DeviceSeen:
    device_id: str
    kind: str
    last_seen: datetime
    info: dict[str, Any] = field(default_factory=dict)


class Presence:
    def __init__(self) -> None:
        self._devices: dict[str, DeviceSeen] = {}

    def seen(self, device_id: str, kind: str, at: datetime, **info: Any) -> None:
        entry = self._devices.get(device_id)
        if entry is None:
            self._devices[device_id] = DeviceSeen(device_id, kind, at, {k: v for k, v in info.items() if v is not None})
        else:
            entry.last_seen = at
            entry.info.update({k: v for k, v in info.items() if v is not None})

    def get(self, device_id: str) -> DeviceSeen | None:
        return self._devices.get(device_id)

    def snapshot(self) -> list[DeviceSeen]:
        return sorted(self._devices.values(), key=lambda d: d.device_id)
