"""Session lifetime rules: automatic timeout, minutes on court, highlight windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain.model import Court, Instant, Now, OpenSession
from agent.domain.sessions import (
    HIGHLIGHT_DURATION,
    HIGHLIGHT_PRE_ROLL,
    duration_minutes,
    highlight_window,
    overdue,
)

T0 = datetime(2024, 6, 5, 15, 0, tzinfo=UTC)
NOW = Now(wall=T0, trusted=True)
COURTS = {
    "c1": Court(court_id="c1", name="Quadra 1", max_session=timedelta(minutes=60)),
    "c2": Court(court_id="c2", name="Quadra 2", max_session=timedelta(minutes=120)),
}


def opened(session_id: str, court_id: str, minutes_ago: float) -> OpenSession:
    return OpenSession(
        session_id=session_id,
        member_id=f"m-{session_id}",
        court_id=court_id,
        started_at=T0 - timedelta(minutes=minutes_ago),
    )


# --- overdue ---------------------------------------------------------------------------------------------


BOOT = "boot-1"
MONO_NOW = 50 * 3600 * 10**9


def opened_mono(minutes_ago_wall: float, minutes_ago_mono: float, boot: str = BOOT) -> OpenSession:
    """A session whose wall-clock start and monotonic start disagree: the wall clock stepped since it opened."""
    session = opened("a", "c1", minutes_ago_wall)
    started = Instant(MONO_NOW - int(minutes_ago_mono * 60e9), boot)
    return OpenSession(session.session_id, session.member_id, session.court_id, session.started_at, started)


@pytest.mark.parametrize(
    ("wall_ago", "mono_ago", "expected"),
    [
        (-90, 61, True),  # the clock stepped back 2.5 h after check-in: still closed on time
        (150, 30, False),  # the clock stepped forward 2 h: not closed early
        (61, 61, True),
        (59, 59, False),
    ],
)
def test_overdue_counts_time_on_court_on_the_monotonic_clock(wall_ago: float, mono_ago: float, expected: bool) -> None:
    now = Now(wall=T0, trusted=True, instant=Instant(MONO_NOW, BOOT))
    assert bool(overdue([opened_mono(wall_ago, mono_ago)], COURTS, now, timedelta(hours=3))) is expected


def test_overdue_across_a_reboot_falls_back_to_the_wall_clock() -> None:
    now = Now(wall=T0, trusted=True, instant=Instant(10**9, "boot-2"))  # monotonic time restarted
    assert overdue([opened_mono(61, 5)], COURTS, now, timedelta(hours=3)) != []
    assert overdue([opened_mono(59, 500)], COURTS, now, timedelta(hours=3)) == []


def test_overdue_uses_each_courts_max_session() -> None:
    short_over = opened("a", "c1", 90)
    long_under = opened("b", "c2", 90)
    long_over = opened("c", "c2", 121)
    short_under = opened("d", "c1", 59)
    result = overdue([short_over, long_under, long_over, short_under], COURTS, NOW, timedelta(minutes=30))
    assert result == [short_over, long_over]


@pytest.mark.parametrize(("default", "expected"), [(timedelta(minutes=60), True), (timedelta(minutes=120), False)])
def test_overdue_uses_the_default_for_an_unknown_court(default: timedelta, expected: bool) -> None:
    orphan = opened("a", "c9", 90)
    assert (overdue([orphan], COURTS, NOW, default) == [orphan]) is expected


def test_known_court_limit_wins_over_the_default() -> None:
    on_c2 = opened("a", "c2", 90)
    assert overdue([on_c2], COURTS, NOW, timedelta(minutes=1)) == []


def test_session_exactly_at_the_limit_is_overdue() -> None:
    at_limit = opened("a", "c1", 60)
    just_under = OpenSession("b", "m-b", "c1", T0 - timedelta(minutes=60) + timedelta(microseconds=1))
    assert overdue([at_limit, just_under], COURTS, NOW, timedelta(hours=3)) == [at_limit]


def test_overdue_with_no_sessions() -> None:
    assert overdue([], COURTS, NOW, timedelta(minutes=1)) == []


def test_overdue_accepts_any_iterable_and_keeps_order() -> None:
    sessions = [opened(str(i), "c1", 60 + i) for i in range(5)]
    assert overdue(iter(reversed(sessions)), COURTS, NOW, timedelta(hours=3)) == list(reversed(sessions))


def test_session_started_in_the_future_is_not_overdue() -> None:
    # A clock that jumped back must not close every session at once.
    assert overdue([opened("a", "c1", -30)], COURTS, NOW, timedelta(minutes=1)) == []


def test_default_court_max_session_is_three_hours() -> None:
    plain = {"c1": Court(court_id="c1", name="Quadra 1")}
    assert overdue([opened("a", "c1", 179)], plain, NOW, timedelta(minutes=1)) == []
    assert overdue([opened("a", "c1", 180)], plain, NOW, timedelta(minutes=1)) != []


# --- duration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "minutes"),
    [
        (timedelta(0), 0),
        (timedelta(microseconds=1), 1),
        (timedelta(seconds=1), 1),
        (timedelta(seconds=59), 1),
        (timedelta(seconds=60), 1),
        (timedelta(seconds=60, microseconds=1), 2),
        (timedelta(seconds=61), 2),
        (timedelta(minutes=90), 90),
        (timedelta(minutes=90, seconds=1), 91),
        (timedelta(hours=3), 180),
    ],
)
def test_duration_rounds_up_to_whole_minutes(elapsed: timedelta, minutes: int) -> None:
    assert duration_minutes(T0, T0 + elapsed) == minutes


@pytest.mark.parametrize("back", [timedelta(microseconds=1), timedelta(seconds=30), timedelta(days=2)])
def test_duration_is_never_negative(back: timedelta) -> None:
    assert duration_minutes(T0, T0 - back) == 0


@settings(max_examples=300)
@given(
    st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2025, 1, 1), timezones=st.just(UTC)),
    st.timedeltas(min_value=timedelta(days=-30), max_value=timedelta(days=30)),
)
def test_duration_is_the_exact_ceiling_of_elapsed_minutes(start: datetime, elapsed: timedelta) -> None:
    result = duration_minutes(start, start + elapsed)
    assert isinstance(result, int)
    minute = timedelta(minutes=1)
    expected = 0 if elapsed <= timedelta(0) else -(-elapsed // minute)  # exact integer arithmetic
    assert result == expected
    assert result >= 0


# --- highlights ------------------------------------------------------------------------------------------


def test_highlight_defaults_are_ten_seconds_before_and_thirty_long() -> None:
    assert timedelta(seconds=10) == HIGHLIGHT_PRE_ROLL
    assert timedelta(seconds=30) == HIGHLIGHT_DURATION


def test_highlight_starts_ten_seconds_before_the_press() -> None:
    pressed = T0 + timedelta(minutes=20)
    assert highlight_window(pressed, T0) == (pressed - timedelta(seconds=10), timedelta(seconds=30))


def test_highlight_is_clamped_to_a_session_that_just_began() -> None:
    pressed = T0 + timedelta(seconds=4)
    start, duration = highlight_window(pressed, T0)
    assert start == T0
    assert duration == timedelta(seconds=30)


def test_highlight_for_a_session_that_began_exactly_ten_seconds_ago() -> None:
    pressed = T0 + timedelta(seconds=10)
    assert highlight_window(pressed, T0) == (T0, timedelta(seconds=30))


def test_highlight_without_a_session_start() -> None:
    pressed = T0 + timedelta(seconds=3)
    assert highlight_window(pressed, None) == (T0 - timedelta(seconds=7), timedelta(seconds=30))


def test_highlight_with_custom_pre_roll_and_duration() -> None:
    pressed = T0 + timedelta(minutes=5)
    start, duration = highlight_window(pressed, T0, pre_roll=timedelta(seconds=20), duration=timedelta(minutes=1))
    assert start == pressed - timedelta(seconds=20)
    assert duration == timedelta(minutes=1)


@settings(max_examples=300)
@given(
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=4)),
    st.booleans(),
)
def test_highlight_window_properties(since_start: timedelta, known_start: bool) -> None:
    pressed = T0 + since_start
    session_start = T0 if known_start else None
    start, duration = highlight_window(pressed, session_start)
    assert duration == HIGHLIGHT_DURATION
    assert start <= pressed
    assert pressed - start <= HIGHLIGHT_PRE_ROLL
    if session_start is None or since_start >= HIGHLIGHT_PRE_ROLL:
        assert start == pressed - HIGHLIGHT_PRE_ROLL
    else:
        assert start == session_start
