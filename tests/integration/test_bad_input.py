"""Hostile and broken device input: each is rejected or answered with a reason, counted, logged once;
the agent keeps answering and loses nothing."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from agent.logs import OnceLogger, get_logger
from tests.conftest import BRUNO, Premises, PremisesFactory, next_message


async def _raw_scan(premises: Premises, payload: bytes, *, retain: bool = False) -> dict[str, object]:
    async with premises.client("r1", identifier="r1-raw") as raw:
        await raw.subscribe("rfid/r1/response", qos=1)
        await raw.publish("rfid/r1/scan", payload, qos=1, retain=retain)
        return await next_message(raw, "rfid/r1/response")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe\x00", "not_utf8"),
        (b"[1, 2, 3]", "not_object"),
        (b'{"card_id": 1234, "msg_id": "m-types"}', "invalid_field"),
        (b'{"card_id": "ZZ-not-hex", "msg_id": "m-hex"}', "invalid_field"),
        (b'{"msg_id": "m-missing"}', "invalid_field"),
        (json.dumps({"card_id": "04AA", "pad": "x" * 5000}).encode(), "oversized"),
        (b"[" * 3000 + b"]" * 3000, "oversized"),
    ],
)
async def test_malformed_scan_is_denied_with_invalid_request(premises: Premises, payload: bytes, reason: str) -> None:
    reply = await _raw_scan(premises, payload)
    assert reply["status"] == "denied"
    assert reply["reason"] == "invalid_request"
    if b'"msg_id": "m-' in payload:
        assert str(reply["msg_id"]).startswith("m-")
    assert premises.metric("messages_rejected_total", kind="scan", reason=reason) == 1
    assert await premises.rows("SELECT COUNT(*) FROM events") == [(0,)]
    async with premises.reader("r1") as r:  # and the door still works
        assert (await r.tap(BRUNO)).payload["status"] == "granted"


async def test_unknown_fields_are_ignored(premises: Premises) -> None:
    reply = await _raw_scan(premises, json.dumps({"card_id": BRUNO, "msg_id": "x1", "firmware": "9.9"}).encode())
    assert reply["status"] == "granted"


async def test_card_ids_are_normalised(premises: Premises) -> None:
    pretty = ":".join(BRUNO[i : i + 2] for i in range(0, len(BRUNO), 2)).lower()
    reply = await _raw_scan(premises, json.dumps({"card_id": pretty}).encode())
    assert reply["status"] == "granted"
    assert await premises.rows("SELECT card_id FROM sessions") == [(BRUNO,)]


async def test_stored_retained_scan_is_never_acted_on_and_is_cleared(premises: Premises) -> None:
    # Live, a retained publish reaches the agent with RETAIN=0 (MQTT-3.3.1-9): it is a real tap.
    reply = await _raw_scan(premises, json.dumps({"card_id": BRUNO, "msg_id": "r-1"}).encode(), retain=True)
    assert reply["action"] == "checkin"
    # The stored copy arrives with RETAIN=1 whenever the agent subscribes again (as after a reconnect).
    dispatcher = premises.agent.dispatcher
    assert dispatcher is not None
    for _ in range(2):
        await dispatcher.subscribe_all()
        for _ in range(25):
            await asyncio.sleep(0.02)
    assert premises.metric("messages_rejected_total", kind="scan", reason="retained_command") == 1
    assert await premises.rows("SELECT COUNT(*) FROM events WHERE type = 'access.decided'") == [(1,)]


async def test_unknown_reader_is_refused_by_the_service(premises: Premises) -> None:
    assert premises.agent.service is not None
    outcome = await premises.agent.service.scan("ghost", BRUNO, "m1")
    assert outcome.response["reason"] == "unknown_reader"
    assert outcome.response["msg_id"] == "m1"
    assert await premises.rows("SELECT COUNT(*) FROM events") == [(0,)]


async def test_a_reader_cannot_speak_for_another_reader(premises: Premises) -> None:
    async with premises.client("r1", identifier="r1-raw") as raw:
        await raw.publish("rfid/r2/scan", json.dumps({"card_id": BRUNO}).encode(), qos=1)
        await raw.publish("court/c1/button/pressed", json.dumps({"button_id": "b1"}).encode(), qos=1)
    async with premises.reader("r2") as r2:  # a round trip through the agent after the forged messages
        await r2.tap("0102030405")
    assert await premises.rows("SELECT COUNT(*) FROM sessions") == [(0,)]
    assert await premises.rows("SELECT COUNT(*) FROM highlights") == [(0,)]
    if premises.embedded:  # mosquitto's refusals are in mosquitto's log
        assert premises.metric("messages_rejected_total", kind="acl_publish", reason="denied") == 2


async def test_unknown_button_and_bad_press_get_an_invalid_ack(premises: Premises) -> None:
    async with premises.client("b1", identifier="b1-raw") as raw:
        await raw.subscribe("court/c1/button/ack", qos=1)
        await raw.publish("court/c1/button/pressed", b'{"button_id": "b9", "msg_id": "p1"}', qos=1)
        unknown = await next_message(raw, "court/c1/button/ack")
        await raw.publish("court/c1/button/pressed", b'{"button_id": "b1", "kind": "double"}', qos=1)
        bad = await next_message(raw, "court/c1/button/ack")
    assert (unknown["status"], unknown["reason"]) == ("invalid", "unknown_button")
    assert (bad["status"], bad["reason"]) == ("invalid", "invalid_request")
    assert await premises.rows("SELECT COUNT(*) FROM highlights") == [(0,)]


async def test_tablet_with_both_card_and_code_is_told_what_is_wrong(premises: Premises) -> None:
    async with premises.client("t1", identifier="t1-raw") as raw:
        await raw.subscribe("tablet/t1/response", qos=1)
        body = {"tablet_id": "t1", "msg_id": "c1", "card_id": BRUNO, "member_code": "1002"}
        await raw.publish("court/c1/checkin", json.dumps(body).encode(), qos=1)
        reply = await next_message(raw, "tablet/t1/response")
    assert reply["status"] == "invalid"
    assert "exactly one of card_id or member_code" in str(reply["detail"])


async def test_a_flooding_reader_is_rate_limited_and_others_are_still_served(
    premises_factory: PremisesFactory,
) -> None:
    premises = await premises_factory(policy={"scan_rate_per_s": 2, "scan_burst": 5})
    async with premises.client("r1", identifier="r1-flood") as flood:
        await flood.subscribe("rfid/r1/response", qos=1)
        for i in range(200):
            await flood.publish("rfid/r1/scan", json.dumps({"card_id": f"AA{i:08X}", "msg_id": f"f{i}"}), qos=0)
        told = await next_message(flood, "rfid/r1/response")
        while told["reason"] != "rate_limited":
            told = await next_message(flood, "rfid/r1/response")
        async with premises.reader("r2") as r2:
            reply = await r2.tap(BRUNO)
    assert reply.payload["status"] == "granted"
    assert reply.latency_s < 1.0
    decided = (await premises.rows("SELECT COUNT(*) FROM events WHERE device_id = 'r1'"))[0][0]
    assert 5 <= decided <= 10  # the burst, plus what the refill allowed while the flood arrived
    assert premises.metric("messages_rejected_total", kind="scan", reason="rate_limited") >= 150


def test_repeated_device_errors_are_logged_once_then_at_debug() -> None:
    once = OnceLogger(get_logger("test"), capacity=2)
    with capture_logs() as logs:
        for _ in range(3):
            once.warning("bad_frame", "r1", reader="r1")
        once.warning("bad_frame", "r2", reader="r2")
        once.warning("bad_frame", "r3", reader="r3")  # r1 is forgotten (capacity 2) ...
        once.warning("bad_frame", "r1", reader="r1")  # ... so it warns again, once
    levels = [(entry["log_level"], entry["reader"]) for entry in logs]
    assert levels == [
        ("warning", "r1"),
        ("debug", "r1"),
        ("debug", "r1"),
        ("warning", "r2"),
        ("warning", "r3"),
        ("warning", "r1"),
    ]


async def test_store_failure_denies_instead_of_granting_unrecorded(premises: Premises) -> None:
    db = premises.agent.db
    assert db is not None
    # A read-only store (full disk, failing SD card) must never lead to an unrecorded "granted".
    await db.conn.execute("PRAGMA query_only = ON")
    try:
        async with premises.reader("r1") as r:
            reply = await r.tap(BRUNO)
    finally:
        await db.conn.execute("PRAGMA query_only = OFF")
    assert reply.payload["status"] == "denied"
    assert reply.payload["reason"] == "unavailable"
    assert premises.metric("store_errors_total", doing="decision") == 1
    async with premises.reader("r1") as r:
        assert (await r.tap(BRUNO)).payload["status"] == "granted"
