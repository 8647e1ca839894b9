"""systemd's notify protocol (sd_notify(3)) and the watchdog, without libsystemd.

The unit is `Type=notify` with `WatchdogSec=`: the agent says READY=1 once its decision path is up (broker,
store, dispatcher connected), then WATCHDOG=1 every half period, but only while the work that matters answers:

- the store's writer takes a transaction (every decision commits through it);
- the dispatcher's worker takes a probe from its queue (every tap, press and order goes through it);
- the embedded broker accepts a TCP connection (every LAN device talks through it);
- each outbox worker went round its loop recently (it wakes at least every IDLE_MAX_S, or its breaker period).

A probe that fails or times out withholds the ping (and says why in STATUS= and the log): systemd then kills
and restarts the agent after WatchdogSec. Without NOTIFY_SOCKET (not under systemd) everything here is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from .logs import get_logger

log = get_logger("agent.notify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is given as "@name" (the leading NUL byte of its address).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())  # the watchdog may be meant for another process of the unit
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False (and a log line) if it could not be sent."""
        if not self._address:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # a full socket buffer or a gone manager: the next ping tries again
            log.warning("sd_notify_failed", error=str(exc), fields=[f.split("=", 1)[0] for f in fields])
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
