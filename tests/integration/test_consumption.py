"""Bar orders on pos/{tablet}/consumption: recorded against the player's open session with their events in one
transaction, answered once per request_id, refused with a reason when there is nothing to charge."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ANA, BRUNO, Premises, PremisesFactory, next_message
from tests.sandboxes import delivered, exactly_once_in_order, sandbox_overrides

WATER = {"item_id": "agua-500", "name": "Água 500 ml", "quantity": 2, "unit_price": 4.5}
BEER = {"item_id": "chopp", "name": "Chopp", "quantity": 1, "unit_price": 12.9}


async def test_a_tap_at_the_bar_reader_names_the_players_session_and_records_nothing(premises: Premises) -> None:
    async with premises.reader("rb") as bar_reader, premises.reader("r1") as court_reader:
        nobody = (await bar_reader.tap(ANA)).payload
        assert (nobody["status"], nobody["reason"], nobody["pos"]) == ("denied", "no_open_session", "bar-1")
        assert nobody["message"] == "Nenhuma sessão aberta para este cartão"
        assert (await bar_reader.tap("DEADBEEF02")).payload["reason"] == "unknown_card"
        session_id = (await court_reader.tap(ANA)).payload["session_id"]
        before = await premises.rows("SELECT count(*) FROM events")
        picked = (await bar_reader.tap(ANA)).payload
    assert picked["status"] == "granted"
    assert picked["color"] == "green"
    assert (picked["session_id"], picked["first_name"], picked["court_id"]) == (session_id, "Ana", "c1")
    assert picked["message"] == "Ana: pedido no bar"
    assert picked["action"] == "none"  # no check-in, no checkout: the bar decides nothing
    assert await premises.rows("SELECT count(*) FROM events") == before
    assert await premises.rows("SELECT count(*) FROM sessions WHERE ended_at IS NULL") == [(1,)]


async def test_an_order_by_card_is_charged_to_the_open_session(premises: Premises) -> None:
    async with premises.reader("r1") as reader, premises.tablet("desk") as bar:
        session_id = (await reader.tap(BRUNO)).payload["session_id"]
        reply = (await bar.order([WATER, BEER], card_id=BRUNO, request_id="ord-1")).payload
    assert reply["status"] == "ok"
    assert reply["session_id"] == session_id
    assert reply["lines"] == 2
    assert reply["total"] == 21.9  # 2 x 4.50 + 12.90, in cents underneath
    assert reply["session_total"] == 21.9
    lines = await premises.rows(
        "SELECT line_no, item_id, quantity, unit_cents, total_cents, session_id FROM consumption ORDER BY line_no"
    )
    assert lines == [(1, "agua-500", 2, 450, 900, session_id), (2, "chopp", 1, 1290, 1290, session_id)]
    events = await premises.rows(
        "SELECT json_extract(data, '$.unit_price'), json_extract(data, '$.total_price'), session_id, device_id"
        " FROM events WHERE type = 'consumption.recorded' ORDER BY seq"
    )
    assert events == [(4.5, 9.0, session_id, "desk"), (12.9, 12.9, session_id, "desk")]
    # one delivery row per line and destination, once queued (as the destinations' workers do)
    await premises.queue_deliveries()
    assert await premises.rows(
        "SELECT d.destination, COUNT(*) FROM deliveries d JOIN events e ON e.seq = d.seq"
        " WHERE e.type = 'consumption.recorded' GROUP BY 1 ORDER BY 1"
    ) == [("cloud", 2), ("ziggy", 2)]


async def test_the_same_request_id_is_answered_again_and_never_charged_twice(premises: Premises) -> None:
    async with premises.reader("r1") as reader, premises.tablet("desk") as bar:
        session_id = (await reader.tap(BRUNO)).payload["session_id"]
        first = (await bar.order([BEER], session_id=session_id, request_id="ord-7")).payload
        again = (await bar.order([BEER], session_id=session_id, request_id="ord-7")).payload
        other = (await bar.order([BEER], session_id=session_id, request_id="ord-8")).payload
    assert again == first
    assert other["session_total"] == 25.8
    assert premises.metric("answers_replayed_total", why="msg_id") == 1
    assert await premises.rows("SELECT request_id, COUNT(*) FROM consumption GROUP BY 1 ORDER BY 1") == [
        ("ord-7", 1),
        ("ord-8", 1),
    ]


async def test_nothing_is_charged_without_an_open_session(premises: Premises) -> None:
    async with premises.reader("r1") as reader, premises.tablet("desk") as bar:
        no_session = (await bar.order([BEER], card_id=BRUNO)).payload
        session_id = (await reader.tap(BRUNO)).payload["session_id"]
        premises.clock.advance(seconds=120)
        await reader.tap(BRUNO)  # checkout
        closed = (await bar.order([BEER], session_id=session_id)).payload
        unknown = (await bar.order([BEER], session_id="no-such-session")).payload
    for reply in (no_session, closed, unknown):
        assert reply["status"] == "denied"
        assert reply["reason"] == "no_open_session"
    assert await premises.rows("SELECT COUNT(*) FROM consumption") == [(0,)]
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'consumption.recorded'") == [(0,)]


@pytest.mark.parametrize(
    ("order", "detail"),
    [
        ({"items": [BEER]}, "exactly one of session_id or card_id"),
        ({"card_id": BRUNO, "session_id": "s", "items": [BEER]}, "exactly one of session_id or card_id"),
        ({"card_id": BRUNO, "items": []}, "items"),
        ({"card_id": BRUNO, "items": [{**BEER, "unit_price": -1}]}, "unit_price"),
        ({"card_id": BRUNO, "items": [{**BEER, "unit_price": 1.005}]}, "unit_price"),
        ({"card_id": BRUNO, "items": [{**BEER, "unit_price": "12,90"}]}, "unit_price"),
        ({"card_id": BRUNO, "items": [{**BEER, "quantity": 0}]}, "quantity"),
        ({"card_id": BRUNO, "items": [{"item_id": "x", "quantity": 1, "unit_price": 1}]}, "name"),
    ],
)
async def test_a_malformed_order_is_refused_with_the_field_named(
    premises: Premises, order: dict[str, Any], detail: str
) -> None:
    async with premises.reader("r1") as reader, premises.client("desk", identifier="desk-raw") as raw:
        await reader.tap(BRUNO)
        await raw.subscribe("tablet/desk/response", qos=1)
        await raw.publish("pos/desk/consumption", json.dumps({"request_id": "bad-1", **order}), qos=1)
        reply = await next_message(raw, "tablet/desk/response")
    assert reply["status"] == "invalid"
    assert reply["request_id"] == "bad-1"
    assert detail in reply["detail"]
    assert premises.metric("messages_rejected_total", kind="consumption", reason="invalid_field") == 1
    assert await premises.rows("SELECT COUNT(*) FROM consumption") == [(0,)]


async def test_only_a_configured_tablet_is_a_point_of_sale(premises: Premises) -> None:
    # The ACL already keeps a reader off pos/…; a tablet may only sell as itself.
    async with premises.client("desk", identifier="desk-raw") as raw:
        await raw.subscribe("tablet/t1/response", qos=1)
        await raw.publish("pos/t1/consumption", json.dumps({"card_id": BRUNO, "items": [BEER]}), qos=1)
        with pytest.raises(TimeoutError):
            await next_message(raw, "tablet/t1/response", within=0.5)
    assert await premises.rows("SELECT COUNT(*) FROM consumption") == [(0,)]


@pytest.mark.embedded_only  # the outbox does not depend on the broker
async def test_consumption_reaches_ziggy_with_its_session_id_between_checkin_and_checkout(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory()
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    async with premises.reader("r1") as reader, premises.tablet("desk") as bar:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"
        assert (await bar.order([WATER, BEER], card_id=ANA)).payload["status"] == "ok"
        premises.clock.advance(seconds=300)
        assert (await reader.tap(ANA)).payload["action"] == "checkout"
    await delivered(premises)
    exactly_once_in_order(server, await premises.rows("SELECT event_id, type FROM events ORDER BY seq"))
    calls = [e for e in server.sandbox.log if e["kind"] == "call" and e["route"].startswith("ziggy.")]
    assert [c["route"] for c in calls] == [
        "ziggy.checkin",
        "ziggy.consumption.record",
        "ziggy.consumption.record",
        "ziggy.checkout",
    ]
    [(theirs,)] = await premises.rows("SELECT ziggy_session_id FROM ziggy_sessions")
    session = server.sandbox.ziggy.sessions[theirs]
    assert [(line["item_id"], line["quantity"], line["total_price"]) for line in session.lines] == [
        ("agua-500", 2, Decimal("9.00")),
        ("chopp", 1, Decimal("12.90")),
    ]
    assert session.checked_out_at is not None
    assert session.total == Decimal("21.90")


async def test_a_line_voided_before_ziggy_heard_of_it_is_never_sent_there(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # Ziggy is down for the first two calls: the order's lines wait in the outbox while the beer is voided.
    server = await sandbox_factory({"endpoint": "ziggy.consumption.record", "kind": "503", "count": 2})
    premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    service = premises.agent.service
    assert service is not None
    async with premises.reader("r1") as reader, premises.tablet("desk") as bar:
        assert (await reader.tap(ANA)).payload["action"] == "checkin"
        assert (await bar.order([WATER, BEER], card_id=ANA)).payload["status"] == "ok"
    [(beer,)] = await premises.rows("SELECT line_id FROM consumption WHERE item_id = 'chopp'")
    voided = await service.void_consumption("desk", "void-1", beer, "charged to the wrong player")
    assert voided.response["session_total"] == 9.0
    await delivered(premises, within=30)
    [(theirs,)] = await premises.rows("SELECT ziggy_session_id FROM ziggy_sessions")
    lines = server.sandbox.ziggy.sessions[theirs].lines
    assert [line["item_id"] for line in lines] == ["agua-500"]  # the beer never reached Ziggy
    cloud = [e for e in server.sandbox.log if e["kind"] == "event"]
    assert [e["type"] for e in cloud].count("consumption.voided") == 1  # the cloud hears of the void
