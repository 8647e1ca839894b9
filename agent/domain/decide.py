"""The access decision (DESIGN section 4): pure, total, deterministic.

Rules, first match wins:

1. unknown card: `cache_too_old` when the member list is older than the policy allows, else `unknown_card`;
2. an open session: a tap on its court checks out (or is denied, by policy); elsewhere `already_in_session`.
   Checkout comes before the status rules on purpose: a member suspended mid-game must still be able to leave,
   or the session runs on until the automatic timeout;
3. an `out` reader with no open session here: `no_open_session`;
4. member status: `suspended`, or `expired` for expired and cancelled plans;
5. validity dates, judged by the untrusted-clock policy while time is not synced;
6. court access groups: `court_not_allowed`;
7. court opening hours and the member's plan hours (club-local time): `outside_hours`;
8. timed anti-passback since the last check-in: `anti_passback`;
9. credits: the synced balance plus unconfirmed local spending must cover the check-in: `no_credits`;
10. otherwise check in.
"""

from __future__ import annotations

from .model import (
    Action,
    CacheInfo,
    Court,
    Decision,
    Direction,
    Member,
    MemberState,
    MemberStatus,
    Now,
    Policy,
    Reason,
    SecondTap,
    UntrustedClock,
    within,
)


def _deny(reason: Reason, member: Member | None, cache: CacheInfo) -> Decision:
    return Decision(
        granted=False,
        action=Action.NONE,
        reason=reason,
        member_id=member.member_id if member else None,
        list_version=cache.version,
    )


def cache_too_old(cache: CacheInfo, now: Now, policy: Policy) -> bool:
    """A list never synced, or synced longer ago than the policy allows, is stale.

    With an untrusted clock we cannot measure the age, so we judge against the last trusted time.
    """
    if cache.synced_at is None:
        return False  # an imported list has no age to speak of; the operator chose it
    reference = now.wall if now.trusted else max(now.wall, now.last_trusted or now.wall)
    return reference - cache.synced_at > policy.max_cache_age


def _date_reason(member: Member, now: Now, policy: Policy) -> Reason | None:
    if member.valid_from is None and member.valid_until is None:
        return None
    if now.trusted:
        reference = now.wall
    elif policy.untrusted_clock is UntrustedClock.ALLOW:
        return None
    elif policy.untrusted_clock is UntrustedClock.DENY:
        return Reason.CLOCK_NOT_SYNCED
    else:
        reference = max(now.wall, now.last_trusted) if now.last_trusted else now.wall
    if member.valid_from is not None and reference < member.valid_from:
        return Reason.EXPIRED
    if member.valid_until is not None and reference >= member.valid_until:
        return Reason.EXPIRED
    return None


def effective_credits(member: Member, state: MemberState) -> int | None:
    if member.credits is None:
        return None
    return member.credits + state.pending_credits


def decide(
    member: Member | None,
    court: Court,
    direction: Direction,
    now: Now,
    state: MemberState,
    cache: CacheInfo,
    policy: Policy,
) -> Decision:
    """Decide a tap of `member`'s card (None when the card is unknown) on a reader of `court`."""
    if member is None:
        stale = cache_too_old(cache, now, policy)
        return _deny(Reason.CACHE_TOO_OLD if stale else Reason.UNKNOWN_CARD, None, cache)

    session = state.open_session
    if session is not None:
        if session.court_id != court.court_id:
            return _deny(Reason.ALREADY_IN_SESSION, member, cache)
        if direction is Direction.IN:
            if policy.second_tap is SecondTap.DENY:
                return _deny(Reason.ALREADY_IN_SESSION, member, cache)
            if now.since(session.started_at, session.started) < policy.second_tap_grace:
                return _deny(Reason.ALREADY_IN_SESSION, member, cache)
        return Decision(
            granted=True,
            action=Action.CHECKOUT,
            reason=Reason.OK,
            member_id=member.member_id,
            list_version=cache.version,
            session_id=session.session_id,
            credits_after=effective_credits(member, state),
        )
    if direction is Direction.OUT:
        return _deny(Reason.NO_OPEN_SESSION, member, cache)

    if member.status is MemberStatus.SUSPENDED:
        return _deny(Reason.SUSPENDED, member, cache)
    if member.status is not MemberStatus.ACTIVE:
        return _deny(Reason.EXPIRED, member, cache)
    date_reason = _date_reason(member, now, policy)
    if date_reason is not None:
        return _deny(date_reason, member, cache)

    if court.access_groups and not (court.access_groups & member.groups):
        return _deny(Reason.COURT_NOT_ALLOWED, member, cache)

    if now.trusted or policy.enforce_hours_untrusted:
        local = now.wall.astimezone(policy.timezone)
        if not within(court.hours, local) or not within(member.hours, local):
            return _deny(Reason.OUTSIDE_HOURS, member, cache)

    if (
        policy.anti_passback
        and state.last_checkin_at is not None
        and now.since(state.last_checkin_at, state.last_checkin) < policy.anti_passback
    ):
        return _deny(Reason.ANTI_PASSBACK, member, cache)

    balance = effective_credits(member, state)
    cost = 0
    if member.requires_credit:
        cost = policy.credits_per_checkin
        if balance is None or balance < cost:
            return _deny(Reason.NO_CREDITS, member, cache)
        balance -= cost

    return Decision(
        granted=True,
        action=Action.CHECKIN,
        reason=Reason.OK,
        member_id=member.member_id,
        list_version=cache.version,
        credits_after=balance,
        cost=cost,
    )
