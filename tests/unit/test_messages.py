"""What the reader shows: pt-BR by default, English on request, one line for every decision."""

from __future__ import annotations

import inspect
import re
from datetime import UTC, datetime, time, timedelta

import pytest

import agent.domain.decide as decide_module
from agent.domain.decide import decide
from agent.domain.messages import Language, denial_message, message
from agent.domain.model import (
    Action,
    CacheInfo,
    Court,
    Decision,
    Direction,
    Member,
    MemberState,
    MemberStatus,
    Now,
    OpenSession,
    Policy,
    Reason,
    TimeWindow,
    UntrustedClock,
)

T0 = datetime(2024, 6, 5, 15, 0, tzinfo=UTC)
COURT = Court(court_id="c1", name="Quadra 1")
FRESH = CacheInfo(version=5, synced_at=T0 - timedelta(hours=1))
TRUSTED = Now(wall=T0, trusted=True, last_trusted=T0)
ANA = Member(member_id="m1", first_name="Ana", status=MemberStatus.ACTIVE)

# Every reason decide() can deny with, named in its source; the scenarios below produce each one for real.
DENIALS_FROM_DECIDE = sorted(
    {Reason[name] for name in re.findall(r"Reason\.([A-Z_]+)", inspect.getsource(decide_module))} - {Reason.OK}
)


def checkin(credits_after: int | None = None, cost: int = 0) -> Decision:
    return Decision(
        granted=True,
        action=Action.CHECKIN,
        reason=Reason.OK,
        member_id="m1",
        list_version=1,
        credits_after=credits_after,
        cost=cost,
    )


def denied(reason: Reason) -> Decision:
    return Decision(granted=False, action=Action.NONE, reason=reason, member_id=None, list_version=1)


def _session(court_id: str, age: timedelta) -> MemberState:
    return MemberState(open_session=OpenSession("s1", "m1", court_id, T0 - age))


def _member(**changes: object) -> Member:
    fields: dict[str, object] = {"member_id": "m1", "first_name": "Ana", "status": MemberStatus.ACTIVE}
    fields.update(changes)
    return Member(**fields)  # type: ignore[arg-type]


# One real decide() call per denial reason, so the message table is checked against what decide() produces.
SCENARIOS: dict[Reason, Decision] = {
    Reason.UNKNOWN_CARD: decide(None, COURT, Direction.IN, TRUSTED, MemberState(), FRESH, Policy()),
    Reason.CACHE_TOO_OLD: decide(
        None, COURT, Direction.IN, TRUSTED, MemberState(), CacheInfo(5, T0 - timedelta(days=3)), Policy()
    ),
    Reason.ALREADY_IN_SESSION: decide(
        ANA, COURT, Direction.IN, TRUSTED, _session("c2", timedelta(hours=1)), FRESH, Policy()
    ),
    Reason.NO_OPEN_SESSION: decide(ANA, COURT, Direction.OUT, TRUSTED, MemberState(), FRESH, Policy()),
    Reason.SUSPENDED: decide(
        _member(status=MemberStatus.SUSPENDED), COURT, Direction.IN, TRUSTED, MemberState(), FRESH, Policy()
    ),
    Reason.EXPIRED: decide(
        _member(valid_until=T0 - timedelta(days=1)),
        COURT,
        Direction.IN,
        TRUSTED,
        MemberState(),
        FRESH,
        Policy(),
    ),
    Reason.CLOCK_NOT_SYNCED: decide(
        _member(valid_until=T0 + timedelta(days=1)),
        COURT,
        Direction.IN,
        Now(wall=T0, trusted=False),
        MemberState(),
        FRESH,
        Policy(untrusted_clock=UntrustedClock.DENY),
    ),
    Reason.COURT_NOT_ALLOWED: decide(
        ANA,
        Court(court_id="c1", name="Quadra 1", access_groups=frozenset({"tennis"})),
        Direction.IN,
        TRUSTED,
        MemberState(),
        FRESH,
        Policy(),
    ),
    Reason.OUTSIDE_HOURS: decide(
        ANA,
        Court(court_id="c1", name="Quadra 1", hours=(TimeWindow(frozenset(range(1, 8)), time(6), time(7)),)),
        Direction.IN,
        TRUSTED,
        MemberState(),
        FRESH,
        Policy(),
    ),
    Reason.ANTI_PASSBACK: decide(
        ANA,
        COURT,
        Direction.IN,
        TRUSTED,
        MemberState(last_checkin_at=T0 - timedelta(seconds=30)),
        FRESH,
        Policy(anti_passback=timedelta(minutes=5)),
    ),
    Reason.NO_CREDITS: decide(
        _member(requires_credit=True, credits=0), COURT, Direction.IN, TRUSTED, MemberState(), FRESH, Policy()
    ),
}


def test_welcome_in_portuguese() -> None:
    assert message(checkin(), "Ana", Language.PT_BR) == "Bem-vindo, Ana!"


def test_welcome_in_english() -> None:
    assert message(checkin(), "Ana", Language.EN) == "Welcome, Ana!"


def test_goodbye_on_checkout() -> None:
    checkout = Decision(
        granted=True,
        action=Action.CHECKOUT,
        reason=Reason.OK,
        member_id="m1",
        list_version=1,
        session_id="s1",
    )
    assert message(checkout, "Ana", Language.PT_BR) == "Até logo, Ana!"
    assert message(checkout, "Ana", Language.EN) == "See you, Ana!"


def test_unknown_card_in_portuguese_and_english() -> None:
    assert message(denied(Reason.UNKNOWN_CARD), None, Language.PT_BR) == "Acesso negado: cartão desconhecido"
    assert message(denied(Reason.UNKNOWN_CARD), None, Language.EN) == "Access denied: unknown card"


def test_denial_ignores_the_name() -> None:
    assert message(denied(Reason.SUSPENDED), "Ana", Language.PT_BR) == "Acesso negado: cadastro suspenso"
    assert message(denied(Reason.SUSPENDED), "Ana", Language.EN) == "Access denied: membership suspended"


def test_scenarios_cover_every_denial_decide_can_produce() -> None:
    assert len(DENIALS_FROM_DECIDE) >= 11
    assert set(SCENARIOS) == set(DENIALS_FROM_DECIDE)
    for reason, decision in SCENARIOS.items():
        assert decision.reason is reason
        assert decision.action is Action.NONE


@pytest.mark.parametrize("reason", DENIALS_FROM_DECIDE)
@pytest.mark.parametrize("language", list(Language))
def test_every_decide_reason_has_its_own_message(reason: Reason, language: Language) -> None:
    text = message(SCENARIOS[reason], "Ana", language)
    assert text.strip()
    assert text == denial_message(reason, language)
    # Not the generic fallback: each reason tells the person something specific.
    assert text != denial_message(Reason.INVALID_REQUEST, language)


@pytest.mark.parametrize("reason", DENIALS_FROM_DECIDE)
def test_languages_differ(reason: Reason) -> None:
    assert denial_message(reason, Language.PT_BR) != denial_message(reason, Language.EN)


def test_denial_messages_are_distinct_per_language() -> None:
    for language in Language:
        texts = [denial_message(reason, language) for reason in DENIALS_FROM_DECIDE]
        assert len(set(texts)) == len(texts)


def test_reason_without_a_message_falls_back_to_the_generic_one() -> None:
    # auto_timeout is recorded by the session sweeper; nobody stands at a reader to read it.
    assert denial_message(Reason.AUTO_TIMEOUT, Language.PT_BR) == "Leitura inválida, tente de novo"
    assert denial_message(Reason.AUTO_TIMEOUT, Language.EN) == "Invalid read, please try again"


@pytest.mark.parametrize(
    ("language", "expected"),
    [(Language.PT_BR, "Bem-vindo, Ana! Créditos: 4"), (Language.EN, "Welcome, Ana! Credits: 4")],
)
def test_credits_suffix_when_the_checkin_costs_credits(language: Language, expected: str) -> None:
    assert message(checkin(credits_after=4, cost=1), "Ana", language) == expected


def test_credits_suffix_shows_zero_left() -> None:
    assert message(checkin(credits_after=0, cost=1), "Ana", Language.PT_BR) == "Bem-vindo, Ana! Créditos: 0"


@pytest.mark.parametrize("language", list(Language))
def test_no_credits_suffix_when_nothing_is_spent(language: Language) -> None:
    text = message(checkin(credits_after=12, cost=0), "Ana", language)
    assert text == {Language.PT_BR: "Bem-vindo, Ana!", Language.EN: "Welcome, Ana!"}[language]
    assert "12" not in text


def test_no_credits_suffix_without_a_balance() -> None:
    assert message(checkin(credits_after=None, cost=0), "Ana", Language.PT_BR) == "Bem-vindo, Ana!"


def test_no_credits_suffix_on_checkout() -> None:
    checkout = Decision(
        granted=True,
        action=Action.CHECKOUT,
        reason=Reason.OK,
        member_id="m1",
        list_version=1,
        session_id="s1",
        credits_after=3,
    )
    assert message(checkout, "Ana", Language.EN) == "See you, Ana!"


def test_messages_from_real_decisions() -> None:
    paying = _member(requires_credit=True, credits=3)
    spent = decide(paying, COURT, Direction.IN, TRUSTED, MemberState(), FRESH, Policy())
    assert message(spent, paying.first_name, Language.PT_BR) == "Bem-vindo, Ana! Créditos: 2"
    free = decide(_member(credits=3), COURT, Direction.IN, TRUSTED, MemberState(), FRESH, Policy())
    assert message(free, "Ana", Language.PT_BR) == "Bem-vindo, Ana!"
