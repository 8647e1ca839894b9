"""The access decision: one or more tests per rule of decide(), then properties over random inputs."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain.decide import cache_too_old, decide, effective_credits
from agent.domain.model import (
    Action,
    CacheInfo,
    Court,
    Decision,
    Direction,
    Instant,
    Member,
    MemberState,
    MemberStatus,
    Now,
    OpenSession,
    Policy,
    Reason,
    SecondTap,
    TimeWindow,
    UntrustedClock,
    within,
)

SAO_PAULO = ZoneInfo("America/Sao_Paulo")  # UTC-3 all year since 2019
ALL_DAYS = frozenset(range(1, 8))
WEEKDAYS = frozenset(range(1, 6))

# Wednesday 2024-06-05, 12:00 in São Paulo.
T0 = datetime(2024, 6, 5, 15, 0, tzinfo=UTC)
COURT = Court(court_id="c1", name="Quadra 1")
OTHER_COURT = Court(court_id="c2", name="Quadra 2")
CACHE = CacheInfo(version=42, synced_at=T0 - timedelta(hours=1))
POLICY = Policy()
TRUSTED = Now(wall=T0, trusted=True, last_trusted=T0)
NO_STATE = MemberState()


def local(year: int, month: int, day: int, hour: int, minute: int = 0, tz: ZoneInfo = SAO_PAULO) -> datetime:
    """A club-local wall time, expressed as the UTC instant the clock reports."""
    return datetime(year, month, day, hour, minute, tzinfo=tz).astimezone(UTC)


def member(**overrides: object) -> Member:
    fields: dict[str, object] = {"member_id": "m1", "first_name": "Ana", "status": MemberStatus.ACTIVE}
    fields.update(overrides)
    return Member(**fields)  # type: ignore[arg-type]


def session(court_id: str = "c1", started_at: datetime = T0 - timedelta(minutes=30)) -> OpenSession:
    return OpenSession(session_id="s1", member_id="m1", court_id=court_id, started_at=started_at)


def tap(
    who: Member | None,
    *,
    court: Court = COURT,
    direction: Direction = Direction.IN,
    now: Now = TRUSTED,
    state: MemberState = NO_STATE,
    cache: CacheInfo = CACHE,
    policy: Policy = POLICY,
) -> Decision:
    decision = decide(who, court, direction, now, state, cache, policy)
    assert decision.list_version == cache.version
    return decision


def at(wall: datetime) -> Now:
    return Now(wall=wall, trusted=True, last_trusted=wall)


def untrusted(wall: datetime, last_trusted: datetime | None) -> Now:
    return Now(wall=wall, trusted=False, last_trusted=last_trusted)


def assert_denied(decision: Decision, reason: Reason) -> None:
    assert decision.reason is reason
    assert decision.granted is False
    assert decision.action is Action.NONE
    assert decision.cost == 0
    assert decision.session_id is None


def assert_checked_in(decision: Decision) -> None:
    assert decision.reason is Reason.OK, decision
    assert decision.granted is True
    assert decision.action is Action.CHECKIN


# --- 1. unknown card ---------------------------------------------------------------------------------------


def test_unknown_card_with_fresh_list() -> None:
    decision = tap(None)
    assert_denied(decision, Reason.UNKNOWN_CARD)
    assert decision.member_id is None
    assert decision.list_version == 42


def test_unknown_card_with_list_older_than_max_cache_age_is_cache_too_old() -> None:
    cache = CacheInfo(version=7, synced_at=T0 - timedelta(hours=36, seconds=1))
    decision = tap(None, cache=cache)
    assert_denied(decision, Reason.CACHE_TOO_OLD)
    assert decision.member_id is None
    assert decision.list_version == 7


def test_list_exactly_max_cache_age_old_is_not_stale() -> None:
    cache = CacheInfo(version=7, synced_at=T0 - timedelta(hours=36))
    assert_denied(tap(None, cache=cache), Reason.UNKNOWN_CARD)


def test_max_cache_age_comes_from_the_policy() -> None:
    cache = CacheInfo(version=7, synced_at=T0 - timedelta(days=29))
    assert_denied(tap(None, cache=cache), Reason.CACHE_TOO_OLD)
    openpath = Policy(max_cache_age=timedelta(days=30))
    assert_denied(tap(None, cache=cache, policy=openpath), Reason.UNKNOWN_CARD)


def test_never_synced_list_is_not_stale() -> None:
    cache = CacheInfo(version=0, synced_at=None)
    far_future = at(T0 + timedelta(days=3650))
    assert cache_too_old(cache, far_future, POLICY) is False
    assert_denied(tap(None, cache=cache, now=far_future), Reason.UNKNOWN_CARD)


def test_untrusted_clock_judges_cache_age_against_last_trusted_time() -> None:
    # A Pi without RTC boots in 1970: its wall clock would make any list look fresh.
    booted = untrusted(datetime(1970, 1, 1, 0, 1, tzinfo=UTC), last_trusted=T0)
    stale = CacheInfo(version=3, synced_at=T0 - timedelta(days=2))
    assert cache_too_old(stale, booted, POLICY) is True
    assert_denied(tap(None, now=booted, cache=stale), Reason.CACHE_TOO_OLD)
    fresh = CacheInfo(version=3, synced_at=T0 - timedelta(hours=2))
    assert_denied(tap(None, now=booted, cache=fresh), Reason.UNKNOWN_CARD)


def test_untrusted_clock_ahead_of_last_trusted_uses_the_wall_clock() -> None:
    cache = CacheInfo(version=3, synced_at=T0 - timedelta(hours=1))
    ahead = untrusted(T0 + timedelta(days=3), last_trusted=T0)
    assert_denied(tap(None, now=ahead, cache=cache), Reason.CACHE_TOO_OLD)


def test_untrusted_clock_without_last_trusted_uses_the_wall_clock() -> None:
    cache = CacheInfo(version=3, synced_at=T0 - timedelta(days=2))
    assert cache_too_old(cache, untrusted(T0, last_trusted=None), POLICY) is True
    assert cache_too_old(cache, untrusted(T0 - timedelta(days=2), last_trusted=None), POLICY) is False


def test_known_active_member_still_enters_with_a_stale_list() -> None:
    stale = CacheInfo(version=9, synced_at=T0 - timedelta(days=10))
    decision = tap(member(), cache=stale)
    assert_checked_in(decision)
    assert decision.list_version == 9


# --- 2. open session ---------------------------------------------------------------------------------------


def test_tap_on_the_session_court_after_grace_checks_out() -> None:
    open_here = MemberState(open_session=session(started_at=T0 - timedelta(minutes=45)))
    decision = tap(member(), state=open_here)
    assert decision.granted is True
    assert decision.action is Action.CHECKOUT
    assert decision.reason is Reason.OK
    assert decision.session_id == "s1"
    assert decision.member_id == "m1"
    assert decision.cost == 0


def test_tap_exactly_at_grace_end_checks_out() -> None:
    open_here = MemberState(open_session=session(started_at=T0 - POLICY.second_tap_grace))
    assert tap(member(), state=open_here).action is Action.CHECKOUT


@pytest.mark.parametrize("age", [timedelta(0), timedelta(seconds=1), timedelta(seconds=59)])
def test_second_tap_within_grace_is_denied(age: timedelta) -> None:
    open_here = MemberState(open_session=session(started_at=T0 - age))
    assert_denied(tap(member(), state=open_here), Reason.ALREADY_IN_SESSION)


def test_grace_comes_from_the_policy() -> None:
    open_here = MemberState(open_session=session(started_at=T0 - timedelta(minutes=3)))
    patient = Policy(second_tap_grace=timedelta(minutes=5))
    assert_denied(tap(member(), state=open_here, policy=patient), Reason.ALREADY_IN_SESSION)
    assert tap(member(), state=open_here).action is Action.CHECKOUT


@pytest.mark.parametrize(
    ("wall_age", "mono_age", "action"),
    [
        # The clock stepped back 10 min after check-in: two minutes on court is past the grace, checkout.
        (timedelta(minutes=-8), timedelta(minutes=2), Action.CHECKOUT),
        # The clock stepped forward 1 h: a nervous double tap 5 s later is still within the grace.
        (timedelta(hours=1, seconds=5), timedelta(seconds=5), None),
    ],
)
def test_grace_is_measured_on_the_monotonic_clock(
    wall_age: timedelta, mono_age: timedelta, action: Action | None
) -> None:
    boot, mono_now = "boot-1", 7_200 * 10**9
    started = Instant(mono_now - int(mono_age.total_seconds() * 1e9), boot)
    opened = dataclasses.replace(session(started_at=T0 - wall_age), started=started)
    now = dataclasses.replace(TRUSTED, instant=Instant(mono_now, boot))
    decision = tap(member(), state=MemberState(open_session=opened), now=now)
    if action is None:
        assert_denied(decision, Reason.ALREADY_IN_SESSION)
    else:
        assert decision.action is action
    # After a reboot the monotonic clock restarts: the wall clock is all there is.
    rebooted = dataclasses.replace(now, instant=Instant(10**9, "boot-2"))
    by_wall = tap(member(), state=MemberState(open_session=opened), now=rebooted)
    if wall_age >= POLICY.second_tap_grace:
        assert by_wall.action is Action.CHECKOUT
    else:
        assert_denied(by_wall, Reason.ALREADY_IN_SESSION)


def test_anti_passback_is_measured_on_the_monotonic_clock() -> None:
    boot, mono_now = "boot-1", 7_200 * 10**9
    policy = Policy(anti_passback=timedelta(minutes=5))
    # Checked out and back in 10 min later by the monotonic clock, though the wall clock stepped back 15 min.
    state = MemberState(last_checkin_at=T0 + timedelta(minutes=5), last_checkin=Instant(mono_now - 600 * 10**9, boot))
    now = dataclasses.replace(TRUSTED, instant=Instant(mono_now, boot))
    assert tap(member(), state=state, now=now, policy=policy).action is Action.CHECKIN
    too_soon = dataclasses.replace(state, last_checkin=Instant(mono_now - 60 * 10**9, boot))
    assert_denied(tap(member(), state=too_soon, now=now, policy=policy), Reason.ANTI_PASSBACK)


def test_second_tap_deny_policy_refuses_toggle_checkout() -> None:
    open_here = MemberState(open_session=session(started_at=T0 - timedelta(hours=2)))
    deny = Policy(second_tap=SecondTap.DENY)
    assert_denied(tap(member(), state=open_here, policy=deny), Reason.ALREADY_IN_SESSION)


@pytest.mark.parametrize("second_tap", list(SecondTap))
def test_out_reader_checks_out_regardless_of_second_tap_policy_and_grace(second_tap: SecondTap) -> None:
    just_started = MemberState(open_session=session(started_at=T0 - timedelta(seconds=5)))
    decision = tap(member(), direction=Direction.OUT, state=just_started, policy=Policy(second_tap=second_tap))
    assert decision.action is Action.CHECKOUT
    assert decision.granted is True
    assert decision.session_id == "s1"


@pytest.mark.parametrize("direction", list(Direction))
def test_open_session_on_another_court_is_already_in_session(direction: Direction) -> None:
    open_elsewhere = MemberState(open_session=session(court_id="c2", started_at=T0 - timedelta(hours=1)))
    decision = tap(member(), court=COURT, direction=direction, state=open_elsewhere)
    assert_denied(decision, Reason.ALREADY_IN_SESSION)
    assert decision.member_id == "m1"


def test_checkout_reports_the_effective_balance_and_spends_nothing() -> None:
    open_here = MemberState(open_session=session(), pending_credits=-1)
    decision = tap(member(requires_credit=True, credits=3), state=open_here)
    assert decision.action is Action.CHECKOUT
    assert decision.credits_after == 2
    assert decision.cost == 0


def test_member_without_credits_can_still_check_out() -> None:
    open_here = MemberState(open_session=session())
    decision = tap(member(requires_credit=True, credits=0), state=open_here)
    assert decision.action is Action.CHECKOUT
    assert decision.credits_after == 0


@pytest.mark.parametrize(
    "who",
    [
        member(status=MemberStatus.SUSPENDED),
        member(status=MemberStatus.EXPIRED),
        member(status=MemberStatus.CANCELLED),
        member(valid_until=T0 - timedelta(days=1)),
        member(groups=frozenset()),  # court below needs a group
    ],
)
@pytest.mark.parametrize("direction", list(Direction))
def test_status_rules_do_not_trap_a_member_on_court(who: Member, direction: Direction) -> None:
    # Documented on purpose: a member suspended mid-game must still be able to leave.
    restricted = Court(court_id="c1", name="Quadra 1", access_groups=frozenset({"tennis"}))
    open_here = MemberState(open_session=session(started_at=T0 - timedelta(hours=1)))
    decision = tap(who, court=restricted, direction=direction, state=open_here)
    assert decision.action is Action.CHECKOUT
    assert decision.granted is True
    assert decision.session_id == "s1"


def test_suspended_member_cannot_check_out_of_another_courts_session() -> None:
    open_elsewhere = MemberState(open_session=session(court_id="c2"))
    decision = tap(member(status=MemberStatus.SUSPENDED), direction=Direction.OUT, state=open_elsewhere)
    assert_denied(decision, Reason.ALREADY_IN_SESSION)


# --- 3. out reader without a session ----------------------------------------------------------------------


def test_out_reader_without_session_is_no_open_session() -> None:
    assert_denied(tap(member(), direction=Direction.OUT), Reason.NO_OPEN_SESSION)


def test_out_reader_without_session_comes_before_status() -> None:
    decision = tap(member(status=MemberStatus.SUSPENDED), direction=Direction.OUT)
    assert_denied(decision, Reason.NO_OPEN_SESSION)


# --- 4. member status -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (MemberStatus.SUSPENDED, Reason.SUSPENDED),
        (MemberStatus.EXPIRED, Reason.EXPIRED),
        (MemberStatus.CANCELLED, Reason.EXPIRED),
    ],
)
def test_inactive_status_is_denied(status: MemberStatus, reason: Reason) -> None:
    decision = tap(member(status=status, credits=10, requires_credit=True))
    assert_denied(decision, reason)
    assert decision.member_id == "m1"
    assert decision.credits_after is None


def test_active_member_with_no_restrictions_checks_in() -> None:
    decision = tap(member())
    assert_checked_in(decision)
    assert decision.member_id == "m1"
    assert decision.session_id is None
    assert decision.cost == 0
    assert decision.credits_after is None


def test_status_comes_before_court_groups() -> None:
    restricted = Court(court_id="c1", name="Quadra 1", access_groups=frozenset({"tennis"}))
    assert_denied(tap(member(status=MemberStatus.SUSPENDED), court=restricted), Reason.SUSPENDED)


# --- 5. validity dates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "who",
    [
        member(valid_from=T0 + timedelta(days=1)),
        member(valid_from=T0 + timedelta(seconds=1), valid_until=T0 + timedelta(days=30)),
        member(valid_until=T0 - timedelta(seconds=1)),
        member(valid_until=T0),  # valid_until is exclusive
        member(valid_from=T0 - timedelta(days=60), valid_until=T0 - timedelta(days=30)),
    ],
)
def test_outside_validity_dates_is_expired(who: Member) -> None:
    assert_denied(tap(who), Reason.EXPIRED)


@pytest.mark.parametrize(
    "who",
    [
        member(valid_from=T0),  # valid_from is inclusive
        member(valid_from=T0 - timedelta(days=1)),
        member(valid_until=T0 + timedelta(seconds=1)),
        member(valid_from=T0 - timedelta(days=1), valid_until=T0 + timedelta(days=1)),
    ],
)
def test_inside_validity_dates_checks_in(who: Member) -> None:
    assert_checked_in(tap(who))


def test_last_known_policy_judges_against_last_trusted_when_wall_is_behind() -> None:
    booted = untrusted(datetime(1970, 1, 1, 0, 1, tzinfo=UTC), last_trusted=T0)
    lapsed = member(valid_until=T0 - timedelta(days=1))
    assert_denied(tap(lapsed, now=booted), Reason.EXPIRED)
    current = member(valid_from=T0 - timedelta(days=1), valid_until=T0 + timedelta(days=30))
    assert_checked_in(tap(current, now=booted))


def test_last_known_policy_uses_the_wall_clock_when_it_is_ahead() -> None:
    ahead = untrusted(T0 + timedelta(days=2), last_trusted=T0)
    assert_denied(tap(member(valid_until=T0 + timedelta(days=1)), now=ahead), Reason.EXPIRED)


def test_last_known_policy_without_last_trusted_uses_the_wall_clock() -> None:
    never_synced = untrusted(T0, last_trusted=None)
    assert_denied(tap(member(valid_until=T0 - timedelta(days=1)), now=never_synced), Reason.EXPIRED)
    assert_checked_in(tap(member(valid_until=T0 + timedelta(days=1)), now=never_synced))


def test_allow_policy_skips_date_checks_while_untrusted() -> None:
    allow = Policy(untrusted_clock=UntrustedClock.ALLOW)
    lapsed = member(valid_until=T0 - timedelta(days=100))
    not_yet = member(valid_from=T0 + timedelta(days=100))
    for who in (lapsed, not_yet):
        assert_checked_in(tap(who, now=untrusted(T0, last_trusted=T0), policy=allow))
        assert_denied(tap(who, now=at(T0), policy=allow), Reason.EXPIRED)  # trusted: dates count again


@pytest.mark.parametrize(
    "who",
    [
        member(valid_from=T0 - timedelta(days=1)),
        member(valid_until=T0 + timedelta(days=1)),
        member(valid_from=T0 - timedelta(days=1), valid_until=T0 + timedelta(days=1)),
    ],
)
def test_deny_policy_refuses_members_with_dates_while_untrusted(who: Member) -> None:
    deny = Policy(untrusted_clock=UntrustedClock.DENY)
    assert_denied(tap(who, now=untrusted(T0, last_trusted=T0), policy=deny), Reason.CLOCK_NOT_SYNCED)
    assert_checked_in(tap(who, now=at(T0), policy=deny))


def test_deny_policy_admits_members_without_dates_while_untrusted() -> None:
    deny = Policy(untrusted_clock=UntrustedClock.DENY)
    assert_checked_in(tap(member(), now=untrusted(T0, last_trusted=None), policy=deny))


def test_dates_come_before_court_groups() -> None:
    restricted = Court(court_id="c1", name="Quadra 1", access_groups=frozenset({"tennis"}))
    assert_denied(tap(member(valid_until=T0 - timedelta(days=1)), court=restricted), Reason.EXPIRED)


# --- 6. court access groups -------------------------------------------------------------------------------


def test_court_without_access_groups_is_open_to_everyone() -> None:
    assert_checked_in(tap(member(groups=frozenset())))
    assert_checked_in(tap(member(groups=frozenset({"padel"}))))


@pytest.mark.parametrize(
    ("groups", "allowed"),
    [
        (frozenset(), False),
        (frozenset({"padel"}), False),
        (frozenset({"tennis"}), True),
        (frozenset({"padel", "tennis"}), True),
        (frozenset({"kids"}), True),
    ],
)
def test_court_access_groups(groups: frozenset[str], allowed: bool) -> None:
    court = Court(court_id="c1", name="Quadra 1", access_groups=frozenset({"tennis", "kids"}))
    decision = tap(member(groups=groups), court=court)
    if allowed:
        assert_checked_in(decision)
    else:
        assert_denied(decision, Reason.COURT_NOT_ALLOWED)


def test_groups_come_before_hours() -> None:
    court = Court(
        court_id="c1",
        name="Quadra 1",
        access_groups=frozenset({"tennis"}),
        hours=(TimeWindow(ALL_DAYS, time(8), time(9)),),
    )
    assert_denied(tap(member(), court=court), Reason.COURT_NOT_ALLOWED)


# --- 7. opening hours and plan hours ----------------------------------------------------------------------

DAYTIME = Court(court_id="c1", name="Quadra 1", hours=(TimeWindow(ALL_DAYS, time(8), time(22)),))


@pytest.mark.parametrize(
    ("wall", "open_"),
    [
        (datetime(2024, 6, 5, 10, 59, tzinfo=UTC), False),  # 07:59 local
        (datetime(2024, 6, 5, 11, 0, tzinfo=UTC), True),  # 08:00 local: start is inclusive
        (datetime(2024, 6, 5, 21, 30, tzinfo=UTC), True),  # 18:30 local
        (datetime(2024, 6, 6, 0, 30, tzinfo=UTC), True),  # 21:30 local (already "tomorrow" in UTC)
        (datetime(2024, 6, 6, 1, 0, tzinfo=UTC), False),  # 22:00 local: end is exclusive
        (datetime(2024, 6, 5, 9, 0, tzinfo=UTC), False),  # 06:00 local although 09:00 UTC
    ],
)
def test_court_hours_are_judged_in_club_local_time(wall: datetime, open_: bool) -> None:
    decision = tap(member(), court=DAYTIME, now=at(wall))
    if open_:
        assert_checked_in(decision)
    else:
        assert_denied(decision, Reason.OUTSIDE_HOURS)


def test_hours_follow_the_policy_timezone() -> None:
    wall = datetime(2024, 6, 5, 9, 0, tzinfo=UTC)  # 06:00 in São Paulo, 10:00 in Lisbon
    assert_denied(tap(member(), court=DAYTIME, now=at(wall)), Reason.OUTSIDE_HOURS)
    lisbon = Policy(timezone=ZoneInfo("Europe/Lisbon"))
    assert_checked_in(tap(member(), court=DAYTIME, now=at(wall), policy=lisbon))


def test_court_hours_respect_days_of_week() -> None:
    weekend_only = Court(court_id="c1", name="Quadra 1", hours=(TimeWindow(frozenset({6, 7}), time(8), time(20)),))
    assert_denied(tap(member(), court=weekend_only, now=at(local(2024, 6, 5, 10))), Reason.OUTSIDE_HOURS)
    assert_checked_in(tap(member(), court=weekend_only, now=at(local(2024, 6, 8, 10))))
    assert_checked_in(tap(member(), court=weekend_only, now=at(local(2024, 6, 9, 10))))


def test_any_court_window_is_enough() -> None:
    split = Court(
        court_id="c1",
        name="Quadra 1",
        hours=(TimeWindow(ALL_DAYS, time(6), time(12)), TimeWindow(ALL_DAYS, time(14), time(22))),
    )
    assert_checked_in(tap(member(), court=split, now=at(local(2024, 6, 5, 7))))
    assert_denied(tap(member(), court=split, now=at(local(2024, 6, 5, 13))), Reason.OUTSIDE_HOURS)
    assert_checked_in(tap(member(), court=split, now=at(local(2024, 6, 5, 15))))


def test_member_plan_hours_are_enforced_in_club_local_time() -> None:
    mornings = member(hours=(TimeWindow(WEEKDAYS, time(6), time(12)),))
    assert_checked_in(tap(mornings, now=at(local(2024, 6, 5, 9))))  # Wednesday 09:00
    assert_denied(tap(mornings, now=at(local(2024, 6, 5, 13))), Reason.OUTSIDE_HOURS)
    assert_denied(tap(mornings, now=at(local(2024, 6, 8, 9))), Reason.OUTSIDE_HOURS)  # Saturday
    # 11:30 local is 14:30 UTC: only club-local time admits this tap.
    assert_checked_in(tap(mornings, now=at(datetime(2024, 6, 5, 14, 30, tzinfo=UTC))))


def test_both_court_and_plan_hours_must_admit_the_tap() -> None:
    mornings = member(hours=(TimeWindow(ALL_DAYS, time(6), time(12)),))
    assert_denied(tap(mornings, court=DAYTIME, now=at(local(2024, 6, 5, 7))), Reason.OUTSIDE_HOURS)
    assert_checked_in(tap(mornings, court=DAYTIME, now=at(local(2024, 6, 5, 9))))
    assert_denied(tap(mornings, court=DAYTIME, now=at(local(2024, 6, 5, 15))), Reason.OUTSIDE_HOURS)


def test_hours_are_not_enforced_while_the_clock_is_untrusted() -> None:
    mornings = member(hours=(TimeWindow(ALL_DAYS, time(6), time(12)),))
    night = untrusted(local(2024, 6, 5, 3), last_trusted=None)
    assert_checked_in(tap(mornings, court=DAYTIME, now=night))


def test_hours_are_enforced_while_untrusted_when_the_policy_says_so() -> None:
    strict = Policy(enforce_hours_untrusted=True)
    night = untrusted(local(2024, 6, 5, 3), last_trusted=None)
    assert_denied(tap(member(), court=DAYTIME, now=night, policy=strict), Reason.OUTSIDE_HOURS)
    day = untrusted(local(2024, 6, 5, 10), last_trusted=None)
    assert_checked_in(tap(member(), court=DAYTIME, now=day, policy=strict))


FRIDAY_NIGHT = TimeWindow(frozenset({5}), time(22), time(2))


@pytest.mark.parametrize(
    ("wall", "inside"),
    [
        (local(2024, 6, 7, 21, 59), False),  # Friday before the start
        (local(2024, 6, 7, 22, 0), True),  # Friday start
        (local(2024, 6, 7, 23, 30), True),  # Friday night
        (local(2024, 6, 8, 1, 59), True),  # Saturday small hours belong to Friday's window
        (local(2024, 6, 8, 2, 0), False),  # end is exclusive
        (local(2024, 6, 8, 23, 0), False),  # Saturday night is not in the window
        (local(2024, 6, 7, 1, 0), False),  # Friday small hours belong to Thursday
        (local(2024, 6, 7, 12, 0), False),  # Friday midday
    ],
)
def test_overnight_window_belongs_to_the_day_it_starts(wall: datetime, inside: bool) -> None:
    assert FRIDAY_NIGHT.contains(wall.astimezone(SAO_PAULO)) is inside
    court = Court(court_id="c1", name="Quadra 1", hours=(FRIDAY_NIGHT,))
    decision = tap(member(), court=court, now=at(wall))
    if inside:
        assert_checked_in(decision)
    else:
        assert_denied(decision, Reason.OUTSIDE_HOURS)


def test_overnight_window_wraps_from_sunday_to_monday() -> None:
    sunday_night = TimeWindow(frozenset({7}), time(22), time(2))
    assert sunday_night.contains(datetime(2024, 6, 10, 1, 0, tzinfo=SAO_PAULO)) is True  # Monday 01:00
    assert sunday_night.contains(datetime(2024, 6, 3, 23, 0, tzinfo=SAO_PAULO)) is False  # Monday 23:00
    assert sunday_night.contains(datetime(2024, 6, 9, 23, 0, tzinfo=SAO_PAULO)) is True  # Sunday 23:00


def test_equal_start_and_end_is_the_whole_day() -> None:
    wednesdays = TimeWindow(frozenset({3}), time(0), time(0))
    assert wednesdays.contains(datetime(2024, 6, 5, 0, 0, tzinfo=SAO_PAULO)) is True
    assert wednesdays.contains(datetime(2024, 6, 5, 23, 59, 59, tzinfo=SAO_PAULO)) is True
    assert wednesdays.contains(datetime(2024, 6, 6, 0, 0, tzinfo=SAO_PAULO)) is False


def test_no_windows_means_no_restriction() -> None:
    assert within((), datetime(2024, 6, 5, 3, 0, tzinfo=SAO_PAULO)) is True
    closed = (TimeWindow(frozenset(), time(0), time(0)),)
    assert within(closed, datetime(2024, 6, 5, 3, 0, tzinfo=SAO_PAULO)) is False


def test_hours_come_before_anti_passback() -> None:
    night = at(local(2024, 6, 5, 3))
    state = MemberState(last_checkin_at=night.wall - timedelta(seconds=10))
    policy = Policy(anti_passback=timedelta(minutes=5))
    assert_denied(tap(member(), court=DAYTIME, now=night, state=state, policy=policy), Reason.OUTSIDE_HOURS)


# --- 8. anti-passback ------------------------------------------------------------------------------------

PASSBACK = Policy(anti_passback=timedelta(minutes=5))


@pytest.mark.parametrize(
    ("since", "blocked"),
    [
        (timedelta(0), True),
        (timedelta(minutes=2), True),
        (timedelta(minutes=4, seconds=59), True),
        (timedelta(minutes=5), False),
        (timedelta(hours=3), False),
    ],
)
def test_anti_passback_window_since_last_checkin(since: timedelta, blocked: bool) -> None:
    decision = tap(member(), state=MemberState(last_checkin_at=T0 - since), policy=PASSBACK)
    if blocked:
        assert_denied(decision, Reason.ANTI_PASSBACK)
    else:
        assert_checked_in(decision)


def test_anti_passback_without_previous_checkin_admits() -> None:
    assert_checked_in(tap(member(), state=MemberState(last_checkin_at=None), policy=PASSBACK))


def test_anti_passback_disabled_by_default() -> None:
    assert POLICY.anti_passback == timedelta(0)
    assert_checked_in(tap(member(), state=MemberState(last_checkin_at=T0 - timedelta(seconds=1))))


def test_anti_passback_comes_before_credits() -> None:
    broke = member(requires_credit=True, credits=0)
    state = MemberState(last_checkin_at=T0 - timedelta(minutes=1))
    assert_denied(tap(broke, state=state, policy=PASSBACK), Reason.ANTI_PASSBACK)


# --- 9. credits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credits", "pending", "per_checkin"),
    [
        (1, 0, 1),
        (5, -4, 1),
        (0, 1, 1),  # an unconfirmed local refund counts too
        (2, 0, 2),
        (10, -7, 3),
    ],
)
def test_exactly_enough_credits_checks_in(credits: int, pending: int, per_checkin: int) -> None:
    who = member(requires_credit=True, credits=credits)
    decision = tap(who, state=MemberState(pending_credits=pending), policy=Policy(credits_per_checkin=per_checkin))
    assert_checked_in(decision)
    assert decision.cost == per_checkin
    assert decision.credits_after == credits + pending - per_checkin == 0


def test_more_than_enough_credits_spends_credits_per_checkin() -> None:
    who = member(requires_credit=True, credits=10)
    decision = tap(who, state=MemberState(pending_credits=-3), policy=Policy(credits_per_checkin=2))
    assert_checked_in(decision)
    assert decision.cost == 2
    assert decision.credits_after == 5


@pytest.mark.parametrize(
    ("credits", "pending", "per_checkin"),
    [
        (0, 0, 1),
        (1, -1, 1),  # synced balance looks fine, but offline spending used it up
        (1, 0, 2),
        (3, -2, 2),
        (-1, 0, 1),
    ],
)
def test_not_enough_credits_is_no_credits(credits: int, pending: int, per_checkin: int) -> None:
    who = member(requires_credit=True, credits=credits)
    decision = tap(who, state=MemberState(pending_credits=pending), policy=Policy(credits_per_checkin=per_checkin))
    assert_denied(decision, Reason.NO_CREDITS)
    assert decision.credits_after is None


def test_credit_plan_without_a_synced_balance_is_no_credits() -> None:
    who = member(requires_credit=True, credits=None)
    assert_denied(tap(who, state=MemberState(pending_credits=5)), Reason.NO_CREDITS)


@pytest.mark.parametrize(("credits", "pending", "expected_after"), [(None, 0, None), (0, 0, 0), (7, -1, 6)])
def test_plan_without_requires_credit_spends_nothing(
    credits: int | None, pending: int, expected_after: int | None
) -> None:
    who = member(requires_credit=False, credits=credits)
    decision = tap(who, state=MemberState(pending_credits=pending))
    assert_checked_in(decision)
    assert decision.cost == 0
    assert decision.credits_after == expected_after


def test_effective_credits_adds_pending_ledger() -> None:
    assert effective_credits(member(credits=4), MemberState(pending_credits=-3)) == 1
    assert effective_credits(member(credits=None), MemberState(pending_credits=-3)) is None


# --- list version ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "direction", "state", "policy", "expected"),
    [
        (None, Direction.IN, NO_STATE, POLICY, Reason.UNKNOWN_CARD),
        (member(), Direction.IN, NO_STATE, POLICY, Reason.OK),
        (member(), Direction.IN, MemberState(open_session=session()), POLICY, Reason.OK),
        (member(), Direction.IN, MemberState(open_session=session("c2")), POLICY, Reason.ALREADY_IN_SESSION),
        (member(), Direction.OUT, NO_STATE, POLICY, Reason.NO_OPEN_SESSION),
        (member(status=MemberStatus.SUSPENDED), Direction.IN, NO_STATE, POLICY, Reason.SUSPENDED),
        (member(valid_until=T0), Direction.IN, NO_STATE, POLICY, Reason.EXPIRED),
        (member(requires_credit=True, credits=0), Direction.IN, NO_STATE, POLICY, Reason.NO_CREDITS),
        (member(), Direction.IN, MemberState(last_checkin_at=T0), PASSBACK, Reason.ANTI_PASSBACK),
    ],
)
@pytest.mark.parametrize("version", [0, 1, 987654321])
def test_every_decision_records_the_list_version(
    who: Member | None,
    direction: Direction,
    state: MemberState,
    policy: Policy,
    expected: Reason,
    version: int,
) -> None:
    cache = CacheInfo(version=version, synced_at=T0 - timedelta(minutes=5))
    decision = decide(who, COURT, direction, TRUSTED, state, cache, policy)
    assert decision.reason is expected
    assert decision.list_version == version


# --- properties ------------------------------------------------------------------------------------------

GROUPS = ("tennis", "padel", "kids")
COURT_IDS = ("c1", "c2")

instants = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2024, 12, 31), timezones=st.just(UTC))
maybe_instants = st.none() | instants
group_sets = st.frozensets(st.sampled_from(GROUPS), max_size=len(GROUPS))
windows = st.builds(
    TimeWindow,
    days=st.frozensets(st.integers(1, 7), max_size=7),
    start=st.times(),
    end=st.times(),
)
window_tuples = st.lists(windows, max_size=2).map(tuple)

members = st.builds(
    Member,
    member_id=st.sampled_from(("m1", "m2")),
    first_name=st.sampled_from(("Ana", "João", "")),
    status=st.sampled_from(MemberStatus),
    credits=st.none() | st.integers(-3, 5),
    requires_credit=st.booleans(),
    valid_from=maybe_instants,
    valid_until=maybe_instants,
    groups=group_sets,
    hours=window_tuples,
)
courts = st.builds(
    Court,
    court_id=st.sampled_from(COURT_IDS),
    name=st.just("Quadra"),
    access_groups=group_sets,
    hours=window_tuples,
    max_session=st.timedeltas(min_value=timedelta(minutes=30), max_value=timedelta(hours=4)),
)
open_sessions = st.builds(
    OpenSession,
    session_id=st.just("s1"),
    member_id=st.just("m1"),
    court_id=st.sampled_from(COURT_IDS),
    started_at=instants,
)
states = st.builds(
    MemberState,
    open_session=st.none() | open_sessions,
    last_checkin_at=maybe_instants,
    pending_credits=st.integers(-5, 5),
)
nows = st.builds(Now, wall=instants, trusted=st.booleans(), last_trusted=maybe_instants)
policies = st.builds(
    Policy,
    timezone=st.sampled_from([SAO_PAULO, ZoneInfo("UTC"), ZoneInfo("Asia/Tokyo"), ZoneInfo("Europe/Lisbon")]),
    second_tap=st.sampled_from(SecondTap),
    second_tap_grace=st.timedeltas(min_value=timedelta(0), max_value=timedelta(minutes=5)),
    anti_passback=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
    max_cache_age=st.timedeltas(min_value=timedelta(hours=1), max_value=timedelta(days=30)),
    untrusted_clock=st.sampled_from(UntrustedClock),
    enforce_hours_untrusted=st.booleans(),
    credits_per_checkin=st.integers(0, 3),
)
caches = st.builds(CacheInfo, version=st.integers(0, 2**31), synced_at=maybe_instants)
directions = st.sampled_from(Direction)

# Random restrictions deny almost every tap; these let a good share of taps reach the credit rule.
open_courts = st.builds(Court, court_id=st.sampled_from(COURT_IDS), name=st.just("Quadra"), hours=st.just(()))
idle_states = st.builds(
    MemberState,
    open_session=st.none(),
    last_checkin_at=st.none(),
    pending_credits=st.integers(-5, 5),
)
undated_members = st.builds(
    Member,
    member_id=st.just("m1"),
    first_name=st.just("Ana"),
    status=st.sampled_from(MemberStatus),
    credits=st.none() | st.integers(-5, 5),
    requires_credit=st.booleans(),
)
credit_members = st.builds(
    Member,
    member_id=st.just("m1"),
    first_name=st.just("Ana"),
    status=st.just(MemberStatus.ACTIVE),
    credits=st.none() | st.integers(-5, 5),
    requires_credit=st.just(True),
)

Args = tuple[Member | None, Court, Direction, Now, MemberState, CacheInfo, Policy]


def taps(who: st.SearchStrategy[Member | None], reachable: st.SearchStrategy[Member]) -> st.SearchStrategy[Args]:
    """decide() arguments: fully random, or with few enough restrictions that check-ins happen."""
    anything = st.tuples(who, courts, directions, nows, states, caches, policies)
    likely_checkin = st.tuples(reachable, open_courts, st.just(Direction.IN), nows, idle_states, caches, policies)
    return st.one_of(anything, likely_checkin)


def inactive(m: st.SearchStrategy[Member]) -> st.SearchStrategy[Member]:
    inactive_statuses = [MemberStatus.SUSPENDED, MemberStatus.EXPIRED, MemberStatus.CANCELLED]
    return st.builds(dataclasses.replace, m, status=st.sampled_from(inactive_statuses))


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


@PROPERTY_SETTINGS
@given(taps(inactive(members), inactive(undated_members)))
def test_inactive_member_is_never_checked_in(args: Args) -> None:
    who, court, direction, _, state, _, _ = args
    assert who is not None
    decision = decide(*args)
    assert decision.action is not Action.CHECKIN
    assert decision.granted is (decision.action is Action.CHECKOUT)
    if decision.action is Action.CHECKOUT:
        # The one thing an inactive member may do: leave the session they are in, on its court.
        assert state.open_session is not None
        assert state.open_session.court_id == court.court_id
        assert decision.session_id == state.open_session.session_id
    if state.open_session is None and direction is Direction.IN:
        expected = Reason.SUSPENDED if who.status is MemberStatus.SUSPENDED else Reason.EXPIRED
        assert decision.reason is expected


@PROPERTY_SETTINGS
@given(taps(members, credit_members))
def test_credits_never_go_below_zero(args: Args) -> None:
    who, _, _, _, state, _, policy = args
    assert who is not None
    decision = decide(*args)
    if decision.action is Action.CHECKIN and who.requires_credit:
        assert decision.credits_after is not None
        assert decision.credits_after >= 0
        assert decision.cost == policy.credits_per_checkin
        assert decision.credits_after == who.credits + state.pending_credits - decision.cost  # type: ignore[operator]
    else:
        assert decision.cost == 0


@PROPERTY_SETTINGS
@given(taps(st.none() | members, undated_members | credit_members))
def test_decide_is_deterministic(args: Args) -> None:
    first = decide(*args)
    second = decide(*args)
    assert first == second


@PROPERTY_SETTINGS
@given(taps(st.none() | members, undated_members | credit_members))
def test_granted_iff_an_action_happens(args: Args) -> None:
    who, _, _, _, _, cache, _ = args
    decision = decide(*args)
    assert decision.granted == (decision.action is not Action.NONE)
    if decision.granted:
        assert decision.reason is Reason.OK
    else:
        assert decision.action is Action.NONE
        assert decision.reason is not Reason.OK
        assert decision.cost == 0
    assert decision.list_version == cache.version
    assert decision.member_id == (who.member_id if who else None)
    assert (decision.session_id is not None) == (decision.action is Action.CHECKOUT)


@PROPERTY_SETTINGS
@given(courts | open_courts, directions, nows, states | idle_states, caches, policies)
def test_unknown_member_is_never_granted(
    court: Court, direction: Direction, now: Now, state: MemberState, cache: CacheInfo, policy: Policy
) -> None:
    decision = decide(None, court, direction, now, state, cache, policy)
    assert decision.granted is False
    assert decision.action is Action.NONE
    assert decision.member_id is None
    assert decision.reason in {Reason.UNKNOWN_CARD, Reason.CACHE_TOO_OLD}
    assert (decision.reason is Reason.CACHE_TOO_OLD) == cache_too_old(cache, now, policy)


@PROPERTY_SETTINGS
@given(members | undated_members, courts, nows, states, caches, policies)
def test_checkout_only_ends_the_session_on_this_court(
    who: Member, court: Court, now: Now, state: MemberState, cache: CacheInfo, policy: Policy
) -> None:
    for direction in Direction:
        decision = decide(who, court, direction, now, state, cache, policy)
        here = state.open_session is not None and state.open_session.court_id == court.court_id
        if decision.action is Action.CHECKOUT:
            assert here
        if here and direction is Direction.OUT:
            assert decision.action is Action.CHECKOUT
        if state.open_session is not None:
            assert decision.action is not Action.CHECKIN
