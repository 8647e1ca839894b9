"""The MQTT check-in flow through the real embedded broker, with real clients, a real store and a manual clock."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.domain.model import Reason
from tests.conftest import ANA, BRUNO, CARLA, DIEGO, EVA, FABIO, UNKNOWN, Premises, PremisesFactory, next_message


async def test_granted_tap_is_answered_recorded_and_shown_on_the_court(premises: Premises) -> None:
    async with premises.client("t1", identifier="t1-screen") as screen:
        await screen.subscribe("court/c1/state", qos=1)
        first_state = await next_message(screen, "court/c1/state")
        assert first_state["players"] == []
        async with premises.reader("r1") as reader:
            reply = await reader.tap(ANA, msg_id="tap-1")
        state = await next_message(screen, "court/c1/state")

    p = reply.payload
    assert (p["status"], p["action"], p["reason"], p["color"]) == ("granted", "checkin", "ok", "green")
    assert p["message"] == "Bem-vindo, Ana! Créditos: 1"
    assert p["msg_id"] == "tap-1"
    assert p["credits_left"] == 1
    session_id = p["session_id"]
    assert [pl["first_name"] for pl in state["players"]] == ["Ana"]
    assert state["players"][0]["session_id"] == session_id

    assert await premises.rows("SELECT member_id, court_id, ended_at FROM sessions") == [("m-ana", "c1", None)]
    events = await premises.rows("SELECT type, session_id, clock_synced FROM events ORDER BY seq")
    assert [e[0] for e in events] == ["access.decided", "session.started"]
    assert all(e[1] == session_id for e in events)
    assert await premises.pending("cloud") == 2
    assert await premises.pending("ziggy") == 1
    await premises.queue_deliveries()  # as the destinations' workers would (none here: no secrets)
    deliveries = await premises.rows(
        "SELECT e.type, d.destination, d.state FROM deliveries d JOIN events e USING (seq) ORDER BY d.seq, 2"
    )
    assert deliveries == [
        ("access.decided", "cloud", "pending"),
        ("session.started", "cloud", "pending"),
        ("session.started", "ziggy", "pending"),
    ]
    ledger = await premises.rows("SELECT member_id, delta, session_id, confirmed FROM credit_ledger")
    assert ledger == [("m-ana", -1, session_id, 0)]
    assert premises.metric("scans_total", reader="r1", result="granted", reason="ok") == 1


@pytest.mark.parametrize(
    ("card", "reader", "reason", "message"),
    [
        (UNKNOWN, "r1", "unknown_card", "Acesso negado: cartão desconhecido"),
        (CARLA, "r1", "suspended", "Acesso negado: cadastro suspenso"),
        (DIEGO, "r1", "expired", "Acesso negado: plano vencido"),
        (EVA, "r1", "no_credits", "Acesso negado: sem créditos"),
        (FABIO, "r1", "court_not_allowed", "Acesso negado: quadra não liberada no seu plano"),
        (BRUNO, "rx", "no_open_session", "Nenhuma sessão aberta nesta quadra"),
    ],
)
async def test_every_denial_tells_why(premises: Premises, card: str, reader: str, reason: str, message: str) -> None:
    async with premises.reader(reader) as r:
        reply = await r.tap(card)
    assert reply.payload["status"] == "denied"
    assert reply.payload["color"] == "red"
    assert reply.payload["reason"] == reason
    assert reply.payload["message"] == message
    assert await premises.rows("SELECT COUNT(*) FROM sessions") == [(0,)]
    decided = await premises.rows("SELECT json_extract(data, '$.reason') FROM events WHERE type = 'access.decided'")
    assert decided == [(reason,)]


async def test_english_messages(premises_factory: PremisesFactory) -> None:
    premises = await premises_factory(agent={"language": "en"})
    async with premises.reader("r1") as r:
        assert (await r.tap(BRUNO)).payload["message"] == "Welcome, Bruno!"
        assert (await r.tap(UNKNOWN)).payload["message"] == "Access denied: unknown card"


async def test_second_tap_after_grace_checks_out_before_it_is_denied(premises: Premises) -> None:
    async with premises.reader("r1") as r:
        checkin = await r.tap(BRUNO)
        premises.clock.advance(10)
        early = await r.tap(BRUNO)
        premises.clock.advance(55)
        checkout = await r.tap(BRUNO)
    assert checkin.payload["action"] == "checkin"
    assert early.payload["reason"] == "already_in_session"
    assert checkout.payload["action"] == "checkout"
    assert checkout.payload["session_id"] == checkin.payload["session_id"]
    assert checkout.payload["message"] == "Até logo, Bruno!"
    rows = await premises.rows("SELECT end_reason, ended_at - started_at FROM sessions")
    assert rows == [("tap", 65_000)]
    ended = await premises.rows("SELECT data FROM events WHERE type = 'session.ended'")
    assert json.loads(ended[0][0])["duration_minutes"] == 2


async def test_second_tap_policy_deny(premises_factory: PremisesFactory) -> None:
    premises = await premises_factory(policy={"second_tap": "deny"})
    async with premises.reader("r1") as r:
        await r.tap(BRUNO)
        premises.clock.advance(3600)
        assert (await r.tap(BRUNO)).payload["reason"] == "already_in_session"


async def test_member_on_one_court_is_refused_on_another(premises: Premises) -> None:
    async with premises.reader("r1") as r1, premises.reader("r2") as r2:
        assert (await r1.tap(BRUNO)).payload["action"] == "checkin"
        premises.clock.advance(120)
        reply = await r2.tap(BRUNO)
    assert reply.payload["reason"] == "already_in_session"


async def test_out_reader_checks_out(premises: Premises) -> None:
    async with premises.reader("r1") as r1, premises.reader("rx") as rx:
        opened = await r1.tap(BRUNO)
        closed = await rx.tap(BRUNO)  # an exit reader needs no grace period
    assert closed.payload["action"] == "checkout"
    assert closed.payload["session_id"] == opened.payload["session_id"]


async def test_repeated_msg_id_is_answered_again_not_decided_twice(premises: Premises) -> None:
    async with premises.reader("r1") as r:
        first = await r.tap(ANA, msg_id="same-id")
        premises.clock.advance(120)  # past debounce and grace: only the msg_id protects us
        again = await r.tap(ANA, msg_id="same-id")
    assert again.payload == first.payload
    assert await premises.rows("SELECT COUNT(*) FROM sessions") == [(1,)]
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'access.decided'") == [(1,)]
    assert premises.metric("answers_replayed_total", why="msg_id") == 1


async def test_same_card_within_debounce_gets_the_same_answer_without_effect(premises: Premises) -> None:
    async with premises.reader("r1") as r:
        first = await r.tap(BRUNO)
        premises.clock.advance(1)
        second = await r.tap(BRUNO)
    assert second.payload["action"] == "checkin"
    assert second.payload["session_id"] == first.payload["session_id"]
    assert second.payload["msg_id"] != first.payload["msg_id"]
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'access.decided'") == [(1,)]
    assert premises.metric("answers_replayed_total", why="debounce") == 1


async def test_tablet_checkin_by_member_code_and_checkout(premises: Premises) -> None:
    async with premises.tablet("t1") as tablet:
        checkin = await tablet.checkin("c1", member_code="1002")
        assert checkin.payload["status"] == "granted"
        assert checkin.payload["message"] == "Bem-vindo, Bruno!"
        unknown = await tablet.checkin("c1", member_code="9999")
        assert unknown.payload["reason"] == "unknown_card"
        premises.clock.advance(30 * 60)
        checkout = await tablet.checkout("c1", checkin.payload["session_id"])
        again = await tablet.checkout("c1", checkin.payload["session_id"])
    assert checkout.payload["status"] == "ok"
    assert checkout.payload["duration_minutes"] == 30
    assert again.payload["reason"] == "no_open_session"
    assert await premises.rows("SELECT opened_by, end_reason FROM sessions") == [("t1", "tablet")]


async def test_tablet_cannot_act_on_a_court_it_does_not_serve(premises: Premises) -> None:
    async with premises.tablet("t1") as tablet:
        # t1 serves c1 only: the broker drops its publish to court/c2/checkin (ACL), so no answer comes.
        with pytest.raises(TimeoutError):
            await tablet.checkin("c2", member_code="1002", reply_within=1.0)
    assert await premises.rows("SELECT COUNT(*) FROM sessions") == [(0,)]
    if premises.embedded:  # mosquitto's refusals are in mosquitto's log
        assert premises.metric("messages_rejected_total", kind="acl_publish", reason="denied") >= 1


async def test_button_press_creates_a_highlight_with_the_reference_window(premises: Premises) -> None:
    async with premises.reader("r1") as r, premises.button("b1") as button:
        lonely = await button.press()
        opened = await r.tap(BRUNO)
        premises.clock.advance(5)
        early = await button.press()
        premises.clock.advance(60)
        later = await button.press(kind="long")
    assert lonely.payload["status"] == "no_session"
    assert early.payload["status"] == "ok"
    # 5 s into the session: start is clamped to the session start (max(0, press - 10 s)).
    assert early.payload["start_at"] == "2026-03-02T15:00:00.000Z"
    assert later.payload["start_at"] == "2026-03-02T15:00:55.000Z"
    assert later.payload["duration_s"] == 30
    rows = await premises.rows("SELECT session_id, kind FROM highlights ORDER BY pressed_at")
    assert rows == [(None, "short"), (opened.payload["session_id"], "short"), (opened.payload["session_id"], "long")]
    events = await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'highlight.created'")
    assert events == [(3,)]


async def test_court_state_counts_highlights_of_the_current_occupation(premises: Premises) -> None:
    async with premises.reader("r1") as r, premises.button("b1") as button:
        await r.tap(BRUNO)
        await button.press()
        await button.press()
    assert premises.agent.service is not None
    state = await premises.agent.service.court_state("c1")
    assert state["occupied"] is True
    assert state["highlight_count"] == 2


async def test_tablet_heartbeat_updates_presence(premises: Premises) -> None:
    async with premises.tablet("t1") as tablet:
        await tablet.heartbeat(battery=41, app_version="2.3.0")
        seen = premises.agent.presence.get("t1")
        assert seen is not None
        for _ in range(50):
            if seen.info:
                break
            await asyncio.sleep(0.02)
        assert seen.online
    assert seen.info == {"battery": 41, "app_version": "2.3.0"}
    assert premises.metric("heartbeats_total", kind="tablet") == 1


async def test_agent_status_is_retained_online_and_offline_on_clean_stop(premises_factory: PremisesFactory) -> None:
    premises = await premises_factory()
    async with premises.client("d1") as display:
        await display.subscribe("agent/status", qos=1)
        online = await next_message(display, "agent/status")
        assert online["state"] == "online"
        assert online["agent_id"] == "edge-test"
        assert premises.agent.dispatcher is not None
        await premises.agent.dispatcher.announce_offline()
        offline = await next_message(display, "agent/status")
    assert offline["state"] == "offline"


async def test_sessions_nobody_closes_end_by_themselves(premises: Premises) -> None:
    async with premises.reader("r1") as r:
        await r.tap(BRUNO)
    assert premises.agent.service is not None
    premises.clock.advance(119 * 60)
    assert await premises.agent.service.sweep() == frozenset()
    premises.clock.advance(60)
    assert await premises.agent.service.sweep() == frozenset({"c1"})
    assert await premises.rows("SELECT end_reason FROM sessions") == [(Reason.AUTO_TIMEOUT.value,)]
    ended = await premises.rows("SELECT data FROM events WHERE type = 'session.ended'")
    assert json.loads(ended[0][0])["end_reason"] == "auto_timeout"
    async with premises.reader("r1") as r:
        assert (await r.tap(BRUNO)).payload["action"] == "checkin"


async def test_stale_member_list_refuses_unknown_cards_but_lets_members_in(premises_factory: PremisesFactory) -> None:
    premises = await premises_factory()
    premises.clock.advance(48 * 3600)  # same time of day, so opening hours do not interfere
    async with premises.reader("r1") as r:
        assert (await r.tap(UNKNOWN)).payload["reason"] == "cache_too_old"
        assert (await r.tap(BRUNO)).payload["action"] == "checkin"


async def test_decisions_record_the_member_list_version(premises: Premises) -> None:
    async with premises.reader("r1") as r:
        await r.tap(BRUNO)
    rows = await premises.rows(
        "SELECT json_extract(data, '$.list_version'), (SELECT version FROM member_list) FROM events"
    )
    assert {a for a, _ in rows} == {rows[0][1]}
    assert rows[0][1] >= 1
