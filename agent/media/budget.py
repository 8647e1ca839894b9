"""One storage budget for the ring, the clips and the database (DESIGN 3).

`measure()` adds up what the agent keeps on disk and in the ring: the database with its WAL, every file under
the clips directory and under the ring. `choose()` is the eviction order, a pure function over the clips on
disk: clips the cloud already has go first (oldest first), then, only if that is not enough, the oldest clips
not yet uploaded (the caller warns loudly and tells the cloud). Records not yet synced are never candidates: the
database is measured, never trimmed here (retention prunes only what every destination has).
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


class Level(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # at or above warn_pct of the budget
    CRITICAL = "critical"  # at or above critical_pct
    OVER = "over"  # above the budget even after evicting every clip it may


@dataclass(frozen=True, slots=True)
class Usage:
    database: int
    clips: int
    ring: int
    budget: int

    @property
    def total(self) -> int:
        return self.database + self.clips + self.ring

    @property
    def pct(self) -> float:
        return 100.0 * self.total / self.budget if self.budget else 0.0

    def level(self, warn_pct: int, critical_pct: int) -> Level:
        if self.total > self.budget:
            return Level.OVER
        if self.pct >= critical_pct:
            return Level.CRITICAL
        return Level.WARN if self.pct >= warn_pct else Level.OK

    def to_json(self, warn_pct: int, critical_pct: int) -> dict[str, object]:
        return {
            "level": self.level(warn_pct, critical_pct).value,
            "used_bytes": self.total,
            "budget_bytes": self.budget,
            "used_pct": round(self.pct, 1),
            "database_bytes": self.database,
            "clips_bytes": self.clips,
            "ring_bytes": self.ring,
        }


@dataclass(frozen=True, slots=True)
class ClipFile:
    highlight_id: str
    path: Path
    size: int
    uploaded: bool
    pressed_at_ms: int


def tree_size(root: Path) -> int:
    """Bytes of the regular files under `root` (hard links counted once: pinned ring segments share blocks)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:  # pruned while we walked
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_size
    return total


def database_size(db_path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"{db_path}{suffix}").st_size
    return total


def measure(db_path: Path, clips_dir: Path, ring_dir: Path, budget: int) -> Usage:
    """Blocking (walks directories): run it in a thread."""
    return Usage(database_size(db_path), tree_size(clips_dir), tree_size(ring_dir), budget)


def choose(usage: Usage, clips: Iterable[ClipFile], target_pct: float) -> tuple[list[ClipFile], list[ClipFile]]:
    """The clips to delete to bring usage down to `target_pct` of the budget: (already uploaded, not uploaded),
    each oldest first. The second list is empty unless the first is not enough."""
    excess = usage.total - int(usage.budget * target_pct / 100)
    if excess <= 0:
        return [], []
    ordered: Sequence[ClipFile] = sorted(clips, key=lambda c: (not c.uploaded, c.pressed_at_ms))
    uploaded: list[ClipFile] = []
    waiting: list[ClipFile] = []
    for clip in ordered:
        if excess <= 0:
            break
        (uploaded if clip.uploaded else waiting).append(clip)
        excess -= clip.size
    return uploaded, waiting
