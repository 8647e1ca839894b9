"""Stand-in for MicroPython's `network`: a station interface that joins the access points in `access_points`.

A test takes the Wi-Fi away by removing the access point or calling `WLAN.lose()` on the interface.
"""

from __future__ import annotations

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202

access_points: dict[str, str] = {}  # ssid -> password, the networks in range
stations: list[WLAN] = []
_hostname = "esp32"


def hostname(name: str | None = None) -> str:
    global _hostname
    if name is not None:
        _hostname = name
    return _hostname


class WLAN:
    def __init__(self, interface: int = STA_IF):
        self.interface = interface
        self._active = False
        self._status = STAT_IDLE
        self.connect_calls = 0
        stations.append(self)

    def active(self, on: bool | None = None) -> bool:
        if on is not None:
            self._active = bool(on)
        return self._active

    def connect(self, ssid: str, password: str = "") -> None:
        if not self._active:
            raise OSError("Wifi Not Started")
        self.connect_calls += 1
        if ssid not in access_points:
            self._status = STAT_NO_AP_FOUND
        elif access_points[ssid] != password:
            self._status = STAT_WRONG_PASSWORD
        else:
            self._status = STAT_GOT_IP

    def disconnect(self) -> None:
        self._status = STAT_IDLE

    def lose(self) -> None:
        """The access point went away (or the signal did)."""
        self._status = STAT_IDLE

    def isconnected(self) -> bool:
        return self._status == STAT_GOT_IP

    def status(self) -> int:
        return self._status
