"""Which devices are online, and since when.

Fed by everything that says a device is alive or gone:
- the embedded broker's connects and disconnects (a device that loses power is disconnected by the keepalive
  check, 1.5 x its keepalive after its last packet, and shown offline at that moment);
- status messages on `{rfid|button|tablet|display}/{id}/status`: heartbeats with battery and version, retained
  "online" births, and wills saying "offline" (the only signals there are when the site runs its own mosquitto);
- any other message a device sends (a scan, a press).

A device known only from its messages (no connection seen, as with an external broker) is shown offline when it
has been silent for `SILENT_AFTER_S`. Every change is handed to `on_change`, which publishes the retained
`agent/presence/{device_id}` topic the tablets read; the local API reads `snapshot()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..config import DeviceConfig

# Heartbeat-only devices (external broker) are offline after this long without a message.
SILENT_AFTER_S = 180.0


@dataclass(slots=True)
class DeviceState:
    device_id: str
    kind: str
    court: str | None
    online: bool = False
    since: datetime | None = None  # when `online` last changed
    last_seen: datetime | None = None
    how: str = "never_seen"  # what said so: connected, disconnect, will, keepalive, network, heartbeat, silent...
    connected: bool = False  # the broker holds a connection for it (embedded mode)
    info: dict[str, Any] = field(default_factory=dict)  # battery, app_version, charging

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "kind": self.kind,
            "court": self.court,
            "state": "online" if self.online else "offline",
            "since": _iso(self.since),
            "last_seen": _iso(self.last_seen),
            "how": self.how,
            **self.info,
        }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat(timespec="seconds") if at is not None else None


class Presence:
    def __init__(
        self, devices: Iterable[DeviceConfig] = (), on_change: Callable[[DeviceState], None] | None = None
    ) -> None:
        self._devices = {d.id: DeviceState(d.id, d.kind, d.court) for d in devices}
        self.on_change = on_change

    def add(self, device_id: str, kind: str, court: str | None) -> None:
        """A device the agent watches itself (a court camera): shown like the rest, online while it records."""
        self._devices.setdefault(device_id, DeviceState(device_id, kind, court))

    def _changed(self, state: DeviceState) -> None:
        if self.on_change is not None:
            self.on_change(state)

    def _set(self, state: DeviceState, online: bool, how: str, at: datetime) -> None:
        if state.online != online:
            state.online, state.since, state.how = online, at, how
            self._changed(state)
        elif not online:
            state.how = how

    def connected(self, device_id: str, at: datetime) -> None:
        state = self._devices.get(device_id)
        if state is None:
            return
        state.connected, state.last_seen = True, at
        self._set(state, True, "connected", at)

    def disconnected(self, device_id: str, how: str, at: datetime) -> None:
        """`how`: disconnect (said goodbye), keepalive (went silent: power or Wi-Fi lost), network, taken_over."""
        state = self._devices.get(device_id)
        if state is None:
            return
        state.connected = False
        self._set(state, False, how, at)

    def seen(self, device_id: str, at: datetime, how: str = "message", **info: Any) -> None:
        """A message from the device: it is alive. `info` (battery, version...) is kept when given."""
        state = self._devices.get(device_id)
        if state is None:
            return
        state.last_seen = at
        extra = {k: v for k, v in info.items() if v is not None}
        info_changed = any(state.info.get(k) != v for k, v in extra.items())
        state.info.update(extra)
        if state.online:
            if info_changed:
                self._changed(state)
        else:
            self._set(state, True, how, at)

    def said_offline(self, device_id: str, at: datetime, how: str = "will") -> None:
        """A status message saying the device is gone (its will, or a goodbye)."""
        state = self._devices.get(device_id)
        if state is None or state.connected:
            return  # the broker still holds its connection: a stale retained will, not news
        self._set(state, False, how, at)

    def sweep(self, now: datetime) -> None:
        """Devices known only from their messages go offline after SILENT_AFTER_S of silence."""
        limit = timedelta(seconds=SILENT_AFTER_S)
        for state in self._devices.values():
            if state.online and not state.connected and state.last_seen is not None and now - state.last_seen > limit:
                self._set(state, False, "silent", now)

    def get(self, device_id: str) -> DeviceState | None:
        return self._devices.get(device_id)

    def snapshot(self) -> list[DeviceState]:
        return sorted(self._devices.values(), key=lambda d: d.device_id)
