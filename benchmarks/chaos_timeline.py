"""When each fault of a chaos run was in force, and what a request's fate says given the faults around it.

A window opens when a fault is applied and closes when it is healed plus a settling time (the agent back and
answering after a restart, the reader reopened after a replug). A request that got no decision is judged by the
windows its attempt overlapped: during a disk fault it is expected (`disk`); while the agent was being killed and
restarted there was nobody to answer (`restart`); a serial reader unplugged hears nothing (`unplug`); anything
else is a refusal the run counts against the agent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

DISK_KINDS = frozenset({"disk_full", "read_only"})
RESTART_KINDS = frozenset({"kill"})


@dataclass
class Window:
    kind: str  # kill, cloud:<fault kind>, outage, disk_full, read_only, clock, unplug, flood
    detail: str
    start: float  # time.monotonic()
    healed: float | None = None  # when the fault was taken away
    end: float | None = None  # healed plus settling: what classification uses
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.kind.split(":", 1)[0]

    @property
    def seconds(self) -> float:
        return (self.healed if self.healed is not None else time.monotonic()) - self.start

    def overlaps(self, t0: float, t1: float) -> bool:
        end = self.end if self.end is not None else float("inf")
        return self.start <= t1 and t0 <= end


class Timeline:
    def __init__(self) -> None:
        self.windows: list[Window] = []

    def open(self, kind: str, detail: str = "") -> Window:
        window = Window(kind, detail, time.monotonic())
        self.windows.append(window)
        return window

    @staticmethod
    def healed(window: Window, settle_s: float | None = None) -> None:
        """The fault is gone; its window stays open `settle_s` longer for what it left behind, or (None) until
        `settled` says the premises are back (an agent restarted, a reader reopened)."""
        now = time.monotonic()
        window.healed = now
        window.end = None if settle_s is None else now + settle_s

    @staticmethod
    def settled(window: Window) -> None:
        """End the window now (after a restart is done, or a reader reopened)."""
        window.end = time.monotonic()

    def during(self, t0: float, t1: float) -> list[Window]:
        return [w for w in self.windows if w.overlaps(t0, t1)]

    def category(self, t0: float, t1: float, *, serial: bool = False) -> str | None:
        """Why an attempt made over [t0, t1] may go unanswered without the agent being at fault, if it may."""
        families = {w.family for w in self.during(t0, t1)}
        if families & DISK_KINDS:
            return "disk"
        if families & RESTART_KINDS:
            return "restart"
        if serial and "unplug" in families:
            return "unplug"
        return None

    def label(self, t0: float, t1: float) -> str:
        """The faults an attempt overlapped, for the per-fault table ('calm' when none)."""
        kinds = sorted({w.kind for w in self.during(t0, t1)})
        return "+".join(kinds) if kinds else "calm"
