"""Session lifetime rules: automatic timeout and highlight windows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from .model import Court, Now, OpenSession

HIGHLIGHT_PRE_ROLL = timedelta(seconds=10)
HIGHLIGHT_DURATION = timedelta(seconds=30)


def overdue(
    sessions: Iterable[OpenSession], courts: Mapping[str, Court], now: Now, default_max: timedelta
) -> list[OpenSession]:
    """Sessions open longer than their court's maximum: nobody tapped out. Time on court is monotonic within a
    boot, so an NTP step neither closes sessions early nor keeps them open longer."""
    out = []
    for session in sessions:
        court = courts.get(session.court_id)
        limit = court.max_session if court else default_max
        if now.since(session.started_at, session.started) >= limit:
            out.append(session)
    return out


def duration_minutes(started_at: datetime, ended_at: datetime) -> int:
    """Whole minutes on court, rounded up; a clock that jumped back never yields a negative duration."""
    seconds = max(0.0, (ended_at - started_at).total_seconds())
    return int(-(-seconds // 60))


def highlight_window(
    pressed_at: datetime,
    session_started_at: datetime | None,
    pre_roll: timedelta = HIGHLIGHT_PRE_ROLL,
    duration: timedelta = HIGHLIGHT_DURATION,
) -> tuple[datetime, timedelta]:
    """Start = max(session start, press - pre-roll); a fixed duration (reference document: 10 s, 30 s)."""
    start = pressed_at - pre_roll
    if session_started_at is not None and start < session_started_at:
        start = session_started_at
    return start, duration
