"""Time sources. The domain never reads a clock; the service asks one of these and passes time in.

A Raspberry Pi has no RTC: until NTP syncs, the wall clock may be hours or years off. Every event therefore
carries wall time, monotonic time, the boot id and whether the clock was synced when it was stamped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

_TIME_ERROR = 5  # adjtimex() return value while the kernel considers the clock unsynchronised
_TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")


class Clock(Protocol):
    def wall(self) -> datetime:
        """Timezone-aware UTC wall time."""
        ...

    def monotonic_ns(self) -> int: ...

    def synced(self) -> bool:
        """Whether the wall clock was synchronised (NTP) since boot."""
        ...


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>: we only need the return value, but the kernel writes the whole struct.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 256)]


def _kernel_clock_synced() -> bool | None:
    """Ask the kernel (adjtimex with modes=0 is read-only and needs no privilege)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"process-{uuid.uuid4()}"  # not Linux: one "boot" per process is the honest fallback


class SystemClock:
    """The real clocks. Sync state is re-read at most every `refresh` seconds (it is a syscall)."""

    def __init__(self, refresh: float = 5.0) -> None:
        self._refresh_ns = int(refresh * 1e9)
        self._checked_at: int | None = None
        self._synced = False

    def wall(self) -> datetime:
        return datetime.now(UTC)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def synced(self) -> bool:
        now = time.monotonic_ns()
        if self._checked_at is None or now - self._checked_at > self._refresh_ns:
            kernel = _kernel_clock_synced()
            self._synced = kernel if kernel is not None else _TIMESYNCD_FLAG.exists()
            self._checked_at = now
        return self._synced


class TrustedClock(SystemClock):
    """For hosts whose clock is kept by other means (an RTC hat, a container's host): always synced."""

    def synced(self) -> bool:
        return True


class ManualClock:
    """A clock tests and simulations move by hand."""

    def __init__(self, start: datetime | None = None, *, synced: bool = True) -> None:
        self._wall = start or datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
        self._mono = 1_000_000_000
        self.is_synced = synced

    def wall(self) -> datetime:
        return self._wall

    def monotonic_ns(self) -> int:
        return self._mono

    def synced(self) -> bool:
        return self.is_synced

    def advance(self, seconds: float) -> None:
        self._wall += timedelta(seconds=seconds)
        self._mono += int(seconds * 1e9)

    def jump_wall(self, seconds: float) -> None:
        """Move only the wall clock (an NTP step), not monotonic time."""
        self._wall += timedelta(seconds=seconds)
